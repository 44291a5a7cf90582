"""`samout bench grammar`: runs end to end on a small vocabulary, checks validity, and says in
one line when the optional engine is missing."""

from __future__ import annotations

import json
import sys

from samout.cli import main


def test_bench_grammar_end_to_end(tmp_path, capsys):
    code = main(["bench", "grammar", "--vocab-sizes", "300", "--batch", "3", "--repeats", "1",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads((tmp_path / "grammar-llguidance.json").read_text())
    (row,) = data["rows"]
    assert row["vocab_size"] == 300 and row["outputs"] == 3 * 4 and row["valid"] == row["outputs"]
    assert row["mask_us"] > 0 and row["advance_us"] > 0 and set(row["compile_ms"]) == {
        "enums", "nested", "arrays", "scalars"}
    assert "| bpe-300 | 300 |" in printed and "12/12" in printed
    assert data["header"]["command"].startswith("samout bench grammar --engine llguidance")


def test_missing_xgrammar_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    assert main(["bench", "grammar", "--engine", "xgrammar", "--vocab-sizes", "300"]) == 1
    err = capsys.readouterr().err
    assert "--engine xgrammar needs xgrammar installed" in err and err.count("\n") == 1


def test_bench_grammar_decode(tmp_path, capsys):
    code = main(["bench", "grammar", "--decode", "--vocab-sizes", "300", "--preset", "tiny",
                 "--decode-batches", "1,3", "--decode-steps", "150", "--repeats", "2",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = json.loads((tmp_path / "grammar-decode.json").read_text())["rows"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(1, "plain"), (1, "schema"), (3, "plain"),
                                                       (3, "schema")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["forward_ms"] > 0 and r["sample_ms"] > 0
        assert (r["mask_ms"] > 0) == (r["mode"] == "schema")
    assert rows[3]["outputs"] > 0  # rows completed JSON values and started fresh ones
    assert "| bpe-300 | tiny | 3 | schema (nested) |" in printed
