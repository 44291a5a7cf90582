"""Incremental detokenization: characters split across tokens, and stop strings."""

from __future__ import annotations

from samout.serve.detokenizer import TextStream


class _Bytes:
    """A tokenizer whose token ids are UTF-8 bytes."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _pieces(text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(_Bytes(), stops)
    pieces = []
    for b in text.encode():
        pieces.append(stream.add(b))
        if stream.stopped:  # the server aborts the request here
            return pieces, stream
    pieces.append(stream.finish())
    return pieces, stream


def test_a_character_split_across_tokens_comes_out_whole():
    pieces, stream = _pieces("a✓b", [])
    assert "".join(pieces) == "a✓b" == stream.text
    assert "\ufffd" not in "".join(pieces) and "✓" in pieces


def test_text_ends_at_the_first_stop_string_and_never_shows_its_start():
    pieces, stream = _pieces("one two END three", ["END", "xyz"])
    assert "".join(pieces) == "one two " == stream.text and stream.stopped
    assert all("E" not in p for p in pieces)


def test_a_held_back_prefix_is_released_at_the_end():
    pieces, stream = _pieces("abcEN", ["END"])
    assert "".join(pieces) == "abcEN" and not stream.stopped
