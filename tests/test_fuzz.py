"""Property-based fuzzing (hypothesis): no input crashes samout. Every outcome is either a
valid result or a clean error (SamoutError / ValueError), never a TypeError, KeyError,
AttributeError, RuntimeError or the like. Example counts are modest to keep the suite fast."""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samout.config import SamOutConfig
from samout.data.dataset import TokenData
from samout.data.prepare import prepare
from samout.errors import SamoutError
from samout.generation import generate, stream_ids
from samout.models.samout import SamOut
from samout.models.transformer_config import TransformerConfig
from samout.tokenizer import EOT_TOKEN, PAD_TOKEN, train_tokenizer
from samout.training.config import TRAIN_FIELDS, load_config_file, resolve_settings

CLEAN = (SamoutError, ValueError)
# SAMOUT_FUZZ_EXAMPLES=2000 for a deeper run than the suite's.
SCALE = max(1, int(os.environ.get("SAMOUT_FUZZ_EXAMPLES", "40"))) / 40
FUZZ = settings(max_examples=int(40 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=int(60 * SCALE), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text with the characters that tend to break things: controls, NUL, line separators,
# combining marks, astral planes, and the special tokens' own spelling.
tricky_text = st.lists(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
    | st.sampled_from(["\x00", "\r", "\n", "\r\n", "\u2028", "\ufeff", "\u0301", "😀", "中文", " ", "\t",
                       PAD_TOKEN, EOT_TOKEN]),
    max_size=30).map("".join)

# Several lines of it, so that many examples are big enough to prepare (two or more pieces).
tricky_lines = st.lists(tricky_text, min_size=0, max_size=25).map("\n".join)
tricky_bytes = st.binary(max_size=3000) | st.tuples(tricky_lines, st.binary(max_size=3)).map(
    lambda t: t[0].encode("utf-8") + t[1])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: (st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6)
MODEL_KEYS = ["vocab_size", "hidden_size", "num_layers", "num_heads", "mixer", "padding_idx", "ffn_mult",
              "tie_word_embeddings", "final_norm", "model_type", "format_version", "preset", "positional",
              "norm", "rope_theta", "ffn_hidden_size"]
config_keys = st.sampled_from(MODEL_KEYS + sorted(TRAIN_FIELDS)) | st.text(max_size=8)
good_values = st.sampled_from([1, 2, 4, 16, 64, 0, -1, 0.5, "tiny", "small", "openash", "gen4", "samout",
                               "transformer", "cpu", "auto", "4m", True, None, 1e-3, "float32"])
config_dicts = st.dictionaries(config_keys, good_values | json_values, max_size=8)


@pytest.fixture(scope="module")
def small_tokenizer(shakespeare_text):
    return train_tokenizer([shakespeare_text[:20_000]], vocab_size=300)


@pytest.fixture(scope="module")
def tiny_model(small_tokenizer):
    torch.manual_seed(0)
    config = SamOutConfig.from_preset("tiny", vocab_size=small_tokenizer.get_vocab_size())
    return SamOut(config).eval()


OUTCOMES: dict[str, int] = {}


def count(test: str, outcome: str) -> None:
    """Tally valid results vs clean errors, so a fuzzer that only ever errors is noticed."""
    OUTCOMES[f"{test}:{outcome}"] = OUTCOMES.get(f"{test}:{outcome}", 0) + 1


def check_prepare(write_input) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.txt"
        write_input(path)
        try:
            meta = prepare([str(path)], Path(tmp) / "data", vocab_size=300, quiet=True)
        except CLEAN:
            count("prepare", "error")
            return
        count("prepare", "ok")
        data = TokenData(Path(tmp) / "data")
        assert data.vocab_size == meta["vocab_size"]
        for split in ("train", "val"):
            assert len(data.splits[split]) == meta["splits"][split]["tokens"] > 0
            assert int(data.splits[split].max()) < data.vocab_size


@FUZZ
@given(raw=tricky_bytes)
def test_prepare_on_arbitrary_bytes(raw):
    check_prepare(lambda path: path.write_bytes(raw))


@FUZZ
@given(text=tricky_lines)
def test_prepare_on_arbitrary_unicode(text):
    check_prepare(lambda path: path.write_text(text, encoding="utf-8"))


@MANY
@given(text=tricky_text)
def test_tokenizer_round_trip_is_lossless(small_tokenizer, text):
    ids = small_tokenizer.encode(text, add_special_tokens=False).ids
    # Text that spells a special token is text, not a document boundary.
    assert 0 not in ids and 1 not in ids
    assert small_tokenizer.decode(ids, skip_special_tokens=True) == text


@FUZZ
@given(data=config_dicts)
def test_model_config_from_arbitrary_dicts(data):
    for cls in (SamOutConfig, TransformerConfig):
        try:
            config = cls.from_dict(data)
        except CLEAN:
            count("model_config", "error")
            continue
        count("model_config", "ok")
        assert cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@FUZZ
@given(text=st.text(max_size=200) | config_dicts.map(json.dumps))
def test_model_config_from_arbitrary_json_text(text):
    try:
        SamOutConfig.from_json(text if text.lstrip().startswith("{") else "{" + text)
    except CLEAN:
        pass


def check_config_file(name: str, content: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(content, encoding="utf-8")
        try:
            model_fields, train_fields = load_config_file(path)
            cfg, model_type, model_config = resolve_settings(model_fields, train_fields, {}, None, None, 300,
                                                             from_file=True)
        except CLEAN:
            count("config", "error")
            return
        count("config", "ok")
        assert cfg.batch_size > 0 and model_config.vocab_size == 300


@FUZZ
@given(data=st.dictionaries(config_keys | st.integers(), good_values | json_values, max_size=8)
       | json_values)
def test_config_files_with_arbitrary_yaml_and_json(data):
    check_config_file("run.yaml", yaml.safe_dump(data, allow_unicode=True))
    try:
        check_config_file("run.json", json.dumps(data))
    except (TypeError, ValueError):  # json.dumps of int keys mixed with str keys: not a file we can write
        pass


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("abc:-[]{}!&*|>'\"#%@` \n\t0123456789.,?")), max_size=80))
def test_config_files_with_arbitrary_yaml_text(text):
    check_config_file("run.yaml", text)
    check_config_file("run.json", text)


# Half plausible values, half anything (nan, inf, negative, subnormal, huge).
number = st.one_of(st.sampled_from([0, 0.0, 0.3, 0.9, 1, 1.0, 1.3, 2.0, 1e-300, 1e300, 5e-324]),
                   st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**6))


@MANY
@given(temperature=number, top_k=st.none() | st.integers(-3, 10**9), top_p=st.none() | number,
       repetition_penalty=st.just(1.0) | number, max_new_tokens=st.integers(-3, 6),
       seed=st.none() | st.integers(0, 2**64) | st.integers(-2**65, 2**65), prompt=tricky_text)
def test_generate_parameters(tiny_model, small_tokenizer, temperature, top_k, top_p, repetition_penalty,
                             max_new_tokens, seed, prompt):
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                  max_new_tokens=max_new_tokens, seed=seed)
    try:
        ids = list(stream_ids(tiny_model, [1] + small_tokenizer.encode(prompt).ids, **params))
        text = generate(tiny_model, small_tokenizer, prompt, **params)
    except CLEAN:
        count("generate", "error")
        return
    count("generate", "ok")
    vocab = small_tokenizer.get_vocab_size()
    assert len(ids) <= max_new_tokens and all(0 <= i < vocab for i in ids)
    assert isinstance(text, str)
    if seed is not None or temperature == 0:  # reproducible
        assert generate(tiny_model, small_tokenizer, prompt, **params) == text


def test_fuzzers_reached_valid_outcomes(tiny_model, small_tokenizer):
    """Each fuzzer produced some valid results too, not only clean errors. A fuzzer that did
    not run in this process (another xdist worker took it, or a -k selection) is run here."""
    fuzzers = {
        "prepare": [test_prepare_on_arbitrary_bytes, test_prepare_on_arbitrary_unicode],
        "model_config": [test_model_config_from_arbitrary_dicts, test_model_config_from_arbitrary_json_text],
        "config": [test_config_files_with_arbitrary_yaml_and_json,
                   test_config_files_with_arbitrary_yaml_text],
        "generate": [lambda: test_generate_parameters(tiny_model, small_tokenizer)],
    }
    for name, runs in fuzzers.items():
        if f"{name}:ok" not in OUTCOMES and f"{name}:error" not in OUTCOMES:
            for run in runs:
                run()  # a hypothesis test called directly runs all its examples
        print(name, {k: v for k, v in OUTCOMES.items() if k.startswith(name + ":")})
        assert OUTCOMES.get(f"{name}:ok", 0) > 0, f"{name}: every example was an error"


CLI_FLAGS = ["--max-time", "--max-steps", "--lr", "--seq-len", "--dtype", "--device", "--seed",
             "--temperature", "--top-k", "--top-p", "--max-new-tokens", "--vocab-size", "--val-fraction",
             "--batch-size", "--max-windows", "--max-bad-steps"]


@FUZZ
@given(command=st.sampled_from(["train", "generate", "prepare", "eval"]), flag=st.sampled_from(CLI_FLAGS),
       value=st.text(max_size=12) | st.integers(-10**20, 10**20).map(str) | st.floats().map(str))
def test_cli_flag_values(command, flag, value):
    """Any value of any flag: an argparse usage error (exit 2) or a one-line error (exit 1, here
    because the paths do not exist), never an exception."""
    import contextlib
    import io

    from samout.cli import main

    args = {"train": ["train", "--data", "/nonexistent/d", "--out", "/nonexistent/r"],
            "generate": ["generate", "/nonexistent/r", "--prompt", "x"],
            "prepare": ["prepare", "/nonexistent/in.txt", "--out", "/nonexistent/d"],
            "eval": ["eval", "/nonexistent/r"]}[command]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*args, f"{flag}={value}"])
        except SystemExit as exit_:
            code = exit_.code
    assert code in (1, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
