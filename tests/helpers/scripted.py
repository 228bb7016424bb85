"""ScriptedEngine: a stand-in for `Engine` in tests of what drives it (the chat session, a command).

It renders and tokenizes with a real engine (a vocab-only load of a tiny GGUF, passed in as
`vocab`) and answers from a script instead of sampling, so a test can check the exact
conversation, the prompt the template made and what was kept after a stop or an error.
"""

from __future__ import annotations

from ms4local.engine import ChatStream, Delta, Done, Timings, Usage


class ScriptedEngine:
    """The real template and tokenizer; `chat` plays `script` (a list of (text, reasoning))."""

    def __init__(self, vocab, script=(), *, supports_images=False, fail_at=None, exc=None, drop=0, path=None):
        self.vocab = vocab
        self.drop = drop  # what the real engine reports when the context is full (ChatStream.dropped_messages)
        self.path, self.mmproj = path, None
        self.script = list(script)
        self.supports_images = supports_images
        self.fail_at, self.exc = fail_at, exc
        self.calls: list[dict] = []
        self.resets = 0
        self.closed = 0
        self.n_ctx = 4096

    def render(self, messages, *, reasoning_effort=None):
        return self.vocab.render(messages, reasoning_effort=reasoning_effort)

    def tokenize(self, text, *, add_special=False, parse_special=True):
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def reset(self):
        self.resets += 1

    def chat(self, messages, sampling=None, *, reasoning_effort=None):
        self.calls.append({"messages": messages, "sampling": sampling, "effort": reasoning_effort})
        prompt = self.tokenize(self.render(messages, reasoning_effort=reasoning_effort))

        def events():
            try:
                for i, (text, reasoning) in enumerate(self.script):
                    if i == self.fail_at:
                        raise self.exc
                    yield Delta(text, reasoning)
                if self.fail_at == len(self.script):
                    raise self.exc
                n = len(self.script)
                yield Done("stop", Usage(len(prompt), n + 1, 0), Timings(len(prompt), 0.01, 0.02, 0.1, n + 1))
            finally:
                self.closed += 1

        return ChatStream(events(), self.drop) if self.drop else events()
