"""Stop a training run cleanly on SIGINT/SIGTERM: the handler only records the signal; the
loop finishes the current step, saves a checkpoint and returns (the CLI exits 128 + signal)."""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.requested`, `stop.signum`. Handlers can only be
    installed from the main thread; elsewhere (a notebook's worker thread) it never fires."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        # A second Ctrl-C aborts at once (KeyboardInterrupt); a repeated SIGTERM (torchrun sends
        # one to every worker when it is interrupted itself) does not cut the final save short.
        if signal.SIGINT in self._old:
            signal.signal(signal.SIGINT, self._old[signal.SIGINT])
