"""Chat-template rendering: the GGUF's own Jinja template, sandboxed, with `reasoning_effort`.

Rendered the way Hugging Face renders chat templates (trim_blocks, lstrip_blocks, a
`raise_exception` helper, `tojson` without HTML escaping), so a template written for HF gives
the same text here.

One step of mistral-common's request normalisation cannot be written in Jinja: tool-call
arguments are parsed and dumped again (`{"a":1}` becomes `{"a": 1}`, `1e3` becomes `1000.0`,
text that is not JSON becomes a JSON string). `render` does it before the template runs, so
that the prompt is the one Mistral's own tokenizer produces (tests/test_template_parity.py).
"""

from __future__ import annotations

import json
import os
import re
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


def canonical_arguments(arguments: Any) -> str:
    """Tool-call arguments as mistral-common writes them after `[ARGS]`.

    mistral-common's v15 normaliser and encoder do `json.dumps(json.loads(args))` (with
    `ensure_ascii=False`, default separators), fall back to the raw text when it is not JSON and
    then dump that as a JSON *string*; empty arguments are `{}`. A dict is dumped directly.
    """
    if arguments is None or arguments == "":
        value: Any = {}
    elif isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            value = arguments
    else:
        value = arguments
    return json.dumps(value, ensure_ascii=False)


def _with_canonical_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the messages whose tool calls carry `canonical_arguments` (inputs untouched)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if isinstance(calls, list) and calls:
            fixed = []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    call = {**call, "function": {**fn, "arguments": canonical_arguments(fn.get("arguments"))}}
                fixed.append(call)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def render(
    template: str,
    messages: list[dict[str, Any]],
    *,
    reasoning_effort: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
) -> str:
    """The prompt text for a conversation (generation starts right after it).

    Tool-call arguments are made canonical first (`canonical_arguments`); everything else is
    the template's job.
    """
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise PromptError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    try:
        return _compile(template).render(
            messages=_with_canonical_tool_calls(messages), tools=tools, reasoning_effort=reasoning_effort,
            bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True,
        )
    except PromptError:
        raise
    except TemplateError as e:
        raise PromptError(f"the chat template failed: {e}") from None


def _read_json(path: str | os.PathLike[str], what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise PromptError(f"cannot read the {what} file {os.fspath(path)}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PromptError(f"the {what} file {os.fspath(path)} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise PromptError(f"the {what} file {os.fspath(path)} is not valid JSON: {e.msg} "
                          f"(line {e.lineno}, column {e.colno})") from None


def load_conversation(messages_path: str | os.PathLike[str], tools_path: str | os.PathLike[str] | None = None,
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools from JSON files, shaped as in an OpenAI chat-completions request.

    The messages file holds a list of messages, or a request-like object with "messages" (and
    optionally "tools"), so a saved request body works as is; a separate tools file (a list)
    takes precedence. Only the shape is checked here; the chat template judges the content.
    """
    data = _read_json(messages_path, "messages")
    tools = None
    if isinstance(data, dict) and "messages" in data:
        tools = data.get("tools")
        data = data["messages"]
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in data):
        raise PromptError(f"{os.fspath(messages_path)} must hold a list of messages (objects with a \"role\"), "
                          "or an object with \"messages\"")
    if tools_path is not None:
        tools = _read_json(tools_path, "tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        where = os.fspath(tools_path) if tools_path is not None else f"\"tools\" in {os.fspath(messages_path)}"
        raise PromptError(f"{where} must be a list of tool definitions (objects)")
    return data, tools


# ----------------------------------------------------------------------------------- message text
# Message text must not be read as control tokens: a user who writes "[INST]" typed five
# characters, not a turn boundary (mistral-common encodes every message's text as plain text).
# llama.cpp's tokenizer only knows "parse specials in this whole string, or nowhere", so the
# prompt is rendered a second time with invisible markers around each message text, which tells
# which characters came from messages and which from the template.
_TEXT_KEYS = ("content", "text", "thinking", "reasoning_content", "reasoning")
_MARKERS = [("\ue000", "\ue001"), ("\U000f0000", "\U000f0001"), ("\U00100000", "\U00100001")]


def _mark(value: Any, begin: str, end: str) -> Any:
    """A copy of messages with every message text wrapped in markers (inside its outer spaces,
    so that a template's strip()/rstrip() gives the same text it would without them)."""
    if isinstance(value, list):
        return [_mark(v, begin, end) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in _TEXT_KEYS and isinstance(v, str) and v.strip():
            lead = len(v) - len(v.lstrip())
            core = v.strip()
            trail = v[lead + len(core):]
            out[k] = v[:lead] + begin + core + end + trail
        elif k in ("content",) and isinstance(v, list):
            out[k] = _mark(v, begin, end)
        else:
            out[k] = v
    return out


def render_marked(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[str, list[tuple[int, int]] | None]:
    """The prompt text (as `render` gives it) and the character ranges that are message text.

    The ranges are None when they cannot be trusted (the template changed the marked text in a
    way that makes the two renders differ); the caller then treats the whole prompt as template.
    """
    text = render(template, messages, **kwargs)
    for begin, end in _MARKERS:
        if begin not in text and end not in text:
            break
    else:
        return text, None
    marked = render(template, _mark(messages, begin, end), **kwargs)
    ranges: list[tuple[int, int]] = []
    plain: list[str] = []
    pos = 0
    inside: int | None = None
    for part in re.split(f"({re.escape(begin)}|{re.escape(end)})", marked):
        if part == begin or part == end:
            if (part == begin) == (inside is not None):
                return text, None  # unbalanced: the template cut or reordered a text
            if part == begin:
                inside = pos
            else:
                if pos > inside:
                    ranges.append((inside, pos))
                inside = None
        elif part:
            plain.append(part)
            pos += len(part)
    if inside is not None or "".join(plain) != text:
        return text, None
    return text, ranges


# ----------------------------------------------------------------------------------- images
_IMAGE_MARK = re.compile("\ue010(\\d+)\ue011")


def image_order(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """The order in which the template writes the conversation's image parts: indices into the
    image parts taken in message order (`ms4local.images.image_parts`).

    A template writes the same `[IMG]` for every image, and may move messages (tool results go in
    the order of the calls they answer), so the prompt is rendered once more with each image part
    replaced by a text part that names it. Identity when that render fails or loses a name.
    """
    count = 0

    def swap(content: Any) -> Any:
        nonlocal count
        if not isinstance(content, list):
            return content
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                out.append({"type": "text", "text": f"\ue010{count}\ue011"})
                count += 1
            else:
                out.append(part)
        return out

    named = [{**m, "content": swap(m.get("content"))} if isinstance(m, dict) and "content" in m else m
             for m in messages]
    try:
        found = [int(k) for k in _IMAGE_MARK.findall(render(template, named, **kwargs))]
    except PromptError:
        found = []
    return found if sorted(found) == list(range(count)) else list(range(count))
