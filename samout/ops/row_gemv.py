"""One row times a bfloat16 or int8 matrix on CPU (decoding at batch 1): C kernels and
their references.

    packed = pack_rows(weight)                 # [O, I] bf16 or int8 -> the kernels' layout
    y = bf16_gemv(x, packed, O, bias)          # x [1, I] float32 -> [1, O] float32
    y = int8_gemv(x, packed, scale, O, bias)   # y[o] = scale[o] * (q[o] . x) + bias[o]
    bf16_gemv_ref(x, weight, bias), int8_gemv_ref(x, q, scale, bias)   # plain PyTorch

The input stays float32 (oneDNN's bf16 kernels round it to bf16, fbgemm's int8 kernel
quantizes it to 8 bits per call): int8 here is weight-only. Sums are float32, in another
order than the references', so results agree to rounding. Why kernels of our own, and
the layout: csrc/row_gemv.c. They are built on first use (samout.ops.cpu_build); where
they cannot be, `available()` is False and samout.quant uses oneDNN / fbgemm.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from samout.ops import cpu_build

NAME = "row_gemv"


def bf16_gemv_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, I] float32, weight [O, I] bfloat16, bias [O] or None -> [N, O] float32."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def int8_gemv_ref(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, I] float32, q [O, I] int8, scale [O], bias [O] or None -> [N, O] float32."""
    y = F.linear(x.float(), q.float()) * scale.float()
    return y if bias is None else y + bias.float()


@functools.cache
def _lib() -> tuple[ctypes.CDLL | None, int]:
    lib = cpu_build.load(NAME)
    if lib is None:
        return None, 0
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.samout_bf16_gemv.argtypes = [p, p, p, p, i64, i64, ctypes.c_int]
    lib.samout_int8_gemv.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_int]
    lib.samout_bf16_gemv.restype = lib.samout_int8_gemv.restype = None
    return lib, int(lib.samout_row_gemv_rows())


def available() -> bool:
    """Whether the kernels built and loaded here (else see `why_unavailable()`)."""
    return _lib()[0] is not None


def why_unavailable() -> str | None:
    return cpu_build.why_unavailable(NAME)


def pack_rows(weight: Tensor) -> Tensor:
    """[O, I] (bfloat16 or int8, kept) -> the kernels' layout [ceil(O/R), ceil(I/16), R, 16]
    (R rows per block, csrc/row_gemv.c), zero-padded, contiguous, on CPU."""
    rows = _lib()[1]
    if rows == 0:
        raise RuntimeError(f"the row kernels are unavailable: {why_unavailable()}")
    if weight.dtype not in (torch.bfloat16, torch.int8):
        raise ValueError(f"pack_rows takes bfloat16 or int8 weights, got {weight.dtype}")
    o, i = weight.shape
    w = F.pad(weight.detach().cpu(), (0, -i % 16, 0, -o % rows))
    return w.view(w.shape[0] // rows, rows, w.shape[1] // 16, 16).transpose(1, 2).contiguous()


def _check(x: Tensor, packed: Tensor, dtype: torch.dtype, out_features: int,
           *vectors: Tensor | None) -> Tensor:
    in_features = x.shape[-1]
    if x.shape != (1, in_features) or x.dtype != torch.float32 or x.device.type != "cpu" \
            or packed.dtype != dtype or packed.shape[1] != -(-in_features // 16):
        raise ValueError(f"the row kernel takes one float32 CPU row of the packed width and a "
                         f"{dtype} packed weight, got x {tuple(x.shape)} {x.dtype}, packed "
                         f"{tuple(packed.shape)} {packed.dtype}")
    for v in vectors:
        if v is not None and (v.dtype != torch.float32 or not v.is_contiguous() or v.numel() != out_features):
            raise ValueError(f"scale and bias must be contiguous float32 of {out_features} values")
    return x.contiguous()


def bf16_gemv(x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None = None,
              check: bool = True) -> Tensor:
    """x [1, I] float32 times the `pack_rows` bf16 weight, plus a float32 bias -> [1, O].
    `check=False` (samout.quant's layers, which hold the invariants) skips the checks:
    at batch 1 a call's Python costs as much as reading a small matrix."""
    if check:
        x = _check(x, packed, torch.bfloat16, out_features, bias)
    y = torch.empty(1, out_features)
    _lib()[0].samout_bf16_gemv(packed.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                               y.data_ptr(), out_features, x.shape[-1], torch.get_num_threads())
    return y


def int8_gemv(x: Tensor, packed: Tensor, scale: Tensor, out_features: int,
              bias: Tensor | None = None, check: bool = True) -> Tensor:
    """x [1, I] float32 times the `pack_rows` int8 weight, per-row `scale`, float32 bias
    -> [1, O]; `check` as in `bf16_gemv`."""
    if check:
        x = _check(x, packed, torch.int8, out_features, scale, bias)
    y = torch.empty(1, out_features)
    _lib()[0].samout_int8_gemv(packed.data_ptr(), scale.data_ptr(), x.data_ptr(),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                               x.shape[-1], torch.get_num_threads())
    return y
