"""`samout.chat.Conversation` and `samout chat`: state-carried turns, save/load, the terminal UI, HF."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from samout.chat.conversation import Conversation
from samout.chat.template import render_ids
from samout.errors import SamoutError
from tests.chat.chat_fixtures import make_chat_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-run")
    model, tokenizer = make_chat_run(path)
    return path, model, tokenizer


def test_a_turn_feeds_only_the_new_message_and_the_state_equals_the_whole_history(run):
    path, model, tokenizer = run
    chat = Conversation.load_run(path, system="Be brief.", temperature=0.9, seed=3, max_new_tokens=6)
    fed = []
    messages = [{"role": "system", "content": "Be brief."}]
    for i, text in enumerate(["Hello there", "What is 2 + 3?", "Sort: pear apple"]):
        chat.reply(text)
        want = render_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        want = want if i else render_ids(tokenizer, messages + [{"role": "user", "content": text}], True)
        assert chat.last_fed == (want if i == 0 else want[1:])  # no history, no <|endoftext|> after turn 1
        fed += chat.last_fed + chat.last_reply_ids + [tokenizer.token_to_id("<|end|>")]
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]
    assert chat.tokens_seen == len(fed)
    _, state = model(torch.tensor([fed]))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(state.to_tensors().values(),
                                                                  chat.state.to_tensors().values()))


def test_save_then_load_continues_bit_identically(run, tmp_path):
    path, _, _ = run
    chat = Conversation.load_run(path, temperature=1.0, seed=11, max_new_tokens=8)
    chat.reply("Hello there")
    tensors, transcript = chat.save(tmp_path / "convo")
    assert tensors.stat().st_size < 8192 and transcript.stat().st_size < 8192
    first = list(chat.send_ids("What is 2 + 3?")) + list(chat.send_ids("And 4?"))
    state = chat.state
    again = Conversation.load_run(path, temperature=1.0, seed=11, max_new_tokens=8)
    again.load(tmp_path / "convo")
    assert again.transcript == chat.transcript[:2]
    second = list(again.send_ids("What is 2 + 3?")) + list(again.send_ids("And 4?"))
    assert first == second and again.state.equal(state)
    with pytest.raises(SamoutError, match="no saved conversation"):
        again.load(tmp_path / "missing")


def test_terminal_ui_through_stdin(run, tmp_path):
    path, _, _ = run
    script = "\n".join(["/help", "Hello there", f"/save {tmp_path / 's'}", "/system Be brief.",
                        f"/load {tmp_path / 's'}", "What is 2 + 3?", "/reset", "/nope", "/quit", "ignored"])
    proc = subprocess.run([sys.executable, "-m", "samout", "chat", str(path), "--max-new-tokens", "4",
                           "--seed", "0", "--temperature", "0"], input=script + "\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "/save NAME" in proc.stdout and "(saved" in proc.stdout and "(loaded" in proc.stdout
    assert "1 turns" in proc.stdout and "(new conversation)" in proc.stdout
    assert proc.stderr.strip() == "error: unknown command /nope (/help lists them)"
    assert (tmp_path / "s.safetensors").is_file() and (tmp_path / "s.json").is_file()


def test_chat_needs_a_chat_tokenizer(tmp_path, run):
    from tests.tiny_run import make_run_dir

    make_run_dir(tmp_path, "plain text " * 200)
    proc = subprocess.run([sys.executable, "-m", "samout", "chat", str(tmp_path)], input="hi\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no chat tokens" in proc.stderr and proc.stderr.count("\n") == 1


def test_hugging_face_apply_chat_template_and_generate(run):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import samout.hf  # noqa: F401

    path, _, tokenizer = run
    hf_tok = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    inputs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    end = hf_tok.convert_tokens_to_ids("<|end|>")
    out = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[end, 1])
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    chat = Conversation.load_run(path, temperature=0, max_new_tokens=6)
    ours = list(chat.send_ids("What is 2 + 3?"))
    assert new[: len(ours)] == ours and (len(new) == len(ours) or new[len(ours)] in (end, 1))


def test_conversation_is_exported_by_the_chat_package():
    import samout.chat

    assert samout.chat.Conversation is Conversation
