"""Low-precision inference (samout.quant): each low-precision Linear against a plain float
reference, the converted model's state contract, and generate/eval with every --dtype."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samout
from samout import SamOut, SamOutConfig
from samout.quant import (
    INFERENCE_DTYPES,
    BF16Linear,
    Int8Linear,
    _reduce_range,
    convert_for_inference,
    quantize_activations_ref,
    quantize_per_channel,
    weight_bytes,
)


def test_per_channel_quantization_round_trips_within_half_a_step(seed):
    w = torch.randn(24, 40) * torch.rand(24, 1) * 3
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    assert q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8))


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_int8_linear_equals_dequantized_reference(seed, rows):
    lin = nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        y = q(x)
        if q.uses_row_kernel(x):  # one row on CPU: samout's weight-only kernel
            ref = x @ (q.weight_int8.float() * q.scale[:, None]).T + q.bias
        elif q.uses_fbgemm(x):
            # fbgemm also rounds the activations to 8 bits (one scale per call): same reference.
            xq = quantize_activations_ref(x, _reduce_range())
            ref = F.linear(xq, q.weight_int8.float() * q.scale[:, None], q.bias)
        else:
            ref = x @ (q.weight_int8.float() * q.scale[:, None]).T + q.bias
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        # And close to the float layer it came from (int8 error, not float rounding).
        exact = lin(x)
        assert (y - exact).abs().max() <= 0.05 * exact.abs().max()
        assert not torch.equal(y, exact)


def test_int8_linear_weight_only_path_is_exact_dequantization(seed, monkeypatch):
    lin = nn.Linear(32, 16)
    q = Int8Linear.from_linear(lin)
    monkeypatch.setattr(Int8Linear, "uses_fbgemm", lambda self, x: False)  # as on CUDA
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.dequantized_weight().T + q.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_bf16_linear_equals_bf16_reference(seed, rows):
    lin = nn.Linear(64, 48)
    b = BF16Linear(lin)
    x = torch.randn(rows, 3, 64)
    with torch.no_grad():
        ref = F.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
        y = b(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 3, 48)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)  # bf16 rounding of the sums' order


def _model(mixer="openash"):
    config = SamOutConfig.from_preset("tiny", mixer=mixer, vocab_size=96)
    return SamOut(config).eval()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_converted_model_keeps_the_state_contract(seed, dtype):
    model = _model()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref_logits, _ = model(ids)
        convert_for_inference(model, dtype)
        linears = [m for m in model.modules() if type(m) is nn.Linear]
        assert [type(m).__name__ for m in linears] == ["Linear"] * len(model.layers)  # head_mix only
        full, full_state = model(ids)
        logits, state = model(ids[:, :7])
        steps = [logits]
        for t in range(7, 12):
            logits, state = model(ids[:, t : t + 1], state)
            steps.append(logits)
    assert all(s["running_max"].dtype == torch.float32 for s in full_state)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a["running_max"], b["running_max"], rtol=0.05, atol=0.05)
    scale = full.abs().max()
    assert (torch.cat(steps, 1) - full).abs().max() <= 0.05 * scale
    assert (full - ref_logits).abs().max() <= 0.1 * scale  # close to float32, not equal
    assert not torch.equal(full, ref_logits)


def test_weight_bytes_shrink(seed):
    sizes = {}
    for dtype in INFERENCE_DTYPES:
        sizes[dtype] = weight_bytes(convert_for_inference(_model(), dtype))
    assert sizes["bfloat16"] < 0.6 * sizes["float32"]
    assert sizes["int8"] < 0.35 * sizes["float32"]


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown inference dtype 'int4'"):
        convert_for_inference(_model(), "int4")


def test_load_pretrained_with_dtype(tmp_path, seed):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = samout.load_pretrained(tmp_path, dtype="int8")
    assert isinstance(loaded.head, Int8Linear) and isinstance(loaded.layers[0].mixer.proj, Int8Linear)
    assert isinstance(samout.load_pretrained(tmp_path).head, nn.Linear)


@pytest.mark.parametrize("dtype", INFERENCE_DTYPES)
def test_generate_and_eval_run_with_each_dtype(trained_run, dtype):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "samout", *args], capture_output=True, text=True,
                              timeout=300)

    gen = run("generate", str(trained_run), "--prompt", "To be", "--max-new-tokens", "5",
              "--temperature", "0", "--dtype", dtype)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("To be") and len(gen.stdout.strip()) > len("To be")
    ev = run("eval", str(trained_run), "--max-windows", "2", "--json", "--quiet", "--dtype", dtype)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert 0 < result["loss"] < 20


def test_bad_dtype_flag_is_a_one_line_error(trained_run):
    out = subprocess.run([sys.executable, "-m", "samout", "generate", str(trained_run), "--prompt", "x",
                          "--dtype", "int4"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "invalid choice: 'int4'" in out.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_fused_ffn_input_gives_the_numbers_of_ffn1_and_gate_apart(seed, dtype):
    """convert_for_inference puts ffn1 and gate side by side (one call); per-output-channel
    weights make that the same function as the two converted apart."""
    from samout.models.samout import FeedForward

    ffn = FeedForward(48)
    make = Int8Linear.from_linear if dtype == "int8" else BF16Linear
    ffn1, gate, ffn2 = make(ffn.ffn1), make(ffn.gate), make(ffn.ffn2)
    x = torch.randn(5, 48)
    with torch.no_grad():
        if dtype == "int8":
            apart = ffn2(ffn1(x) * torch.relu(gate(x)))
        else:  # bf16 all the way from ffn1/gate to ffn2, as the converted FFN runs
            xb = x.bfloat16()
            apart = ffn2(ffn1(xb) * torch.relu(gate(xb))).float()
        holder = nn.Sequential(ffn)
        convert_for_inference(holder, dtype)
        assert ffn.ffn1 is None and ffn.gate is None and type(ffn.in_proj) is type(ffn2)
        fused = ffn(x)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, apart, rtol=1e-2 if dtype == "bfloat16" else 0,
                               atol=1e-2 if dtype == "bfloat16" else 1e-6)
