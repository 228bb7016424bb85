"""Integer bounds in JSON-schema grammars (ms4local/grammar.py), checked with llama.cpp's own grammar
engine: for every integer in a window, the grammar accepts its JSON text exactly when the number
lies in the range (Python's `lo <= n <= hi` is the reference). Also texts JSON never writes
(leading zeros, "-0", "+1") are refused.
"""

from __future__ import annotations

import ctypes
import math
import time

import pytest

from ms4local import Engine, EngineOptions
from ms4local.engine import llama
from ms4local.errors import PromptError
from ms4local.grammar import (MAX_GRAMMAR_CHARS, MAX_REPEAT, MAX_SPAN, check_grammar, check_schema, integer_bounds,
                              json_grammar)

WINDOW = range(-1300, 1301)


@pytest.fixture(scope="module")
def vocab(ckpt, gguf_file):
    with Engine(gguf_file(ckpt(), "F32"), EngineOptions(vocab_only=True)) as e:
        yield e


class Matcher:
    """Feeds a text to a llama.cpp grammar sampler one character (one token) at a time."""

    def __init__(self, engine: Engine, grammar: str) -> None:
        self.L = llama()
        self.engine = engine
        self.sampler = self.L.llama_sampler_init_grammar(engine.vocab, grammar.encode(), b"root")
        assert self.sampler, grammar
        self.ids: dict[str, int] = {}

    def close(self) -> None:
        self.L.llama_sampler_free(self.sampler)

    def allowed(self, token: int) -> bool:
        L = self.L
        data = (L.llama_token_data * 1)(L.llama_token_data(token, 0.0, 0.0))
        arr = L.llama_token_data_array(data, 1, -1, False)
        L.llama_sampler_apply(self.sampler, ctypes.byref(arr))
        return data[0].logit != -math.inf

    def token(self, c: str) -> int:
        if c not in self.ids:
            ids = self.engine.tokenize(c, parse_special=False)
            assert len(ids) == 1, (c, ids)
            self.ids[c] = ids[0]
        return self.ids[c]

    def accepts(self, text: str) -> bool:
        """The whole text matches: every character allowed in turn, then the end of text."""
        self.L.llama_sampler_reset(self.sampler)
        for c in text:
            if not self.allowed(self.token(c)):
                return False
            self.L.llama_sampler_accept(self.sampler, self.token(c))
        return self.allowed(self.engine.eos_id)


def matcher(engine: Engine, schema: dict) -> Matcher:
    return Matcher(engine, "root ::= n\n" + json_grammar({"n": schema}))


@pytest.mark.parametrize("lo,hi", [
    (3, 7), (0, 0), (-15, 12), (0, 100), (1, 1000), (-1000, -37), (95, 1203), (100, 109), (10, 99),
    (-999, 999), (-5, -5), (None, -5), (None, 20), (42, None), (-7, None), (0, None), (1000, None),
])
def test_integer_range_accepts_exactly_its_numbers(vocab, lo, hi):
    schema = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    m = matcher(vocab, schema)
    try:
        wrong = [n for n in WINDOW if m.accepts(str(n)) != ((lo is None or lo <= n) and (hi is None or n <= hi))]
        assert not wrong, wrong[:10]
        for text in ("007", "00", "-0", "+1", "-012", "1 2", ""):
            assert not m.accepts(text), text
        if hi is None:  # the open side goes on to 16 digits, as the converter's unbounded integers
            assert m.accepts("9" * 16) and not m.accepts("9" * 17)
        if lo is None:
            assert m.accepts("-" + "9" * 16)
    finally:
        m.close()


def test_unbounded_integers_keep_the_converters_rule(vocab):
    m = matcher(vocab, {"type": "integer"})
    try:
        assert all(m.accepts(str(n)) for n in (-1300, -1, 0, 7, 1300))
    finally:
        m.close()


@pytest.mark.parametrize("schema,bounds", [
    ({"minimum": 2.5, "maximum": 7.9}, (3, 7)),
    ({"exclusiveMinimum": 2, "exclusiveMaximum": 7}, (3, 6)),
    ({"exclusiveMinimum": 2.5, "exclusiveMaximum": 7.5}, (3, 7)),
    ({"minimum": 2, "exclusiveMinimum": True, "maximum": 7, "exclusiveMaximum": True}, (3, 6)),  # draft 4
    ({"minimum": 2, "exclusiveMinimum": False}, (2, None)),
    ({"minimum": 0, "exclusiveMinimum": 4}, (5, None)),  # both given: the tighter one
    ({"maximum": -3}, (None, -3)),
    ({}, None),
])
def test_integer_bounds_follow_json_schema(schema, bounds):
    assert integer_bounds({"type": "integer", **schema}) == bounds


def test_empty_or_infinite_bounds_are_prompt_errors():
    with pytest.raises(PromptError, match="allows no integer"):
        json_grammar({"n": {"type": "integer", "minimum": 5, "maximum": 4}})
    with pytest.raises(PromptError, match="finite"):
        json_grammar({"n": {"type": "integer", "maximum": math.inf}})


def test_bounds_inside_objects(vocab):
    """The bounded rule is used wherever the integer sits (object properties, array items)."""
    m = matcher(vocab, {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 1, "maximum": 3},
        "b": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 0, "minimum": -2}}},
        "required": ["a", "b"], "additionalProperties": False})
    try:
        assert m.accepts('{"a": 2, "b": [-1, -2]}') and m.accepts('{"a": 3, "b": []}')
        assert not m.accepts('{"a": 4, "b": []}') and not m.accepts('{"a": 0, "b": []}')
        assert not m.accepts('{"a": 1, "b": [0]}') and not m.accepts('{"a": 1, "b": [-3]}')
    finally:
        m.close()


# ----------------------------------------------------------------------------- limits (issue #18)
@pytest.mark.parametrize("schema, match", [
    ({"type": "string", "minLength": 100_000_000}, "minLength is 1e\\+08"),
    ({"type": "string", "maxLength": MAX_REPEAT + 1}, "maxLength"),
    ({"type": "string", "maxLength": MAX_SPAN + 1}, "at most 1000"),
    ({"type": "string", "minLength": 50, "maxLength": MAX_SPAN + 51}, "at most 1000"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": MAX_SPAN + 1}, "maxItems"),
    ({"type": "string", "pattern": "^x{0,1001}$"}, "optional"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 10**18}, "minItems"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": math.inf}, "maxItems"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": math.nan}, "whole number"),
    ({"type": "string", "pattern": "x{100000000}"}, "pattern repeats"),
    ({"type": "string", "pattern": "x{2,99999999999999999999999}"}, "pattern repeats"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string", "minLength": MAX_REPEAT + 1}]}}}, "minLength"),
    ({"type": "object", "properties": {str(i): {"type": "string", "minLength": MAX_REPEAT} for i in range(11)}},
     "add up"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "below"),
    ({"type": "string", "minLength": True}, "whole number"),
])
def test_schema_counts_beyond_the_limits_are_prompt_errors_at_once(schema, match):
    t = time.monotonic()
    with pytest.raises(PromptError, match=match):
        json_grammar({"n": schema})
    assert time.monotonic() - t < 5  # nothing was built (1e8 took minutes and gigabytes)


def test_counts_inside_values_are_not_schema_counts():
    """An enum or const value that looks like a schema is a value: not walked, not refused."""
    check_schema({"enum": [{"minLength": 10**12}], "const": {"maxItems": -1}, "default": {"minItems": "x"}})


def test_the_limits_themselves_make_a_grammar_llama_cpp_accepts(vocab):
    """MAX_REPEAT and MAX_SPAN are usable: llama.cpp parses them, and they mean what they say."""
    lo = MAX_REPEAT - MAX_SPAN
    m = matcher(vocab, {"type": "string", "minLength": lo, "maxLength": MAX_REPEAT})
    try:
        assert m.accepts('"' + "a" * lo + '"') and m.accepts('"' + "a" * MAX_REPEAT + '"')
        assert not m.accepts('"' + "a" * (lo - 1) + '"')
        assert not m.accepts('"' + "a" * (MAX_REPEAT + 1) + '"')
    finally:
        m.close()
    m = matcher(vocab, {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_SPAN})
    try:
        assert m.accepts("[" + ", ".join("7" * MAX_SPAN) + "]") and m.accepts("[]")
    finally:
        m.close()


@pytest.mark.parametrize("gbnf, ok", [
    ('root ::= "a"{10000}', True),
    ('root ::= "a"{10001}', False),
    ('root ::= [a-z]{3,99999999999}', False),
    ('root ::= "{99999999}" [{]{2}', True),  # inside a literal or a class: text, not a repetition
    ('root ::= "x" # {99999999}\n', True),  # a comment
])
def test_check_grammar_counts_repetitions_outside_literals(gbnf, ok):
    if ok:
        check_grammar(gbnf)
    else:
        with pytest.raises(PromptError, match="repeats"):
            check_grammar(gbnf)


def test_check_grammar_bounds_the_size():
    with pytest.raises(PromptError, match="characters"):
        check_grammar('root ::= "' + "a" * MAX_GRAMMAR_CHARS + '"')
