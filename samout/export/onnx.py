"""ONNX export of a SamOut model: a decode-step graph and a prefill graph, state explicit.

    decode.onnx   input_ids [B, 1]    + state  ->  logits [B, 1, V] + new state
    prefill.onnx  input_ids [B, T]    + state  ->  logits [B, T, V] + new state   (2 <= T <= max_prefill_len)

State tensors are named after `State.to_tensors()`: inputs `state.layers.{i}.running_max`,
outputs `new_state.layers.{i}.running_max`, each [B, H, dh] float32. The empty state is
all -inf (`SamOut.init_state`), which onnxruntime handles exactly. A prompt longer than
`max_prefill_len` is fed in chunks (the state carries over exactly); a 1-token prompt
goes through the decode graph.

ONNX has no cumulative max, so while exporting, the model's cumulative max is the
doubling scan `samout.ops.doubling_max`: log2(T) rounds of "max with the copy shifted by
1, 2, 4, ... steps". Max is exact, so it equals torch.cummax bit for bit
(tests/ops/test_doubling_max.py). A graph has a fixed number of rounds, which is what
bounds the prefill length (`export_length_bound`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from samout.errors import SamoutError
from samout.files import TOKENIZER_NAME
from samout.models.samout import SamOut
from samout.ops.doubling_max import export_length_bound
from samout.state import State
from samout.tokenizer import EOT_ID, PAD_ID

DECODE_NAME, PREFILL_NAME, MANIFEST_NAME = "decode.onnx", "prefill.onnx", "samout_onnx.json"
DEFAULT_MAX_PREFILL_LEN = 1024
OPSET = 18


# -- the graphs -----------------------------------------------------------------

class _Graph(nn.Module):
    """SamOut with the state as separate tensors, the form an ONNX graph needs."""

    def __init__(self, model: SamOut) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *state: Tensor):
        logits, new = self.model(input_ids, State([{"running_max": t} for t in state]))
        return (logits, *(layer["running_max"] for layer in new))


def state_names(num_layers: int) -> tuple[list[str], list[str]]:
    keys = [f"layers.{i}.running_max" for i in range(num_layers)]
    return [f"state.{k}" for k in keys], [f"new_state.{k}" for k in keys]


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    seconds: float
    checks: dict[str, float | int | bool] = field(default_factory=dict)
    quantized: dict[str, dict] = field(default_factory=dict)


def export_onnx(model: SamOut, out_dir: str | Path, max_prefill_len: int = DEFAULT_MAX_PREFILL_LEN,
                log=print) -> ExportResult:
    """Write decode.onnx, prefill.onnx and samout_onnx.json (the graphs' names and sizes)."""
    if not isinstance(max_prefill_len, int) or max_prefill_len < 2:
        raise SamoutError(f"max_prefill_len must be an integer >= 2, got {max_prefill_len!r}")
    require_onnx()
    attention = [i for i, kind in enumerate(model.config.resolved_layer_types) if kind == "attention"]
    if attention:
        # Their state (keys and values) grows along a dynamic axis the graphs here do not carry.
        raise SamoutError(
            f"ONNX export supports maxstate layers only: layer(s) {', '.join(map(str, attention))} of this "
            "hybrid model are attention (layer_types / attention_every)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    n = len(model.layers)
    in_names, out_names = state_names(n)
    state = [layer["running_max"] for layer in model.init_state(2)]
    batch, time_ = torch.export.Dim("batch"), torch.export.Dim("time", min=2, max=max_prefill_len)
    start = time.perf_counter()
    files = {}
    for name, ids, dims in (
        (DECODE_NAME, torch.ones(2, 1, dtype=torch.long), {0: batch}),
        (PREFILL_NAME, torch.ones(2, 8, dtype=torch.long), {0: batch, 1: time_}),
    ):
        log(f"exporting {name} ...")
        path = out_dir / name
        with export_length_bound(max_prefill_len), _quiet(), torch.no_grad():
            torch.onnx.export(
                _Graph(model), (ids, *state), str(path), dynamo=True, opset_version=OPSET,
                input_names=["input_ids", *in_names], output_names=["logits", *out_names],
                dynamic_shapes=(dims, tuple({0: batch} for _ in state)), verbose=False,
                external_data=False,
            )
        files[name] = path
    manifest = {
        "format": "samout-onnx", "version": 1, "decode": DECODE_NAME, "prefill": PREFILL_NAME,
        "max_prefill_len": max_prefill_len, "num_layers": n,
        "state_shape": ["batch", model.config.num_heads, model.config.head_dim],
        "state_inputs": in_names, "state_outputs": out_names, "vocab_size": model.config.vocab_size,
        "eos_token_id": EOT_ID, "pad_token_id": PAD_ID, "samout_config": model.config.to_dict(),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    files[MANIFEST_NAME] = out_dir / MANIFEST_NAME
    return ExportResult(out_dir, files, time.perf_counter() - start)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's and quantizer's progress chatter (stdout, logging, warnings)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise SamoutError(
            f"ONNX export needs the onnx extra ({err.name} is missing): pip install 'samout[onnx]'"
        ) from None


# -- running the graphs (numpy + onnxruntime) -----------------------------------

class OnnxSamOut:
    """The exported graphs behind `logits, state = model(ids, state)`, in numpy."""

    def __init__(self, out_dir: str | Path, decode: str | None = None, prefill: str | None = None) -> None:
        import onnxruntime as ort

        out_dir = Path(out_dir)
        self.manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        self.decode = ort.InferenceSession(str(out_dir / (decode or self.manifest["decode"])), opts,
                                           providers=providers)
        self.prefill = ort.InferenceSession(str(out_dir / (prefill or self.manifest["prefill"])), opts,
                                            providers=providers)

    def init_state(self, batch_size: int) -> list[np.ndarray]:
        _, h, dh = self.manifest["state_shape"]
        return [np.full((batch_size, h, dh), -np.inf, np.float32) for _ in range(self.manifest["num_layers"])]

    def __call__(self, ids: np.ndarray, state: list[np.ndarray] | None = None):
        ids = np.asarray(ids, dtype=np.int64)
        state = self.init_state(ids.shape[0]) if state is None else state
        chunks = []
        limit = self.manifest["max_prefill_len"]
        pos = 0
        while pos < ids.shape[1]:
            piece = ids[:, pos : pos + limit]
            session = self.decode if piece.shape[1] == 1 else self.prefill
            feed = {"input_ids": piece, **dict(zip(self.manifest["state_inputs"], state))}
            logits, *state = session.run(None, feed)
            chunks.append(logits)
            pos += piece.shape[1]
        return np.concatenate(chunks, axis=1), state


def greedy_tokens(step, ids: np.ndarray, steps: int) -> np.ndarray:
    """`steps` greedy tokens after `ids`, with `step(ids, state) -> (logits, state)` numpy-valued."""
    logits, state = step(ids, None)
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None]
        out.append(nxt)
        logits, state = step(nxt, state)
    return np.concatenate(out, axis=1)


def torch_step(model: SamOut):
    def step(ids, state):
        with torch.no_grad():
            s = None if state is None else State([{"running_max": torch.from_numpy(t)} for t in state])
            logits, new = model(torch.from_numpy(np.asarray(ids, dtype=np.int64)), s)
        return logits.numpy(), [layer["running_max"].numpy() for layer in new]

    return step


def check_onnx(model: SamOut, onnx_model: OnnxSamOut, steps: int = 64, seed: int = 0,
               prompt_len: int = 16) -> dict[str, float | int | bool]:
    """Compare ONNX with PyTorch: logits and states of prefill and decode, greedy tokens."""
    model = model.float().cpu().eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, prompt_len), generator=g).numpy()
    ref = torch_step(model)
    ref_logits, ref_state = ref(ids, None)
    got_logits, got_state = onnx_model(ids, None)
    prefill_diff = float(np.abs(ref_logits - got_logits).max())
    state_diff = max(float(np.abs(a - b).max()) for a, b in zip(ref_state, got_state))
    nxt = ref_logits[:, -1:].argmax(-1)
    decode_diff = float(np.abs(ref(nxt, ref_state)[0] - onnx_model(nxt, ref_state)[0]).max())
    ref_tokens = greedy_tokens(ref, ids, steps)
    got_tokens = greedy_tokens(onnx_model, ids, steps)
    agree = int((ref_tokens == got_tokens).all(axis=0).cumprod().sum())
    return {"prefill_max_abs_diff": prefill_diff, "decode_max_abs_diff": decode_diff,
            "state_max_abs_diff": state_diff, "greedy_steps": steps, "greedy_steps_equal": agree,
            "greedy_equal": bool(agree == steps)}


# -- int8 dynamic quantization --------------------------------------------------

def quantize_int8(out_dir: str | Path) -> dict[str, Path]:
    """Weights to int8 (activations quantized on the fly): decode.int8.onnx, prefill.int8.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir = Path(out_dir)
    files = {}
    for name in (DECODE_NAME, PREFILL_NAME):
        target = out_dir / name.replace(".onnx", ".int8.onnx")
        with _quiet():
            quantize_dynamic(out_dir / name, target, weight_type=QuantType.QInt8)
        files[name] = target
    return files


def compare_models(reference: OnnxSamOut, candidate: OnnxSamOut, vocab_size: int, steps: int = 64,
                   text_ids: np.ndarray | None = None, seed: int = 0) -> dict[str, float | int]:
    """How far `candidate` (e.g. int8) is from `reference`: logits, greedy agreement, perplexity."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (2, 16))
    a, _ = reference(ids)
    b, _ = candidate(ids)
    out = {"max_abs_logit_diff": float(np.abs(a - b).max())}
    ref_tokens, got_tokens = greedy_tokens(reference, ids, steps), greedy_tokens(candidate, ids, steps)
    out["greedy_token_agreement"] = float((ref_tokens == got_tokens).mean())
    if text_ids is not None and text_ids.size > 1:
        x = text_ids[None, :]
        out["perplexity_reference"] = perplexity(reference(x[:, :-1])[0], x[:, 1:])
        out["perplexity_candidate"] = perplexity(candidate(x[:, :-1])[0], x[:, 1:])
        out["perplexity_tokens"] = int(x.shape[1] - 1)
    return out


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(math.exp(nll.mean()))


def copy_tokenizer(run_dir: Path, out_dir: Path) -> Path | None:
    src = Path(run_dir) / TOKENIZER_NAME
    if not src.is_file():
        return None
    dst = Path(out_dir) / TOKENIZER_NAME
    shutil.copyfile(src, dst)
    return dst
