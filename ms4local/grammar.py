"""GBNF for JSON-schema integer bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`).

llama-cpp-python 0.3.36's copy of llama.cpp's schema converter ignores these keywords for integers
(a TODO in its source), so a `json_schema` response format with `{"type": "integer", "minimum": 1,
"maximum": 5}` could yield 9 and fail validation. `json_grammar` (engine.py) hands bounded integers
to `integer_rule` instead. The rule accepts exactly the decimal integers in the range, written as
JSON writes them (no leading zeros, no "+"), built digit by digit the way range regexes are: split
the range at powers of ten, then within one length at the first digit where the bounds part.
Pure Python, no llama.cpp: tests check it against llama.cpp's own grammar engine.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import PromptError

MAX_DIGITS = 16  # as the converter's `integral-part` (and enough for any 53-bit JSON integer)
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


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
