"""Self-describing run directories: auto_map + thin remote-code modules, so a process that
never imports samout loads a run by path with trust_remote_code=True."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from samout.generation import encode_prompt, load_for_generation, stream_ids  # noqa: E402
from samout.remote_code import HF_FILES, MODEL_AUTO_MAP, REMOTE_FILES  # noqa: E402
from samout.run_dir import CHECKSUMS_NAME  # noqa: E402
from samout.tokenizer import TOKENIZER_CONFIG_NAME, update_tokenizer_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "KING LEAR:\nWhat says"


def fresh_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)


def test_a_trained_run_is_self_describing(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["auto_map"] == MODEL_AUTO_MAP
    tok_config = json.loads((trained_run / TOKENIZER_CONFIG_NAME).read_text())
    assert tok_config["auto_map"] == {"AutoTokenizer": [None, "tokenization_samout.SamOutTokenizer"]}
    for name, text in REMOTE_FILES.items():
        assert (trained_run / name).read_text() == text
    checkpoint = sorted((trained_run / "checkpoints").iterdir())[-1]
    for directory in (trained_run, checkpoint):
        listed = json.loads((directory / CHECKSUMS_NAME).read_text())["files"]
        assert set(HF_FILES) <= set(listed), directory


def test_fresh_process_loads_the_run_and_generates_like_samout(trained_run, tmp_path):
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "samout" not in sys.modules
model = AutoModelForCausalLM.from_pretrained({str(trained_run)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(trained_run)!r}, trust_remote_code=True)
import torch
ids = torch.tensor([[tok.bos_token_id] + tok({PROMPT!r}).input_ids])
out = model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
print(type(model).__name__, type(tok).__name__)
print(" ".join(map(str, out)))
"""
    done = fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    names, ids = done.stdout.strip().splitlines()[-2:]
    assert names == "SamOutForCausalLM SamOutTokenizer"
    hf_ids = [int(i) for i in ids.split()]
    model, tokenizer = load_for_generation(trained_run)
    own = list(stream_ids(model, encode_prompt(tokenizer, PROMPT), max_new_tokens=30, temperature=0.0))
    assert len(own) >= 5, "too short to compare: samout stopped at once"
    assert hf_ids[: len(own)] == own
    assert hf_ids[len(own):] in ([], [1])  # HF keeps the end-of-text token it stopped at


def test_without_samout_the_directory_says_how_to_install_it(trained_run, tmp_path):
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "samout" or name.startswith("samout."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from transformers import AutoConfig
AutoConfig.from_pretrained({str(trained_run)!r}, trust_remote_code=True)
"""
    done = fresh_python(code, tmp_path)
    assert done.returncode != 0
    assert "pip install 'samout[hf]'" in done.stderr.strip().splitlines()[-1]


def test_update_tokenizer_config_keeps_other_keys(tmp_path):
    update_tokenizer_config(tmp_path, chat_template="{{ x }}")
    update_tokenizer_config(tmp_path, auto_map={"AutoTokenizer": [None, "a.B"]})
    data = json.loads((tmp_path / TOKENIZER_CONFIG_NAME).read_text())
    assert data == {"chat_template": "{{ x }}", "auto_map": {"AutoTokenizer": [None, "a.B"]}}
    (tmp_path / TOKENIZER_CONFIG_NAME).write_text("[1]")
    from samout.errors import SamoutError

    with pytest.raises(SamoutError, match="JSON object"):
        update_tokenizer_config(tmp_path, chat_template="x")
