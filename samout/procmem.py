"""What a process holds in memory, and handing freed heap back to the OS: Linux's
/proc/<pid>/status and glibc's allocator (mallinfo2, malloc_trim). Used by `samout serve`
(its /health figures and idle trimming) and by the benchmarks that measure memory.

Every reader answers None where the platform lacks the figure (not Linux, not glibc).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
from pathlib import Path


def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...); None when the file has no such
    line (an exited process has no VmRSS). OSError when the file cannot be read."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process; None where /proc cannot tell."""
    with contextlib.suppress(OSError):
        kib = proc_status_kib("VmRSS", pid)
        return None if kib is None else kib * 1024
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


def heap_bytes() -> tuple[int | None, int | None]:
    """(in use, free) bytes of glibc's heap: live allocations of every thread (Python's and
    torch's), and bytes freed but kept by the allocator for reuse. (None, None) without glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None, None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd, info.fordblks


def return_free_heap() -> None:
    """glibc keeps freed memory for reuse (RSS stays at the highest load's working set);
    malloc_trim hands it back to the OS. It takes milliseconds per hundred MiB: call it
    after a while without work, not between steps."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_free_memory() -> None:
    """Collect garbage, then hand the freed heap back to the OS."""
    gc.collect()
    return_free_heap()


def memory_stats() -> dict[str, int | None]:
    """The process's resident memory and what its heap holds in use and free. RSS minus the
    two is code, libraries and untouched pages."""
    rss = rss_bytes()
    in_use, free = heap_bytes()
    return {"rss_bytes": rss, "heap_in_use_bytes": in_use, "heap_free_bytes": free}
