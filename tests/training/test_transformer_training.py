"""The Transformer baseline through the same CLI and training code as SamOut (`--arch transformer`)."""

import json

import torch

from samout import SamOutConfig, Transformer, TransformerConfig, load_pretrained
from samout.cli import main
from samout.models.transformer_config import samout_non_embedding_parameters
from tests.fixtures_pipeline import TINY_TRAIN, VOCAB


def _flags(settings):
    return [a for k, v in settings.items() for a in ("--" + k.replace("_", "-"), str(v))]


def test_train_generate_eval_a_transformer(tmp_path, prepared_data, capsys):
    run = tmp_path / "tf"
    code = main(["train", "--data", str(prepared_data), "--out", str(run), "--arch", "transformer",
                 "--preset", "tiny", "--quiet", *_flags(TINY_TRAIN)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == "transformer"
    model = load_pretrained(run)
    assert isinstance(model, Transformer) and model.config.vocab_size == VOCAB
    # The preset's Transformer is the one matched to SamOut's tiny preset at this vocab.
    target = samout_non_embedding_parameters(SamOutConfig.from_preset("tiny", vocab_size=VOCAB))
    assert abs(model.num_parameters(exclude_embeddings=True) - target) <= 0.02 * target
    assert model.config.style == "modern"  # new training runs get the modern baseline
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "KING", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert "KING" in capsys.readouterr().out
    assert main(["eval", str(run), "--max-windows", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"] > 0


def test_transformer_from_preset():
    config = TransformerConfig.from_preset("small", vocab_size=1000, positional="rotary")
    assert (config.vocab_size, config.hidden_size, config.positional) == (1000, 256, "rotary")
    with torch.device("meta"):
        got = Transformer(config).num_parameters(exclude_embeddings=True)
    target = samout_non_embedding_parameters(SamOutConfig.from_preset("small", vocab_size=1000))
    assert abs(got - target) <= 0.02 * target
    explicit = TransformerConfig.from_preset("tiny", ffn_hidden_size=100)
    assert explicit.ffn_hidden_size == 100 and explicit.hidden_size == 64


def test_a_config_file_picks_the_seed_004_baseline():
    from samout.training.config import build_model_config

    _, config = build_model_config({"model_type": "transformer", "baseline": "seed-004"}, VOCAB, "tiny")
    assert config.style == "seed-004" and config.vocab_size == VOCAB
    _, config = build_model_config({"model_type": "transformer", "baseline": "seed-004",
                                    "positional": "rotary", "ffn_hidden_size": 64}, VOCAB, None)
    assert (config.positional, config.norm_type, config.ffn_hidden_size) == ("rotary", "layernorm", 64)
