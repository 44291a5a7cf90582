"""`prepare --format chat|dpo`: masks, offsets, the overlong rule and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from samout.chat.tasks import write_task_files
from samout.data.chat import ChatData, prepare_conversations
from samout.errors import SamoutError
from samout.tokenizer import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    files = write_task_files(root / "tasks", train=200, heldout=20, seed=1)
    prepare_conversations([str(files["sft_train"])], root / "data", "chat", vocab_size=300, quiet=True)
    return root / "data"


def test_mask_is_one_exactly_on_assistant_tokens(chat_dir):
    data = ChatData(chat_dir, "chat")
    tok = load_tokenizer(chat_dir)
    assistant, end = tok.token_to_id("<|assistant|>"), tok.token_to_id("<|end|>")
    for i in range(data.num_sequences("train")):
        ids, mask = data.sequence("train", i)
        assert ids[0] == 1 and (ids == 1).sum() == 1  # each conversation starts with <|endoftext|>
        inside, want = False, []
        for t in ids:
            want.append(int(inside))
            inside = True if t == assistant else (False if t == end else inside)
        assert mask.tolist() == want
        assert ids[-1] == end and mask[-1] == 1
    meta = json.loads((chat_dir / "meta.json").read_text())
    assert meta["kind"] == "chat"
    assert json.loads((chat_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_overlong_rule_drops_or_truncates_to_whole_turns(tmp_path):
    long = " ".join(str(i * 7919 % 1000) for i in range(60))
    rows = [conv("hi", "hello")] * 5 + [conv("hi", "ok", long, "d")] * 3 + [conv("x", long)] * 2
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    meta = prepare_conversations([str(src)], tmp_path / "drop", vocab_size=300, max_tokens=30, quiet=True)
    assert meta["overlong_report"] == {"dropped": 5, "truncated": 0}
    meta = prepare_conversations([str(src)], tmp_path / "cut", vocab_size=300, max_tokens=30,
                                 overlong="truncate", quiet=True)
    assert meta["overlong_report"]["truncated"] == 3 and meta["overlong_report"]["dropped"] == 2
    data = ChatData(tmp_path / "cut")
    assert max(np.diff(data.offsets[s]).max() for s in ("train", "val")) <= 30


BAD = [
    ("not json", "not valid JSON"),
    ('{"text": "x"}', 'no "messages" field'),
    (json.dumps({"messages": [{"role": "function", "content": "x"}]}),
     r"messages\[0\] has unknown role 'function'"),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
     r"messages\[0\] \(tool\) has no \"tool_call_id\""),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
     r"messages\[1\] \(assistant\) tool_calls\[0\].function.arguments is not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": {}}}]}]}),
     r"messages\[1\] \(assistant\) tool_calls\[0\].function.name must be"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                 "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}),
     r"tools\[0\].function.parameters: "),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "does not end with an assistant turn"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
     "no text"),
]


@pytest.mark.parametrize("line,why", BAD)
def test_bad_lines_name_file_and_line(tmp_path, line, why):
    src = write_jsonl(tmp_path / "c.jsonl", [conv("a", "b"), line])
    with pytest.raises(SamoutError, match=f"c.jsonl:2: .*{why}"):
        prepare_conversations([str(src)], tmp_path / "out", vocab_size=300, quiet=True)


def test_bad_dpo_lines(tmp_path):
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    cases = [({**good, "chosen": None}, "chosen"), ({"prompt": good["prompt"], "chosen": "a"}, "rejected"),
             ({**good, "prompt": [{"role": "assistant", "content": "x"}]}, "ends with an assistant")]
    for line, why in cases:
        src = write_jsonl(tmp_path / "d.jsonl", [good, line])
        with pytest.raises(SamoutError, match=f"d.jsonl:2: .*{why}"):
            prepare_conversations([str(src)], tmp_path / "out", "dpo", vocab_size=300, quiet=True)


def test_cli_error_is_one_line_exit_1(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [conv("a", "b"), "{oops"])
    proc = subprocess.run([sys.executable, "-m", "samout", "prepare", "--format", "chat", str(src), "--out",
                           str(tmp_path / "o"), "--vocab-size", "300"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "c.jsonl:2" in proc.stderr


def test_dpo_pairs_mask_only_the_completion(tmp_path):
    files = write_task_files(tmp_path / "tasks", train=50, heldout=5, seed=2)
    prepare_conversations([str(files["dpo_train"])], tmp_path / "dpo", "dpo", vocab_size=300, quiet=True)
    data = ChatData(tmp_path / "dpo", "dpo")
    tok = load_tokenizer(tmp_path / "dpo")
    rows = [json.loads(line) for line in files["dpo_train"].read_text().splitlines()]
    assert data.num_sequences("train") % 2 == 0
    for i in range(data.num_sequences("train") // 2):
        (c, cm), (r, rm) = data.sequence("train", 2 * i), data.sequence("train", 2 * i + 1)
        chosen = tok.decode(c[cm == 1].tolist(), skip_special_tokens=True)
        rejected = tok.decode(r[rm == 1].tolist(), skip_special_tokens=True)
        assert any(row["chosen"] == chosen and row["rejected"] == rejected for row in rows)
    with pytest.raises(SamoutError, match="holds dpo data, not chat data"):
        ChatData(tmp_path / "dpo", "chat")


TOOL_LINE = {
    "tools": [{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."}]}


def test_tool_calls_and_results_are_prepared_and_only_calls_are_trained_on(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [TOOL_LINE] * 4 + [conv("hi", "hello")] * 4)
    prepare_conversations([str(src)], tmp_path / "out", vocab_size=300, val_fraction=0.25, quiet=True)
    data = ChatData(tmp_path / "out", "chat")
    tok = load_tokenizer(tmp_path / "out")
    seen = 0
    for split in ("train", "val"):
        for i in range(data.num_sequences(split)):
            ids, mask = data.sequence(split, i)
            text = tok.decode(ids.tolist(), skip_special_tokens=False)
            if "<tools>" not in text:
                continue
            seen += 1
            trained = tok.decode([t for t, m in zip(ids.tolist(), mask) if m], skip_special_tokens=False)
            assert trained == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                               "</tool_call><|end|>It is 18 C.<|end|>")
            assert "<|user|><tool_response>18 C</tool_response><|end|>" in text
    assert seen == 4
