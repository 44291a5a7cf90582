"""`samout convert openash`: the author's weights and jieba vocabulary as a samout run.

The reference below mirrors the author's published code (dfytensor/OpenASH open_ash.py and
open_ash_voc.py) in plain PyTorch: channel-major head merge, the author's state handling
("train" flag: any chunk length), and the author's encode/decode.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("jieba")

from samout import load_pretrained  # noqa: E402
from samout.cli import main  # noqa: E402
from samout.convert.openash import convert_openash  # noqa: E402
from samout.errors import SamoutError  # noqa: E402
from samout.openash_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, VOCAB_NAME  # noqa: E402
from samout.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
D, H, LAYERS = 32, 4, 2
CHINESE = "你好，请介绍一下你自己。人工智能的技术发展已经越来越快，包括深度学习。"
ENGLISH = "Hello world, 自然语言处理 is fun! 🙂"


# -- the author's model, as published (reference) -------------------------------------

class RefMaxStateSuper(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.combined = nn.Linear(dim, 4 * dim, bias=False)
        self.alpha1, self.alpha2, self.alpha3 = (nn.Parameter(torch.tensor(0.5)) for _ in range(3))
        self.head_linear = nn.Linear(heads * 5, heads, bias=False)

    def forward(self, x, state=None):
        b, s, d = x.shape
        streams = self.combined(x).view(b, s, 4, self.heads, -1).unbind(2)
        a, b_, c, d_ = (t.permute(0, 3, 1, 2) for t in streams)  # [b, dh, s, heads]
        if state is None:
            e = torch.cummax(c, dim=2)[0]
        else:  # the author's "train" flag: every position of a chunk after a state
            e = torch.cummax(torch.cat([state, c], dim=2), dim=2)[0][:, :, 1:]
        state = e[:, :, -1:]
        g = self.head_linear(torch.cat([a, b_, c, d_, e], dim=-1)) * e
        y = (a * b_ + self.alpha1 * b_ + self.alpha2 * d_ + a * (self.alpha3 * e + d_)
             + b_ * (c + e) + c * e + g)
        return y.transpose(1, 2).contiguous().view(b, s, d), state  # channel-major merge


class RefFFN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn1, self.ffn2, self.gate = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.ffn2(self.ffn1(x) * torch.relu(self.gate(x)))


class RefLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.self_attention_linear = RefMaxStateSuper(dim, heads)
        self.ffn = RefFFN(dim)
        self.layer_norm = nn.LayerNorm(dim)
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, state=None):
        x1, state = self.self_attention_linear(x, state)
        return self.layer_norm(self.alpha * self.ffn(x1) + (1 - self.alpha) * x), state


class RefOpenASH(nn.Module):
    def __init__(self, voc, dim, heads, layers):
        super().__init__()
        self.em = nn.Embedding(voc, dim, padding_idx=0)
        self.decoder_layers = nn.ModuleList(RefLayer(dim, heads) for _ in range(layers))
        self.head_score = nn.Linear(dim, voc, bias=False)

    def forward(self, x, state=None):
        x = self.em(x)
        state = [None] * len(self.decoder_layers) if state is None else list(state)
        for i, layer in enumerate(self.decoder_layers):
            x1, state[i] = layer(x, state[i])
            x = x1 + x
        return self.head_score(x), state


# -- the author's vocabulary and tokenizer, as published (reference) ----------------------

def make_vocab(two: int = 6, thr: int = 3) -> dict:
    """A small vocabulary built the way the author's gen_agent_voc_from_voc builds one."""
    words = ["你好", "，", "请", "介绍", "一下", "你", "自己", "。", "人工智能", "的", "技术", "已经",
             "越来越", "快", "包括", "学习", "深度", "Hello", " ", "world", ",", "is", "!", "fun",
             "自然", "处理", "越", "来"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    coded = ["发展", "语言", "自", "然", "界", "H", "e", "l", "o", "w", "r", "d"] + \
        [f"词{i}" for i in range(two * two + thr ** 3 - 12)]
    tokens = SPECIAL_TOKENS + words + [f"ts{i}" for i in range(two)] + [f"te{i}" for i in range(two)] + \
        [f"rs{i}" for i in range(thr)] + [f"rc{i}" for i in range(thr)] + [f"re{i}" for i in range(thr)]
    codes = [f"{i}t{j}" for i in range(two) for j in range(two)] + \
        [f"{i}t{j}r{z}" for i in range(thr) for j in range(thr) for z in range(thr)]
    random.Random(0).shuffle(coded)
    agent = dict(zip(coded, codes))
    return {"agent_token_to_token_id": agent, "agent_token_id_to_token": {v: k for k, v in agent.items()},
            "token_to_id": {t: i for i, t in enumerate(tokens)},
            "id_to_token": {str(i): t for i, t in enumerate(tokens)}}


def ref_encode(voc: dict, text: str) -> list[int]:
    import jieba

    t2i, agent = voc["token_to_id"], voc["agent_token_to_token_id"]

    def agent_encode(token):
        code = agent.get(token)
        if "r" in code:
            rs, rc, re_ = code.replace("t", "_").replace("r", "_").split("_")
            return [t2i.get("rs" + rs), t2i.get("rc" + rc), t2i.get("re" + re_)]
        ts, te = code.split("t")
        return [t2i.get("ts" + ts), t2i.get("te" + te)]

    token_id = []
    for token in jieba.Tokenizer().lcut(text):
        if token in t2i:
            token_id.append(t2i.get(token))
        elif token in agent:
            token_id += agent_encode(token)
        else:
            stoken_id = []
            for stoken in list(token):
                if stoken in t2i:
                    token_id.append(t2i.get(stoken))
                elif stoken in agent:
                    stoken_id += agent_encode(stoken)
                else:
                    stoken_id.append(10)
            token_id += stoken_id
    return token_id


def ref_decode(voc: dict, token_ids: list[int]) -> str:
    ts0, i2t, words = voc["token_to_id"]["ts0"], voc["id_to_token"], voc["agent_token_id_to_token"]
    text, code = "", ""
    for token_id in token_ids:
        token = i2t.get(str(token_id))
        if token_id < ts0:
            text += token or ""
        elif "t" in token:
            if "ts" in token:
                code = token.replace("ts", "")
            elif "te" in token:
                code += "t" + token.replace("te", "")
                text += words.get(code) or ""
        elif "rs" in token:
            code = token.replace("rs", "")
        elif "rc" in token:
            code += "t" + token.replace("rc", "") + "r"
        elif "re" in token:
            code += token.replace("re", "")
            text += words.get(code) or ""
    return text


@pytest.fixture(scope="module")
def author(tmp_path_factory):
    """(reference model, vocabulary dict, weights path, vocab path, converted run dir)."""
    d = tmp_path_factory.mktemp("openash")
    voc = make_vocab()
    (d / "open_ash_voc_agent.json").write_text(json.dumps(voc, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    ref = RefOpenASH(len(voc["token_to_id"]) + 1, D, H, LAYERS).eval()  # the author's voc_size: len + 1
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "alpha" in name:
                p.uniform_(0.2, 0.8)  # distinct scalars: a swapped alpha would show
    torch.save(ref.state_dict(), d / "full_sft_32_2.pth")
    out = d / "run"
    convert_openash(d / "full_sft_32_2.pth", d / "open_ash_voc_agent.json", out)
    return ref, voc, d / "full_sft_32_2.pth", d / "open_ash_voc_agent.json", out


def test_logits_equal_the_authors_model_full_and_step_by_step(author, seed):
    ref, _, _, _, out = author
    model = load_pretrained(out).eval()
    assert model.config.vocab_size == ref.em.weight.shape[0] and model.config.mixer == "openash"
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        want, _ = ref(ids)
        got, _ = model(ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for kernel in ("fused", "reference"):
            model.set_kernel(kernel)
            state, ref_state = None, None
            for split in ((0, 5), (5, 6), (6, 13)):  # a chunk, one token, a chunk
                part = ids[:, split[0]:split[1]]
                got, state = model(part, state)
                want, ref_state = ref(part, ref_state)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tokenizer_matches_the_authors_algorithm(author):
    _, voc, _, _, out = author
    tok = load_tokenizer(out)
    for text in (CHINESE, ENGLISH, "自然界 发展语言", "未知字符：龘"):
        ids = tok.encode(text).ids
        assert ids == ref_encode(voc, text), text
        assert tok.decode(ids) == ref_decode(voc, ids)
    assert tok.decode(tok.encode(CHINESE).ids) == CHINESE  # every word is in the vocabulary or coded
    ids = tok.encode("发展").ids
    assert len(ids) in (2, 3) and all(i >= voc["token_to_id"]["ts0"] for i in ids)  # an agent code
    assert tok.encode("龘").ids == [10]
    im = [voc["token_to_id"][t] for t in ("<|im_start|>", "<|user|>")]
    assert tok.decode(im + tok.encode("你好").ids) == "<|im_start|><|user|>你好"
    assert tok.decode(im + tok.encode("你好").ids, skip_special_tokens=True) == "你好"


def test_run_dir_is_ordinary_and_carries_the_chat_template(author):
    _, _, _, _, out = author
    names = {p.name for p in out.iterdir()}
    want = {"config.json", "model.safetensors", VOCAB_NAME, "checksums.json", "tokenizer_config.json"}
    assert want <= names
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["auto_map"]["AutoTokenizer"][0] == "tokenization_samout.OpenAshTokenizer"


def test_hf_auto_classes_load_the_converted_dir(author):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, voc, _, _, out = author
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok(CHINESE).input_ids == ref_encode(voc, CHINESE)
    ids = torch.tensor([ref_encode(voc, CHINESE)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids)[0], rtol=1e-5, atol=1e-5)
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|><|user|>你好<|im_end|><|im_start|><|agent|>"
    t2i = voc["token_to_id"]
    want = [t2i["<|im_start|>"], t2i["<|user|>"], *ref_encode(voc, "你好"), t2i["<|im_end|>"],
            t2i["<|im_start|>"], t2i["<|agent|>"]]
    assert tok(prompt).input_ids == want


def test_samout_generate_runs_on_the_converted_dir(author):
    out = author[4]
    done = subprocess.run([sys.executable, "-m", "samout", "generate", str(out), "--prompt", "你好",
                           "--max-new-tokens", "5", "--temperature", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr


def test_bad_inputs_are_one_line_errors(author, tmp_path, capsys):
    _, voc, weights, vocab, _ = author
    (tmp_path / "junk.pth").write_bytes(b"not a zip file")
    torch.save({"x": 1}, tmp_path / "notsd.pth")
    small = dict(voc, token_to_id={**voc["token_to_id"], **{f"extra{i}": 1000 + i for i in range(5)}},
                 id_to_token={**voc["id_to_token"], **{str(1000 + i): f"extra{i}" for i in range(5)}})
    (tmp_path / "big_vocab.json").write_text(json.dumps(small), encoding="utf-8")
    cases = [
        ([str(tmp_path / "missing.pth"), "--vocab", str(vocab)], "not found"),
        ([str(tmp_path / "junk.pth"), "--vocab", str(vocab)], "state dict"),
        ([str(tmp_path / "notsd.pth"), "--vocab", str(vocab)], "state dict"),
        ([str(weights), "--vocab", str(tmp_path / "missing.json")], "not found"),
        ([str(weights), "--vocab", str(weights)], "vocabulary"),
        ([str(weights), "--vocab", str(tmp_path / "big_vocab.json")], "does not belong"),
    ]
    for args, words in cases:
        code = main(["convert", "openash", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and words in err, (args, err)
        assert err.startswith("samout convert: error:")
    with pytest.raises(SamoutError):
        convert_openash(tmp_path / "junk.pth", vocab, tmp_path / "out")


def test_convert_help():
    done = subprocess.run([sys.executable, "-m", "samout", "convert", "openash", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "--vocab" in done.stdout and "weights_only" in done.stdout


def test_generation_prompts_and_stops_as_the_authors_code(author):
    # The author's documents start bare (no <|endoftext|>: id 1 is <|im_start|> there) and
    # their generation stops at <|im_end|> or <|pad|>.
    from samout.generation import encode_prompt, generate, stream_ids
    from samout.tokenizer import end_ids

    ref, voc, _, _, out = author
    model, tok = load_pretrained(out).eval(), load_tokenizer(out)
    t2i = voc["token_to_id"]
    assert encode_prompt(tok, "你好") == ref_encode(voc, "你好")
    assert end_ids(tok) == {t2i["<|im_end|>"], t2i["<|pad|>"]}
    ids = ref_encode(voc, "你好")
    with torch.no_grad():
        for _ in range(12):  # the author's greedy loop: the whole sequence every step
            token = int(ref(torch.tensor([ids]))[0][0, -1].argmax())
            if token in (t2i["<|im_end|>"], t2i["<|pad|>"]):
                break
            ids.append(token)
    want = ids[len(ref_encode(voc, "你好")):]
    got = generate(model, tok, "你好", temperature=0, max_new_tokens=12)
    assert got == tok.decode(want, skip_special_tokens=True)
    first = next(stream_ids(model, encode_prompt(tok, "你好"), temperature=0, max_new_tokens=1))
    assert list(stream_ids(model, encode_prompt(tok, "你好"), temperature=0, max_new_tokens=5,
                           stop_ids=frozenset({first}))) == []


def test_chat_and_serve_speak_the_authors_chat_format(author):
    # samout chat and the server render the author's format, stop at <|im_end|> and close the
    # turn with it; a turn after the first feeds only its own text.
    from samout.chat.conversation import Conversation
    from samout.chat.template import load_chat_template
    from samout.serve.loading import chat_renderer

    ref, voc, _, _, out = author
    t2i = voc["token_to_id"]
    model, tok = load_pretrained(out).eval(), load_tokenizer(out)
    chat = Conversation(model, tok, load_chat_template(out), temperature=0, max_new_tokens=6)
    head = [t2i["<|im_start|>"], t2i["<|user|>"]]
    tail = [t2i["<|im_end|>"], t2i["<|im_start|>"], t2i["<|agent|>"]]
    assert chat.turn_ids("你好") == head + ref_encode(voc, "你好") + tail
    assert chat.close_ids == [t2i["<|im_end|>"]] and t2i["<|im_end|>"] in chat.stop_ids
    chat.reply("你好")
    assert chat.turn_ids("发展") == head + ref_encode(voc, "发展") + tail  # only the new turn
    render, stop_ids = chat_renderer(tok, load_chat_template(out))
    assert render([{"role": "user", "content": "你好"}]) == head + ref_encode(voc, "你好") + tail
    assert t2i["<|im_end|>"] in stop_ids
    done = subprocess.run([sys.executable, "-m", "samout", "chat", str(out), "--temperature", "0",
                           "--max-new-tokens", "4"], input="你好\n/save " + str(out.parent / "c") + "\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out.parent / "c.safetensors").is_file()
