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


def _reference(text: str, stops: list[str]) -> str:
    """What a stream fed one character at a time must show: the text up to the start of the
    stop string that ends first (the longest, where several end at one place)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


def test_stop_strings_match_a_plain_search_on_random_texts():
    import random

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 3))]
        pieces, stream = _pieces(text, stops)
        want = _reference(text, stops)
        assert "".join(pieces) == want == stream.text, (text, stops)
        assert stream.stopped == (want != text or any(text.endswith(s) for s in stops))


def test_a_long_stop_string_costs_linear_time():
    """A 20,000-character stop string that the text keeps almost matching: checking its every
    prefix on every token (as before) took minutes; the automaton takes milliseconds."""
    import time

    stop = "a" * 19_999 + "b"
    start = time.perf_counter()
    pieces, stream = _pieces("a" * 20_000 + "c", [stop])
    assert time.perf_counter() - start < 2.0
    assert "".join(pieces) == "a" * 20_000 + "c" and not stream.stopped
    assert pieces[-2] == "a" * 19_999 + "c"  # held back while it could still begin the stop string
