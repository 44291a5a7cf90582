"""Token ids -> text for a streamed reply: incremental detokenization and stop strings.

Kept apart from sampling (samout.generation) and from the wire format (protocol.py), so
that one decoding core can serve generate, chat and the server.
"""

from __future__ import annotations


class TextStream:
    """Token ids -> text pieces for one choice: waits where a UTF-8 character spans tokens,
    and ends the text at the first stop string (holding back text that may start one)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.pending: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        if self.pending and not self.stopped:
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending = []
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                       default=0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
