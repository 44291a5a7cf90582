"""samout.ops.row_gemv: the C kernels against their references, their layout, build and
fallback, and the choice of path in BF16Linear and Int8Linear."""

import copy
import os
import platform
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from samout.ops import cpu_build, row_gemv
from samout.quant import BF16Linear, Int8Linear, convert_for_inference, quantize_per_channel, weight_bytes

needs_kernel = pytest.mark.skipif(not row_gemv.available(),
                                  reason=f"row kernels unavailable: {row_gemv.why_unavailable()}")


@pytest.fixture(autouse=True)
def scan_path():  # overrides tests/ops/conftest.py's parametrized one: no running max here
    return None


def _case(out, inp, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g).bfloat16()
    b = torch.randn(out, generator=g) if bias else None
    x = torch.randn(1, inp, generator=g)
    return w, b, x


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out,inp", [(48, 64), (3, 16), (37, 40), (1, 1), (261, 768), (5, 33)])
def test_kernel_equals_reference(out, inp, bias, threads):
    w, b, x = _case(out, inp, bias, seed=out * 1000 + inp)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = row_gemv.bf16_gemv(x, row_gemv.pack_rows(w), out, b)
    finally:
        torch.set_num_threads(saved)
    ref = row_gemv.bf16_gemv_ref(x, w, b)
    assert y.shape == (1, out) and y.dtype == torch.float32
    # Each product is exact in float32; only the order of the float32 sums differs.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * inp ** 0.5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out,inp", [(48, 64), (3, 16), (37, 40), (1, 1), (261, 768), (5, 33)])
def test_int8_kernel_equals_reference(out, inp, bias, threads):
    w, b, x = _case(out, inp, bias, seed=out * 1000 + inp + 7)
    q, scale = quantize_per_channel(w.float())
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = row_gemv.int8_gemv(x, row_gemv.pack_rows(q), scale, out, b)
    finally:
        torch.set_num_threads(saved)
    ref = row_gemv.int8_gemv_ref(x, q, scale, b)
    assert y.shape == (1, out) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * inp ** 0.5)


@needs_kernel
def test_int8_kernel_is_weight_only():
    # fbgemm rounds the input to 8 bits; the row kernel keeps it: exact here in float32.
    q = torch.ones(4, 16, dtype=torch.int8)
    x = torch.linspace(0, 1, 16)[None] * (1 + 2 ** -12)
    y = row_gemv.int8_gemv(x, row_gemv.pack_rows(q), torch.full((4,), 0.5), 4)
    torch.testing.assert_close(y, (x.sum() * 0.5).expand(1, 4), rtol=1e-6, atol=0)


@needs_kernel
def test_kernel_keeps_the_input_in_float32():
    # An input that bf16 cannot hold: the kernel's answer is the float32 one, not the rounded.
    w = torch.ones(4, 16, dtype=torch.bfloat16)
    x = torch.full((1, 16), 1.0 + 2 ** -12)
    y = row_gemv.bf16_gemv(x, row_gemv.pack_rows(w), 4)
    assert torch.equal(y, torch.full((1, 4), 16 * (1.0 + 2 ** -12)))


@needs_kernel
def test_pack_rows_layout():
    w, _, _ = _case(10, 40, False)
    p = row_gemv.pack_rows(w)
    rows = p.shape[2]
    assert p.shape == (-(-10 // rows), 3, rows, 16) and p.dtype == torch.bfloat16 and p.is_contiguous()
    for o in range(10):
        for i in range(40):
            assert p[o // rows, i // 16, o % rows, i % 16] == w[o, i]
    flat = p.transpose(1, 2).reshape(p.shape[0] * rows, 48)
    assert (flat[10:] == 0).all() and (flat[:, 40:] == 0).all()  # the padding is zeros


@needs_kernel
def test_kernel_rejects_wrong_inputs():
    w, _, x = _case(8, 32, False)
    p = row_gemv.pack_rows(w)
    with pytest.raises(ValueError, match="one float32 CPU row"):
        row_gemv.bf16_gemv(x.repeat(2, 1), p, 8)
    with pytest.raises(ValueError, match="one float32 CPU row"):
        row_gemv.bf16_gemv(x.double(), p, 8)
    with pytest.raises(ValueError, match="one float32 CPU row"):
        row_gemv.bf16_gemv(torch.randn(1, 64), p, 8)
    with pytest.raises(ValueError, match="float32 of 8 values"):
        row_gemv.bf16_gemv(x, p, 8, torch.zeros(7))
    with pytest.raises(ValueError, match="int8 packed weight"):
        row_gemv.int8_gemv(x, p, torch.ones(8), 8)
    with pytest.raises(ValueError, match="bfloat16 or int8"):
        row_gemv.pack_rows(torch.randn(8, 32))


@needs_kernel
def test_bf16_linear_takes_the_kernel_for_one_row_only(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    b = BF16Linear(lin)
    assert b.weight_rows is not None
    calls = []
    real = row_gemv.bf16_gemv
    monkeypatch.setattr(row_gemv, "bf16_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = lin.weight.detach().bfloat16()
    with torch.no_grad():
        one = torch.randn(1, 1, 64)
        y = b(one)
        assert calls and y.shape == (1, 1, 48)
        torch.testing.assert_close(y[0], row_gemv.bf16_gemv_ref(one[0], w, lin.bias.bfloat16()),
                                   rtol=1e-5, atol=1e-5)
        calls.clear()
        many = torch.randn(3, 64)
        b(many)
        assert not calls  # batches go to oneDNN
    x = torch.randn(1, 64, requires_grad=True)
    b(x)
    assert not calls  # autograd never enters the kernel


@needs_kernel
def test_int8_linear_takes_the_kernel_for_one_row_only(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = Int8Linear.from_linear(lin)
    assert layer.weight_rows is not None
    calls = []
    real = row_gemv.int8_gemv
    monkeypatch.setattr(row_gemv, "int8_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        one = torch.randn(1, 64)
        y = layer(one)
        assert calls
        torch.testing.assert_close(y, row_gemv.int8_gemv_ref(one, layer.weight_int8, layer.scale, layer.bias),
                                   rtol=1e-5, atol=1e-5)
        calls.clear()
        layer(torch.randn(2, 64))
        assert not calls  # batches go to fbgemm


@needs_kernel
def test_alternate_layout_is_not_saved_or_counted():
    lin = nn.Linear(64, 48)
    b = BF16Linear(lin)
    assert "weight_rows" not in b.state_dict() and "bias_f32" not in b.state_dict()
    assert weight_bytes(nn.Sequential(b)) == 64 * 48 * 2 + 48 * 2
    i8 = Int8Linear.from_linear(lin)
    assert "weight_rows" not in i8.state_dict()
    assert weight_bytes(nn.Sequential(i8)) == 64 * 48 + 48 * 4 + 48 * 4


@needs_kernel
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_decode_with_kernel_matches_without(monkeypatch, dtype):
    from samout.config import SamOutConfig
    from samout.models import SamOut

    torch.manual_seed(0)
    config = SamOutConfig.from_preset("tiny", vocab_size=96)
    ids = torch.randint(0, 96, (1, 10))

    def decode(model):
        with torch.no_grad():
            logits, state = model(ids[:, :4])
            out = [logits[:, -1]]
            for t in range(4, 10):
                logits, state = model(ids[:, t : t + 1], state)
                out.append(logits[:, -1])
        return torch.stack(out), state

    base = SamOut(config).eval()
    fast = convert_for_inference(copy.deepcopy(base), dtype)
    monkeypatch.setenv(cpu_build.ENV_SWITCH, "0")
    cpu_build.load.cache_clear()
    row_gemv._lib.cache_clear()
    try:
        assert not row_gemv.available()
        slow = convert_for_inference(copy.deepcopy(base), dtype)
    finally:
        monkeypatch.delenv(cpu_build.ENV_SWITCH)
        cpu_build.load.cache_clear()
        row_gemv._lib.cache_clear()
    kinds = (BF16Linear, Int8Linear)
    assert all(m.weight_rows is None for m in slow.modules() if isinstance(m, kinds))
    assert all(m.weight_rows is not None for m in fast.modules() if isinstance(m, kinds))
    a, sa = decode(fast)
    b, sb = decode(slow)
    # The kernels keep inputs in float32 where oneDNN rounds them to bf16 and fbgemm to
    # 8 bits: close, not equal.
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x["running_max"], y["running_max"], rtol=0.05, atol=0.05)


def test_build_failure_gives_a_reason_and_no_library(tmp_path, monkeypatch):
    (tmp_path / "broken.c").write_text("this is not C\n")
    monkeypatch.setattr(cpu_build, "CSRC", tmp_path)
    monkeypatch.setenv("SAMOUT_CACHE_DIR", str(tmp_path / "cache"))
    cpu_build.load.cache_clear()
    try:
        if cpu_build._compiler() is None:
            assert cpu_build.load("broken") is None
            assert "no C compiler" in cpu_build.why_unavailable("broken")
        else:
            assert cpu_build.load("broken") is None
            assert "could not build broken.c" in cpu_build.why_unavailable("broken")
        monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
        cpu_build.load.cache_clear()
        assert cpu_build.load("broken") is None
        assert cpu_build.why_unavailable("broken") == "no C compiler (cc, gcc or clang) on PATH"
    finally:
        cpu_build.load.cache_clear()


def test_switch_turns_kernels_off(monkeypatch):
    monkeypatch.setenv(cpu_build.ENV_SWITCH, "0")
    cpu_build.load.cache_clear()
    try:
        assert cpu_build.load("row_gemv") is None
        assert cpu_build.why_unavailable("row_gemv") == "SAMOUT_CPU_KERNELS=0"
    finally:
        cpu_build.load.cache_clear()


def test_conversion_warns_when_the_kernel_cannot_be_built(monkeypatch):
    from samout.config import SamOutConfig
    from samout.models import SamOut

    monkeypatch.setattr(cpu_build, "_compiler", lambda: None)
    cpu_build.load.cache_clear()
    row_gemv._lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="row kernel is unavailable .no C compiler"):
            model = convert_for_inference(SamOut(SamOutConfig.from_preset("tiny", vocab_size=96)), "int8")
        with torch.no_grad():  # and the model still decodes, on fbgemm
            logits, state = model(torch.tensor([[1, 2, 3]]))
            logits, state = model(torch.tensor([[4]]), state)
        assert logits.shape == (1, 1, 96)
    finally:
        cpu_build.load.cache_clear()
        row_gemv._lib.cache_clear()


def test_int8_linear_repacks_after_loading_a_state_dict():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(32, 8))
    other = Int8Linear.from_linear(nn.Linear(32, 8))
    x = torch.randn(2, 32)
    with torch.no_grad():
        layer(x)  # builds fbgemm's packed weight too
        layer.load_state_dict(other.state_dict())
        for rows in (x[:1], x):  # the row kernel (where built) and fbgemm
            torch.testing.assert_close(layer(rows), other(rows), rtol=0, atol=0)


@pytest.fixture
def tiny_kernel(tmp_path, monkeypatch):
    """A kernel `tiny` (returns 42) and an empty private place for the cache: `load` afresh."""
    if cpu_build._compiler() is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("no C compiler, or no kernels for this CPU")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.c").write_text("int answer(void) { return 42; }\n")
    monkeypatch.setattr(cpu_build, "CSRC", tmp_path / "src")
    monkeypatch.setenv(cpu_build.ENV_SWITCH, "1")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("SAMOUT_CACHE_DIR", str(home))
    monkeypatch.setattr(cpu_build, "_temp_dir", None)
    cpu_build.load.cache_clear()
    yield home / "kernels"
    cpu_build.load.cache_clear()


def loaded_from(library) -> Path:
    return Path(library._name).parent


def test_the_kernel_cache_is_created_private(tiny_kernel):
    library = cpu_build.load("tiny")
    assert library.answer() == 42 and loaded_from(library) == tiny_kernel
    st = os.stat(tiny_kernel)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert cpu_build.why_unavailable("tiny") is None


def test_a_cache_of_ours_no_one_else_could_write_is_tightened(tiny_kernel):
    tiny_kernel.mkdir(mode=0o755)
    os.chmod(tiny_kernel, 0o755)
    assert loaded_from(cpu_build.load("tiny")) == tiny_kernel
    assert stat.S_IMODE(os.stat(tiny_kernel).st_mode) == 0o700


def test_a_planted_library_in_a_world_writable_cache_is_never_loaded(tiny_kernel):
    """A shared cache (0777) may hold a library another user planted under the very name
    `load` looks for: the cache is passed over for a fresh private temporary directory."""
    name = Path(cpu_build.load("tiny")._name).name
    cpu_build.load.cache_clear()
    (tiny_kernel.parent / "evil.c").write_text("int answer(void) { return 666; }\n")
    subprocess.run([cpu_build._compiler(), "-shared", "-fPIC", str(tiny_kernel.parent / "evil.c"),
                    "-o", str(tiny_kernel / name)], check=True)
    os.chmod(tiny_kernel, 0o777)
    library = cpu_build.load("tiny")
    assert library.answer() == 42
    where = loaded_from(library)
    assert where != tiny_kernel and where.name.startswith("samout-kernels-")
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700 and os.stat(where).st_uid == os.getuid()
    assert cpu_build.why_unavailable("tiny") is None  # loaded


def test_a_cache_owned_by_someone_else_is_never_loaded_from(tiny_kernel, monkeypatch):
    cpu_build.load("tiny")  # built into the (private) cache
    cpu_build.load.cache_clear()
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):  # the cache, as if another user had made it
        st = real_lstat(path, *args, **kwargs)
        if Path(path) != tiny_kernel:
            return st
        fields = list(st)
        fields[4] = os.getuid() + 1  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(os, "lstat", lstat)
    library = cpu_build.load("tiny")
    assert library.answer() == 42 and loaded_from(library) != tiny_kernel


def test_a_library_writable_by_others_is_not_loaded(tiny_kernel):
    library = cpu_build.load("tiny")
    target = Path(library._name)
    os.chmod(target, 0o666)
    cpu_build.load.cache_clear()
    assert loaded_from(cpu_build.load("tiny")) != tiny_kernel


def test_the_old_shared_temporary_directory_is_not_used(tiny_kernel, monkeypatch, tmp_path):
    """Before: an unusable cache fell back to $TMPDIR/samout-kernels, shared by all users,
    and loaded any row_gemv-<key>.so already there."""
    shared = tmp_path / "tmp"
    (shared / "samout-kernels").mkdir(parents=True)
    os.chmod(shared / "samout-kernels", 0o777)
    monkeypatch.setattr(cpu_build.tempfile, "tempdir", str(shared))
    tiny_kernel.parent.rmdir()
    tiny_kernel.parent.write_text("a file where the cache's parent should be\n")  # the cache cannot be made
    library = cpu_build.load("tiny")
    assert library.answer() == 42
    assert loaded_from(library).parent == shared and loaded_from(library).name.startswith("samout-kernels-")
    assert list((shared / "samout-kernels").iterdir()) == []
