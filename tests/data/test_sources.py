"""Inputs: files, directories, globs, .jsonl and the built-in corpora."""

import json
import re

import pytest

from samout.data.prepare import split_documents
from samout.data.sources import load_documents, shakespeare_works
from samout.errors import SamoutError


def test_kjv_is_chapters_without_verse_numbers_or_brackets():
    docs, records = load_documents(["kjv"])
    assert len(docs) == 1189  # the chapters of the King James Bible
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].text.rstrip().endswith("Amen.")
    text = "".join(d.text for d in docs)
    assert "[" not in text and "]" not in text
    assert not re.search(r"\d", text)  # no verse numbers left (the KJV text has no other digits)
    assert docs[478].text.startswith("Blessed is the man that walketh not")  # Psalm 1
    assert "darkness was upon the face of the deep" in docs[0].text  # "[was]" kept as a word
    assert records[0]["kind"] == "builtin" and len(records[0]["sha256"]) == 64


def test_pystdlib_is_one_document_per_module():
    docs, records = load_documents(["pystdlib"])
    assert len(docs) > 200
    assert sum("def " in d.text for d in docs) > 100
    assert records[0]["documents"] == len(docs)


def test_shakespeare_is_shipped_one_document_per_work(tmp_path):
    works = shakespeare_works()
    assert len(works) == 38 and list(works) == sorted(works)
    assert works["lear_gut.txt"].startswith("THE TRAGEDY OF KING LEAR")
    assert "Shall I compare thee to a summer's day?" in works["sonnets_gut.txt"]
    docs, records = load_documents(["shakespeare"])
    assert [d.source for d in docs] == [f"shakespeare/{name}" for name in works]
    assert [d.text for d in docs] == list(works.values())
    assert records[0]["kind"] == "builtin" and records[0]["documents"] == 38
    assert records[0]["bytes"] == sum(len(t.encode("utf-8")) for t in works.values())
    # The same works as a directory of files give the same documents in the same order,
    # so a split by whole works (the quality benchmark's) names the same validation plays.
    for name, text in list(works.items())[:25]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    from_dir, _ = load_documents([str(tmp_path)])
    assert [d.text for d in from_dir] == [d.text for d in docs[:25]]
    assert split_documents(from_dir, 0.1, 0) == split_documents(docs[:25], 0.1, 0)


def test_directory_glob_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub" / "b.md").write_text("beta text\n")
    (tmp_path / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta", "id": 3}) + "\n")
    (tmp_path / "sub" / "bin.dat").write_bytes(b"\xff\xfe\x00binary")
    docs, records = load_documents([str(tmp_path)])
    assert sorted(d.text.strip() for d in docs) == ["alpha text", "beta text", "delta", "gamma"]
    assert records[0]["kind"] == "directory" and records[0]["documents"] == 4
    docs, records = load_documents([str(tmp_path / "**" / "*.md")])
    assert [d.text.strip() for d in docs] == ["beta text"] and records[0]["kind"] == "glob"


def test_source_hash_changes_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    h1 = load_documents([str(f)])[1][0]["sha256"]
    f.write_text("two")
    assert load_documents([str(f)])[1][0]["sha256"] != h1


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r'bad\.jsonl:2: no "text"'),
    ('[1, 2]\n', r'bad\.jsonl:1: no "text"'),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SamoutError, match=match):
        load_documents([str(path)])


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(SamoutError, match="input not found"):
        load_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(SamoutError, match="no files match"):
        load_documents([str(tmp_path / "*.nothing")])
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(SamoutError, match="corpus is empty"):
        load_documents([str(tmp_path / "empty.txt")])
