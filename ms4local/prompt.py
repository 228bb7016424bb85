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


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """Refuse an assistant turn that follows fewer tool results than the previous turn's calls,
    as mistral-common does.

    This one rule of mistral-common's validation lives here, not in ms4local's template: llama.cpp
    probes a template for parallel tool calls with exactly such a conversation (two calls, one
    result, an answer) and allows one call per turn in llama-server when the template refuses it.
    The template checks everything else (role order, more results than calls).
    """
    calls = results = 0
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role == "tool":
            results += 1
        elif role == "assistant":
            if results < calls:
                raise PromptError(f"an assistant message made {calls} tool call(s) but {results} result(s) follow it")
            tool_calls = m.get("tool_calls")
            calls, results = (len(tool_calls) if isinstance(tool_calls, list) else 0), 0


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
    check_tool_results(messages)
    try:
        return _compile(template).render(
            messages=_with_canonical_tool_calls(messages), tools=tools, reasoning_effort=reasoning_effort,
            bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True,
        )
    except PromptError:
        raise
    except TemplateError as e:
        raise PromptError(f"the chat template failed: {e}") from None


# Bounds on a conversation file, so that a hostile or broken file is one line, not a
# RecursionError or an exhausted memory: JSON nested deeper than any conversation needs, and a
# file far larger than any context (a 256k-token conversation is a few MB of text).
MAX_CONVERSATION_BYTES = 256 * 1024 * 1024
MAX_DEPTH = 64
ROLES = ("system", "developer", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "image_url", "thinking")


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """A JSON file the user named, or PromptError with one line (unreadable, too large, not
    UTF-8, not JSON, nested too deep)."""
    where = f"the {what} file {os.fspath(path)}"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONVERSATION_BYTES:
                raise PromptError(f"{where} is {size / 2**20:.0f} MiB; the limit is "
                                  f"{MAX_CONVERSATION_BYTES // 2**20} MiB")
            data = f.read(MAX_CONVERSATION_BYTES + 1)
    except IsADirectoryError:
        raise PromptError(f"{where} is a directory") from None
    except OSError as e:
        raise PromptError(f"cannot read {where}: {e.strerror or e}") from None
    if len(data) > MAX_CONVERSATION_BYTES:  # a pipe or a device that keeps going
        raise PromptError(f"{where} is larger than {MAX_CONVERSATION_BYTES // 2**20} MiB")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise PromptError(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise PromptError(f"{where} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise PromptError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)") from None


def _kind(value: Any) -> str:
    names = {str: "text", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_text(value: Any, where: str) -> None:
    """Every string (keys too) valid Unicode, and nesting bounded; iterative, so it cannot
    itself overflow the stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PromptError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PromptError(f"{where} holds text that is not valid Unicode (a lone surrogate "
                                  f"{v[e.start]!a})") from None
        elif isinstance(v, dict):
            stack.extend((k, depth + 1) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        raise PromptError(f"{where} must be an object whose type is one of {', '.join(PART_TYPES)}")
    kind = part["type"]
    if kind in ("text", "thinking") and not isinstance(part.get(kind), str):
        raise PromptError(f"{where}: \"{kind}\" must be text, got {_kind(part.get(kind))}")
    if kind == "image" and not isinstance(part.get("image"), str):
        raise PromptError(f"{where}: \"image\" must be a path, URL or data: URI, got {_kind(part.get('image'))}")
    if kind == "image_url":
        url = part.get("image_url")
        if not (isinstance(url, str) or (isinstance(url, dict) and isinstance(url.get("url"), str))):
            raise PromptError(f"{where}: \"image_url\" must be text or an object with a \"url\"")


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise PromptError(f"{where}: tool_calls must be a list, got {_kind(calls)}")
    for j, call in enumerate(calls, 1):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise PromptError(f"{where}: tool call {j} must be an object with a \"function\" that has a \"name\"")
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            raise PromptError(f"{where}: tool call {j}'s arguments must be JSON text or an object, "
                              f"got {_kind(fn.get('arguments'))}")
        if not isinstance(call.get("id", ""), (str, type(None))):
            raise PromptError(f"{where}: tool call {j}'s id must be text")


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """The conversation a user or client handed in, checked once so that nothing later (the
    template, the tokenizer, llama.cpp) meets a shape or a string it cannot take.

    A list of objects; role one of ROLES; content text, a list of known parts, or null;
    reasoning text; tool calls shaped as OpenAI writes them; every string valid Unicode (JSON's
    "\\ud800" escape makes a lone surrogate that no encoder accepts); nesting bounded. Raises
    PromptError with one line that names the message (1-based). Unknown keys are left alone.
    """
    if not isinstance(messages, list):
        raise PromptError(f"{where}: \"messages\" must be a list, got {_kind(messages)}")
    for i, m in enumerate(messages, 1):
        at = f"{where}: message {i}"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise PromptError(f"{at} must be an object whose role is one of {', '.join(ROLES)}")
        _check_text(m, at)
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content, 1):
                _check_part(part, f"{at}, content part {j}")
        elif content is not None and not isinstance(content, str):
            raise PromptError(f"{at}: content must be text, a list of parts or null, got {_kind(content)}")
        for key in ("reasoning_content", "reasoning", "name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise PromptError(f"{at}: {key} must be text, got {_kind(m[key])}")
        if m.get("tool_calls") is not None:
            _check_tool_calls(m["tool_calls"], at)
    return messages


def load_conversation(messages_path: str | os.PathLike[str], tools_path: str | os.PathLike[str] | None = None,
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools from JSON files, shaped as in an OpenAI chat-completions request.

    The messages file holds a list of messages, or a request-like object with "messages" (and
    optionally "tools"), so a saved request body works as is; a separate tools file (a list)
    takes precedence. The messages are checked by `check_messages`; the chat template judges
    the order of the roles.
    """
    data = read_json(messages_path, "messages")
    tools = None
    if isinstance(data, dict) and "messages" in data:
        tools = data.get("tools")
        data = data["messages"]
    if not isinstance(data, list):
        raise PromptError(f"{os.fspath(messages_path)} must hold a list of messages (objects with a \"role\"), "
                          "or an object with \"messages\"")
    check_messages(data, os.fspath(messages_path))
    if tools_path is not None:
        tools = read_json(tools_path, "tools")
    where = os.fspath(tools_path) if tools_path is not None else f"\"tools\" in {os.fspath(messages_path)}"
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise PromptError(f"{where} must be a list of tool definitions (objects)")
    if tools is not None:
        _check_text(tools, where)
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
