"""`samout generate --json-schema FILE`: the schema is read and compiled before any token, with
one-line errors naming the flag, and every continuation is one JSON value valid against it."""

from __future__ import annotations

import json
import re

import pytest

from samout.cli import main
from tests.tiny_run import make_run_dir

TEXT = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 50


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    make_run_dir(directory, TEXT)
    return directory


@pytest.mark.parametrize("content, message", [
    (None, "--json-schema: file not found"),
    ("{oops", "not valid JSON"),
    ("[1, 2]", "a JSON schema must be an object"),
    (json.dumps({"type": "strin"}), r"--json-schema .*s.json: Invalid type: strin"),
    (json.dumps({"type": "string", "pattern": "("}), r"--json-schema .*s.json: .*unclosed group"),
])
def test_bad_schemas_are_one_line_errors(run_dir, tmp_path, capsys, content, message):
    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content)
    assert main(["generate", str(run_dir), "--prompt", "x", "--json-schema", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing generated
    assert captured.err.count("\n") == 1
    assert re.search(message, captured.err), captured.err


SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["sonnet", "ode", "haiku"]},
        "title": {"type": "string", "maxLength": 8},
        "lines": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                 "additionalProperties": False},
    },
    "required": ["kind", "title", "lines", "meta"],
    "additionalProperties": False,
}


def test_every_continuation_is_valid_json(run_dir, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SCHEMA))
    prompts = [arg for i in range(8) for arg in ("--prompt", f"poem {i}")]
    assert main(["generate", str(run_dir), *prompts, "--json-schema", str(path), "--json",
                 "--temperature", "1", "--seed", "3", "--max-new-tokens", "300"]) == 0
    ends = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ends = [e for e in ends if "token" not in e]
    assert [e["prompt"] for e in ends] == list(range(8))
    for end in ends:
        jsonschema.validate(json.loads(end["text"]), SCHEMA)


def test_text_output_holds_the_json_after_each_prompt(run_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"enum": ["yes", "no"]}))
    assert main(["generate", str(run_dir), "--prompt", "A", "--prompt", "B", "--json-schema", str(path),
                 "--seed", "0"]) == 0
    parts = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    assert [p[0] for p in parts] == ["A", "B"]
    assert all(json.loads(p[1:]) in ("yes", "no") for p in parts)
