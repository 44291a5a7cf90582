"""Process memory: /proc/<pid>/status and glibc's heap figures."""

from __future__ import annotations

import os
import sys

import pytest

from samout.procmem import heap_bytes, memory_stats, proc_status_kib, release_free_memory, rss_bytes

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_rss_of_this_process_by_pid_and_as_self():
    assert rss_bytes() > 0 and rss_bytes(os.getpid()) > 0
    assert proc_status_kib("VmHWM") >= proc_status_kib("VmRSS") > 0
    assert proc_status_kib("NoSuchField") is None


def test_memory_stats_has_the_three_figures():
    release_free_memory()
    stats = memory_stats()
    assert set(stats) == {"rss_bytes", "heap_in_use_bytes", "heap_free_bytes"}
    in_use, free = heap_bytes()
    assert (in_use is None) == (free is None)
