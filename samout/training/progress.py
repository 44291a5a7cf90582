"""Training progress for a person: a tqdm bar on a terminal; elsewhere (a log file, a pipe,
a CI job) a plain line every few seconds, so a long run never goes silent."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

# Seconds between plain progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 10.0


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.step = total, initial
        self.tty = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.tty
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not self.tty,
                        dynamic_ncols=True)
        self.fields: dict[str, str] = {}
        self.last_line = time.monotonic()
        self.printed = False

    def update(self, step: int, **fields: str) -> None:
        """After an optimizer step; `fields` (loss, tok/s, eta, ...) replace the previous ones."""
        self.fields.update(fields)
        if self.tty:
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
            self.bar.update(step - self.step)
        self.step = step
        now = time.monotonic()
        if self.plain and (not self.printed or now - self.last_line >= PLAIN_EVERY_S):
            self.last_line, self.printed = now, True
            details = ", ".join(f"{k} {v}" for k, v in self.fields.items())
            print(f"step {step}/{self.total}" + (f": {details}" if details else ""), flush=True)

    def write(self, line: str) -> None:
        """A line that stays (an evaluation result)."""
        if self.tty:
            self.bar.write(line)
        elif self.plain:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()
