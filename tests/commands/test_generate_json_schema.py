"""`samout generate --json-schema FILE`: the schema is read and compiled before any token, with
one-line errors naming the flag. (Constrained sampling itself waits for the decoding core.)"""

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


def test_valid_schema_reaches_the_integration_point(run_dir, tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    assert main(["generate", str(run_dir), "--prompt", "x", "--json-schema", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "the schema is valid, but constrained sampling needs" in captured.err
