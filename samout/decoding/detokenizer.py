"""Token ids -> text for a streamed reply: incremental detokenization and stop strings, for
`samout generate`, `samout chat` and the server alike.

UTF-8 safe: a token whose text ends inside a character (byte-level BPE splits them) is held
until the character is complete, or for at most `MAX_HELD_TOKENS` tokens (a model may never
complete it; holding on would make each token re-decode a growing tail). Linear time: stop
strings are found by an Aho-Corasick automaton fed each character once, and only the tail that
may still begin a stop string is held back. Special tokens are dropped from the text, except
those named in `keep` (the OpenASH vocabulary's tool-call markers, when a reply is parsed for
calls), which are spelled out as their text.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator

from samout.tokenizer import _byte_decoder

MAX_HELD_TOKENS = 8  # a UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens


class StopMatcher:
    """An Aho-Corasick automaton over the stop strings. Fed the text a character at a time, it
    finds the first place where a stop string ends, and knows the longest end of the text that
    may still begin one (the text to hold back): each character costs amortised constant time,
    whatever the stop strings (checking every stop string's every prefix on every token grew
    with the square of their length)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.fail = [0]
        self.depth = [0]  # the length of the stop-string prefix a state stands for
        self.match = [0]  # the length of the longest stop string ending at a state (0: none)
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto.append({})
                    self.fail.append(0)
                    self.depth.append(self.depth[state] + 1)
                    self.match.append(0)
                    self.goto[state][ch] = nxt
                state = nxt
            self.match[state] = len(stop)
        self._link()

    def _link(self) -> None:
        """Failure links, breadth first: a state's link is its longest proper suffix that is
        also a stop-string prefix."""
        queue = deque(self.goto[0].values())
        while queue:
            state = queue.popleft()
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0)
                self.match[nxt] = max(self.match[nxt], self.match[self.fail[nxt]])
                queue.append(nxt)

    def feed(self, text: str, state: int) -> tuple[int | None, int]:
        """Runs `text` from `state`: (where the first stop string to end in it begins, relative
        to text[0] (negative: in text fed before), or None; the state after it)."""
        goto, fail, match = self.goto, self.fail, self.match
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                return i + 1 - match[state], state
        return None, state


@functools.lru_cache(maxsize=64)
def stop_matcher(stops: tuple[str, ...]) -> StopMatcher:
    """One automaton per set of stop strings (requests often repeat theirs)."""
    return StopMatcher(stops)


def text_pieces(tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` as they come, in non-empty pieces (a `TextStream` without stops)."""
    text = TextStream(tokenizer)
    for token in tokens:
        piece = text.add(token)
        if piece:
            yield piece
    piece = text.finish()
    if piece:
        yield piece


class TextStream:
    """Token ids -> text pieces for one choice: waits where a UTF-8 character spans tokens,
    and ends the text where the first stop string ends (holding back text that may start one).
    keep: ids of special tokens whose text stays in the text (others are dropped)."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = (),
                 keep: frozenset[int] | set[int] = frozenset()) -> None:
        self.tokenizer, self.stops, self.keep = tokenizer, stops, frozenset(keep)
        self.matcher = stop_matcher(tuple(stops)) if stops else None
        self.state = 0  # the matcher's, after the text so far
        self.pending: list[int] = []
        # The text is the pieces released plus the tail held back; only the tail (at most the
        # longest stop string and a token's text) is ever searched or copied.
        self.released: list[str] = []
        self.unsent = ""
        self.stopped = False

    @property
    def text(self) -> str:
        if len(self.released) > 1:
            self.released = ["".join(self.released)]
        return "".join(self.released) + self.unsent

    def add(self, token: int) -> str:
        if token in self.keep:  # what is pending, then the kept token's own text
            piece = self.tokenizer.decode(self.pending, skip_special_tokens=True) if self.pending else ""
            self.pending = []
            marker = self.tokenizer.decode([token], skip_special_tokens=False)
            return self._release(piece + marker, final=False)
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd") and len(self.pending) < MAX_HELD_TOKENS:
            return ""
        self.pending = []
        return self._release(piece, final=False)

    def finish(self) -> str:
        piece = ""
        if self.pending and not self.stopped:
            piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending = []
        return self._release(piece, final=True)

    def _release(self, piece: str, final: bool) -> str:
        """Adds `piece` to the text; returns the text now safe to send."""
        if self.stopped:
            return ""
        self.unsent += piece
        hold = 0
        if self.matcher is not None:
            found, self.state = self.matcher.feed(piece, self.state)
            if found is not None:  # the text ends where the stop string begins, `found` into `piece`
                self.unsent = self.unsent[:len(self.unsent) - len(piece) + found]
                self.stopped = True
            elif not final:
                hold = self.matcher.depth[self.state]
        out = self.unsent[:len(self.unsent) - hold]
        self.unsent = self.unsent[len(out):]
        if out:
            self.released.append(out)
        return out


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes token `token` stands for: exact for a byte-level BPE (a token may hold part of
    a character), else the UTF-8 of its decoded text; a special token's own text."""
    piece = tokenizer.id_to_token(token) if hasattr(tokenizer, "id_to_token") else None
    if piece is None:
        return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
    decoder = _byte_decoder()
    byte_level = type(getattr(tokenizer, "decoder", None)).__name__ == "ByteLevel"
    if byte_level and all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")
