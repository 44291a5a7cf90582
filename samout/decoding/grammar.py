"""Grammar constraints (structured output) on llguidance: JSON schemas, any JSON object,
OpenAI `response_format`, and Lark grammars (tool calls, `samout.decoding.tools`).

Why llguidance (see docs/serving.md, "Structured output", for the figures of
`samout bench grammar`): it has no Python dependencies, builds its token tables from a
samout `tokenizer.json` in milliseconds, and computes a mask in tens of microseconds on CPU
with no per-schema precompilation, so a request's schema costs nothing before its first
token; it also takes Lark grammars with embedded JSON schemas, which tool calls need.

A `GrammarConstraint` is one sequence's matcher (`samout.decoding.constraint.TokenConstraint`):
the core asks it for the allowed tokens (`fill_bitmask`), tells it the token it picked
(`advance`), and ends the sequence when `is_finished()` (the grammar is complete and took its
end token). The end tokens a grammar allows once complete are `eos_ids`: by default the
tokenizer's end of text (`samout.tokenizer.end_ids`); a chat passes its end-of-turn ids
(`samout.chat.template.end_of_turn_ids`). Special tokens (chat markers) are never allowed
inside JSON. A model whose vocabulary is larger than its tokenizer's (padding rows) gets
those ids masked off.

Errors in a schema or grammar are raised when the constraint is built, before any token is
generated, as a one-line SamoutError naming where the schema came from (`response_format`,
`--json-schema FILE`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from samout.decoding.constraint import bitmask_words
from samout.errors import SamoutError
from samout.tokenizer import end_ids

# How generated JSON is laid out: json.dumps's separators and no other whitespace. Flexible
# whitespace lets a weak model pad JSON with newlines until it runs out of tokens.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _llguidance():
    try:
        import llguidance
    except ModuleNotFoundError:
        raise SamoutError("structured output needs llguidance: pip install 'samout[serve]' (or llguidance)"
                          ) from None
    return llguidance


def one_line(text: str) -> str:
    """An engine's (multi-line) error message on one line."""
    return " ".join(str(text).split())


# -- tokenizers ------------------------------------------------------------------------

class GrammarTokenizer:
    """A samout tokenizer as llguidance sees it (built once per tokenizer and end-id set:
    `grammar_tokenizer`)."""

    def __init__(self, ll_tokenizer, vocab_size: int, eos_ids: tuple[int, ...], source=None) -> None:
        self.ll = ll_tokenizer
        self.source = source  # the samout tokenizer
        # The ids llguidance writes bits for (the tokenizer's, 0 .. vocab_size-1); a model's
        # vocabulary may be larger (padding rows), never smaller.
        self.vocab_size = max(vocab_size, ll_tokenizer.vocab_size)
        self.words = bitmask_words(self.vocab_size)
        self.eos_ids = eos_ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` by the samout tokenizer itself (llguidance's tables not involved)."""
        if self.source is None:
            return self.ll.decode_str(list(ids))
        return self.source.decode(list(ids), skip_special_tokens=False)


_CACHE: dict[tuple[int, tuple[int, ...]], tuple[Any, GrammarTokenizer]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 16


def grammar_tokenizer(tokenizer, eos_ids: Iterable[int] | None = None) -> GrammarTokenizer:
    """The llguidance tokenizer of a samout tokenizer (a `tokenizers.Tokenizer` or the OpenASH
    vocabulary), cached per tokenizer object and end-id set. `eos_ids`: the tokens that end
    a complete output (default: `samout.tokenizer.end_ids(tokenizer)`)."""
    eos = tuple(sorted(set(end_ids(tokenizer) if eos_ids is None else eos_ids)))
    if not eos:
        raise SamoutError("a grammar needs at least one end token id")
    key = (id(tokenizer), eos)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    built = _build_tokenizer(tokenizer, eos)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (tokenizer, built)  # holding the tokenizer keeps its id from being reused
    return built


def _build_tokenizer(tokenizer, eos: tuple[int, ...]) -> GrammarTokenizer:
    llg = _llguidance()
    vocab_size = tokenizer.get_vocab_size()
    bad = [i for i in eos if not 0 <= i < vocab_size]
    if bad:
        raise SamoutError(f"end token ids {bad} are outside the tokenizer's vocabulary ({vocab_size})")
    if hasattr(tokenizer, "to_str"):  # a tokenizers.Tokenizer: llguidance reads its JSON
        try:
            ll = llg.LLTokenizer(tokenizer.to_str(), eos_token=list(eos))
        except Exception as err:  # noqa: BLE001  (the Rust side raises bare exceptions)
            raise SamoutError(f"llguidance cannot read this tokenizer: {one_line(err)}") from None
    else:
        ll = llg.LLTokenizer(llg.TokenizerWrapper(_WordVocab(tokenizer, eos[0])), eos_token=list(eos))
    return GrammarTokenizer(ll, vocab_size, eos, tokenizer)


class _WordVocab:
    """A word-level vocabulary (the author's OpenASH one) in llguidance's TokenizerWrapper
    shape: each id's bytes. Its agent-code tokens (ts*/te*/rs*/rc*/re*, from `ts0` on) spell
    a word only in pairs or triples, so they count as special tokens: constrained text is
    written with the vocabulary's plain words and characters."""

    def __init__(self, tokenizer, eos: int) -> None:
        size = tokenizer.get_vocab_size()
        first_code = getattr(tokenizer, "ts0", size)
        declared = set(getattr(tokenizer, "special_ids", ()))
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(size):
            text = tokenizer.id_to_token(i)
            if text is None or i in declared or i >= first_code or not text:
                self.special_token_ids.append(i)
                text = text or f"<|unused{i}|>"
            self.tokens.append(text.encode("utf-8"))
        self.eos_token_id, self.bos_token_id = eos, None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # tells TokenizerWrapper to pass str
        return self._tokenizer.encode(text).ids


# -- constraints -----------------------------------------------------------------------

class GrammarConstraint:
    """One sequence's grammar matcher; a `TokenConstraint`. `fresh()` gives another at the
    start (for n > 1 choices) without compiling the grammar again."""

    def __init__(self, tokenizer: GrammarTokenizer, matcher, grammar: str, what: str) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.what = what
        self._start = matcher.deep_copy()
        self._matcher = matcher
        self.tokens: list[int] = []

    def fresh(self) -> GrammarConstraint:
        return GrammarConstraint(self.tokenizer, self._start.deep_copy(), self.grammar, self.what)

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """The allowed tokens into `bitmask[row]` (int32 [batch, words], CPU, contiguous);
        the words past the tokenizer's vocabulary (a model's padding ids) are zeroed."""
        words = self.tokenizer.words
        if bitmask.dtype.itemsize != 4 or bitmask.device.type != "cpu" or bitmask.shape[-1] < words:
            raise SamoutError(f"the grammar mask must be int32 on the CPU with at least {words} words a row, "
                              f"got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}")
        view = bitmask[row]
        if not view.is_contiguous():
            raise SamoutError("the grammar mask rows must be contiguous")
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), words * 4)
        if view.shape[0] > words:
            view[words:] = 0
        if self._matcher.is_error():
            raise SamoutError(f"{self.what}: {one_line(self._matcher.get_error())}")

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise SamoutError(f"{self.what}: token {int(token)} is not allowed by the grammar "
                              f"({one_line(self._matcher.get_error())})")
        self.tokens.append(int(token))

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is complete (an end token would be allowed)."""
        return self._matcher.is_accepting()

    def allowed(self) -> list[int]:
        """The allowed ids, as a list (for tests and debugging)."""
        import torch

        from samout.decoding.constraint import bitmask_to_bool_ref

        mask = torch.zeros(1, self.tokenizer.words, dtype=torch.int32)
        self.fill_bitmask(mask, 0)
        return bitmask_to_bool_ref(mask, self.tokenizer.vocab_size)[0].nonzero().flatten().tolist()


def grammar_constraint(tokenizer, grammar: str, what: str, eos_ids: Iterable[int] | None = None
                       ) -> GrammarConstraint:
    """A constraint from an llguidance grammar (`LLMatcher.grammar_from_*`); a grammar the
    engine rejects is a one-line SamoutError starting with `what`."""
    llg = _llguidance()
    gt = grammar_tokenizer(tokenizer, eos_ids)
    matcher = llg.LLMatcher(gt.ll, grammar, log_level=0)
    if matcher.is_error():
        raise SamoutError(f"{what}: {one_line(matcher.get_error())}")
    return GrammarConstraint(gt, matcher, grammar, what)


def json_schema_constraint(tokenizer, schema: dict, *, strict: bool = True, what: str = "json schema",
                           eos_ids: Iterable[int] | None = None) -> GrammarConstraint:
    """Output that is one JSON value valid against `schema`. strict: a keyword the engine does
    not implement is an error; not strict: it is ignored (the output may then not validate)."""
    if not isinstance(schema, dict) and not isinstance(schema, bool):
        raise SamoutError(f"{what}: a JSON schema must be an object, got {type(schema).__name__}")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={**JSON_LAYOUT, "lenient": not strict})
    except (ValueError, TypeError) as err:
        raise SamoutError(f"{what}: {one_line(err)}") from None
    return grammar_constraint(tokenizer, grammar, what, eos_ids)


def json_object_constraint(tokenizer, what: str = "json object", eos_ids: Iterable[int] | None = None
                           ) -> GrammarConstraint:
    """Output that is one JSON object (OpenAI's `{"type": "json_object"}`)."""
    return json_schema_constraint(tokenizer, {"type": "object"}, what=what, eos_ids=eos_ids)


def check_response_format(response_format: Any, field: str = "response_format"
                          ) -> tuple[str, dict | None, bool]:
    """OpenAI's `response_format` checked: (type, schema, strict); a one-line SamoutError
    naming the field otherwise."""
    if response_format is None:
        return "text", None, False
    if not isinstance(response_format, dict):
        raise SamoutError(f"{field} must be an object with a \"type\" ({', '.join(RESPONSE_FORMAT_TYPES)})")
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise SamoutError(f"{field}.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}")
    extra = set(response_format) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in response_format):
        unknown = sorted(extra) or ["json_schema"]
        raise SamoutError(f"{field}: unexpected field {unknown[0]!r} for type {kind!r}")
    if kind != "json_schema":
        return kind, None, False
    spec = response_format.get("json_schema")
    where = f"{field}.json_schema"
    if not isinstance(spec, dict):
        raise SamoutError(f"{where} must be an object with \"name\" and \"schema\"")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise SamoutError(f"{where}: unknown field {unknown[0]!r} (use name, schema, strict, description)")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SamoutError(f"{where}.name must be 1-64 letters, digits, _ or -, got {name!r}")
    if "description" in spec and not isinstance(spec["description"], str):
        raise SamoutError(f"{where}.description must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise SamoutError(f"{where}.strict must be true, false or null, got {strict!r}")
    schema = spec.get("schema", {})  # OpenAI: a missing schema means any JSON value
    if not isinstance(schema, dict):
        raise SamoutError(f"{where}.schema must be a JSON schema object")
    return kind, schema, bool(strict)


def response_format_constraint(tokenizer, response_format: Any, field: str = "response_format",
                               eos_ids: Iterable[int] | None = None) -> GrammarConstraint | None:
    """The constraint of an OpenAI `response_format` (None for text), compiled now: an
    invalid one is a one-line SamoutError starting with `field` (a server's 400)."""
    kind, schema, strict = check_response_format(response_format, field)
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_constraint(tokenizer, what=field, eos_ids=eos_ids)
    assert schema is not None
    return json_schema_constraint(tokenizer, schema, strict=strict, what=f"{field}.json_schema.schema",
                                  eos_ids=eos_ids)


def load_json_schema(path) -> dict:
    """A JSON schema file (`samout generate --json-schema FILE`), checked: one-line errors."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise SamoutError(f"--json-schema: file not found: {path}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SamoutError(f"--json-schema {path}: not valid JSON ({one_line(err)})") from None
    if not isinstance(schema, dict):
        raise SamoutError(f"--json-schema {path}: a JSON schema must be an object")
    return schema


# -- the plain reference ---------------------------------------------------------------

def check_output_ref(constraint: GrammarConstraint, tokens: Sequence[int], schema: dict | None = None) -> Any:
    """Checks, with nothing from the constraint's state, that `tokens` (the generated ids,
    an end token at the end or not) is an output the grammar accepts, decodes it and returns
    the JSON value, validated against `schema` with jsonschema when one is given. Raises
    AssertionError (or jsonschema's ValidationError) otherwise."""
    check = constraint.fresh()
    eos = set(constraint.tokenizer.eos_ids)
    body = list(tokens)
    if body and body[-1] in eos:
        body = body[:-1]
    for i, token in enumerate(body):
        assert token not in eos, f"an end token at {i} before the end"
        assert token in check.allowed(), f"token {token} at {i} is not allowed"
        check.advance(token)
    assert check.is_accepting(), "the output is not complete"
    text = constraint.tokenizer.decode(body)
    value = json.loads(text)
    if schema is not None:
        import jsonschema

        jsonschema.validate(value, schema)
    return value
