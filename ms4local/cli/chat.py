"""`ms4local chat`: one-shot answers through the GGUF's own chat template."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .. import ui
from ..engine import Delta, Engine, EngineOptions, Sampling
from . import options
from .errors import fail, handle_errors


def sampling_for(effort: str, temp: float | None, max_tokens: int, seed: int | None) -> Sampling:
    """Mistral's guidance: 0.7 when reasoning, lower for direct answers."""
    default = 0.7 if effort == "high" else 0.1
    return Sampling(temperature=default if temp is None else temp, max_tokens=max_tokens, seed=seed)


@handle_errors
def chat(
    model: options.Model,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="Ask this, print the answer and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    reasoning_effort: options.ReasoningEffort = "none",
    max_tokens: options.MaxTokens = 512,
    temp: options.Temp = None,
    seed: options.Seed = None,
    ctx_size: options.CtxSize = 4096,
    threads: options.Threads = None,
    as_json: options.Json = False,
) -> None:
    """Chat with a GGUF model (one-shot with --prompt)."""
    if reasoning_effort not in ("none", "high"):
        raise fail(f"--reasoning-effort must be none or high, got {reasoning_effort!r}", 2)
    if prompt is None:
        raise fail("interactive chat is not available yet; pass --prompt TEXT", 2)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with ui.fraction_progress("loading") as progress:
        engine = Engine(model, EngineOptions(ctx_size=ctx_size, threads=threads), progress=progress)
    with engine:
        stream = ui.Streamer()
        parts: dict[bool, list[str]] = {True: [], False: []}
        for event in engine.chat(messages, sampling_for(reasoning_effort, temp, max_tokens, seed),
                                 reasoning_effort=reasoning_effort):
            if isinstance(event, Delta):
                parts[event.reasoning].append(event.text)
                if not as_json:
                    stream.write(event.text, event.reasoning)
            else:
                done = event
    if as_json:
        print(json.dumps({"reasoning": "".join(parts[True]), "content": "".join(parts[False]),
                          "finish_reason": done.finish_reason, "usage": vars(done.usage),
                          "timings": {**vars(done.timings), "decode_tps": done.timings.decode_tps}}, ensure_ascii=False))
        return
    stream.finish()
    ui.err.print(ui.stats_line(done), style="dim")
