"""Low-precision inference: weights in bfloat16 or int8, activations and state in float32.

    model = convert_for_inference(model, "int8")      # or "bfloat16", "float32" (no-op)
    model = samout.load_pretrained(run_dir, dtype="int8")
    add_dtype_argument(parser)                        # the one `--dtype` flag of the CLI

Decoding one token reads every weight once, so at batch 1 its speed is bounded by memory
bandwidth / bytes of weights; only smaller weights go past float32's limit. Every
`nn.Linear` (mixer projections, FFN, output head) is replaced; the embedding stays
float32 (a token reads one row of it), as do LayerNorm, the mixers' small parameters and
the running-max state (the state contract `logits, state = model(ids, state)` is kept).

- "bfloat16": `BF16Linear`, weights in bf16. One input row on CPU (decoding at batch 1)
  goes to samout's row kernel (samout.ops.row_gemv, built on first use with the
  machine's C compiler; float32 input, float32 sums): oneDNN's bf16 kernels read the
  85M model's 768-wide matrices at 15-25 GB/s there, for 1.39x float32's tokens/s. Every
  other shape goes to oneDNN with the weight prepacked once
  (`torch.ops.mkldnn._reorder_linear_weight`; the input rounded to bf16).
- "int8": `Int8Linear`, weights int8 with one float32 scale per output channel
  (symmetric: w ≈ scale[o] * q[o, i], q in [-127, 127]). One input row on CPU goes to
  the row kernel too, weight-only (the input stays float32). Other shapes run fbgemm's
  dynamic int8 kernel (`torch.ops.quantized.linear_dynamic`, what `torch.ao`'s
  `quantize_dynamic` uses), which also rounds the activations to 8 bits, per call, with
  one scale for the whole input tensor; the weight-only
  `torch.ops.aten._weight_int8pack_mm` (gpt-fast's CPU kernel) was 2.3x *slower* than
  float32 there, and dequantize-then-matmul slower still. Elsewhere (CUDA, no fbgemm)
  it computes x @ (q * scale).T, weight-only.
- Both fuse each gated FFN's ffn1 and gate into one Linear first (`_fuse_ffn_input`).
- Where the row kernel is available a layer holds its weight again in the kernel's
  layout (`weight_rows`, not saved), beside oneDNN's / fbgemm's: memory for speed, as
  each call reads one layout. `SAMOUT_CPU_KERNELS=0` turns the kernel off.
The accuracy cost (perplexity, greedy agreement with float32) is measured by
`samout bench speed --lowp --accuracy-run RUN_DIR` (samout/bench/lowp.py).
"""

from __future__ import annotations

import argparse
import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samout.ops import cpu_build, row_gemv
from samout.ops.tracing import is_tracing

INFERENCE_DTYPES = ("float32", "bfloat16", "int8")
DEFAULT_INFERENCE_DTYPE = "float32"


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `--dtype` flag of every inference command (generate, eval, chat, serve)."""
    parser.add_argument(
        "--dtype", choices=INFERENCE_DTYPES, default=DEFAULT_INFERENCE_DTYPE,
        help="weights for inference: float32, bfloat16, or int8 (per-channel scales; activations "
             "and the running-max state stay float32); see README 'Low-precision decoding'")


def check_dtype(dtype: str) -> str:
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"unknown inference dtype {dtype!r}: choose one of {', '.join(INFERENCE_DTYPES)}")
    return dtype


# -- int8 ---------------------------------------------------------------------------


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel: (q int8 [out, in], scale float32 [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # clamp: an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic")


@functools.cache
def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _reduce_range() -> bool:
    # Without VNNI, fbgemm adds pairs of u8*s8 products in int16, which can saturate with
    # full 8-bit activations; 7-bit activations (reduce_range) avoid that, at some accuracy.
    return not _cpu_has_vnni()


def _row_kernel_takes(linear: nn.Module, x: Tensor) -> bool:
    """Whether a call goes to samout's row kernel (samout.ops.row_gemv): one float32 CPU
    row, outside autograd and graph capture, on a layer that holds the kernel's layout."""
    # Graph capture is checked without the slow ONNX check (see is_tracing): this runs per
    # layer and token.
    return (linear.weight_rows is not None and x.dtype == torch.float32 and x.numel() == linear.in_features
            and x.is_contiguous() and x.is_cpu and not (torch.is_grad_enabled() and x.requires_grad)
            and not is_tracing(onnx=False))


class Int8Linear(nn.Module):
    """A Linear with int8 weights and per-output-channel float32 scales (see the module doc)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._packed = None  # fbgemm's packed weight, built on first CPU use
        rows = q.device.type == "cpu" and row_gemv.available()
        self.register_buffer("weight_rows", row_gemv.pack_rows(q) if rows else None, persistent=False)
        self.register_load_state_dict_post_hook(Int8Linear._repack)

    @staticmethod
    def _repack(module: Int8Linear, incompatible) -> None:
        # The packed forms derive from weight_int8 (the saved one): rebuilt after a load.
        module._packed = None
        if module.weight_rows is not None:
            module.weight_rows = row_gemv.pack_rows(module.weight_int8)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self) -> Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def uses_fbgemm(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and _fbgemm_available()

    def _packed_params(self):
        if self._packed is None:
            with _engine("fbgemm"), warnings.catch_warnings():
                # The qint8 tensor exists only to be packed (torch warns about quantized tensors).
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.scale.double(), torch.zeros_like(self.scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._packed

    def uses_row_kernel(self, x: Tensor) -> bool:
        return _row_kernel_takes(self, x)

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_row_kernel(x):
            y = row_gemv.int8_gemv(x, self.weight_rows, self.scale, self.out_features, self.bias, check=False)
            return y.view(*x.shape[:-1], self.out_features)
        if self.uses_fbgemm(x):
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self._packed_params(),
                                                   _reduce_range())
            return y.view(*shape[:-1], self.out_features)
        y = F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class _engine:
    """Set torch.backends.quantized.engine for a block (older torch has no engine_scope)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        self.saved = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.name

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.saved


def quantize_activations_ref(x: Tensor, reduce_range: bool = False) -> Tensor:
    """What fbgemm's dynamic kernel does to its input, in plain float: one affine uint8
    scale for the whole tensor (range widened to include 0), rounded, then dequantized.

    Written to match it bit for bit: PyTorch's ChooseQuantizationParams (scale computed in
    double and stored as float32; the zero point taken from whichever end, min or max, has
    the smaller rounding error, then rounded half to even), and fbgemm's quantization
    round(x * (1/scale) + zero) with one rounding for the multiply-add (an FMA), emulated
    here in float64 before the cast to float32."""
    qmax = 127 if reduce_range else 255
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / qmax if hi > lo else 0.1  # what fbgemm uses for an all-zero input
    from_min, from_max = -lo / scale, qmax - hi / scale
    zero = from_min if abs(lo / scale) < qmax + abs(hi / scale) else from_max
    zero = int(min(max(round(zero), 0), qmax))  # Python's round is half to even, as nearbyint
    scale32 = torch.tensor(scale, dtype=torch.float32)
    inverse = float(1.0 / scale32)  # float32 1/scale, as fbgemm computes it
    q = torch.clamp(torch.round((x.double() * inverse + zero).float()), 0, qmax)
    return (q - zero) * scale32


# -- bfloat16 -----------------------------------------------------------------------


@functools.cache
def _mkldnn_bf16() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class BF16Linear(nn.Module):
    """A Linear with bfloat16 weights; float32 in and out.

    On CPU, one input row (decoding at batch 1) goes to samout's kernel
    (samout.ops.row_gemv: float32 input, bf16 weights, float32 sums) and every other
    shape to oneDNN with the weight prepacked once (input rounded to bf16). Where the
    kernel is available the weight is held in both layouts, `weight_rows` for it (a
    non-persistent buffer) and `weight_bf16` for oneDNN: twice the bf16 bytes resident,
    while each call reads one. Elsewhere a plain bf16 `F.linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        plain = linear.weight.detach().to(torch.bfloat16)
        on_cpu = plain.device.type == "cpu"
        self.packed = on_cpu and _mkldnn_bf16()
        self.register_buffer("weight_bf16", torch.ops.mkldnn._reorder_linear_weight(plain, 1)
                             if self.packed else plain)
        b = linear.bias
        self.register_buffer("bias", None if b is None else b.detach().to(torch.bfloat16))
        rows = on_cpu and row_gemv.available()
        self.register_buffer("weight_rows", row_gemv.pack_rows(plain) if rows else None, persistent=False)
        self.register_buffer("bias_f32", self.bias.float() if rows and b is not None else None,
                             persistent=False)

    def uses_row_kernel(self, x: Tensor) -> bool:
        return _row_kernel_takes(self, x)

    def forward(self, x: Tensor) -> Tensor:
        """Out in x's dtype: a bf16 input (FeedForward's `in_dtype`) stays bf16."""
        if self.uses_row_kernel(x):
            y = row_gemv.bf16_gemv(x, self.weight_rows, self.out_features, self.bias_f32, check=False)
            return y.view(*x.shape[:-1], self.out_features)
        xb = x.to(torch.bfloat16)
        if self.packed and x.device.type == "cpu":
            if x.dim() == 2:
                y = torch.ops.mkldnn._linear_pointwise(xb, self.weight_bf16, self.bias, "none", [], "")
            else:
                y = torch.ops.mkldnn._linear_pointwise(xb.reshape(-1, x.shape[-1]), self.weight_bf16,
                                                       self.bias, "none", [], "")
                y = y.view(*x.shape[:-1], self.out_features)
            return y.to(x.dtype)
        return F.linear(xb, self.weight_bf16, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bfloat16"


# Buffers that hold a weight again in another layout (a call reads one of them).
ALTERNATE_LAYOUTS = ("weight_rows", "bias_f32")


# -- conversion ---------------------------------------------------------------------

# Linears kept in float32: openash's head mixing (a 5H -> H matrix, 320 numbers) whose
# weight the mixer kernels read directly.
KEEP_FLOAT = frozenset({"head_mix"})


def convert_for_inference(model: nn.Module, dtype: str) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by its `dtype` form and put the model
    in eval mode; "float32" changes nothing. Returns the model. Inference only: the new
    modules have no trainable weights."""
    check_dtype(dtype)
    model.eval()
    if dtype == DEFAULT_INFERENCE_DTYPE:
        return model
    make = Int8Linear.from_linear if dtype == "int8" else BF16Linear
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not row_gemv.available() and cpu_build.enabled():
        warnings.warn(f"samout's CPU row kernel is unavailable ({row_gemv.why_unavailable()}): "
                      f"{dtype} decoding at batch 1 uses PyTorch's kernels, which are slower", stacklevel=2)
    for module in list(model.modules()):
        _fuse_ffn_input(module)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in KEEP_FLOAT:
                setattr(module, child_name, make(child))
        _ffn_in_dtype(module, dtype)
    model.inference_dtype = dtype
    return model


def _fuse_ffn_input(module: nn.Module) -> None:
    """A gated FFN's ffn1 and gate read the same input: one Linear with their weights side
    by side (`FeedForward.in_proj`) makes one low-precision call of twice the width instead
    of two, each converting or quantizing that input. Per-output-channel int8 scales make
    it the same numbers as the two apart; it is fewer calls, not fewer bytes."""
    ffn1, gate = getattr(module, "ffn1", None), getattr(module, "gate", None)
    if not (hasattr(module, "in_proj") and type(ffn1) is nn.Linear and type(gate) is nn.Linear):
        return
    fused = nn.Linear(ffn1.in_features, ffn1.out_features + gate.out_features, bias=ffn1.bias is not None,
                      device=ffn1.weight.device)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([ffn1.weight, gate.weight]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([ffn1.bias, gate.bias]))
    module.in_proj, module.ffn1, module.gate = fused, None, None


def _ffn_in_dtype(module: nn.Module, dtype: str) -> None:
    """bfloat16: the gated FFN runs in bf16 from in_proj to ffn2 (`FeedForward.in_dtype`).
    ffn2 rounds its input to bf16 anyway, and a bf16 product is the float product rounded,
    so this gives the same numbers as converting back and forth, with four fewer
    conversions per layer."""
    in_proj, ffn2 = getattr(module, "in_proj", None), getattr(module, "ffn2", None)
    if dtype == "bfloat16" and isinstance(in_proj, BF16Linear) and isinstance(ffn2, BF16Linear) \
            and in_proj.weight_rows is None:  # the row kernel takes float32 rows: no conversions
        module.in_dtype = torch.bfloat16


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer except the
    embedding table (one row per token)."""
    skip = {id(model.embed.weight)} if hasattr(model, "embed") else set()
    skip |= {id(t) for name, t in model.named_buffers() if name.rsplit(".", 1)[-1] in ALTERNATE_LAYOUTS}
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in skip:
            total += t.numel() * t.element_size()
    return total
