"""Streaming `prepare`: shards, workers, resume after SIGKILL, input formats, sampling."""

import gzip
import importlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samout.data.dataset import TokenData
from samout.data.prepare import KILL_ENV, STATE_NAME, prepare
from samout.data.sources import Corpus, load_documents
from samout.errors import SamoutError
from samout.tokenizer import load_tokenizer

prep = importlib.import_module("samout.data.prepare")  # samout.data.prepare is also a function
sources = importlib.import_module("samout.data.sources")
ROOT = Path(__file__).resolve().parents[2]


def _docs(n: int = 60) -> list[str]:
    words = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()
    rng = np.random.default_rng(0)
    return ["\n".join(" ".join(rng.choice(words, 12)) for _ in range(int(rng.integers(2, 30)))) + "\n"
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(_docs()):
        (d / f"doc{i:03d}.txt").write_text(text)
    return d


@pytest.fixture
def streaming(monkeypatch):
    """Take the streaming path (block split) even for a tiny corpus."""
    monkeypatch.setattr(prep, "SMALL_CORPUS_BYTES", 0)
    monkeypatch.setattr(prep, "SPLIT_BLOCK", 8)


def _stream(out: Path, split: str) -> bytes:
    meta = json.loads((out / "meta.json").read_text())
    return b"".join((out / s["file"]).read_bytes() for s in meta["splits"][split]["shards"])


def _without_shards(out: Path) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    for info in meta["splits"].values():
        info.pop("shards")
    meta.pop("shard_tokens")
    return meta


def _data_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_output_for_any_workers_and_shard_size(tmp_path, corpus_dir, prepared_data, streaming):
    tok = prepared_data / "tokenizer.json"
    runs = {}
    for workers, shard in ((1, 1 << 27), (2, 1 << 27), (4, 1 << 27), (2, 700), (1, 700)):
        out = tmp_path / f"w{workers}-s{shard}"
        prepare([str(corpus_dir)], out, tokenizer=tok, workers=workers, shard_tokens=shard, quiet=True)
        runs[workers, shard] = out
    one = runs[1, 1 << 27]
    for out in runs.values():
        for split in ("train", "val"):
            assert _stream(out, split) == _stream(one, split)
        assert _without_shards(out) == _without_shards(one)
    # Byte-identical directories for the same shard size, whatever the worker count.
    assert _data_files(runs[1, 1 << 27]) == _data_files(runs[2, 1 << 27]) == _data_files(runs[4, 1 << 27])
    assert _data_files(runs[2, 700]) == _data_files(runs[1, 700])
    meta = json.loads((runs[1, 700] / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] == 700 for s in meta["splits"]["train"]["shards"][:-1])
    assert meta["split"]["rule"] == "blocks of 8" and meta["splits"]["val"]["documents"] > 0
    # The whole token stream is what a single encode of each document gives.
    tokenizer = load_tokenizer(tok)
    texts = _docs()
    val = [i for i in range(len(texts)) if prep.BlockSplit(0.05, 0, len(texts))(i)]
    want = [t for i in range(len(texts)) if i not in val
            for t in tokenizer.encode(texts[i], add_special_tokens=False).ids + [1]]
    assert np.array_equal(np.frombuffer(_stream(one, "train"), dtype=np.uint16), want)


def test_streamed_split_is_the_old_split_up_to_a_block():
    docs = [sources.Document("x", str(i)) for i in range(300)]
    for n in (2, 20, 300):
        split = prep.BlockSplit(0.1, 5, n)
        assert [i for i in range(n) if split(i)] == prep.split_documents(docs[:n], 0.1, 5)[1]
    big = prep.BlockSplit(0.05, 0, 3 * prep.SPLIT_BLOCK + 7)
    val = [i for i in range(3 * prep.SPLIT_BLOCK + 7) if big(i)]
    assert len(val) == 3 * round(0.05 * prep.SPLIT_BLOCK) and val[-1] < 3 * prep.SPLIT_BLOCK


def test_few_large_documents_split_by_pieces(tmp_path, monkeypatch, prepared_data):
    monkeypatch.setattr(prep, "SMALL_CORPUS_BYTES", 0)
    monkeypatch.setattr(sources, "PIECE_CHARS", 200)
    (tmp_path / "one.txt").write_text("".join(_docs(20)))
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "d", tokenizer=prepared_data / "tokenizer.json",
                   workers=1, quiet=True)
    assert meta["split"]["unit"].startswith("piece") and meta["splits"]["val"]["documents"] > 0
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] > 20


def test_batches_do_not_depend_on_shard_size(tmp_path, corpus_dir, prepared_data):
    tok = prepared_data / "tokenizer.json"
    prepare([str(corpus_dir)], tmp_path / "one", tokenizer=tok, workers=1, quiet=True)
    prepare([str(corpus_dir)], tmp_path / "many", tokenizer=tok, workers=1, shard_tokens=97, quiet=True)
    one, many = TokenData(tmp_path / "one"), TokenData(tmp_path / "many")
    assert len(many.meta["splits"]["train"]["shards"]) > 10
    for step in range(5):
        for rank in range(2):
            a = one.train_batch(step, 0, 4, 50, seed=3, rank=rank, world_size=2)
            b = many.train_batch(step, 0, 4, 50, seed=3, rank=rank, world_size=2)
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.array_equal(np.asarray(many.val), np.asarray(one.val))
    assert int(many.train[len(many.train) - 1]) == int(one.train[-1])


def test_training_on_shards_gives_the_same_losses(tmp_path, corpus_dir, prepared_data):
    from samout.training.setup import train
    tok = prepared_data / "tokenizer.json"
    prepare([str(corpus_dir)], tmp_path / "one", tokenizer=tok, workers=1, quiet=True)
    prepare([str(corpus_dir)], tmp_path / "many", tokenizer=tok, workers=1, shard_tokens=128, quiet=True)
    losses = []
    for name in ("one", "many"):
        train(tmp_path / name, tmp_path / f"run-{name}", preset="tiny", quiet=True,
              overrides=dict(max_steps=3, seq_len=32, batch_size=2, warmup_steps=1, eval_every=3,
                             eval_windows=2, save_every=3, log_every=1))
        log = [json.loads(line) for line in (tmp_path / f"run-{name}" / "log.jsonl").read_text().splitlines()]
        losses.append([r.get("loss") for r in log if "loss" in r])
    assert losses[0] and losses[0] == losses[1]


def test_resume_after_sigkill_gives_identical_output(tmp_path, corpus_dir, prepared_data, streaming):
    tok = str(prepared_data / "tokenizer.json")
    whole = tmp_path / "whole"
    prepare([str(corpus_dir)], whole, tokenizer=tok, workers=1, shard_tokens=500, quiet=True)
    out = tmp_path / "killed"
    # The child takes the streaming path too (as the monkeypatched parent): a tiny wrapper.
    code = ("import importlib, sys; p = importlib.import_module('samout.data.prepare'); "
            "p.SMALL_CORPUS_BYTES = 0; p.SPLIT_BLOCK = 8; "
            "from samout.cli import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "prepare", str(corpus_dir), "--tokenizer", tok, "--out", str(out),
           "--shard-tokens", "500", "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), KILL_ENV: "3"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (out / STATE_NAME).is_file() and not (out / "meta.json").exists()
    state = json.loads((out / STATE_NAME).read_text())
    assert 0 < state["pieces"] < 60
    env.pop(KILL_ENV)
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _data_files(out) == _data_files(whole)


def test_input_formats_give_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    texts = _docs(5)
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(texts[0].encode()))
    (tmp_path / "a.txt.xz").write_bytes(lzma.compress(texts[0].encode()))
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[0].encode()))
    jsonl = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    (tmp_path / "b.jsonl").write_bytes(jsonl)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress(jsonl))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    pq.write_table(pa.table({"id": list(range(5)), "body": texts}), tmp_path / "c.parquet", row_group_size=2)
    ds = datasets.Dataset.from_dict({"body": texts})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(3)), "test": ds.select(range(3, 5))}).save_to_disk(
        str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for name in ("a.txt", "a.txt.gz", "a.txt.xz", "a.txt.zst"):
        docs, records = load_documents([str(tmp_path / name)])
        assert [d.text for d in docs] == texts[:1] and records[0]["documents"] == 1
    for name in ("b.jsonl", "b.jsonl.gz", "b.jsonl.xz", "b.jsonl.zst", "c.parquet", "saved", "saved_dict",
                 str(arrow)):
        docs, records = load_documents([str(tmp_path / name)], text_column="body")
        assert [d.text for d in docs] == texts, name
        assert records[0]["bytes"] == sum(len(t.encode()) for t in texts)
    assert load_documents([str(tmp_path / "saved")], "body")[1][0]["kind"] == "datasets"


@pytest.mark.parametrize("make, match", [
    (lambda p: p.with_suffix(".jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\nnope\n')),
     r"in\.jsonl\.gz:2: not valid JSON"),
    (lambda p: p.with_suffix(".txt.gz").write_bytes(b"not gzip at all"), r"in\.txt\.gz: cannot read it"),
    (lambda p: p.with_suffix(".txt.xz").write_bytes(lzma.compress(b"ok \xff\xfe text")),
     r"in\.txt\.xz is binary"),
])
def test_bad_compressed_input_is_one_line(tmp_path, capsys, make, match):
    from samout.cli import main
    make(tmp_path / "in")
    path = next(tmp_path.glob("in.*"))
    with pytest.raises(SamoutError, match=match):
        load_documents([str(path)])
    assert main(["prepare", str(path), "--out", str(tmp_path / "d"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_parquet_without_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(SamoutError, match=r"t\.parquet: no column 'text' \(it has content\): use --text"):
        load_documents([str(tmp_path / "t.parquet")])


def test_large_documents_stream_in_pieces_with_the_same_tokens(monkeypatch, tmp_path, prepared_data):
    monkeypatch.setattr(sources, "PIECE_CHARS", 64)
    monkeypatch.setattr(sources, "READ_BYTES", 50)
    text = "".join(_docs(3))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(Corpus([str(tmp_path / "big.txt")]).pieces())
    assert len(pieces) > 10 and [p.last for p in pieces].count(True) == 1
    assert "".join(p.text for p in pieces) == text and all(len(p.text) <= 256 for p in pieces)
    tok = load_tokenizer(prepared_data / "tokenizer.json")
    ids = [i for p in pieces for i in tok.encode(p.text, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_tokenizer_sample_is_bounded_and_reported(tmp_path, corpus_dir, capsys):
    meta = prepare([str(corpus_dir)], tmp_path / "d", vocab_size=300, tokenizer_sample=5000, workers=1)
    sample = meta["tokenizer_sample"]
    assert 0 < sample["bytes"] <= 5000 < sample["of_bytes"] == meta["splits"]["train"]["bytes"]
    assert f"on {sample['bytes'] / 1e6:,.1f} MB of" in capsys.readouterr().out
    again = prepare([str(corpus_dir)], tmp_path / "e", vocab_size=300, tokenizer_sample=5000, workers=1,
                    quiet=True)
    assert (tmp_path / "d" / "tokenizer.json").read_text() == (tmp_path / "e" / "tokenizer.json").read_text()
    assert again["tokenizer_sample"] == sample


def test_format_1_directory_still_reads(tmp_path, prepared_data):
    """A data directory written before shards (train.bin, val.bin, version 1) trains as before."""
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads((prepared_data / "meta.json").read_text())
    for name, info in meta["splits"].items():
        (old / f"{name}.bin").write_bytes(_stream(prepared_data, name))
        info["file"] = f"{name}.bin"
        info.pop("shards")
    meta["version"] = 1
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "tokenizer.json").write_bytes((prepared_data / "tokenizer.json").read_bytes())
    a, b = TokenData(old), TokenData(prepared_data)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
