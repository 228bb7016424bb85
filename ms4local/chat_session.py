"""Conversation state of the interactive chat: messages, settings, `/commands`, save and load.

Nothing here touches the terminal: `ChatSession` takes text in and hands back `Turn`s (streams of
`Delta`s that commit the answer to the conversation when they end) and `Reply`s (what a command
did, as text). `ms4local/cli/chat.py` reads lines and draws; tests drive this module directly.

Choices that the next maintainer should know:

* An assistant turn is stored with its reasoning (`reasoning_content`), so the next prompt
  renders `[THINK]…[/THINK]answer</s>`, the very tokens the model produced: the engine's KV
  prefix reuse then only evaluates the new user turn.
* A turn stopped by the user keeps its partial answer, marked `"interrupted": true` in the saved
  file; the mark is dropped from what the template sees. A turn that produced nothing (or an
  error before any output) is taken back, user message included, because the template (like
  mistral-common) rejects an empty assistant message and two user messages would merge.
* Stopping is cooperative (`Turn.stop()`): the engine's generator is closed at a `yield`, where
  its token list and its KV cache agree. An exception raised *inside* the engine (a second
  Ctrl-C arriving during `llama_decode`) can leave the cache one token ahead of the engine's
  bookkeeping, so the session resets the engine's cache then (the next turn re-evaluates the
  prompt; slower, never wrong).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .engine.events import Delta, Done
from .engine.options import Sampling
from .errors import Ms4localError, PromptError
from .images import check_image
from .prompt import REASONING_EFFORTS, check_messages, read_json
from .stream import MalformedToolCall, ToolCall

FILE_FORMAT = "ms4local-chat"
FILE_VERSION = 1
# How every file written by `save` starts (json.dumps with indent=2, "format" first): a file that
# starts so is a conversation the user saved, which /save may update without --force.
SAVED_PREFIX = ('{\n  "format": "' + FILE_FORMAT + '"').encode()
IMAGE_NOTICE = "images need the model's vision projector (an mmproj-*.gguf beside the model, or --mmproj)"


class SessionError(Ms4localError):
    """A command or a file the chat cannot use; the message is one line and the chat goes on."""


class ChatEngine(Protocol):
    """What the session needs from `ms4local.engine.Engine` (tests may pass a scripted fake)."""

    def render(self, messages: list[dict[str, Any]], *, reasoning_effort: str | None = None) -> str: ...

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]: ...

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling | None = None, *,
             reasoning_effort: str | None = None) -> Iterator[Delta | Done]: ...

    def reset(self) -> None: ...


# ----------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    help: str
    arg: str  # "none" | "optional" | "required"


_SPECS = [
    CommandSpec("think", "/think [high|none]", "set the reasoning effort; without an argument, flip it", "optional"),
    CommandSpec("system", "/system [TEXT|--clear]", "set the system prompt (alone: show it; --clear: remove it)",
                "optional"),
    CommandSpec("image", "/image PATH", "attach an image to your next message", "required"),
    CommandSpec("reset", "/reset", "forget the conversation (keeps the system prompt and reasoning effort)", "none"),
    CommandSpec("save", "/save [--force] FILE",
                "write the conversation, system prompt and reasoning effort as JSON; an existing file is "
                "replaced only if /save wrote it, or with --force (never the model)", "required"),
    CommandSpec("load", "/load FILE", "replace the conversation with one saved by /save (or a messages JSON)",
                "required"),
    CommandSpec("prompt", "/prompt", "show the last prompt sent to the model, as text, with its token count", "none"),
    CommandSpec("stats", "/stats", "turns, tokens generated, context used", "none"),
    CommandSpec("help", "/help", "this list", "none"),
    CommandSpec("exit", "/exit", "leave (also /quit, Ctrl-D, or Ctrl-C at the prompt)", "none"),
    CommandSpec("quit", "/quit", "leave", "none"),
]
COMMANDS: dict[str, CommandSpec] = {s.name: s for s in _SPECS}

HELP_FOOTER = ('A line ending with \\ continues on the next line; """ starts and ends a block of several lines. '
               "Start a message with // to send text that begins with /. Quote a path that holds spaces, as "
               "in a shell: /image \"my cat.png\". Ctrl-C stops an answer and keeps what was written so far. "
               "When the context is full, the oldest turns are dropped (never the system prompt), with a notice.")


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


def parse_input(text: str) -> Command | str | None:
    """A `/command`, a message to send, or None for blank input.

    Raises SessionError for an unknown command or one used with the wrong arguments, so that a
    typo such as `/sytem be brief` is not sent to the model as a message.
    """
    if not text.strip():
        return None
    stripped = text.strip()
    if stripped.startswith("//"):
        return stripped[1:]
    if not stripped.startswith("/"):
        return text
    match = re.match(r"/(\S*)\s*(.*)", stripped, re.DOTALL)
    head, arg = (match.group(1), match.group(2).strip()) if match else ("", "")
    name = head.lower()
    spec = COMMANDS.get(name)
    if spec is None:
        raise SessionError(f"unknown command /{head}; /help lists the commands (start with // to send a message "
                           "that begins with /)")
    if spec.arg == "none" and arg:
        raise SessionError(f"/{name} takes no argument")
    if spec.arg == "required" and not arg:
        raise SessionError(f"usage: {spec.usage}")
    if name == "think" and arg and arg.lower() not in REASONING_EFFORTS:
        raise SessionError(f"usage: /think [high|none], got {arg!r}")
    return Command(name, arg.lower() if name == "think" else arg)


def path_argument(command: Command, *, flags: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """The one path a command takes, read with shell quoting (`/image "my cat.png"`), and the
    `flags` given before it. Raises SessionError (the usage) for none, several or an unknown flag."""
    spec = COMMANDS[command.name]
    try:
        words = shlex.split(command.arg)
    except ValueError as e:  # an unbalanced quote
        raise SessionError(f"usage: {spec.usage} ({str(e).lower()})") from None
    given = set()
    while words and words[0] in flags:
        given.add(words.pop(0))
    if len(words) != 1:
        hint = " (quote a path that holds spaces)" if len(words) > 1 else ""
        raise SessionError(f"usage: {spec.usage}{hint}")
    return words[0], given


class InputAssembler:
    """Joins physical lines into one input: `\\` at the end continues, `\"\"\"` opens and closes a block."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._block = False

    @property
    def pending(self) -> bool:
        """True while more lines are needed (the UI shows a continuation prompt)."""
        return bool(self._lines) or self._block

    def discard(self) -> None:
        self._lines, self._block = [], False

    def feed(self, line: str) -> str | None:
        """Add one line; return the whole input once it is complete, else None."""
        if self._block:
            body = line.rstrip()
            if body.endswith('"""'):
                if body[:-3]:
                    self._lines.append(body[:-3])
                return self._take()
            self._lines.append(line)
            return None
        if not self._lines and line.lstrip().startswith('"""'):
            rest = line.lstrip()[3:]
            if rest.rstrip().endswith('"""'):  # """one line"""
                return rest.rstrip()[:-3]
            self._block = True
            if rest.strip():
                self._lines.append(rest)
            return None
        if line.endswith("\\"):
            self._lines.append(line[:-1])
            return None
        self._lines.append(line)
        return self._take()

    def _take(self) -> str:
        text = "\n".join(self._lines)
        self.discard()
        return text


def history_path(env: dict[str, str] | None = None) -> Path:
    """Where line-editing history is kept: $XDG_CACHE_HOME/ms4local (else ~/.cache/ms4local)."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ms4local" / "chat_history"


# ----------------------------------------------------------------------------------- turns
@dataclass(frozen=True)
class Reply:
    """What a command did. `kind` tells the UI how to show `text`: info, notice, prompt, help,
    stats, or exit (leave the chat)."""

    kind: str
    text: str = ""


class Turn:
    """One answer being generated. Iterate it for `Delta`s; it joins the conversation when the
    iteration ends, normally, by `stop()`, or by an error (see the module docstring)."""

    def __init__(self, session: ChatSession, user: dict[str, Any], events: Iterator[Delta | Done],
                 notices: list[str]) -> None:
        self._session = session
        self.user = user  # the message this turn answers (taken back if nothing comes of it)
        self._events = events
        self.notices = notices  # things the user should be told before the answer (dropped images)
        self.done: Done | None = None
        self.stopped = False  # the user stopped it; the partial answer is kept
        self.committed = False  # the answer joined the conversation
        self.reasoning_deltas = 0
        self.content_deltas = 0
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.ended: float | None = None
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.tool_calls: list[ToolCall | MalformedToolCall] = []  # what the model asked to call
        self._stop = False
        self._iter: Iterator[Delta] | None = None
        self.dropped = 0  # oldest non-system messages the engine left out to fit the context

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def generated(self) -> int:
        """Tokens generated: the engine's count when it finished, else the deltas seen (≈ tokens)."""
        if self.done is not None:
            return self.done.usage.completion_tokens
        return self.reasoning_deltas + self.content_deltas

    def stop(self) -> None:
        """Ask the turn to end after the token in progress; safe to call from a signal handler."""
        self._stop = True

    def __iter__(self) -> Iterator[Delta]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def close(self) -> None:
        """End the turn now (e.g. the UI caught an exception); commits what was produced."""
        if self._iter is not None:
            self._iter.close()
        if self.ended is None:  # never iterated: nothing was generated
            self.stopped = True
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
            self._finish(error=False)

    def _run(self) -> Iterator[Delta]:
        error = False
        try:
            while not self._stop:
                try:
                    event = next(self._events)
                except StopIteration:
                    break
                except BaseException:
                    # Raised inside the engine: its cache may hold a token it did not record.
                    error = True
                    self._session.engine.reset()
                    raise
                if isinstance(event, Done):
                    self.done = event
                    continue
                if isinstance(event, (ToolCall, MalformedToolCall)):
                    self.tool_calls.append(event)
                    continue
                if not isinstance(event, Delta):
                    continue  # ToolCallDelta: the complete call follows
                now = time.perf_counter()
                if self.first_token is None:
                    self.first_token = now
                if event.reasoning:
                    self.reasoning_deltas += 1
                    self._reasoning.append(event.text)
                else:
                    self.content_deltas += 1
                    self._content.append(event.text)
                yield event
        finally:
            # Asked to stop after the engine had finished: the answer is whole, not stopped.
            self.stopped = self.done is None
            # Closing at a yield leaves the engine's tokens and KV cache in agreement.
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
            self._finish(error)

    def _finish(self, error: bool) -> None:
        if self.ended is not None:
            return
        self.ended = time.perf_counter()
        self._session._commit(self, error)


# ----------------------------------------------------------------------------------- session
def _same_file(a: Path, b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


@dataclass
class SessionStats:
    turns: int
    generated_tokens: int
    context_tokens: int
    n_ctx: int | None
    reasoning_effort: str
    system: bool
    pending_images: int


def without_oldest(messages: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """`messages` less the `count` oldest non-system ones (what `Engine.chat` leaves out)."""
    kept = []
    for m in messages:
        if count and m.get("role") not in ("system", "developer"):
            count -= 1
            continue
        kept.append(m)
    return kept


def dropped_notice(count: int) -> str:
    return (f"the context is full: the oldest {count} message{'s were' if count > 1 else ' was'} "
            "dropped (the system prompt is kept)")


def default_sampling(effort: str) -> Sampling:
    """Mistral's guidance: 0.7 when reasoning, lower for direct answers."""
    return Sampling(temperature=0.7 if effort == "high" else 0.1)


@dataclass
class ChatSession:
    """A conversation with one engine: system prompt, reasoning effort, messages, pending images.

    `sampling(effort)` gives the sampling for a turn, so that a `/think` flip also moves the
    temperature to the one that suits the effort (unless the user fixed it with --temp).
    """

    engine: ChatEngine
    system: str | None = None
    reasoning_effort: str = "none"
    sampling: Callable[[str], Sampling] = default_sampling
    history: list[dict[str, Any]] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)
    # What the last turn sent (messages, effort); its text is rendered only when /prompt asks, since
    # a loaded history of thousands of messages takes seconds to render and the engine renders
    # only the turns it keeps.
    _sent: tuple[list[dict[str, Any]], str] | None = field(default=None, repr=False)
    _sent_text: str | None = field(default=None, repr=False)
    last_turn: Turn | None = None
    generated_tokens: int = 0  # by this session since the last /reset or /load

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise SessionError(f"reasoning effort must be none or high, got {self.reasoning_effort!r}")

    # ------------------------------------------------------------------------------- views
    @property
    def last_prompt(self) -> str | None:
        """The prompt text of the last turn, as the model was sent it (the dropped turns left out)."""
        if self._sent is not None and self._sent_text is None:
            messages, effort = self._sent
            self._sent_text = self.engine.render(messages, reasoning_effort=effort)
        return self._sent_text

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation as saved: the system prompt first, then the turns (with their marks)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.history]

    def model_messages(self) -> list[dict[str, Any]]:
        """The conversation as the template sees it: session marks removed."""
        return [{k: v for k, v in m.items() if k != "interrupted"} for m in self.messages]

    @property
    def turns(self) -> int:
        """Answers in the conversation (loaded ones included)."""
        return sum(1 for m in self.history if m.get("role") == "assistant")

    @property
    def supports_images(self) -> bool:
        """True once the engine can take image parts (it will say so with `supports_images`)."""
        return bool(getattr(self.engine, "supports_images", False))

    def render(self) -> str:
        """The prompt text of the conversation so far, with the current settings."""
        messages = self.model_messages()
        if not messages:
            raise SessionError("the conversation is empty")
        return self.engine.render(messages, reasoning_effort=self.reasoning_effort)

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text, add_special=False, parse_special=True))

    def stats(self) -> SessionStats:
        messages = self.model_messages()
        context = self.count_tokens(self.render()) if messages else 0
        return SessionStats(turns=self.turns, generated_tokens=self.generated_tokens, context_tokens=context,
                            n_ctx=getattr(self.engine, "n_ctx", None), reasoning_effort=self.reasoning_effort,
                            system=bool(self.system), pending_images=len(self.pending_images))

    # ------------------------------------------------------------------------------- turns
    def send(self, text: str) -> Turn:
        """Add a user message and start the answer; iterate the returned Turn to generate it.

        Typed errors of the template (PromptError) come out here and leave the conversation as
        it was; the engine's own (ContextError) come out of the iteration, with the same effect.
        """
        notices: list[str] = []
        content: Any = text
        if self.pending_images:
            if self.supports_images:
                # Images first, as mistral-common places a single image before the text.
                content = [{"type": "image", "image": p} for p in self.pending_images] + [{"type": "text", "text": text}]
            else:
                n = len(self.pending_images)
                notices.append(f"{IMAGE_NOTICE}; {n} image{'s' if n > 1 else ''} not sent")
            self.pending_images = []
        user = {"role": "user", "content": content}
        self.history.append(user)
        messages = self.model_messages()
        try:
            events = self.engine.chat(messages, self.sampling(self.reasoning_effort),
                                      reasoning_effort=self.reasoning_effort)
        except BaseException:
            self.history.pop()
            raise
        turn = Turn(self, user, iter(events), notices)
        turn.dropped = int(getattr(events, "dropped_messages", 0) or 0)
        if turn.dropped:
            notices.append(dropped_notice(turn.dropped))
        self._sent, self._sent_text = (without_oldest(messages, turn.dropped), self.reasoning_effort), None
        self.last_turn = turn
        return turn

    def _commit(self, turn: Turn, error: bool) -> None:
        """Put the turn's answer into the conversation (or take the user message back)."""
        reasoning, content = turn.reasoning, turn.content
        if not self.history or self.history[-1] is not turn.user:
            return  # the conversation was replaced meanwhile (/load, /reset): nothing to attach to
        calls = [c for c in turn.tool_calls if isinstance(c, ToolCall)]
        if not reasoning and not content.strip() and not calls:
            self.history.pop()
            if turn.stopped and not error:
                turn.notices.append("stopped before any answer; your message was not kept")
            elif not error:
                turn.notices.append("the model gave an empty answer; your message was not kept")
            return
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            answer["reasoning_content"] = reasoning
        if calls:
            answer["tool_calls"] = [{"id": c.id or f"call_{c.index}", "type": "function",
                                     "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        if turn.stopped:
            answer["interrupted"] = True
        self.history.append(answer)
        turn.committed = True
        self.generated_tokens += turn.generated
        dropped = turn.done.dropped_messages if turn.done is not None else 0
        if dropped and not turn.dropped:  # an engine that tells only at the end
            turn.dropped = dropped
            turn.notices.append(dropped_notice(dropped))
        self._drop_oldest(turn.dropped)

    def _drop_oldest(self, count: int) -> None:
        """Forget the `count` oldest non-system messages, as the engine left them out of the prompt:
        the next prompt then starts as this one did, and the engine reuses its KV cache."""
        self.history[:] = without_oldest(self.history, count)

    # ------------------------------------------------------------------------------- commands
    def execute(self, command: Command) -> Reply:
        """Run one parsed command. Raises SessionError (one line) when it cannot be done."""
        name, arg = command.name, command.arg
        if name == "think":
            self.reasoning_effort = arg or ("none" if self.reasoning_effort == "high" else "high")
            temp = self.sampling(self.reasoning_effort).temperature
            return Reply("info", f"reasoning effort: {self.reasoning_effort} (temperature {temp:g})")
        if name == "system":
            if not arg:
                return Reply("info", f"system prompt: {self.system}" if self.system else "no system prompt")
            self.system = None if arg == "--clear" else arg
            return Reply("info", "system prompt set" if self.system else "system prompt removed")
        if name == "image":
            return self.add_image(path_argument(command)[0])
        if name == "reset":
            self.reset()
            return Reply("info", "conversation cleared" + (" (system prompt kept)" if self.system else ""))
        if name == "save":
            target, flags = path_argument(command, flags=("--force",))
            path = self.save(target, force="--force" in flags)
            return Reply("info", f"saved {len(self.messages)} messages to {path}")
        if name == "load":
            path = self.load(path_argument(command)[0])
            return Reply("info", f"loaded {len(self.messages)} messages from {path} "
                                 f"(reasoning effort {self.reasoning_effort})")
        if name == "prompt":
            return self.prompt_reply()
        if name == "stats":
            s = self.stats()
            ctx = f"context {s.context_tokens}/{s.n_ctx} tokens" if s.n_ctx else f"context {s.context_tokens} tokens"
            if s.n_ctx and s.context_tokens > s.n_ctx:  # a loaded conversation, before its first turn
                ctx = (f"conversation {s.context_tokens} tokens, more than the context of {s.n_ctx}: "
                       "the oldest turns are dropped at the next message")
            return Reply("stats", f"{s.turns} turn{'' if s.turns == 1 else 's'} · {s.generated_tokens} tokens generated · {ctx} · "
                                  f"reasoning effort {s.reasoning_effort} · system prompt {'set' if s.system else 'none'}"
                                  + (f" · {s.pending_images} pending images" if s.pending_images else ""))
        if name == "help":
            width = max(len(s.usage) for s in _SPECS)
            lines = [f"{s.usage:<{width}}  {s.help}" for s in _SPECS if s.name != "quit"]
            return Reply("help", "\n".join(lines + ["", HELP_FOOTER]))
        if name in ("exit", "quit"):
            return Reply("exit")
        raise SessionError(f"unknown command /{name}")

    def add_image(self, path: str) -> Reply:
        """Keep an image for the next message (when `engine.supports_images`).

        The image is read and checked now (ImageError: empty, not an image, truncated, too small
        or too large), so a bad file is reported at /image and never reaches the engine.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise SessionError(f"no image file at {path}")
        if self.supports_images:
            check_image(p)
        self.pending_images.append(str(p))
        if not self.supports_images:
            return Reply("notice", f"{IMAGE_NOTICE}; {p} is kept for your next message but will not be sent")
        return Reply("info", f"{p} goes with your next message")

    def prompt_reply(self) -> Reply:
        if self.last_prompt is not None:
            text, what = self.last_prompt, "last prompt"
        elif self.model_messages():
            text, what = self.render(), "conversation so far (nothing sent yet)"
        else:
            return Reply("info", "nothing sent yet")
        return Reply("prompt", f"--- {what}: {self.count_tokens(text)} tokens ---\n{text}\n--- end ---")

    def reset(self) -> None:
        """Forget the turns; the system prompt and reasoning effort stay."""
        self.history.clear()
        self.pending_images.clear()
        self._sent, self._sent_text = None, None
        self.last_turn = None
        self.generated_tokens = 0

    # ------------------------------------------------------------------------------- files
    def to_json(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "reasoning_effort": self.reasoning_effort,
                "messages": self.messages}

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the conversation atomically (a temporary file renamed over the target, so a crash
        never leaves half a file).

        A chat user types `/save NAME` without looking first, so an existing file is kept unless
        it is a conversation that /save wrote (saving again updates it) or `force` is given; the
        model and projector the engine runs on, a GGUF, and anything that is not a regular file
        are never replaced, force or not.
        """
        target = Path(path).expanduser()
        if target.exists() or target.is_symlink():
            self._check_replaceable(target, path, force)
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        except OSError as e:
            raise SessionError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise SessionError(f"cannot write {path}: {e.strerror or e}") from None
        return target

    def _check_replaceable(self, target: Path, path: str | os.PathLike[str], force: bool) -> None:
        """Raise SessionError unless `target` (which exists) may be replaced by a save."""
        try:
            st = target.stat()
        except OSError as e:  # a dangling link, a loop, no permission
            raise SessionError(f"{path} exists and cannot be read ({e.strerror or e}); choose another name") from None
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise SessionError(f"{path} is {what}; choose a file name")
        for name in ("path", "mmproj"):
            used = getattr(self.engine, name, None)
            if used is not None and _same_file(target, used):
                raise SessionError(f"{path} is the {'model' if name == 'path' else 'vision projector'} this chat "
                                   "runs on; choose another name")
        head = _head(target)
        if head.startswith(b"GGUF"):
            raise SessionError(f"{path} is a GGUF model file; choose another name")
        if not force and not head.startswith(SAVED_PREFIX):
            raise SessionError(f"{path} exists and is not a conversation saved by /save; "
                               f"/save --force {shlex.quote(str(path))} replaces it")

    def load(self, path: str | os.PathLike[str]) -> Path:
        """Replace the conversation with a saved one; on any problem nothing changes.

        Takes what `save` writes, an OpenAI-style request body (`{"messages": [...]}`) or a bare
        list of messages. The conversation is rendered once with the model's template, so a file
        the model cannot take fails here rather than at the next message.
        """
        source = Path(path).expanduser()
        try:
            data = read_json(source, "conversation")
            effort = self.reasoning_effort
            if isinstance(data, dict):
                if "messages" not in data:
                    raise SessionError(f"{path} has no \"messages\"; save a conversation with /save")
                effort = data.get("reasoning_effort", effort)
                data = data["messages"]
            if effort not in REASONING_EFFORTS:
                raise SessionError(f"{path}: reasoning_effort must be none or high, got {effort!r}")
            check_messages(data, str(path))
        except PromptError as e:
            raise SessionError(str(e)) from None
        messages = [dict(m) for m in data]
        system = None
        if messages and messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
            system = messages.pop(0)["content"]
        candidate = ChatSession(self.engine, system=system, reasoning_effort=effort, history=messages)
        if candidate.model_messages():
            try:
                candidate.render()
            except Ms4localError as e:
                raise SessionError(f"{path}: the model's template refuses this conversation: {e}") from None
        self.reset()
        self.system, self.reasoning_effort, self.history = system, effort, messages
        return source
