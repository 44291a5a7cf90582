"""Make a samout model directory self-describing for Hugging Face tools.

`write_hf_files(directory)` adds `auto_map` to config.json (and to tokenizer_config.json)
and writes three thin modules that re-export samout's own Hugging Face classes from the
installed package. Then any tool that loads models by path, in a process that never
imported samout (lm-evaluation-harness, TRL, a notebook), can do

    AutoModelForCausalLM.from_pretrained(RUN_DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(RUN_DIR, trust_remote_code=True)

The modules hold no model code (one implementation: `samout.hf`), so a directory never
goes stale when samout is upgraded. Without samout installed they raise an ImportError
saying how to install it. This module does not import transformers: every samout save
path calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

from samout.files import CONFIG_NAME, TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, VOCAB_NAME, atomic_write
from samout.tokenizer import update_tokenizer_config

_HEADER = '''"""Hugging Face remote code of a samout model directory (written by samout).

The classes live in the installed `samout` package; this file only re-exports them, so
`from_pretrained(..., trust_remote_code=True)` works in a process that never imported samout.
"""

try:
    from samout.hf.{module} import {names}
except ImportError as err:
    raise ImportError(
        "this model directory was written by samout, which is not installed (or lacks its "
        "Hugging Face extra): pip install 'samout[hf]'"
    ) from err

__all__ = [{quoted}]
'''


def _module(module: str, *names: str) -> str:
    return _HEADER.format(module=module, names=", ".join(names),
                          quoted=", ".join(f'"{n}"' for n in names))


# file name -> text. The module names are those of samout.hf, so the auto_map reads the same.
REMOTE_FILES: dict[str, str] = {
    "configuration_samout.py": _module("configuration_samout", "SamOutHFConfig"),
    "modeling_samout.py": _module("modeling_samout", "SamOutForCausalLM", "SamOutPreTrainedModel"),
    "tokenization_samout.py": _module("tokenization_samout", "OpenAshTokenizer", "SamOutTokenizer"),
}
HF_FILES = [*REMOTE_FILES, TOKENIZER_CONFIG_NAME]

MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_samout.SamOutHFConfig",
    "AutoModelForCausalLM": "modeling_samout.SamOutForCausalLM",
}
# AutoTokenizer's entry is [slow class, fast class].
BPE_TOKENIZER = ("SamOutTokenizer", [None, "tokenization_samout.SamOutTokenizer"])
OPENASH_TOKENIZER = ("OpenAshTokenizer", ["tokenization_samout.OpenAshTokenizer", None])


def write_hf_files(directory: str | Path) -> list[str]:
    """Add the Hugging Face auto_map and remote-code modules to a samout model directory.

    Idempotent; does nothing unless config.json describes a SamOut model. The tokenizer's
    entries are written only when the directory holds a tokenizer (tokenizer.json or an
    OpenASH vocabulary), so call it again after writing one. Returns the names of the
    files it wrote (for checksums.json).
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    data = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("model_type", "samout") != "samout":
        return []
    for name, text in REMOTE_FILES.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write(path, text)
    if data.get("auto_map") != MODEL_AUTO_MAP:
        data["auto_map"] = MODEL_AUTO_MAP
        atomic_write(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    tokenizer = _tokenizer_kind(directory)
    if tokenizer is not None:
        name, entry = tokenizer
        update_tokenizer_config(directory, tokenizer_class=name, auto_map={"AutoTokenizer": entry})
    return hf_files_in(directory)


def hf_files_in(directory: str | Path) -> list[str]:
    """The Hugging Face files `directory` holds (what `write_hf_files` wrote there)."""
    return [name for name in HF_FILES if (Path(directory) / name).is_file()]


def _tokenizer_kind(directory: Path) -> tuple[str, list] | None:
    if (directory / VOCAB_NAME).is_file():
        return OPENASH_TOKENIZER
    if (directory / TOKENIZER_NAME).is_file():
        return BPE_TOKENIZER
    return None
