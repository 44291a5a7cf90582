"""Build the C kernels of samout/ops/csrc on first use, with the machine's C compiler.

A kernel is one C file compiled for this CPU (`-O3 -march=native -fopenmp`) into a shared
library, cached under `$SAMOUT_CACHE_DIR` (default `~/.cache/samout/kernels`) by a hash of
its source, the compiler and the CPU, and loaded with ctypes: no torch headers, so a build
takes well under a second. OpenMP resolves to the libgomp torch has already loaded (same
soname), so the kernels share torch's threads instead of starting a second pool.

The cache must be a directory of this user's with mode 0700 (it is created so), checked
before every load, and so must the library (this user's, writable by no one else): a
library runs with the server's rights. Otherwise the kernels are built into a fresh private
temporary directory (mkdtemp), never into a shared one where another user could plant one.

Where a kernel cannot be built (no compiler, a CPU the source rejects, no private directory)
`load` returns None with the reason in `why_unavailable`, and callers use their PyTorch
path. `SAMOUT_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
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
    for directory in _kernel_dirs(name):
        target = directory / f"{name}-{key}.so"
        if not target.exists():
            try:
                _build(cc, CSRC / f"{name}.c", target)
            except OSError as e:  # unwritable: try the next directory
                _why[name] = f"cannot write {directory}: {e}"
                continue
            except subprocess.CalledProcessError as e:
                _why[name] = f"{cc} could not build {name}.c: {_first_error(e.stderr)}"
                return None
        # Checked again right before loading: a library runs as this user, so it must come
        # from a directory and a file no one else could have written.
        unsafe = unsafe_dir(directory) or _unsafe_file(target)
        if unsafe:
            _why[name] = f"not loading {target}: {unsafe}"
            continue
        try:
            library = ctypes.CDLL(str(target))
        except OSError as e:
            _why[name] = f"cannot load {target}: {e}"
            return None
        _why.pop(name, None)  # a reason noted for a directory passed over is no longer one
        return library
    return None


def _kernel_dirs(name: str) -> Iterator[Path]:
    """Where to build and load: the user's cache when it is private (created mode 0700 if
    absent), else a fresh private temporary directory. Never a shared directory: any local
    user could plant a library there that this process would run."""
    directory = cache_dir()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)  # the umask can only take bits away
        _tighten(directory)
        why = unsafe_dir(directory)
    except OSError as e:
        why = str(e)
    if why is None:
        yield directory
    else:
        _why[name] = f"the kernel cache {directory} is not private ({why})"
    try:
        yield _private_temp_dir()
    except OSError as e:
        _why[name] = f"cannot make a private temporary directory: {e}"


def _tighten(directory: Path) -> None:
    """Mode 0700 for a cache of this user's that no one else could write (0755: made by an
    earlier samout, or under a loose umask); one others could write stays refused."""
    st = os.lstat(directory)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        os.chmod(directory, 0o700)


_temp_dir: Path | None = None


def _private_temp_dir() -> Path:
    """This process's own build directory (mkdtemp: mode 0700, a fresh name), removed at exit."""
    global _temp_dir
    if _temp_dir is None or unsafe_dir(_temp_dir):
        _temp_dir = Path(tempfile.mkdtemp(prefix="samout-kernels-"))
        atexit.register(shutil.rmtree, _temp_dir, True)
    return _temp_dir


def unsafe_dir(directory: Path) -> str | None:
    """Why `directory` may not hold kernels, or None: it must be a real directory (not a
    link) of this user's with mode 0700 (no one else may write, add or rename a file)."""
    try:
        st = os.lstat(directory)
    except OSError as e:
        return f"cannot stat it: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700"
    return None


def _unsafe_file(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot stat it: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
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
