"""Streaming parser for Mistral Small 4 output: reasoning, answer text and tool calls.

The model (tokenizer v15) writes, after the prompt:

    [THINK]reasoning[/THINK]answer text[TOOL_CALLS]name[ARGS]{json}[TOOL_CALLS]name[ARGS]{json}</s>

Every part is optional; the reasoning block comes only with `reasoning_effort="high"`. v15 writes
no call id (mistral-common dropped `[CALL_ID]` from tool calls in v13), but the older form
`[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}` is read too. A tool call ends at the next
`[TOOL_CALLS]`, at EOS, or at `finish()`; its arguments are everything in between, so trailing
text makes them malformed rather than silently dropped.

Two ways to feed it, mixable:

* token mode, `feed(text, token=id)`: the id decides. A control token whose id is in `Tags.ids`
  is a tag; any other token is literal text, even if it reads "[THINK]" (the model can write
  that string with ordinary tokens, and it means nothing then).
* text mode, `feed(text)`: tags are found in the text itself, also when they arrive split over
  several pieces ("[TH" + "INK]"). A suffix that could still become a tag is held back until the
  next piece (or `finish()`) decides, so no event ever has to be taken back.

It never raises on model output: a tool call that cannot be used comes out as a
`MalformedToolCall` with the reason, and an unfinished `[THINK]` is reported by `End`. Pure
Python (no llama_cpp), so the engine, the server and tests share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union


class Tag(Enum):
    """The structural markers of the output."""

    THINK = "think"
    THINK_END = "think_end"
    TOOL_CALLS = "tool_calls"
    ARGS = "args"
    CALL_ID = "call_id"
    EOS = "eos"


DEFAULT_TEXTS: Mapping[Tag, str] = {
    Tag.THINK: "[THINK]",
    Tag.THINK_END: "[/THINK]",
    Tag.TOOL_CALLS: "[TOOL_CALLS]",
    Tag.ARGS: "[ARGS]",
    Tag.CALL_ID: "[CALL_ID]",
    Tag.EOS: "</s>",
}


@dataclass(frozen=True)
class Tags:
    """How tags are recognised: their texts (text mode) and, when known, their token ids.

    Ids must come from the model's vocabulary (spec §4.3: never hard-code them); `from_ids`
    takes the ones the engine looked up and leaves out those the vocabulary lacks (None).
    """

    texts: Mapping[Tag, str] = field(default_factory=lambda: dict(DEFAULT_TEXTS))
    ids: Mapping[int, Tag] = field(default_factory=dict)

    @classmethod
    def from_ids(cls, *, think: int | None = None, think_end: int | None = None, tool_calls: int | None = None,
                 args: int | None = None, call_id: int | None = None, eos: int | Iterable[int] | None = None,
                 texts: Mapping[Tag, str] | None = None) -> Tags:
        """Tags with token ids; `eos` may be several ids (every end-of-generation token)."""
        ids: dict[int, Tag] = {}
        for tag, tok in ((Tag.THINK, think), (Tag.THINK_END, think_end), (Tag.TOOL_CALLS, tool_calls),
                         (Tag.ARGS, args), (Tag.CALL_ID, call_id)):
            if tok is not None:
                ids[int(tok)] = tag
        for tok in ([eos] if isinstance(eos, int) else list(eos or ())):
            ids[int(tok)] = Tag.EOS
        return cls(texts=dict(texts or DEFAULT_TEXTS), ids=ids)


# ----------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ReasoningDelta:
    """Text inside [THINK]…[/THINK]."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """Answer text (outside reasoning and tool calls)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Arguments text of tool call `index` as it streams; the first one (empty `arguments`) comes
    as soon as the name is complete, which is what an OpenAI-style stream sends first."""

    index: int
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call whose arguments are a JSON object (`arguments` is the text as written)."""

    index: int
    name: str
    arguments: str
    id: str | None = None

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)


@dataclass(frozen=True)
class MalformedToolCall:
    """A tool call that cannot be executed, with the reason (`error`) and what was written."""

    index: int
    name: str
    arguments: str
    id: str | None
    error: str


@dataclass(frozen=True)
class End:
    """Last event: whether a [THINK] block was left open and whether EOS was seen."""

    unclosed_reasoning: bool
    eos: bool


# What the parser yields; named apart from `engine.Event` (the engine's `Delta`, tool calls and
# `Done`), which the engine builds from these.
ParsedEvent = Union[ReasoningDelta, ContentDelta, ToolCallDelta, ToolCall, MalformedToolCall, End]


class _State(Enum):
    CONTENT = 0
    REASONING = 1
    NAME = 2
    CALL_ID = 3
    ARGS = 4


_TOOL_STATES = (_State.NAME, _State.CALL_ID, _State.ARGS)


class StreamParser:
    """Incremental parser: `feed` pieces, then `finish` once; each returns the new events.

    Consecutive deltas of one kind produced by a single call are merged. After EOS, further
    pieces are ignored (they are not part of the message).
    """

    def __init__(self, tags: Tags | None = None) -> None:
        self.tags = tags or Tags()
        # Longest first, so that no tag can hide a longer one starting at the same place.
        self._by_text = sorted(((t, tag) for tag, t in self.tags.texts.items() if t), key=lambda p: -len(p[0]))
        self._state = _State.CONTENT
        self._pending = ""
        self._out: list[ParsedEvent] = []
        self._index = -1
        self._name: list[str] = []
        self._call_id: list[str] = []
        self._args: list[str] = []
        self._has_args = False
        self._eos = False
        self._finished = False

    # ------------------------------------------------------------------------------- input
    def feed(self, text: str, token: int | None = None) -> list[ParsedEvent]:
        """Add one generated piece. With `token`, the id decides whether it is a tag."""
        if self._finished:
            raise RuntimeError("the parser is finished; make a new StreamParser for the next answer")
        if not self._eos:
            if token is None:
                self._scan(text)
            else:
                self._release_pending()
                tag = self.tags.ids.get(int(token))
                if tag is None:
                    self._text(text)
                else:
                    self._tag(tag)
        return self._take()

    def finish(self) -> list[ParsedEvent]:
        """End of generation: settle held-back text and an open tool call, then `End`."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        if not self._eos:
            self._release_pending()
            self._close_call()
        self._finished = True
        self._out.append(End(unclosed_reasoning=self._state is _State.REASONING, eos=self._eos))
        return self._take()

    # ------------------------------------------------------------------------------- text mode
    def _scan(self, text: str) -> None:
        buf = self._pending + text
        self._pending = ""
        while buf and not self._eos:
            at, found = -1, None
            for t, tag in self._by_text:
                i = buf.find(t)
                if i >= 0 and (at < 0 or i < at):
                    at, found = i, (t, tag)
            if found is None:
                break
            self._text(buf[:at])
            self._tag(found[1])
            buf = buf[at + len(found[0]):]
        if self._eos:
            return
        hold = self._partial_tag_suffix(buf)
        self._text(buf[:len(buf) - hold])
        self._pending = buf[len(buf) - hold:]

    def _partial_tag_suffix(self, buf: str) -> int:
        """Length of the longest end of `buf` that is the start of a tag (and not a whole one)."""
        longest = max((len(t) for t, _ in self._by_text), default=0)
        for k in range(min(len(buf), longest - 1), 0, -1):
            tail = buf[-k:]
            if any(t.startswith(tail) for t, _ in self._by_text):
                return k
        return 0

    def _release_pending(self) -> None:
        held, self._pending = self._pending, ""
        self._text(held)

    # ------------------------------------------------------------------------------- state machine
    def _text(self, s: str) -> None:
        if not s:
            return
        st = self._state
        if st is _State.CONTENT:
            self._emit(ContentDelta(s))
        elif st is _State.REASONING:
            self._emit(ReasoningDelta(s))
        elif st is _State.NAME:
            self._name.append(s)
        elif st is _State.CALL_ID:
            self._call_id.append(s)
        else:
            self._args.append(s)
            self._emit(ToolCallDelta(self._index, self._current_name(), s))

    def _literal(self, tag: Tag) -> None:
        """A tag where it means nothing is kept as the text it reads."""
        self._text(self.tags.texts.get(tag, ""))

    def _tag(self, tag: Tag) -> None:
        st = self._state
        if tag is Tag.EOS:
            self._close_call()
            self._eos = True
        elif tag is Tag.THINK:
            if st is _State.CONTENT:
                self._state = _State.REASONING
            elif st in _TOOL_STATES:
                self._literal(tag)
            # [THINK] inside reasoning: still reasoning, nothing to show.
        elif tag is Tag.THINK_END:
            if st is _State.REASONING:
                self._state = _State.CONTENT
            elif st in _TOOL_STATES:
                self._literal(tag)
            # A stray [/THINK] in the answer is dropped, as the token-level engine always did.
        elif tag is Tag.TOOL_CALLS:
            if st is _State.REASONING:
                self._literal(tag)  # no tool calls inside reasoning: it is part of the thought
            else:
                self._close_call()
                self._index += 1
                self._name, self._call_id, self._args = [], [], []
                self._has_args = False
                self._state = _State.NAME
        elif tag is Tag.ARGS:
            if st in (_State.NAME, _State.CALL_ID):
                self._has_args = True
                self._state = _State.ARGS
                self._emit(ToolCallDelta(self._index, self._current_name(), ""))
            else:
                self._literal(tag)
        elif tag is Tag.CALL_ID:
            if st is _State.NAME:
                self._state = _State.CALL_ID
            else:
                self._literal(tag)

    def _current_name(self) -> str:
        return "".join(self._name).strip()

    def _close_call(self) -> None:
        if self._state not in _TOOL_STATES:
            return
        name = self._current_name()
        call_id = "".join(self._call_id).strip() or None
        args = "".join(self._args)
        error = None
        if not name:
            error = "the tool call has no name"
        elif not self._has_args:
            error = "no [ARGS] after the tool name"
        else:
            try:
                value = json.loads(args)
            except json.JSONDecodeError as e:
                error = f"arguments are not valid JSON: {e.msg} at character {e.pos}"
            else:
                if not isinstance(value, dict):
                    error = f"arguments must be a JSON object, got {type(value).__name__}"
        if error is None:
            self._out.append(ToolCall(self._index, name, args, call_id))
        else:
            self._out.append(MalformedToolCall(self._index, name, args, call_id, error))
        self._state = _State.CONTENT

    # ------------------------------------------------------------------------------- output
    def _emit(self, ev: ParsedEvent) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(ev, ContentDelta) and isinstance(last, ContentDelta):
            self._out[-1] = ContentDelta(last.text + ev.text)
        elif isinstance(ev, ReasoningDelta) and isinstance(last, ReasoningDelta):
            self._out[-1] = ReasoningDelta(last.text + ev.text)
        elif (isinstance(ev, ToolCallDelta) and isinstance(last, ToolCallDelta) and last.index == ev.index
              and ev.arguments and last.arguments):
            self._out[-1] = ToolCallDelta(ev.index, ev.name, last.arguments + ev.arguments)
        else:
            self._out.append(ev)

    def _take(self) -> list[ParsedEvent]:
        out, self._out = self._out, []
        return out


def parse(pieces: Iterable[str | tuple[int | None, str]], tags: Tags | None = None) -> Iterator[ParsedEvent]:
    """Parse a whole stream: pieces are text (text mode) or `(token_id, text)` (token mode)."""
    parser = StreamParser(tags)
    for piece in pieces:
        if isinstance(piece, str):
            yield from parser.feed(piece)
        else:
            token, text = piece
            yield from parser.feed(text, token=token)
    yield from parser.finish()
