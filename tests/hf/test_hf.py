"""Hugging Face transformers integration: config, cache, generate(), Auto classes, pipeline."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

import samout  # noqa: E402  (registers with the Auto classes)
from samout import SamOut, SamOutConfig  # noqa: E402
from samout.hf import SamOutCache, SamOutForCausalLM, SamOutHFConfig, SamOutTokenizer  # noqa: E402
from samout.hf.configuration_samout import SAMOUT_FIELDS  # noqa: E402
from tests.helpers import MODEL_VARIANTS  # noqa: E402
from tests.tiny_run import PROMPT, make_run_dir, samout_greedy  # noqa: E402

VARIANTS = list(MODEL_VARIANTS)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("run")
    torch.manual_seed(1234)
    make_run_dir(path, shakespeare_text)
    return path


@pytest.fixture(scope="module")
def hf_model(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(run_dir):
    return AutoTokenizer.from_pretrained(run_dir)


def tiny_hf(**overrides) -> SamOutForCausalLM:
    config = SamOutHFConfig(**{**dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4), **overrides})
    model = SamOutForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)  # decisive argmax / beam choices
    return model


# -- config ---------------------------------------------------------------------

def test_config_has_exactly_samouts_fields():
    assert set(SAMOUT_FIELDS) == {f.name for f in dataclasses.fields(SamOutConfig)} - {"model_type"}
    for name in SAMOUT_FIELDS:
        assert getattr(SamOutHFConfig(), name) == getattr(SamOutConfig(), name), name


def test_config_reads_a_samout_config_json_and_round_trips(run_dir, tmp_path):
    config = AutoConfig.from_pretrained(run_dir)
    assert isinstance(config, SamOutHFConfig)
    assert config.to_samout_config() == SamOutConfig.from_json(run_dir / "config.json")
    assert (config.eos_token_id, config.pad_token_id, config.num_hidden_layers) == (1, 0, config.num_layers)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "samout" and saved["format_version"] == 1
    assert SamOutConfig.from_json(tmp_path / "config.json") == config.to_samout_config()


def test_config_rejects_bad_values_with_samouts_message():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SamOutHFConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown mixer"):
        SamOutHFConfig(mixer="attention")


# -- forward and cache ----------------------------------------------------------

def test_weights_are_samouts_and_forward_is_samouts(run_dir, hf_model, seed):
    core = SamOut.from_pretrained(run_dir)
    assert hf_model.state_dict().keys() == core.state_dict().keys()
    for k, v in core.state_dict().items():
        assert torch.equal(v, hf_model.state_dict()[k]), k
    ids = torch.randint(0, core.config.vocab_size, (2, 9))
    out = hf_model(ids)
    ref, ref_state = core(ids)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    assert out.past_key_values.state.equal(ref_state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_forward_with_cache_equals_one_call(seed, variant):
    model = tiny_hf(**MODEL_VARIANTS[variant])
    ids = torch.randint(0, 97, (3, 12))
    full = model(ids, use_cache=False)
    assert full.past_key_values is None
    cache = None
    chunks = []
    for piece in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):
        out = model(piece, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        chunks.append(out.logits)
    # Float rounding of a differently chunked computation (attention layers' softmax over
    # other shapes): within 1e-5 of the logits' scale, the rule of tests/models.
    scale = float(full.logits.detach().abs().max())
    torch.testing.assert_close(torch.cat(chunks, 1), full.logits, rtol=1e-5, atol=1e-5 * scale)
    assert cache.get_seq_length() == 12


def test_cache_counts_tokens_but_never_grows(seed):
    model = tiny_hf()
    out = model(torch.randint(0, 97, (2, 3)))
    cache = out.past_key_values
    size = cache.state.nbytes
    for _ in range(20):
        cache = model(torch.randint(0, 97, (2, 1)), past_key_values=cache).past_key_values
    assert cache.get_seq_length() == 23
    assert cache.state.nbytes == size
    assert cache.get_max_length() == -1 and cache.batch_size == 2 and len(cache) == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_reorder_is_state_index_select(seed, variant):
    model = tiny_hf(**MODEL_VARIANTS[variant])
    cache = model(torch.randint(0, 97, (4, 6))).past_key_values
    before = cache.state.clone()
    idx = torch.tensor([2, 2, 0, 3])
    cache.reorder_cache(idx)
    assert cache.state.equal(before.index_select(idx))
    assert not cache.state.equal(before)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_labels_give_the_shifted_cross_entropy(seed):
    model = tiny_hf()
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_unsupported_inputs_are_refused_with_clear_errors(seed):
    model = tiny_hf()
    with pytest.raises(ValueError, match="inputs_embeds are not supported"):
        model(inputs_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="no attentions"):
        model(torch.randint(0, 97, (1, 3)), output_attentions=True)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[5, 97]]))


def test_a_kv_cache_is_refused_with_a_clear_error(seed):
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="must be a SamOutCache"):
        tiny_hf()(torch.randint(0, 97, (1, 3)), past_key_values=DynamicCache())


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_state_is_taken_under_either_cache_name(seed, name):
    # transformers 5.24 renamed the argument (`past_key_values` -> `cache`); both must
    # continue the state, or generate() silently restarts from nothing at every step.
    model = tiny_hf()
    ids = torch.randint(0, 97, (2, 9))
    full = model(ids, use_cache=False).logits
    first = model(ids[:, :5])
    cache = first.cache if hasattr(first, "cache") else first.past_key_values
    rest = model(ids[:, 5:], **{name: cache}).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full)


def test_a_cache_under_another_name_or_both_names_is_refused(seed):
    model = tiny_hf()
    ids = torch.randint(0, 97, (1, 3))
    out = model(ids)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match="`cache_params`, which SamOut does not read"):
        model(ids, cache_params=cache)


def test_generate_feeds_exactly_the_tokens_the_state_has_not_absorbed(seed):
    # However generate() slices the inputs, the state decides what is fed next.
    model = tiny_hf()
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids[:, :4])
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    inputs = model.prepare_inputs_for_generation(ids, cache=cache, next_sequence_length=1)
    assert torch.equal(inputs["input_ids"], ids[:, 4:])
    with pytest.raises(RuntimeError, match="absorbed 4 tokens of a 4-token"):
        model.prepare_inputs_for_generation(ids[:, :4], cache=cache, next_sequence_length=1)


# -- generate() -----------------------------------------------------------------

class InputLengths:
    """Records the time length of every forward call (to see what generate() feeds)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(ids.shape[1])

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_cache_equals_without_cache_and_samouts_own_decoding(seed, variant):
    model = tiny_hf(mixer="openash", **MODEL_VARIANTS[variant])
    ids = torch.randint(2, 97, (2, 7))
    steps = 24
    rec = InputLengths(model)
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with_cache = model.generate(ids, **kw)
    cached_lengths, rec.lengths = rec.lengths, []
    no_cache = model.generate(ids, use_cache=False, **kw)
    rec.close()
    # With the cache the prompt goes in once, then one token per step; without it the
    # whole prefix is recomputed every step.
    assert cached_lengths == [7] + [1] * (steps - 1)
    assert rec.lengths == list(range(7, 7 + steps))
    assert torch.equal(with_cache, no_cache)
    # samout's own state passing; min_new_tokens only bans end-of-text, so compare the
    # rows while neither produced it.
    ref = samout_greedy(model.samout, ids, steps)
    assert with_cache.shape == ref.shape
    keep = (ref[:, 7:] == 1).cumsum(1) == 0  # positions before samout's first end-of-text
    assert torch.equal(with_cache[:, 7:][keep], ref[:, 7:][keep])


def test_greedy_text_matches_samouts_generator(hf_model, hf_tokenizer):
    generation = pytest.importorskip("samout.generation",
                                     reason="samout's generator (pipeline) not merged yet")
    from tokenizers import Tokenizer

    for prompt in (PROMPT, "Thou art"):
        # The tokenizer adds nothing (lm-eval adds its own prefix); samout's generator puts
        # <|endoftext|> (the bos token) before the prompt, so do the same here.
        ids = torch.tensor([[hf_tokenizer.bos_token_id] + hf_tokenizer(prompt).input_ids])
        raw = Tokenizer.from_file(str(Path(hf_tokenizer.name_or_path) / "tokenizer.json"))
        assert ids[0].tolist() == generation.encode_prompt(raw, prompt)
        out = hf_model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        own = list(generation.stream_ids(hf_model.samout, ids[0].tolist(), max_new_tokens=40,
                                         temperature=0.0))
        assert out[: len(own)] == own
        assert out[len(own):] in ([], [1])  # HF keeps the end-of-text token it stopped at


def test_greedy_matches_samout_without_any_token_ban(seed):
    model = tiny_hf()
    model.generation_config.eos_token_id = None  # run the full length
    ids = torch.randint(2, 97, (3, 5))
    out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(out, samout_greedy(model.samout, ids, 20))


def reference_beam_search(model: SamOut, prompt: torch.Tensor, beams: int, steps: int, banned: int):
    """Plain beam search on samout's State (no end-of-text: `banned` is never chosen)."""
    logits, state = model(prompt)
    scores = torch.log_softmax(logits[0, -1].float(), -1)
    scores[banned] = -float("inf")
    scores, tokens = scores.topk(beams)
    seqs = torch.cat([prompt.repeat(beams, 1), tokens[:, None]], 1)
    state = state.index_select(torch.zeros(beams, dtype=torch.long))
    for _ in range(steps - 1):
        logits, state = model(seqs[:, -1:], state)
        logp = torch.log_softmax(logits[:, -1].float(), -1)
        logp[:, banned] = -float("inf")
        total = (scores[:, None] + logp).flatten()
        scores, flat = total.topk(beams)
        beam, tok = flat // logp.shape[1], flat % logp.shape[1]
        seqs = torch.cat([seqs[beam], tok[:, None]], 1)
        state = state.index_select(beam)
    return seqs[scores.argmax()]


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_with_cache_equals_without_and_a_reference(seed, variant):
    model = tiny_hf(**MODEL_VARIANTS[variant])
    ids = torch.randint(2, 97, (2, 6))
    steps, beams = 12, 4
    reorders = []
    original = SamOutCache.reorder_cache

    def spy(self, beam_idx):
        reorders.append(beam_idx.clone())
        return original(self, beam_idx)

    SamOutCache.reorder_cache = spy
    try:
        kw = dict(max_new_tokens=steps, min_new_tokens=steps, num_beams=beams, do_sample=False)
        with_cache = model.generate(ids, **kw)
    finally:
        SamOutCache.reorder_cache = original
    no_cache = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache, no_cache)
    # The cache really was reordered (beams swapped), not just carried along.
    identity = torch.arange(2 * beams)
    assert any(not torch.equal(r, identity) for r in reorders)
    for row in range(2):
        ref = reference_beam_search(model.samout, ids[row : row + 1], beams, steps, banned=1)
        assert torch.equal(with_cache[row], ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_with_cache_equals_without(seed, variant):
    model = tiny_hf(**MODEL_VARIANTS[variant])
    ids = torch.randint(2, 97, (2, 4))
    kw = dict(max_new_tokens=16, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(seed)
    a = model.generate(ids, **kw)
    torch.manual_seed(seed)
    b = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_left_padded_batch_equals_prompts_one_by_one(hf_model, hf_tokenizer):
    prompts = [PROMPT, "Thou art"]
    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the short prompt really is padded on the left
    kw = dict(max_new_tokens=10, do_sample=False)
    out = hf_model.generate(**batch, **kw)
    for row, prompt in enumerate(prompts):
        alone = hf_model.generate(**hf_tokenizer(prompt, return_tensors="pt"), **kw)
        assert hf_tokenizer.decode(out[row], skip_special_tokens=True) == \
            hf_tokenizer.decode(alone[0], skip_special_tokens=True)


@pytest.mark.parametrize("variant", ["decay", "hybrid-swa"])
def test_config_and_weights_of_new_variants_round_trip(tmp_path, seed, variant):
    model = tiny_hf(**MODEL_VARIANTS[variant])
    model.save_pretrained(tmp_path)
    core = samout.load_pretrained(tmp_path)
    assert core.config == model.config.to_samout_config()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(core(ids)[0], model(ids).logits, rtol=0, atol=0)
    if variant == "decay":  # a fresh HF model starts with δ = max_decay_init, as SamOut does
        fresh = tiny_hf(**MODEL_VARIANTS[variant])
        torch.testing.assert_close(fresh.layers[0].mixer.decay(), torch.full((4, 8), 0.05))


def test_left_padding_of_a_hybrid(seed):
    model = tiny_hf(**MODEL_VARIANTS["hybrid"])
    ids = torch.randint(2, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    # Rows of different lengths leave attention states of different lengths: refused.
    with pytest.raises(ValueError, match="attention: prompts of different lengths"):
        model(ids, attention_mask=mask)
    mask[0, :2] = 0  # equal lengths: the same as the unpadded prompts
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 2:], model(ids[:, 2:]).logits)


def test_right_padding_is_refused(hf_model, hf_tokenizer):
    hf_tokenizer.padding_side = "right"
    try:
        batch = hf_tokenizer([PROMPT, "Thou art"], return_tensors="pt", padding=True)
    finally:
        hf_tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="left padding only"):
        hf_model(**batch)


def test_generation_stops_at_end_of_text(run_dir, hf_model):
    assert hf_model.generation_config.eos_token_id == 1
    ids = torch.tensor([[5, 6, 7]])
    first = hf_model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1].item()
    out = hf_model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=first)
    assert out.shape[1] == 4


# -- Auto classes, tokenizer, save/load, pipeline --------------------------------

def test_tokenizer_matches_the_run_dirs_tokenizer_json(run_dir, hf_tokenizer):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    assert isinstance(hf_tokenizer, SamOutTokenizer)
    text = PROMPT + "\nThou art more lovely and more temperate: é 🙂"
    # No token is added by default: lm-evaluation-harness adds its own prefix (bos).
    assert hf_tokenizer(text).input_ids == raw.encode(text).ids
    assert hf_tokenizer.bos_token_id == 1 and hf_tokenizer.add_bos_token is False
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == raw.encode(text).ids
    assert hf_tokenizer.decode(raw.encode(text).ids) == text
    assert hf_tokenizer.decode(hf_tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id) == (0, 1)
    assert hf_tokenizer.padding_side == "left"


def test_save_pretrained_writes_a_samout_run_dir(hf_model, hf_tokenizer, tmp_path, seed):
    hf_model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    core = samout.load_pretrained(tmp_path)
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 8))
    torch.testing.assert_close(core(ids)[0], hf_model(ids).logits, rtol=0, atol=0)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(ids).logits, hf_model(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path)(PROMPT).input_ids == hf_tokenizer(PROMPT).input_ids
    # The saved tokenizer.json is still samout's: bare ids through `tokenizers`.
    from tokenizers import Tokenizer

    bare = hf_tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(PROMPT).ids == bare


def test_tied_head_saves_once_and_loads_both_ways(tmp_path, seed):
    model = tiny_hf(tie_word_embeddings=True)
    assert model.head.weight is model.embed.weight
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.head.weight is again.embed.weight
    ids = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(samout.load_pretrained(tmp_path)(ids)[0], model(ids).logits, rtol=0, atol=0)


def test_pipeline_text_generation_runs(hf_model, hf_tokenizer):
    generator = pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    text = generator(PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ids = hf_tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = samout_greedy(hf_model.samout, ids, 12)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    if 1 not in greedy[0, ids.shape[1]:]:  # no end-of-text: the whole continuation is there
        assert text == hf_tokenizer.decode(greedy[0], skip_special_tokens=True)


def test_import_samout_is_enough_for_the_auto_classes(run_dir):
    # A fresh interpreter: `import samout` must not import transformers (slow), yet the
    # Auto classes imported afterwards know "samout".
    code = f"""
import sys
import samout
assert "transformers" not in sys.modules, "import samout imported transformers"
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(run_dir)!r})
tok = AutoTokenizer.from_pretrained({str(run_dir)!r})
ids = tok({PROMPT!r}, return_tensors="pt").input_ids
print(type(model).__name__, type(tok).__name__, model.generate(ids, max_new_tokens=3).shape[1] - ids.shape[1])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["SamOutForCausalLM", "SamOutTokenizer", "3"]


def test_transformers_imported_before_samout_also_registers():
    code = "import transformers, samout\nfrom transformers import AutoConfig\n" \
           "print(type(AutoConfig.for_model('samout')).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("SamOutHFConfig")


def test_a_damaged_run_directory_is_named_not_loaded(tmp_path, trained_run):
    import shutil

    from samout.run_dir import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert AutoModelForCausalLM.from_pretrained(run).config.hidden_size == 64  # intact: loads
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(run)
