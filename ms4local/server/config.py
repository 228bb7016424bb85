"""`serve`'s settings (model id, key, request defaults, limits) and the ranges sampling values must lie in.

One table of ranges judges both `serve`'s flags (once, before the model loads) and every request's
fields, so that both are refused in the same words.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.options import Sampling
from ..errors import OptionsError
from .images import ImagePolicy


@dataclass
class ServerConfig:
    """What `ms4local serve` decided: the model's public id, the key, defaults and limits."""

    model_id: str
    api_key: str | None = None  # None: no auth; an empty key is refused by `check`
    reasoning_effort: str = "none"
    # What a request that leaves a sampling value out gets (its seed, grammar and logit_bias are the
    # request's own). The temperature counts only with `temperature_by_effort` off (`serve --temp`).
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=2048))
    temperature_by_effort: bool = True  # 0.7 with high effort, 0.1 with none (Mistral's guidance)
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_body_bytes: int = 32 * 2**20
    created: int = field(default_factory=lambda: int(time.time()))

    def check(self) -> None:
        """Refuse defaults that would fail every request, and a key no client could send."""
        if self.api_key is not None and (not self.api_key.strip() or not self.api_key.isascii()
                                         or not self.api_key.isprintable() or self.api_key != self.api_key.strip()):
            raise OptionsError("--api-key must be a non-empty key of printable ASCII characters without surrounding "
                               "spaces (leave the option out to serve without a key)")
        s = self.sampling
        temperature = None if self.temperature_by_effort else s.temperature
        for flag, param, value in (("--temp", "temperature", temperature), ("--top-p", "top_p", s.top_p),
                                   ("--top-k", "top_k", s.top_k), ("--min-p", "min_p", s.min_p),
                                   ("--repeat-penalty", "repeat_penalty", s.repeat_penalty),
                                   ("-n/--max-tokens", "max_tokens", s.max_tokens)):
            problem = None if value is None else out_of_range(param, value)
            if problem:
                raise OptionsError(f"{flag}: {problem}")


# Where each sampling value is accepted: one table for requests and for `serve`'s defaults. NaN fails
# every comparison, so it is refused too; top_k beyond the vocabulary means "all" (the engine skips it).
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, "0 or more"),
    "min_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "repeat_penalty": (lambda v: 0 < v <= 10, "in (0, 10]"),
    "max_tokens": (lambda v: v >= 1, "at least 1"),
}


def out_of_range(param: str, value: float) -> str | None:
    """"param must be …" when `value` lies outside what RANGES accepts, else None."""
    ok, what = RANGES[param]
    return None if ok(value) else f"{param} must be {what}, got {value}"
