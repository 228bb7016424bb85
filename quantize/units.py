"""Sizes as people type them: `50G`, `500M`, `24GiB`, `1.5T`, plain bytes."""

from __future__ import annotations

import re

from .errors import QuantizeError

# Decimal suffixes as llama.cpp's gguf-split reads them (50G = 50·10⁹ bytes); binary with an "i".
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


class SizeError(QuantizeError, ValueError):
    """A size string that cannot be read."""


def parse_size(text: str) -> int:
    """Bytes of a size string; raises SizeError with the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?)B?\s*", text.upper())
    if not m or (m.group(2) not in _UNITS):
        raise SizeError(f"cannot read size {text!r}; use e.g. 50G, 500M, 24GiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise SizeError(f"size {text!r} must be positive")
    return n
