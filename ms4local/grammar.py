"""Every GBNF grammar ms4local writes, built in this one module: a server answer held to JSON or
tool calls (`answer_grammar`), JSON schemas → rules (`json_grammar`, over llama.cpp's own
converter), integer bounds the converter ignores, and the limits on what a schema may make the
converter and llama.cpp's grammar parser build.

llama-cpp-python 0.3.36's copy of llama.cpp's schema converter ignores `minimum`, `maximum`,
`exclusiveMinimum` and `exclusiveMaximum` for integers (a TODO in its source), so a `json_schema`
response format with `{"type": "integer", "minimum": 1, "maximum": 5}` could yield 9 and fail
validation. `json_grammar` hands bounded integers to `integer_rule` instead. That rule accepts
exactly the decimal integers in the range, written as JSON writes them (no leading zeros, no "+"),
built digit by digit the way range regexes are: split the range at powers of ten, then within one
length at the first digit where the bounds part. Pure Python, no llama.cpp: tests check it against
llama.cpp's own grammar engine.

Limits (`check_schema`, `check_grammar`): the converter writes `minLength: n` as n copies of the
character rule and `maxLength: m` as m - n nested optional groups, and llama.cpp expands `x{n}`
the same way, so one short request (`{"type": "string", "minLength": 100000000}`) would make
gigabytes of grammar. Counts above MAX_REPEAT, spans (max - min) above MAX_SPAN, which is as deep
as llama.cpp's parser nests optional groups (it refuses 1001, after logging the whole grammar),
and grammars longer than MAX_GRAMMAR_CHARS are refused with a PromptError that names the keyword,
before anything is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import PromptError
from .stream import Tag

MAX_DIGITS = 16  # as the converter's `integral-part` (and enough for any 53-bit JSON integer)
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
MAX_REPEAT = 10_000  # largest minLength/maxLength/minItems/maxItems/{n,m} a schema may ask for
MAX_REPEAT_TOTAL = 100_000  # all of a request's counts together (each one is expanded once)
MAX_SPAN = 1000  # maxLength - minLength, maxItems - minItems, m - n in {n,m}: llama.cpp's parser's own limit
MAX_GRAMMAR_CHARS = 4 * 2**20  # GBNF text handed to llama.cpp's parser (a few MB of rules at most)
COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
VALUE_KEYS = ("enum", "const", "default", "examples")  # JSON values, not schemas: not walked
_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def json_grammar(schemas: dict[str, Any]) -> str:
    """GBNF with one rule per entry of `schemas` (rule name → JSON schema), each matching the JSON
    values the schema allows, plus the helper rules they share. The caller writes `root`.

    llama-cpp-python's copy of llama.cpp's schema converter does the work, so a schema means here
    what it means to llama-server. It signals unsupported schemas with asserts, ValueErrors and
    KeyErrors alike (and recursion for self-referencing ones), so every failure becomes one
    PromptError naming the schema as the cause.
    """
    # Imported here, not at the top: the engine imports this module's checks.
    from .engine.library import schema_converter

    RESERVED_NAMES, SchemaConverter = schema_converter()

    class Converter(SchemaConverter):
        """The converter, plus integer bounds (`integer_rule`), which this copy ignores."""

        def visit(self, schema: Any, name: str) -> str:
            bounds = integer_bounds(schema) if isinstance(schema, dict) and schema.get("type") == "integer" \
                and not {"$ref", "oneOf", "anyOf", "allOf", "const", "enum"} & set(schema) else None
            if bounds is None:
                return super().visit(schema, name)
            rule = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule, integer_rule(*bounds))

    check_schema(*schemas.values())  # the converter expands counts in Python: bounded first
    conv = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    for name, schema in schemas.items():
        try:
            key = conv.visit(conv.resolve_refs(schema, "request"), name)
            if key != name:  # a primitive schema gets the primitive's rule name: point `name` at it
                conv._add_rule(name, key)
        except RecursionError:
            raise PromptError("the JSON schema nests or refers to itself too deeply to become a grammar") from None
        except PromptError:
            raise
        except Exception as e:  # the converter's own checks; see the docstring
            raise PromptError(f"the JSON schema cannot be turned into a grammar: {e or type(e).__name__}") from None
    grammar = conv.format_grammar()
    check_grammar(grammar)
    return grammar


def answer_grammar(tags: Mapping[Tag, int], *, json_schema: Any = None, tools: Sequence[tuple[str, Any]] | None = None,
                   calls_only: bool = False, one_call: bool = False, think: bool = False) -> str:
    """GBNF for a whole answer: JSON valid against `json_schema`, or tool calls, or either.

    A tool call is `[TOOL_CALLS]name[ARGS]{arguments}` for one of `tools` ((name, parameters
    schema) pairs), its control tokens written by id (`<[id]>`, from `tags`, which must hold
    [TOOL_CALLS] and [ARGS]), as the model writes them unconstrained; one call with `one_call`,
    else one or more. With `calls_only` the answer must be tool calls, and `json_schema`, when
    given, is converted (so a bad one is still refused) but is no alternative. With `think`, and
    the vocabulary's [THINK] and [/THINK], the answer starts with the block the model writes at
    high effort. PromptError for a schema that cannot become a grammar.
    """
    schemas: dict[str, Any] = {}
    rules: list[str] = []
    answers: list[str] = []
    if json_schema is not None:
        schemas["ms4-json"] = json_schema
        if not calls_only:
            answers.append("ms4-json")
    if tools is not None:
        alts = []
        for k, (name, parameters) in enumerate(tools):
            schemas[f"ms4-args-{k}"] = parameters
            alts.append(f"{json.dumps(name)} <[{tags[Tag.ARGS]}]> ms4-args-{k}")
        rules.append(f"ms4-call ::= <[{tags[Tag.TOOL_CALLS]}]> ({' | '.join(alts)})")
        answers.append("ms4-call" if one_call else "ms4-call+")
    start = ""
    if think and Tag.THINK in tags and Tag.THINK_END in tags:
        rules.append(f"ms4-think ::= <[{tags[Tag.THINK]}]> (!<[{tags[Tag.THINK_END]}]>)* <[{tags[Tag.THINK_END]}]>")
        start = "ms4-think "
    shared = json_grammar(schemas)
    return "\n".join([f"root ::= {start}({' | '.join(answers)})", *rules, shared])


def check_schema(*schemas: Any) -> None:
    """Raise PromptError when `schema` asks for repetition counts the grammar cannot hold: a
    count that is not a whole number >= 0, above MAX_REPEAT, or a max below its min. Walks the
    whole schema iteratively (a deeply nested one cannot exhaust the stack here). The counts of
    all the schemas given together may not exceed MAX_REPEAT_TOTAL."""
    todo = [*schemas]
    total = 0
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        counts: dict[str, int] = {}
        for key in COUNT_KEYS:
            if key not in node:
                continue
            n = node[key]
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not n == n:
                raise PromptError(f"the JSON schema's {key} must be a whole number >= 0, got {n!r}")
            if n > MAX_REPEAT:
                raise PromptError(f"the JSON schema's {key} is {n:g}, above this server's limit of {MAX_REPEAT} "
                                  "(a grammar that long would not fit in memory)")
            if n < 0 or int(n) != n:
                raise PromptError(f"the JSON schema's {key} must be a whole number >= 0, got {n!r}")
            counts[key] = int(n)
            total += int(n)
        for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if hi not in counts:
                continue
            if counts[hi] < counts.get(lo, 0):
                raise PromptError(f"the JSON schema allows nothing: {hi} {counts[hi]} is below {lo} {counts[lo]}")
            if counts[hi] - counts.get(lo, 0) > MAX_SPAN:
                raise PromptError(f"the JSON schema's {hi} may exceed {lo} (0 if not given) by at most {MAX_SPAN}, "
                                  f"got {hi} {counts[hi]} and {lo} {counts.get(lo, 0)} (llama.cpp's grammar parser "
                                  "refuses more optional repetitions)")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            total += pattern_repeats(pattern)
        if total > MAX_REPEAT_TOTAL:
            raise PromptError(f"the JSON schema's lengths and item counts add up to more than this server's limit "
                              f"of {MAX_REPEAT_TOTAL}")
        todo.extend(v for k, v in node.items() if k not in VALUE_KEYS and isinstance(v, (dict, list)))


def pattern_repeats(pattern: str) -> int:
    """The sum of the `{n}`, `{n,}` and `{n,m}` counts in a regex pattern; PromptError for one
    above MAX_REPEAT or a span m - n above MAX_SPAN."""
    total = 0
    for m in _QUANTIFIER.finditer(pattern):
        for count in m.groups():
            if count and (len(count) > 9 or int(count) > MAX_REPEAT):
                raise PromptError(f"the JSON schema's pattern repeats {m.group(0)}, above this server's limit of "
                                  f"{MAX_REPEAT} repetitions")
            total += int(count or 0)
        low, high = m.groups()
        if high and int(high) - int(low or 0) > MAX_SPAN:
            raise PromptError(f"the JSON schema's pattern repeats {m.group(0)}: at most {MAX_SPAN} optional "
                              "repetitions (llama.cpp's grammar parser refuses more)")
    return total


def check_grammar(gbnf: str) -> None:
    """Raise PromptError for GBNF that llama.cpp should not be asked to parse: longer than
    MAX_GRAMMAR_CHARS, or with a `{n,m}` repetition above MAX_REPEAT (the parser expands it)."""
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise PromptError(f"the grammar has {len(gbnf)} characters, above this server's limit of "
                          f"{MAX_GRAMMAR_CHARS} (simplify the JSON schema or the tools)")
    for m in re.finditer(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}',
                         gbnf):
        for count in m.groups():  # only set for a repetition outside literals, classes and comments
            if count and (len(count) > 9 or int(count) > MAX_REPEAT):
                raise PromptError(f"the grammar repeats {m.group(0)}, above this server's limit of {MAX_REPEAT} "
                                  "repetitions")


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None] | None:
    """(lowest, highest) integer the schema allows, None for an open side; None when it sets no
    bound. Draft-4 boolean `exclusiveMinimum`/`exclusiveMaximum` and the later numeric ones both count."""
    if not any(k in schema for k in BOUND_KEYS):
        return None
    lo = hi = None
    try:
        if isinstance(schema.get("minimum"), (int, float)):
            m = schema["minimum"]
            lo = math.floor(m) + 1 if schema.get("exclusiveMinimum") is True and m == math.floor(m) else math.ceil(m)
        if isinstance(schema.get("maximum"), (int, float)):
            m = schema["maximum"]
            hi = math.ceil(m) - 1 if schema.get("exclusiveMaximum") is True and m == math.ceil(m) else math.floor(m)
        x = schema.get("exclusiveMinimum")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            lo = max(lo, math.floor(x) + 1) if lo is not None else math.floor(x) + 1
        x = schema.get("exclusiveMaximum")
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            hi = min(hi, math.ceil(x) - 1) if hi is not None else math.ceil(x) - 1
    except (OverflowError, ValueError):  # inf or nan bounds
        raise PromptError("the JSON schema's integer bounds must be finite numbers") from None
    return lo, hi


def integer_rule(lo: int | None, hi: int | None) -> str:
    """A GBNF expression (followed by the converter's `space` rule) for the integers lo..hi."""
    limit = 10**MAX_DIGITS - 1
    if lo is not None and hi is not None and lo > hi:
        raise PromptError(f"the JSON schema allows no integer: the bounds {lo}..{hi} are empty")
    if (lo is not None and lo > limit) or (hi is not None and hi < -limit):
        raise PromptError(f"the JSON schema's integer bounds lie beyond {MAX_DIGITS} digits")
    alts: list[str] = []
    neg_hi = -1 if hi is None or hi >= 0 else hi  # negatives: lo..min(hi, -1), as "-" and a magnitude
    if lo is None or lo <= neg_hi:
        mags = _naturals(-neg_hi, None if lo is None or -lo > limit else -lo)
        alts.append(f'"-" ({" | ".join(mags)})')
    pos_lo = 0 if lo is None or lo < 0 else lo  # non-negatives: max(lo, 0)..hi
    if hi is None or hi >= pos_lo:
        alts += _naturals(pos_lo, None if hi is None or hi > limit else hi)
    return f"({' | '.join(alts)}) space"


def _naturals(a: int, b: int | None) -> list[str]:
    """Alternatives matching a..b (b None: up to MAX_DIGITS digits), 0 <= a."""
    la = len(str(a))
    lb = MAX_DIGITS if b is None else len(str(b))
    out: list[str] = []
    for n in range(la, lb + 1):
        lo = a if n == la else 10 ** (n - 1)
        hi = 10**n - 1 if b is None or n < lb else b
        if n > la and b is None:  # every longer number: one alternative for the lengths left
            out.append(f"[1-9] [0-9]{{{n - 1},{MAX_DIGITS - 1}}}")
            break
        out += _same_length(str(lo), str(hi))
    return out


def _same_length(a: str, b: str) -> list[str]:
    """Alternatives matching the digit strings s with len(s) == len(a) == len(b) and a <= s <= b."""
    if a == b:
        return [f'"{a}"']
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [f'"{a[0]}" ({" | ".join(_same_length(a[1:], b[1:]))})']
    k = len(a) - 1
    out: list[str] = []
    first = int(a[0])
    last = int(b[0])
    if a[1:] != "0" * k:  # a's first digit, then a[1:]..99…
        out.append(f'"{a[0]}" ({" | ".join(_same_length(a[1:], "9" * k))})')
        first += 1
    if b[1:] != "9" * k:  # b's first digit, then 00…..b[1:]
        tail = f'"{b[0]}" ({" | ".join(_same_length("0" * k, b[1:]))})'
        last -= 1
    else:
        tail = None
    if first <= last:  # the first digits in between, then any k digits
        out.append(f"[{first}-{last}] [0-9]{{{k}}}")
    if tail is not None:
        out.append(tail)
    return out
