"""Grammar constraints (llguidance): sampled outputs are valid JSON that validates against
the schema, end tokens, padding ids, response_format and its one-line errors."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from samout import SamOut, SamOutConfig
from samout.decoding.constraint import TokenConstraint, bitmask_to_bool_ref
from samout.decoding.grammar import (
    check_output_ref,
    grammar_tokenizer,
    json_object_constraint,
    json_schema_constraint,
    load_json_schema,
    response_format_constraint,
)
from samout.errors import SamoutError
from samout.tokenizer import EOT_ID
from tests.chat.chat_fixtures import chat_tokenizer
from tests.decoding.sampling import sample_constrained

SCHEMAS = {
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False},
        "active": {"type": "boolean"}},
        "required": ["user", "active"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "points": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                              "minItems": 2, "maxItems": 2}, "maxItems": 2}},
        "required": ["tags", "points"], "additionalProperties": False},
    "scalars": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10},
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 5}},
        "required": ["x", "n", "ok"], "additionalProperties": False},
    "top-level array": {"type": "array", "items": {"enum": [1, "two", None, True]}, "maxItems": 4},
}


def strip_end(tokens):
    """The output without its end token: a grammar that cannot go on (an object's closing
    brace) finishes without one; one that could (a top-level number) takes it."""
    return tokens[:-1] if tokens and tokens[-1] == EOT_ID else tokens


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(300)


def test_constraint_is_a_token_constraint(tokenizer):
    assert isinstance(json_object_constraint(tokenizer), TokenConstraint)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_validate(tokenizer, name):
    schema = SCHEMAS[name]
    first = json_schema_constraint(tokenizer, schema)
    constraints = [first] + [first.fresh() for _ in range(99)]
    outputs = sample_constrained(constraints, tokenizer.get_vocab_size(), max_tokens=200, seed=len(name))
    values = []
    for tokens, constraint in zip(outputs, constraints):
        assert constraint.is_finished(), tokenizer.decode(tokens)
        assert EOT_ID not in tokens[:-1]
        text = tokenizer.decode(strip_end(tokens))
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert check_output_ref(constraint, tokens, schema) == value
        values.append(json.dumps(value, sort_keys=True))
    assert len(set(values)) >= 5  # the samples differ: the mask is not forcing one output


def test_tiny_model_outputs_validate(tokenizer):
    """A random tiny SamOut whose vocabulary has padding ids past the tokenizer's."""
    vocab = tokenizer.get_vocab_size() + 20
    model = SamOut(SamOutConfig.from_preset("tiny", vocab_size=vocab)).eval()
    schema = SCHEMAS["nested"]
    first = json_schema_constraint(tokenizer, schema)
    constraints = [first] + [first.fresh() for _ in range(31)]
    state = {"state": None, "logits": None}

    def logits_fn(step, out):
        with torch.no_grad():
            last = torch.tensor([[row[-1] if row else EOT_ID] for row in out])
            logits, state["state"] = model(last, state["state"])
        return logits[:, -1].float()

    outputs = sample_constrained(constraints, vocab, max_tokens=200, seed=1, logits_fn=logits_fn)
    for tokens, constraint in zip(outputs, constraints):
        assert constraint.is_finished()
        assert max(tokens) < tokenizer.get_vocab_size()  # padding ids never allowed
        jsonschema.validate(json.loads(tokenizer.decode(strip_end(tokens))), schema)


def test_cut_at_max_tokens_is_not_finished(tokenizer):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    constraints = [json_schema_constraint(tokenizer, schema) for _ in range(8)]
    outputs = sample_constrained(constraints, tokenizer.get_vocab_size(), max_tokens=6, seed=0)
    for tokens, constraint in zip(outputs, constraints):
        assert len(tokens) == 6 and not constraint.is_finished() and not constraint.is_accepting()
        with pytest.raises(json.JSONDecodeError):
            json.loads(tokenizer.decode(tokens))
        with pytest.raises(AssertionError, match="not complete"):
            check_output_ref(constraint, tokens)


def test_reference_rejects_what_the_grammar_forbids(tokenizer):
    constraint = json_schema_constraint(tokenizer, SCHEMAS["enums"])
    good = tokenizer.encode('{"color": "red", "size": "XL"}').ids + [EOT_ID]
    assert check_output_ref(constraint, good, SCHEMAS["enums"]) == {"color": "red", "size": "XL"}
    for text in ['{"color": "pink", "size": "XL"}', '{"color":"red","size":"XL"}', '{"size": "XL"}']:
        with pytest.raises(AssertionError, match="not allowed"):
            check_output_ref(constraint, tokenizer.encode(text).ids)


def test_mask_ends_with_the_given_end_tokens_and_masks_padding(tokenizer):
    end = tokenizer.token_to_id("<|end|>")
    constraint = json_schema_constraint(tokenizer, {"enum": [True]}, eos_ids=[end])
    for token in tokenizer.encode("true").ids:
        constraint.advance(token)
    words = grammar_tokenizer(tokenizer, [end]).words
    mask = torch.full((2, words + 3), -1, dtype=torch.int32)
    constraint.fill_bitmask(mask, 1)
    allowed = bitmask_to_bool_ref(mask, 32 * (words + 3))
    assert allowed[1].nonzero().flatten().tolist() == [end]
    assert allowed[0].all()  # other rows untouched
    constraint.advance(end)
    assert constraint.is_finished()


def test_special_tokens_never_allowed_inside_json(tokenizer):
    constraint = json_schema_constraint(tokenizer, {"type": "string"})
    constraint.advance(tokenizer.encode('"').ids[0])
    allowed = set(constraint.allowed())
    specials = {tokenizer.token_to_id(t) for t in ("<|pad|>", "<|endoftext|>", "<|user|>", "<|end|>")}
    assert not allowed & specials and len(allowed) > 100


def test_grammar_tokenizer_is_cached(tokenizer):
    assert grammar_tokenizer(tokenizer) is grammar_tokenizer(tokenizer)
    assert grammar_tokenizer(tokenizer) is not grammar_tokenizer(tokenizer, [EOT_ID, 5])


def test_response_format(tokenizer):
    assert response_format_constraint(tokenizer, None) is None
    assert response_format_constraint(tokenizer, {"type": "text"}) is None
    obj = response_format_constraint(tokenizer, {"type": "json_object"})
    check_output_ref(obj, tokenizer.encode('{"a": [1, 2]}').ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    c = response_format_constraint(tokenizer, rf)
    assert check_output_ref(c, tokenizer.encode('{"a": 12}').ids, schema) == {"a": 12}


@pytest.mark.parametrize("response_format, message", [
    ("json", "response_format must be an object"),
    ({"type": "yaml"}, "response_format.type must be one of text, json_object, json_schema"),
    ({"type": "json_object", "schema": {}}, "response_format: unexpected field 'schema'"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
     "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": []}},
     "response_format.json_schema.schema must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema: .*strin"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "a("}}},
     "response_format.json_schema.schema: .*unclosed group"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": True,
                                             "schema": {"type": "string", "format": "color"}}},
     "response_format.json_schema.schema: .*format"),
])
def test_response_format_errors_are_one_line(tokenizer, response_format, message):
    with pytest.raises(SamoutError, match=message) as err:
        response_format_constraint(tokenizer, response_format)
    assert "\n" not in str(err.value)


def test_not_strict_ignores_unimplemented_keywords(tokenizer):
    schema = {"type": "string", "format": "color", "maxLength": 3}
    with pytest.raises(SamoutError):
        json_schema_constraint(tokenizer, schema)
    rf = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": False}}
    constraint = response_format_constraint(tokenizer, rf)
    check_output_ref(constraint, tokenizer.encode('"abc"').ids)


def test_load_json_schema(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(SamoutError, match="file not found"):
        load_json_schema(path)
    path.write_text("{nope")
    with pytest.raises(SamoutError, match="not valid JSON"):
        load_json_schema(path)
    path.write_text("[1]")
    with pytest.raises(SamoutError, match="must be an object"):
        load_json_schema(path)
    path.write_text(json.dumps(SCHEMAS["enums"]))
    assert load_json_schema(path) == SCHEMAS["enums"]
