"""What the engine yields while it answers: the vocabulary that the chat session, the server and
the UI share. Plain dataclasses, no llama.cpp: importing them does not load the library.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Union

from ..stream import MalformedToolCall, ToolCall, ToolCallDelta

@dataclass(frozen=True)
class Delta:
    """A piece of streamed output: answer text, or reasoning when `reasoning` is true."""

    text: str
    reasoning: bool = False


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    prompt_eval_tokens: int
    prompt_seconds: float
    ttft_seconds: float
    decode_seconds: float
    decoded_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        return 0.0 if self.decode_seconds <= 0 else self.decoded_tokens / self.decode_seconds


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length
    usage: Usage
    timings: Timings
    unclosed_reasoning: bool = False
    dropped_messages: int = 0  # chat(): non-system messages left out from the start to fit the context
    tool_calls: tuple[ToolCall, ...] = ()  # the well-formed calls, also yielded as they completed


Event = Union[Delta, ToolCallDelta, ToolCall, MalformedToolCall, Done]


class ChatStream:
    """The events of `Engine.chat`, with `dropped_messages` known before the first one (a caller
    that stops the answer early never sees `Done`, yet must trim its history the same way)."""

    def __init__(self, events: Iterator[Event], dropped_messages: int) -> None:
        self._events = events
        self.dropped_messages = dropped_messages

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> Event:
        event = next(self._events)
        if isinstance(event, Done) and self.dropped_messages:
            return replace(event, dropped_messages=self.dropped_messages)
        return event

    def close(self) -> None:
        """Close the generator (the engine's tokens and KV cache then agree)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


