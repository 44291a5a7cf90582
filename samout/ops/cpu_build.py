"""Build the C kernels of samout/ops/csrc on first use, with the machine's C compiler.

A kernel is one C file compiled for this CPU (`-O3 -march=native -fopenmp`) into a shared
library, cached under `$SAMOUT_CACHE_DIR` (default `~/.cache/samout/kernels`) by a hash of
its source, the compiler and the CPU, and loaded with ctypes: no torch headers, so a build
takes well under a second. OpenMP resolves to the libgomp torch has already loaded (same
soname), so the kernels share torch's threads instead of starting a second pool.

Where a kernel cannot be built (no compiler, a CPU the source rejects, a read-only cache)
`load` returns None with the reason in `why_unavailable`, and callers use their PyTorch
path. `SAMOUT_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "SAMOUT_CPU_KERNELS"

_why: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("SAMOUT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "samout")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    try:  # -march=native builds for these flags; another CPU gets another library
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def why_unavailable(name: str) -> str | None:
    """Why `load(name)` returned None (None if it loaded or was never asked)."""
    return _why.get(name)


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The built library of csrc/`name`.c, or None (see `why_unavailable`)."""
    if not enabled():
        _why[name] = f"{ENV_SWITCH}=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _why[name] = f"no kernel for {platform.machine()}"
        return None
    cc = _compiler()
    if cc is None:
        _why[name] = "no C compiler (cc, gcc or clang) on PATH"
        return None
    source = (CSRC / f"{name}.c").read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _why[name] = f"{cc} --version failed: {e}"
        return None
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / "samout-kernels"):
        target = directory / f"{name}-{key}.so"
        if not target.exists():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _build(cc, CSRC / f"{name}.c", target)
            except OSError as e:  # unwritable: try the next directory
                _why[name] = f"cannot write {directory}: {e}"
                continue
            except subprocess.CalledProcessError as e:
                _why[name] = f"{cc} could not build {name}.c: {_first_error(e.stderr)}"
                return None
        try:
            return ctypes.CDLL(str(target))
        except OSError as e:
            _why[name] = f"cannot load {target}: {e}"
            return None
    return None


def _build(cc: str, source: Path, target: Path) -> None:
    # Into a temporary name, then renamed: processes building at once (pytest workers,
    # torchrun ranks) each get a whole library or none.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(source), "-o", tmp], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_error(stderr: str) -> str:
    lines = [line for line in (stderr or "").splitlines() if "error" in line]
    return (lines[0] if lines else (stderr or "").strip()[:200]).strip()
