"""samout's row kernels (samout/ops/row_gemv.py) against PyTorch's at batch 1, two ways:

1. the 85M model's 37 matrix-vector products, cold and warm: float32 (MKL), oneDNN bf16
   (prepacked), fbgemm int8, and the row kernels. "cold" reads 768 MiB before each
   round, so the weights come from memory, not from the cache (the test machine's L3 is
   504 MiB); the median round and the bytes read per second;
2. one-token decode steps of the whole `openash-85m` model, float32 and each dtype with
   and without the row kernels, timed round-robin (median step, x = against float32).

    python scripts/row_gemv_bench.py [--threads 2] [--repeats 9]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from samout.bench.common import header_line, run_header
from samout.ops import row_gemv
from samout.quant import Int8Linear

SHAPES = [(3072, 768), (1536, 768), (768, 768)] * 12 + [(23005, 768)]  # openash-85m, one token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not row_gemv.available():
        raise SystemExit(f"row kernels unavailable: {row_gemv.why_unavailable()}")
    print("#", header_line(run_header(torch.device("cpu"), "python scripts/row_gemv_bench.py")))
    torch.manual_seed(0)
    w32 = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    wb = [w.bfloat16() for w in w32]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in wb]
    rows_bf16 = [row_gemv.pack_rows(w) for w in wb]
    int8 = [Int8Linear.from_linear(torch.nn.Linear(i, o, bias=False)) for o, i in SHAPES]
    for layer, w in zip(int8, w32):
        layer.weight_int8.copy_(torch.randint(-127, 128, w.shape, dtype=torch.int8))
    x = torch.randn(1, 768)
    xb = x.bfloat16()
    fp32_bytes = sum(w.numel() * 4 for w in w32)
    variants = {
        "float32 (MKL)": (lambda: [F.linear(x, w) for w in w32], fp32_bytes),
        "bf16 oneDNN": (lambda: [torch.ops.mkldnn._linear_pointwise(xb, w, None, "none", [], "")
                                 for w in onednn], fp32_bytes / 2),
        "bf16 row kernel": (lambda: [row_gemv.bf16_gemv(x, p, o) for p, (o, _) in zip(rows_bf16, SHAPES)],
                            fp32_bytes / 2),
        "int8 fbgemm": (lambda: [torch.ops.quantized.linear_dynamic(x, layer._packed_params(), False)
                                 for layer in int8], fp32_bytes / 4),
        "int8 row kernel": (lambda: [row_gemv.int8_gemv(x, layer.weight_rows, layer.scale, layer.out_features)
                                     for layer in int8], fp32_bytes / 4),
    }
    flush = torch.ones(768 * 2**20 // 4)
    with torch.inference_mode():
        for cold in (True, False):
            print("cold (from memory)" if cold else "warm (after the same round)")
            for name, (run, nbytes) in variants.items():
                run()
                times = []
                for _ in range(args.repeats):
                    if cold:
                        flush.sum()
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                t = sorted(times)[len(times) // 2]
                print(f"  {name:16s} {t * 1e3:7.2f} ms  {nbytes / t / 1e9:5.1f} GB/s")
    model_steps(args.repeats)


def model_steps(rounds: int, steps: int = 8) -> None:
    import copy

    from samout.config import SamOutConfig
    from samout.models import SamOut
    from samout.quant import convert_for_inference

    base = SamOut(SamOutConfig.from_preset("openash-85m")).eval()
    models = {"float32": base}
    for dtype in ("bfloat16", "int8"):
        models[dtype] = convert_for_inference(copy.deepcopy(base), dtype)
        plain = convert_for_inference(copy.deepcopy(base), dtype)
        for module in plain.modules():  # what the conversion gives where the kernels cannot be built
            if getattr(module, "weight_rows", None) is not None:
                module.weight_rows = None
            if dtype == "bfloat16" and hasattr(module, "in_dtype") and hasattr(module, "in_proj"):
                module.in_dtype = torch.bfloat16
        models[f"{dtype} PyTorch"] = plain
    ids = torch.randint(1, 1000, (1, 16))
    with torch.inference_mode():
        held = {name: [model(ids)[1], ids[:, -1:]] for name, model in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    _, held[name][0] = model(held[name][1], held[name][0])
                    times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    print("openash-85m, one-token decode step at batch 1 (round-robin, median)")
    for name, t in median.items():
        print(f"  {name:16s} {t * 1e3:7.2f} ms  {1 / t:6.1f} tokens/s  {median['float32'] / t:.2f}x")


if __name__ == "__main__":
    main()
