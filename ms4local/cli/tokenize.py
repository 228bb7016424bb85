"""`ms4local tokenize`: the ids llama.cpp produces with a GGUF's vocabulary.

Two modes: TEXT tokenizes a string (like llama.cpp's llama-tokenize); `--messages FILE` prints
the prompt ids the engine would evaluate for a conversation, i.e. the GGUF's chat template
rendered with the tools and reasoning effort, then tokenized (what `chat` feeds the model).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .. import ui
from ..engine import Engine, EngineOptions, check_model_path
from ..prompt import load_conversation
from . import options
from .errors import fail, handle_errors


@handle_errors
def tokenize(
    model: options.Model,
    text: Annotated[Optional[str], typer.Argument(
        help="Text to tokenize; control tokens like [INST] are parsed.", show_default=False)] = None,
    messages: Annotated[Optional[str], typer.Option(
        "--messages", metavar="FILE", show_default=False,
        help='Tokenize a conversation instead: a JSON list of messages, or {"messages": [...], "tools": [...]}.')] = None,
    tools: Annotated[Optional[str], typer.Option(
        "--tools", metavar="FILE", show_default=False, help="A JSON list of tool definitions (with --messages).")] = None,
    reasoning_effort: options.ReasoningEffort = "none",
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Add BOS as the model's metadata asks (TEXT only).")] = True,
    as_json: options.Json = False,
) -> None:
    """Print token ids and pieces of a text, or the prompt ids of a conversation (--messages)."""
    if (text is None) == (messages is None):
        raise fail("give either TEXT or --messages FILE", 2)
    if reasoning_effort not in ("none", "high"):
        raise fail(f"--reasoning-effort must be none or high, got {reasoning_effort!r}", 2)
    if messages is None and (tools is not None or reasoning_effort != "none"):
        raise fail("--tools and --reasoning-effort apply to a conversation; add --messages FILE", 2)
    options.check_text(TEXT=text)
    check_model_path(model)
    # Read the files before loading the model: a typo should not wait for the load.
    conversation = load_conversation(messages, tools) if messages is not None else None
    prompt = None
    with Engine(model, EngineOptions(vocab_only=True)) as engine:
        if conversation is not None:
            msgs, tool_defs = conversation
            prompt = engine.render(msgs, reasoning_effort=reasoning_effort, tools=tool_defs)
            ids = engine.prompt_tokens(msgs, reasoning_effort=reasoning_effort, tools=tool_defs)
        else:
            ids = engine.tokenize(text or "", add_special=bos, parse_special=True)
        pieces = [engine.piece(i).decode("utf-8", "replace") for i in ids]
    if as_json:
        out = {"ids": ids, "pieces": pieces}
        if prompt is not None:
            out["prompt"] = prompt
        print(json.dumps(out, ensure_ascii=False))
        return
    for i, p in zip(ids, pieces):
        ui.out.print(f"{i:>7} -> {p!r}", markup=False)
