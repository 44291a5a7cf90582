"""Import the seed author's OpenASH models (dfytensor/OpenASH: `*_768_12.pth` state dicts
and the jieba vocabulary `open_ash_voc_agent.json`) as an ordinary samout run directory.

    from samout.convert.openash import convert_openash
    convert_openash("full_sft_768_12.pth", "open_ash_voc_agent.json", "runs/openash")

The author's `OpenASH` computes the same function as samout's `openash` mixer; only the
names differ, and the order in which heads are merged: the author's mixer output is
channel-major (channel c of head h at c*H + h), samout's head-major (h*dh + c). That
output feeds only the FFN's `ffn1` and `gate`, whose input columns are permuted here.
The weights are read with `torch.load(weights_only=True)`: no pickled code runs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from samout.config import SamOutConfig
from samout.errors import SamoutError
from samout.files import CONFIG_NAME, WEIGHTS_NAME, write_checksums
from samout.models.samout import SamOut
from samout.openash_tokenizer import CHAT_TEMPLATE, VOCAB_NAME, OpenAshVocab, read_vocab
from samout.remote_code import hf_files_in
from samout.tokenizer import update_tokenizer_config

_LAYER = re.compile(r"decoder_layers\.(\d+)\.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The author's state dict, safely; prefixes of torch.compile / DataParallel removed."""
    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"weights not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, refused globals, ...
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamoutError(f"{path} is not a PyTorch state dict that can be loaded safely: {why}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]  # a training checkpoint holding the state dict
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SamoutError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    out = {}
    for name, tensor in data.items():
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        out[name] = tensor
    if "em.weight" not in out or "head_score.weight" not in out:
        raise SamoutError(f"{path} is not an OpenASH state dict (no em.weight / head_score.weight)")
    return out


def head_major_columns(num_heads: int, head_dim: int) -> torch.Tensor:
    """Index i of the result is samout's input column h*dh + c; its value is the author's c*H + h."""
    return torch.tensor([c * num_heads + h for h in range(num_heads) for c in range(head_dim)])


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> SamOutConfig:
    vocab_size, hidden = sd["em.weight"].shape
    layers = 1 + max((int(m.group(1)) for k in sd if (m := _LAYER.match(k))), default=-1)
    if layers == 0:
        raise SamoutError("the state dict has no decoder_layers: not an OpenASH model")
    heads = sd["decoder_layers.0.self_attention_linear.head_linear.weight"].shape[0]
    return SamOutConfig(vocab_size=int(vocab_size), hidden_size=int(hidden), num_layers=layers,
                        num_heads=int(heads), mixer="openash", padding_idx=0)


def map_state_dict(sd: dict[str, torch.Tensor], config: SamOutConfig) -> dict[str, torch.Tensor]:
    """The author's names and layout -> samout's `SamOut` state dict."""
    perm = head_major_columns(config.num_heads, config.head_dim)
    sd = dict(sd)
    out = {"embed.weight": sd.pop("em.weight"), "head.weight": sd.pop("head_score.weight")}
    for i in range(config.num_layers):
        a, s = f"decoder_layers.{i}.", f"layers.{i}."
        m = a + "self_attention_linear."
        out[s + "mixer.proj.weight"] = sd.pop(m + "combined.weight")
        out[s + "mixer.alpha"] = torch.stack([sd.pop(m + f"alpha{k}").reshape(()) for k in (1, 2, 3)])
        out[s + "mixer.head_mix.weight"] = sd.pop(m + "head_linear.weight")
        for name in ("ffn1", "gate"):  # inputs: the mixer's output, merged channel-major
            out[s + f"ffn.{name}.weight"] = sd.pop(a + f"ffn.{name}.weight")[:, perm]
            out[s + f"ffn.{name}.bias"] = sd.pop(a + f"ffn.{name}.bias")
        for name in ("ffn.ffn2.weight", "ffn.ffn2.bias", "layer_norm.weight", "layer_norm.bias"):
            out[s + name] = sd.pop(a + name)
        out[s + "alpha"] = sd.pop(a + "alpha").reshape(())
    if sd:
        raise SamoutError(f"unexpected tensors in the OpenASH state dict: {', '.join(sorted(sd)[:5])}")
    return {k: v.contiguous() for k, v in out.items()}


def convert_openash(weights: str | Path, vocab: str | Path, out: str | Path) -> SamOut:
    """Write a samout run directory for the author's model at `out`; returns the model."""
    vocab_data = read_vocab(vocab)
    sd = load_state_dict(weights)
    try:
        config = config_from_state_dict(sd)
        model = SamOut(config)
        mapped = map_state_dict(sd, config)
        model.load_state_dict(mapped, strict=True)
    except (KeyError, RuntimeError, ValueError) as err:
        if isinstance(err, SamoutError):
            raise
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SamoutError(f"{weights} does not match the OpenASH architecture: {why}") from None
    tokens = OpenAshVocab(vocab_data).get_vocab_size()
    if tokens > config.vocab_size:
        raise SamoutError(f"{vocab} has {tokens} tokens but the model's embedding has {config.vocab_size} "
                          "rows: the vocabulary does not belong to these weights")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, out / VOCAB_NAME)  # first: save_pretrained writes its tokenizer's HF entries
    model.eval().save_pretrained(out)
    files = [CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME] + hf_files_in(out)
    update_tokenizer_config(out, chat_template=CHAT_TEMPLATE)
    write_checksums(out, sorted(set(files)))
    return model
