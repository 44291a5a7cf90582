"""`prepare`: tokenizer, token files, metadata, the split and exact byte counts."""

import json

import numpy as np
import pytest

from samout.data.dataset import TokenData
from samout.data.prepare import prepare, split_documents
from samout.data.sources import Document
from samout.errors import SamoutError
from samout.tokenizer import EOT_ID, PAD_ID, load_tokenizer, token_byte_lengths, train_tokenizer


def test_data_dir_contents(prepared_data):
    meta = json.loads((prepared_data / "meta.json").read_text())
    assert meta["format"] == "samout-data" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 400 and meta["pad_id"] == PAD_ID and meta["eot_id"] == EOT_ID
    assert len(meta["sources"]) == 3 and all(len(s["sha256"]) == 64 for s in meta["sources"])
    data = TokenData(prepared_data)
    for name in ("train", "val"):
        tokens = data.splits[name]
        info = meta["splits"][name]
        assert len(tokens) == info["tokens"] > 0
        assert [s["file"] for s in info["shards"]] == [f"{name}-00000.bin"]
        assert (prepared_data / f"{name}-00000.bin").stat().st_size == 2 * info["tokens"]
        assert int(tokens.max()) < 400
        # One <|endoftext|> after every document; no padding in the stream.
        assert int((tokens == EOT_ID).sum()) == info["documents"] and tokens[-1] == EOT_ID
        assert int((tokens == PAD_ID).sum()) == 0


def test_token_bytes_are_exact(prepared_data):
    """Summing the bytes of every token gives the UTF-8 size of the text: bpb is exact."""
    data = TokenData(prepared_data)
    lengths = token_byte_lengths(load_tokenizer(data.tokenizer_path))
    for name in ("train", "val"):
        assert int(lengths[np.asarray(data.splits[name])].sum()) == data.meta["splits"][name]["bytes"]


def test_tokenizer_roundtrip_and_special_ids():
    text = "Thou art more lovely — and more temperate. ünïcödé 漢字 🙂"
    tok = train_tokenizer([text * 3], vocab_size=300)
    assert tok.token_to_id("<|pad|>") == 0 and tok.token_to_id("<|endoftext|>") == 1
    assert tok.decode(tok.encode(text).ids) == text


def test_split_is_deterministic_and_by_document():
    docs = [Document("x", f"doc {i}") for i in range(100)]
    train_a, val_a = split_documents(docs, 0.1, seed=3)
    train_b, val_b = split_documents(docs, 0.1, seed=3)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 10
    assert sorted(train_a + val_a) == list(range(100))
    assert split_documents(docs, 0.1, seed=4)[1] != val_a


def test_reuse_tokenizer_gives_same_tokens(tmp_path, prepared_data, play_files):
    out = tmp_path / "again"
    prepare(play_files, out, tokenizer=prepared_data / "tokenizer.json", quiet=True)
    assert (out / "tokenizer.json").read_bytes() == (prepared_data / "tokenizer.json").read_bytes()
    assert np.array_equal(TokenData(out).train, TokenData(prepared_data).train)


def test_single_small_file_still_splits(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("".join(f"line {i} of a small text\n" for i in range(200)))
    meta = prepare([str(src)], tmp_path / "d", vocab_size=260, quiet=True)
    assert meta["splits"]["val"]["tokens"] > 0 and meta["splits"]["train"]["tokens"] > 0
    assert "piece" in meta["split"]["unit"]


def test_vocab_too_small(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello")
    with pytest.raises(SamoutError, match="vocab size 10 is too small"):
        prepare([str(src)], tmp_path / "d", vocab_size=10, quiet=True)
