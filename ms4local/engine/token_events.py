"""Generated token ids → the engine's events: UTF-8 decoded across token boundaries, then split
into answer text, reasoning and tool calls by `StreamParser` on the vocabulary's control tokens.
Shared by `Engine.generate` and each `Slots` run, so one answer reads the same either way.
"""

from __future__ import annotations

import codecs
from typing import Any

from ..stream import ContentDelta, End, ParsedEvent, ReasoningDelta, StreamParser, ToolCall
from .events import Delta, Event


class TokenEvents:
    """Generated ids → events, for `Engine.generate` and for each `Slots` run: UTF-8 decoded
    across token boundaries, then (unless `raw`) `StreamParser` in token mode, so that only the
    vocabulary's control tokens are tags and text that merely reads "[THINK]" stays text. `raw`
    (completions) gives the text as generated, control tokens as their text."""

    def __init__(self, engine: Any, raw: bool = False) -> None:
        self.engine = engine
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.parser = None if raw else StreamParser(engine.tags)
        self.calls: list[ToolCall] = []
        self.unclosed = False

    def feed(self, tok: int) -> list[Event]:
        piece = self.engine.piece(tok)
        if self.parser is None:
            text = self.decoder.decode(piece)
            return [Delta(text)] if text else []
        if tok in self.engine.tags.ids:  # a tag: flush the text before it, then the tag itself
            text = self.decoder.decode(b"", final=True)
            out = self._events(self.parser.feed(text)) if text else []
            return out + self._events(self.parser.feed(piece.decode("utf-8", "replace"), token=tok))
        text = self.decoder.decode(piece)
        return self._events(self.parser.feed(text, token=tok)) if text else []

    def finish(self) -> list[Event]:
        tail = self.decoder.decode(b"", final=True)
        if self.parser is None:
            return [Delta(tail)] if tail else []
        out = self._events(self.parser.feed(tail)) if tail else []
        return out + self._events(self.parser.finish())

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.calls and finish == "stop" else finish

    def _events(self, batch: list[ParsedEvent]) -> list[Event]:
        out: list[Event] = []
        for ev in batch:
            if isinstance(ev, ContentDelta):
                out.append(Delta(ev.text))
            elif isinstance(ev, ReasoningDelta):
                out.append(Delta(ev.text, reasoning=True))
            elif isinstance(ev, End):
                self.unclosed = ev.unclosed_reasoning
            else:
                if isinstance(ev, ToolCall):
                    self.calls.append(ev)
                out.append(ev)
        return out


