"""`ms4local chat`: one-shot answers (--prompt) or an interactive chat, through the GGUF's own template.

The conversation logic lives in `ms4local.chat_session`; this module reads lines, draws turns
with `ui.ChatView` and turns Ctrl-C into "stop this answer".
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Optional

import typer

from .. import ui
from ..chat_session import (COMMANDS, ChatSession, Command, InputAssembler, Reply, Turn, default_sampling,
                            history_path, parse_input)
from ..engine import Delta, Done, Engine, Sampling, check_model_path
from ..stream import MalformedToolCall, ToolCall
from ..errors import Ms4localError
from ..images import check_image
from . import options
from .errors import fail, handle_errors

PROMPT, CONTINUATION = ">>> ", "... "

HideThinking = Annotated[bool, typer.Option("--hide-thinking", help="Fold the reasoning to one line (thought for N tokens).")]


def sampling_for(effort: str, temp: float | None, max_tokens: int, seed: int | None, **knobs: Any) -> Sampling:
    """The session's default temperature for the effort unless --temp fixes it; `knobs` are the
    other sampling flags (top_p, top_k, min_p, repeat_penalty)."""
    default = default_sampling(effort).temperature
    return Sampling(temperature=default if temp is None else temp, max_tokens=max_tokens, seed=seed, **knobs)


@handle_errors
@options.from_hub(projector=True)
@options.isolate_rpc
@options.engine_flags
def chat(
    model: options.Model,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="Ask this, print the answer and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    reasoning_effort: options.ReasoningEffort = "none",
    hide_thinking: HideThinking = False,
    max_tokens: options.MaxTokens = options.SAMPLING.max_tokens,
    temp: options.Temp = None,
    seed: options.Seed = None,
    top_p: options.TopP = options.SAMPLING.top_p,
    top_k: options.TopK = options.SAMPLING.top_k,
    min_p: options.MinP = options.SAMPLING.min_p,
    repeat_penalty: options.RepeatPenalty = options.SAMPLING.repeat_penalty,
    as_json: options.Json = False,
    image: options.ImagePath = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Chat with a GGUF model: interactive, or one-shot with --prompt; --image attaches pictures."""
    options.check_reasoning_effort(reasoning_effort)
    if as_json and prompt is None:
        raise fail("--json needs --prompt (the interactive chat has no JSON output)", 2)
    options.check_text(**{"--prompt": prompt, "--system": system})
    max_tokens = options.max_tokens(max_tokens)
    check_model_path(model)
    knobs = {"top_p": top_p, "top_k": top_k, "min_p": min_p, "repeat_penalty": repeat_penalty}
    opts = options.engine_options(**flags)
    images = list(image or [])
    if images and opts.no_mmproj:
        raise fail("--image needs the vision projector; drop --no-mmproj", 2)
    for source in images:  # a bad image fails here, before the model is loaded
        check_image(source)
    placement = options.resolve_placement(model, opts)
    with ui.fraction_progress("loading") as progress:
        engine = Engine(model, opts, progress=progress, placement=placement)
    with engine:
        if images and not engine.supports_images:
            raise fail(f"--image needs the model's vision projector: no mmproj-*.gguf made for {Path(model).name} "
                       "lies beside it; pass --mmproj PATH", 2)
        if prompt is not None:
            content: Any = prompt
            if images:
                content = [{"type": "image", "image": source} for source in images] + [{"type": "text", "text": prompt}]
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
            one_shot(engine, messages, sampling_for(reasoning_effort, temp, max_tokens, seed, **knobs),
                     reasoning_effort=reasoning_effort, as_json=as_json, hide_thinking=hide_thinking)
            return
        session = ChatSession(engine, system=system, reasoning_effort=reasoning_effort,
                              sampling=lambda effort: sampling_for(effort, temp, max_tokens, seed, **knobs))
        session.pending_images.extend(images)  # checked above; they go with the first message
        interactive(session, title=Path(model).name, hide_thinking=hide_thinking)


def one_shot(engine: Engine, messages: list[dict[str, Any]], sampling: Sampling, *, reasoning_effort: str,
             as_json: bool, hide_thinking: bool) -> None:
    """Answer once: streamed text (reasoning dim on stderr), or one JSON object."""
    stream = ui.Streamer()
    parts: dict[bool, list[str]] = {True: [], False: []}
    calls: list[ToolCall | MalformedToolCall] = []
    done = None
    for event in engine.chat(messages, sampling, reasoning_effort=reasoning_effort):
        if isinstance(event, Delta):
            parts[event.reasoning].append(event.text)
            if not as_json and not (event.reasoning and hide_thinking):
                stream.write(event.text, event.reasoning)
        elif isinstance(event, (ToolCall, MalformedToolCall)):
            calls.append(event)
        elif isinstance(event, Done):
            done = event
    if done is None:  # the engine always ends with Done; guard against a silent change
        raise Ms4localError("the engine ended without a result")
    if as_json:
        print(json.dumps({"reasoning": "".join(parts[True]), "content": "".join(parts[False]),
                          "tool_calls": [tool_call_json(c) for c in calls],
                          "finish_reason": done.finish_reason, "usage": vars(done.usage),
                          "timings": {**vars(done.timings), "decode_tps": done.timings.decode_tps}}, ensure_ascii=False))
        return
    stream.finish()
    for c in calls:
        ui.err.print(f"tool call: {c.name}({c.arguments})" + (f"  [malformed: {c.error}]" if isinstance(c, MalformedToolCall) else ""),
                     style="dim", markup=False, highlight=False)
    if hide_thinking and parts[True]:
        ui.err.print(f"thought for {len(parts[True])} tokens", style="dim")
    ui.err.print(ui.stats_line(done), style="dim")


def tool_call_json(call: ToolCall | MalformedToolCall) -> dict[str, Any]:
    """A tool call as OpenAI writes it; a malformed one carries its `error`."""
    out: dict[str, Any] = {"id": call.id or f"call_{call.index}", "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    if isinstance(call, MalformedToolCall):
        out["error"] = call.error
    return out


# ----------------------------------------------------------------------------------- interactive
def interactive(session: ChatSession, *, title: str, hide_thinking: bool) -> None:
    """Read inputs until /exit, Ctrl-D, or Ctrl-C at the prompt; errors are one line and the chat goes on."""
    editing = LineEditing(history_path())
    ui.err.print(f"ms4local chat · {title} · reasoning effort {session.reasoning_effort} · "
                 "/help lists the commands, Ctrl-D leaves", style="dim", markup=False, highlight=False, soft_wrap=True)
    assembler = InputAssembler()
    try:
        while True:
            try:
                line = input(CONTINUATION if assembler.pending else PROMPT)
            except KeyboardInterrupt:
                print()
                if assembler.pending:  # Ctrl-C in a multi-line input drops that input only
                    assembler.discard()
                    continue
                return
            except EOFError:
                print()
                return
            text = assembler.feed(line)
            if text is None:
                continue
            try:
                parsed = parse_input(text)
                if isinstance(parsed, Command):
                    reply = session.execute(parsed)
                    if reply.kind == "exit":
                        return
                    show(reply)
                elif parsed is not None:
                    run_turn(session, parsed, hide_thinking=hide_thinking)
            except Ms4localError as e:
                if os.environ.get("MS4LOCAL_DEBUG"):
                    ui.err.print_exception()
                ui.err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            except KeyboardInterrupt:  # a Ctrl-C that landed outside an answer (e.g. in /load)
                ui.err.print("interrupted", style="dim")
    finally:
        editing.save()


def run_turn(session: ChatSession, text: str, *, hide_thinking: bool) -> Turn:
    """Stream one answer; the first Ctrl-C stops it after the current token, a second one at once."""
    turn = session.send(text)
    for notice in turn.notices:
        ui.err.print(notice, style="yellow", markup=False, highlight=False, soft_wrap=True)
    seen = len(turn.notices)
    try:
        with stop_on_interrupt(turn), ui.ChatView(hide_thinking=hide_thinking) as view:
            for delta in turn:
                view.add(delta.text, delta.reasoning)
    except KeyboardInterrupt:
        pass  # the second Ctrl-C: the turn has ended and kept what was written
    finally:
        turn.close()
    for notice in turn.notices[seen:]:
        ui.err.print(notice, style="yellow", markup=False, highlight=False, soft_wrap=True)
    ui.err.print(ui.turn_stats_line(turn), style="dim", markup=False, highlight=False, soft_wrap=True)
    return turn


@contextmanager
def stop_on_interrupt(turn: Turn) -> Iterator[None]:
    """SIGINT asks the turn to stop (the engine then ends at a consistent point); twice, raises."""
    presses = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        turn.stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def show(reply: Reply) -> None:
    if reply.kind == "notice":
        ui.err.print(reply.text, style="yellow", markup=False, highlight=False, soft_wrap=True)
    elif reply.kind == "info":
        ui.out.print(reply.text, style="dim", markup=False, highlight=False, soft_wrap=True)
    else:  # prompt, help, stats: shown as they are, long lines unbroken
        ui.out.print(reply.text, markup=False, highlight=False, soft_wrap=True)


class LineEditing:
    """Line editing, history file and /command completion through stdlib readline, when it exists.

    Without readline (Windows, some minimal Pythons) `input()` still works, without history.
    The history file is private (0600): it holds everything the user typed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.readline: Any = None
        if not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:
            return
        self.readline = readline
        readline.set_history_length(2000)
        try:
            readline.read_history_file(str(path))
        except OSError:
            pass
        readline.set_completer_delims(" \t\n")
        readline.set_completer(self._complete)
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _complete(self, text: str, state: int) -> str | None:
        if not text.startswith("/") or " " in self.readline.get_line_buffer().lstrip():
            return None
        matches = [f"/{name} " for name in COMMANDS if f"/{name}".startswith(text)]
        return matches[state] if state < len(matches) else None

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.path))
            os.chmod(self.path, 0o600)
        except OSError:
            pass  # history is a convenience; never fail the chat's exit over it
