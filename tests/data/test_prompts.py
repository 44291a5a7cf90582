"""`samout prepare --format prompts`: the directory, and one-line file:line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from samout.data.chat import ChatData
from samout.data.prompts import PromptData, prepare_prompts
from samout.errors import SamoutError
from samout.tokenizer import ASSISTANT_TOKEN, load_tokenizer
from tests.chat.chat_fixtures import make_chat_run


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def good_lines(n=6):
    return [{"messages": [{"role": "user", "content": f"Which number is the largest: {i} {i + 2}?"}],
             "answer": f"It is {i + 2}.", "meta": {"id": i}} for i in range(n)]


def test_prompts_directory_keeps_messages_and_columns(tmp_path):
    make_chat_run(tmp_path / "run")
    src = write(tmp_path / "p.jsonl", good_lines())
    meta = prepare_prompts([str(src)], tmp_path / "data", tokenizer=tmp_path / "run", quiet=True)
    assert meta["kind"] == "prompts"
    # The same shard writer as text data: shards listed with their token counts and checksums.
    shards = meta["splits"]["train"]["shards"]
    assert sum(s["tokens"] for s in shards) == meta["splits"]["train"]["tokens"]
    assert all((tmp_path / "data" / s["file"]).is_file() and s["sha256"] for s in shards)
    data = PromptData(tmp_path / "data")
    rows = data.rows["train"] + data.rows["val"]
    assert sorted(r["meta"]["id"] for r in rows) == list(range(6))
    ids = data.prompt_ids("train", 0)
    assert ids[-1] == load_tokenizer(data.tokenizer_path).token_to_id(ASSISTANT_TOKEN)  # generation prompt
    with pytest.raises(SamoutError, match="--objective grpo"):
        ChatData(tmp_path / "data", "chat")


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not valid JSON"),
    ({"prompt": []}, "no \"messages\""),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "q"}], "completions": 1}, "reserved"),
])
def test_bad_lines_are_one_line_errors(tmp_path, bad, why):
    make_chat_run(tmp_path / "run")
    src = write(tmp_path / "p.jsonl", [*good_lines(2), bad])
    proc = subprocess.run([sys.executable, "-m", "samout", "prepare", "--format", "prompts", str(src),
                           "--out", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"{src}:3: " in proc.stderr and why in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
