"""Chat-template rendering: the GGUF's own Jinja template, sandboxed, with `reasoning_effort`.

Rendered the way Hugging Face renders chat templates (trim_blocks, lstrip_blocks, a
`raise_exception` helper, `tojson` without HTML escaping), so a template written for HF gives
the same text here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import PromptError

REASONING_EFFORTS = ("none", "high")


def _raise(message: str) -> None:
    raise PromptError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise PromptError(f"the model's chat template does not compile: {e}") from None


def render(
    template: str,
    messages: list[dict[str, Any]],
    *,
    reasoning_effort: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """The prompt text for a conversation (generation starts right after it)."""
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise PromptError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    try:
        return _compile(template).render(
            messages=messages, tools=tools, reasoning_effort=reasoning_effort,
            bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True,
        )
    except PromptError:
        raise
    except TemplateError as e:
        raise PromptError(f"the chat template failed: {e}") from None
