"""OpenAI request fields → what the engine takes: messages, `Sampling`, stop strings, tools, grammar.

Every field's meaning is judged here, so a bad value is a 400 that names it before anything
reaches the scheduler; the routes only put the pieces together. The grammar itself is written by
ms4local/grammar.py.

Effort mapping (OpenAI → Mistral Small 4, which knows only "none" and "high"): "none" and
"minimal" → none; "low", "medium" and "high" → high. Any other value is a 400.
"""

from __future__ import annotations

import string
from typing import Any

from ..chat_session import default_sampling
from ..engine import Engine, Sampling
from ..grammar import answer_grammar
from ..stream import Tag
from .config import ServerConfig, out_of_range
from .errors import bad_request
from .images import ImagePolicy, resolve
from .schemas import ChatRequest, CompletionRequest, ContentPart, Message

EFFORTS = {"none": "none", "minimal": "none", "low": "high", "medium": "high", "high": "high"}
MAX_STOP = 16
MAX_LOGIT_BIAS = 4096
MAX_STOP_CHARS = 256  # the stop filter holds back up to this much text and scans it at every token
TOOL_NAME_CHARS = set(string.ascii_letters + string.digits + "_-.")


def effort_of(value: str | None, default: str) -> str:
    if value is None:
        return default
    effort = EFFORTS.get(value.strip().lower())
    if effort is None:
        raise bad_request(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {value!r} (this model thinks "
                          "at \"none\" or \"high\"; minimal maps to none, low and medium to high)",
                          "reasoning_effort", "invalid_value")
    return effort


def sampling_of(config: ServerConfig, body: ChatRequest | CompletionRequest, effort: str, max_tokens: int | None,
                grammar: str | None) -> Sampling:
    """The request's sampling, checked (400s), on top of the server's defaults."""
    if body.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n", "unsupported_value")
    if body.logprobs not in (None, False, 0):
        raise bad_request("logprobs are not supported by this server", "logprobs", "unsupported_value")
    defaults = config.sampling
    temp = body.temperature if body.temperature is not None else (
        default_sampling(effort).temperature if config.temperature_by_effort else defaults.temperature)
    top_p = defaults.top_p if body.top_p is None else body.top_p
    top_k = defaults.top_k if body.top_k is None else body.top_k
    min_p = defaults.min_p if body.min_p is None else body.min_p
    penalty = defaults.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty
    n = defaults.max_tokens if max_tokens is None else max_tokens
    for param, value in (("temperature", temp), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
                         ("repeat_penalty", penalty), ("max_tokens", n)):
        problem = out_of_range(param, value)
        if problem:
            raise bad_request(problem, param, "invalid_value")
    seed = None if body.seed is None else body.seed & 0xFFFFFFFF  # -1 → 0xFFFFFFFF: llama.cpp's "random"
    return Sampling(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=penalty,
                    max_tokens=n, seed=seed, grammar=grammar, logit_bias=logit_bias_of(body.logit_bias))


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` with biases in [-100, 100]; ids beyond the vocabulary are
    refused by the engine when the sampler is built (a 400 as well)."""
    if bias and len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}", "logit_bias",
                          "invalid_value")
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias", "invalid_value") from None
        if token < 0 or not -100 <= value <= 100:
            raise bad_request(f"logit_bias must map token ids to biases in [-100, 100], got {key}: {value}",
                              "logit_bias", "invalid_value")
        out.append((token, float(value)))
    return tuple(out)


def stops_of(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop strings are accepted, got {len(stops)}", "stop", "invalid_value")
    long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise bad_request(f"stop strings may hold at most {MAX_STOP_CHARS} characters, got one of {len(long)}",
                          "stop", "invalid_value")
    return tuple(s for s in stops if s)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"{where}.content[{j}]: only text parts are accepted in this message",
                              f"{where}.content", "invalid_content")
        out.append(part.text)
    return "".join(out)


def messages_of(messages: list[Message], policy: ImagePolicy) -> tuple[list[dict[str, Any]], int]:
    """OpenAI messages → the dicts the chat template reads; (messages, number of images).

    Blocking where an image is fetched or read (only with --allow-image-urls/--allow-local-files).
    """
    if not messages:
        raise bad_request("messages must hold at least one message", "messages", "invalid_value")
    out: list[dict[str, Any]] = []
    images = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role}
        if role == "user":
            if m.content is None:
                raise bad_request(f"{where}.content is required for a user message", f"{where}.content")
            if isinstance(m.content, str):
                msg["content"] = m.content
            else:
                parts: list[dict[str, Any]] = []
                for j, part in enumerate(m.content):
                    p = f"{where}.content[{j}]"
                    if part.type == "text":
                        if part.text is None:
                            raise bad_request(f"{p}: a text part needs \"text\"", p)
                        parts.append({"type": "text", "text": part.text})
                    elif part.type == "image_url":
                        url = part.image_url.url if part.image_url is not None and not isinstance(part.image_url, str) \
                            else part.image_url
                        if not url:
                            raise bad_request(f"{p}: an image_url part needs \"image_url\": {{\"url\": ...}}", p)
                        parts.append({"type": "image", "image": resolve(url, policy, p)})
                        images += 1
                    else:
                        raise bad_request(f"{p}: content parts of type {part.type!r} are not supported "
                                          "(text and image_url are)", p, "invalid_content")
                msg["content"] = parts
        else:
            text = _text_of(m.content, where)
            if role in ("system", "tool") and text is None:
                raise bad_request(f"{where}.content is required for a {m.role} message", f"{where}.content")
            msg["content"] = text if text is not None else ""
            if role == "assistant":
                if m.tool_calls:
                    msg["tool_calls"] = [{"id": c.id or f"call{k}", "type": "function",
                                          "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                         for k, c in enumerate(m.tool_calls)]
                if m.reasoning_content:
                    msg["reasoning_content"] = m.reasoning_content
            if role == "tool":
                if m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    msg["name"] = m.name
        out.append(msg)
    return out, images


def grammar_of(engine: Engine, body: ChatRequest, effort: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The tools the template shows and the grammar that holds the output to the request (the
    request is judged here, the GBNF written by `ms4local.grammar.answer_grammar`).

    * `response_format` json_object / json_schema: the answer is JSON (valid against the schema).
    * `tool_choice` "required" or a named function: the answer is one or more tool calls,
      `[TOOL_CALLS]name[ARGS]{arguments valid against the tool's parameters}`, written with the
      vocabulary's control tokens (`<[id]>` in GBNF), as the model writes them unconstrained.
    * Both JSON and tools with "auto": JSON or tool calls. "none": the tools are shown (the prompt
      is the one "auto" gives, so its cache is shared) and the caller bans [TOOL_CALLS].
    * At high effort the grammar starts with the [THINK]…[/THINK] block the model writes then.
    No grammar otherwise: the model is free, and the parser reads what it writes.
    """
    tools = body.tools or None
    choice = body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise bad_request("tool_choice needs tools", "tool_choice", "invalid_value")
    fmt = body.response_format
    want_json = fmt is not None and fmt.type != "text"
    forced = choice == "required" or (tools is not None and not isinstance(choice, (str, type(None))))
    callable_tools = tools if choice != "none" else None
    if tools:
        for k, t in enumerate(tools):
            name = t.function.name
            if not name or len(name) > 64 or not set(name) <= TOOL_NAME_CHARS:
                raise bad_request(f"tools[{k}].function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                  f"got {name!r}", f"tools[{k}].function.name", "invalid_value")
    shown = [t.model_dump(exclude_none=True, by_alias=True) for t in tools] if tools else None
    if not want_json and not forced:
        return shown, None
    ids = {tag: tok for tok, tag in engine.tags.ids.items()}
    schema: Any = None
    if want_json:
        schema = {"type": "object"}
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
            schema = fmt.json_schema.schema_
    calls: list[tuple[str, Any]] | None = None
    named = None
    if callable_tools is not None and (forced or want_json):
        if Tag.TOOL_CALLS not in ids or Tag.ARGS not in ids:
            raise bad_request("this model's vocabulary has no [TOOL_CALLS]/[ARGS] tokens, so tool calls cannot be "
                              "enforced", "tool_choice")
        named = choice.function.name if forced and choice != "required" else None  # type: ignore[union-attr]
        picked = [t for t in tools if named is None or t.function.name == named]
        if not picked:
            raise bad_request(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        calls = [(t.function.name, t.function.parameters or {"type": "object"}) for t in picked]
    try:
        grammar = answer_grammar(ids, json_schema=schema, tools=calls, calls_only=forced, one_call=named is not None,
                                 think=effort == "high")
    except Exception as e:  # PromptError from the converter
        raise bad_request(str(e), "response_format" if want_json else "tools", "invalid_schema") from None
    return shown, grammar
