"""The chat session without a terminal: commands, turns, stopping, save and load.

Most tests drive a scripted engine (the real template and tokenizer from a vocab-only load of a
tiny GGUF, scripted deltas instead of sampling) and check the exact conversation; the KV tests
use the real engine, because what they guard is llama.cpp's cache after a stopped answer.
"""

from __future__ import annotations

import json

import pytest

from helpers.scripted import ScriptedEngine
from ms4local.chat_session import (
    IMAGE_NOTICE, ChatSession, Command, InputAssembler, SessionError, history_path, parse_input,
)
from ms4local.engine import Delta, Engine, EngineOptions, Sampling
from ms4local.errors import ContextError


@pytest.fixture(scope="module")
def model(ckpt, gguf_file):
    return gguf_file(ckpt(), "Q8_0")


@pytest.fixture(scope="module")
def vocab(model):
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        yield e


def run(turn, stop_after=None):
    """Iterate a turn like the UI does; `stop_after` deltas, then Turn.stop() (Ctrl-C)."""
    seen = []
    for d in turn:
        seen.append(d)
        if stop_after is not None and len(seen) == stop_after:
            turn.stop()
    turn.close()
    return seen


# ----------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("Hello", "Hello"),
    ("  spaced  ", "  spaced  "),
    ("", None),
    ("   ", None),
    ("/think", Command("think")),
    ("/think HIGH", Command("think", "high")),
    ("/think none", Command("think", "none")),
    ("/system Be brief.", Command("system", "Be brief.")),
    ("/system line one\nline two", Command("system", "line one\nline two")),
    ("/system", Command("system")),
    ("/image ~/cat.png", Command("image", "~/cat.png")),
    ("/save out.json", Command("save", "out.json")),
    ("/load  out.json ", Command("load", "out.json")),
    ("/reset", Command("reset")),
    ("/STATS", Command("stats")),
    ("/prompt", Command("prompt")),
    ("/help", Command("help")),
    ("/exit", Command("exit")),
    ("/quit", Command("quit")),
    ("//etc/hosts is what?", "/etc/hosts is what?"),
])
def test_parse_input(text, expected):
    assert parse_input(text) == expected


@pytest.mark.parametrize("text, message", [
    ("/bogus", "unknown command /bogus"),
    ("/etc/hosts", "unknown command /etc/hosts"),
    ("/think maybe", "usage: /think [high|none]"),
    ("/save", "usage: /save [--force] FILE"),
    ("/load   ", "usage: /load FILE"),
    ("/image", "usage: /image PATH"),
    ("/reset now", "/reset takes no argument"),
])
def test_parse_input_errors_are_one_line(text, message):
    with pytest.raises(SessionError) as e:
        parse_input(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_input_assembler_continuations_and_blocks():
    a = InputAssembler()
    assert a.feed("first \\") is None and a.pending
    assert a.feed("second") == "first \nsecond" and not a.pending
    assert a.feed('"""') is None and a.pending
    assert a.feed("  indented") is None
    assert a.feed("") is None
    assert a.feed('end"""') == "  indented\n\nend"
    assert a.feed('"""opening text') is None
    assert a.feed('"""') == "opening text"
    assert a.feed('"""one line"""') == "one line"
    assert a.feed("plain") == "plain"
    assert a.feed("dropped \\") is None
    a.discard()
    assert not a.pending and a.feed("fresh") == "fresh"


def test_history_path_follows_xdg(tmp_path):
    assert history_path({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "ms4local" / "chat_history"
    assert history_path({}).parts[-3:] == (".cache", "ms4local", "chat_history")


# ----------------------------------------------------------------------------------- turns
def test_turn_joins_conversation_and_next_prompt_reuses_it(vocab):
    engine = ScriptedEngine(vocab, [("Let me see.", True), ("Four", False), (".", False)])
    s = ChatSession(engine, system="Be brief.", reasoning_effort="high")
    deltas = run(s.send("2+2?"))
    assert [d.text for d in deltas] == ["Let me see.", "Four", "."]
    assert s.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Four.", "reasoning_content": "Let me see."},
    ]
    assert s.last_turn.done is not None and not s.last_turn.stopped and s.turns == 1
    assert engine.calls[0]["effort"] == "high" and engine.calls[0]["sampling"].temperature == 0.7
    # The answer renders as the model wrote it, so the next prompt extends the last one.
    first = s.last_prompt
    run(s.send("And 3+3?"))
    assert s.last_prompt.startswith(first)
    assert "[THINK]Let me see.[/THINK]Four.</s>[INST]And 3+3?[/INST]" in s.last_prompt


def test_stop_keeps_partial_answer_marked(vocab, tmp_path):
    engine = ScriptedEngine(vocab, [(f"w{i} ", False) for i in range(50)])
    s = ChatSession(engine)
    seen = run(s.send("Count."), stop_after=3)
    assert len(seen) == 3 and engine.closed == 1  # the engine's generator was closed, not abandoned
    turn = s.last_turn
    assert turn.stopped and turn.committed and turn.done is None and turn.generated == 3
    assert s.history[-1] == {"role": "assistant", "content": "w0 w1 w2 ", "interrupted": True}
    assert all("interrupted" not in m for m in s.model_messages())  # the template never sees the mark
    s.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"][-1]["interrupted"] is True


def test_stop_before_any_output_takes_the_message_back(vocab):
    s = ChatSession(ScriptedEngine(vocab, [("x", False)]))
    turn = s.send("Hi")
    turn.stop()
    assert run(turn) == []
    assert s.history == [] and not turn.committed
    assert turn.notices == ["stopped before any answer; your message was not kept"]


def test_empty_answer_is_not_kept(vocab):
    engine = ScriptedEngine(vocab, [])
    s = ChatSession(engine)
    turn = s.send("Hi")
    run(turn)
    assert s.history == [] and turn.notices == ["the model gave an empty answer; your message was not kept"]
    engine.script = [("ok", False)]
    run(s.send("Again"))  # the next prompt holds one user message, not two merged ones
    assert engine.calls[-1]["messages"] == [{"role": "user", "content": "Again"}]


def test_engine_error_before_output_leaves_conversation_unchanged(vocab):
    engine = ScriptedEngine(vocab, [("a", False)], fail_at=0, exc=ContextError("the prompt has 9 tokens"))
    s = ChatSession(engine)
    with pytest.raises(ContextError):
        run(s.send("Hi"))
    assert s.history == [] and engine.resets == 1


def test_interrupt_inside_engine_resets_its_cache_and_keeps_partial(vocab):
    engine = ScriptedEngine(vocab, [("a", False), ("b", False), ("c", False)], fail_at=2, exc=KeyboardInterrupt())
    s = ChatSession(engine)
    turn = s.send("Hi")
    with pytest.raises(KeyboardInterrupt):
        run(turn)
    assert engine.resets == 1
    assert s.history[-1] == {"role": "assistant", "content": "ab", "interrupted": True}


# ----------------------------------------------------------------------------------- commands
def test_think_flips_rendered_prompt_and_temperature(vocab):
    engine = ScriptedEngine(vocab, [("ok", False)])
    s = ChatSession(engine, system="S")
    before = s.render()
    assert '[MODEL_SETTINGS]{"reasoning_effort": "none"}' not in before  # no user turn yet: no settings
    run(s.send("Hi"))
    none_prompt = s.render()
    assert s.execute(Command("think")).text == "reasoning effort: high (temperature 0.7)"
    high_prompt = s.render()
    assert '{"reasoning_effort": "none"}' in none_prompt and '{"reasoning_effort": "high"}' in high_prompt
    assert high_prompt.replace('"high"', '"none"') == none_prompt
    run(s.send("Again"))
    assert engine.calls[-1]["effort"] == "high" and engine.calls[-1]["sampling"].temperature == 0.7
    assert '{"reasoning_effort": "high"}' in s.last_prompt
    s.execute(Command("think"))
    assert s.reasoning_effort == "none"
    s.execute(Command("think", "none"))
    assert s.reasoning_effort == "none"
    s.execute(Command("think", "high"))
    assert s.reasoning_effort == "high"


def test_reset_keeps_system_prompt_and_effort(vocab):
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)]), system="Be brief.", reasoning_effort="high")
    run(s.send("Hi"))
    reply = s.execute(Command("reset"))
    assert reply.text == "conversation cleared (system prompt kept)"
    assert s.messages == [{"role": "system", "content": "Be brief."}]
    assert s.reasoning_effort == "high" and s.last_prompt is None and s.turns == 0


def test_system_command(vocab):
    s = ChatSession(ScriptedEngine(vocab))
    assert s.execute(Command("system")).text == "no system prompt"
    s.execute(Command("system", "Answer in French."))
    assert s.messages[0] == {"role": "system", "content": "Answer in French."}
    assert s.execute(Command("system")).text == "system prompt: Answer in French."
    s.execute(Command("system", "--clear"))
    assert s.messages == []


def test_save_load_round_trip(vocab, tmp_path):
    engine = ScriptedEngine(vocab, [("Hmm.", True), ("Sure.", False)])
    s = ChatSession(engine, system="Be brief.", reasoning_effort="high")
    run(s.send("One"))
    run(s.send("Two"), stop_after=1)
    path = tmp_path / "chat.json"
    assert s.execute(Command("save", str(path))).text == f"saved 5 messages to {path}"
    data = json.loads(path.read_text())
    assert data["format"] == "ms4local-chat" and data["reasoning_effort"] == "high"
    assert data["messages"][0] == {"role": "system", "content": "Be brief."}

    other = ChatSession(ScriptedEngine(vocab), reasoning_effort="none")
    reply = other.execute(Command("load", str(path)))
    assert reply.text == f"loaded 5 messages from {path} (reasoning effort high)"
    assert other.messages == s.messages and other.system == "Be brief." and other.reasoning_effort == "high"
    assert other.render() == s.render()
    # What it loaded also comes back identical when saved again.
    other.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data


def test_load_accepts_request_body_and_bare_list(vocab, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (tmp_path / "body.json").write_text(json.dumps({"model": "x", "messages": msgs}))
    (tmp_path / "list.json").write_text(json.dumps(msgs))
    for name in ("body.json", "list.json"):
        s = ChatSession(ScriptedEngine(vocab), system="old", reasoning_effort="high")
        s.load(tmp_path / name)
        assert s.messages == msgs and s.system is None and s.reasoning_effort == "high"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    (b"\xff\xfe", "is not UTF-8 text"),
    ('{"conversation": []}', 'has no "messages"'),
    ('{"messages": {"role": "user"}}', '"messages" must be a list'),
    ('[{"content": "no role"}]', "message 1 must be an object whose role is one of"),
    ('[{"role": "user", "content": "hi"}, "text"]', "message 2 must be an object"),
    ('{"messages": [], "reasoning_effort": "medium"}', "reasoning_effort must be none or high, got 'medium'"),
    ('[{"role": "assistant", "content": "first"}]', "the model's template refuses this conversation: "
                                                    "the conversation must start with a user or system message"),
    ('[{"role": "user", "content": 5}]', "message 1: content must be text, a list of parts or null, got a number"),
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply"),
    ('[{"role": "user", "content": [' + "[" * 200 + "]" * 200 + "]}]", "is nested too deeply"),
    ('[{"role": "user", "content": "\\ud800 hi"}]', "message 1 holds text that is not valid Unicode (a lone surrogate '\\ud800')"),
    ('[{"role": "user", "content": "hi", "name": {"\\udfff": 1}}]', "not valid Unicode"),
    ('[{"role": "user", "content": [{"type": "video", "video": "x"}]}]', "content part 1 must be an object whose type is one of"),
    ('[{"role": "user", "content": [{"type": "text", "text": 3}]}]', 'content part 1: "text" must be text, got a number'),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": [{"function": 1}]}]',
     'message 2: tool call 1 must be an object with a "function" that has a "name"'),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "tool_calls": {"x": 1}}]',
     "message 2: tool_calls must be a list, got an object"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reasoning_content": ["x"]}]',
     "reasoning_content must be text, got a list"),
    ('[{"role": 7, "content": "hi"}]', "message 1 must be an object whose role is one of"),
])
def test_bad_load_is_one_line_and_changes_nothing(vocab, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)]), system="Keep me.", reasoning_effort="high")
    run(s.send("Hi"))
    before = (s.messages, s.reasoning_effort, s.last_prompt)
    with pytest.raises(SessionError) as e:
        s.execute(Command("load", str(path)))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (s.messages, s.reasoning_effort, s.last_prompt) == before


def test_save_never_replaces_a_file_it_did_not_write_without_force(vocab, tmp_path):
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)]))
    run(s.send("Hi"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(SessionError) as e:
        s.execute(Command("save", str(notes)))
    assert str(e.value) == f"{notes} exists and is not a conversation saved by /save; /save --force {notes} replaces it"
    assert notes.read_text() == "my notes\n"
    assert s.execute(Command("save", f"--force {notes}")).text == f"saved 2 messages to {notes}"
    assert json.loads(notes.read_text())["messages"][-1] == {"role": "assistant", "content": "ok"}
    # A conversation that /save wrote is updated without --force: saving again is what a user expects.
    run(s.send("Again"))
    s.execute(Command("save", str(notes)))
    assert len(json.loads(notes.read_text())["messages"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no temporary file left behind


def test_save_never_replaces_the_model_a_gguf_or_a_directory(vocab, model, tmp_path):
    import shutil

    loaded = tmp_path / "model.gguf"
    shutil.copy(model, loaded)
    other = tmp_path / "other.gguf"
    shutil.copy(model, other)
    link = tmp_path / "link.json"
    link.symlink_to(loaded)
    size = loaded.stat().st_size
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)], path=loaded))
    run(s.send("Hi"))
    for target, message in ((loaded, "is the model this chat runs on"), (link, "is the model this chat runs on"),
                            (other, "is a GGUF model file"), (tmp_path, "is a directory")):
        for arg in (str(target), f"--force {target}"):
            with pytest.raises(SessionError, match=message) as e:
                s.execute(Command("save", arg))
            assert "\n" not in str(e.value)
    assert loaded.stat().st_size == size and other.stat().st_size == size and link.is_symlink()


def test_paths_take_shell_quoting(vocab, tmp_path):
    from PIL import Image

    img = tmp_path / "my cat.png"
    Image.new("RGB", (30, 20), (200, 120, 40)).save(img)
    s = ChatSession(ScriptedEngine(vocab, [("A cat.", False)], supports_images=True))
    assert s.execute(Command("image", f'"{img}"')).text == f"{img} goes with your next message"
    assert s.pending_images == [str(img)]
    run(s.send("What is it?"))
    chat = tmp_path / "my chat.json"
    assert s.execute(Command("save", f"'{chat}'")).text == f"saved 2 messages to {chat}"
    assert s.execute(Command("load", f'"{chat}"')).text.startswith(f"loaded 2 messages from {chat}")
    with pytest.raises(SessionError, match=r"^usage: /image PATH \(quote a path that holds spaces\)$"):
        s.execute(Command("image", str(img)))
    with pytest.raises(SessionError, match=r"^usage: /save \[--force\] FILE \(no closing quotation\)$"):
        s.execute(Command("save", f'"{chat}'))


def test_a_full_context_drops_the_oldest_messages_from_the_history_with_a_notice(vocab):
    """The engine reports the messages it left out; the session forgets the same ones, so the
    next prompt starts as this one did (and the engine reuses its cache)."""
    engine = ScriptedEngine(vocab, [("ok", False)])
    s = ChatSession(engine, system="Be brief.")
    for q in ("One", "Two", "Three"):
        run(s.send(q))
    engine.drop = 4
    turn = s.send("Four")
    assert turn.notices == ["the context is full: the oldest 4 messages were dropped (the system prompt is kept)"]
    run(turn)
    assert turn.done.dropped_messages == 4
    assert s.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Three"},
                          {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Four"},
                          {"role": "assistant", "content": "ok"}]
    engine.drop = 0
    run(s.send("Five"))
    assert engine.calls[-1]["messages"][:5] == s.model_messages()[:5]  # the prefix the engine evaluated last time


def test_save_into_missing_directory_is_one_line(vocab, tmp_path):
    s = ChatSession(ScriptedEngine(vocab))
    with pytest.raises(SessionError, match=r"^cannot write .*nope/c\.json: No such file or directory$"):
        s.execute(Command("save", str(tmp_path / "nope" / "c.json")))


def test_image_without_vision_is_a_notice_and_not_sent(vocab, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")
    engine = ScriptedEngine(vocab, [("ok", False)])
    s = ChatSession(engine)
    with pytest.raises(SessionError, match="no image file at"):
        s.execute(Command("image", str(tmp_path / "missing.png")))
    reply = s.execute(Command("image", str(img)))
    assert reply.kind == "notice" and reply.text.startswith(IMAGE_NOTICE) and s.pending_images == [str(img)]
    turn = s.send("What is it?")
    assert turn.notices == [f"{IMAGE_NOTICE}; 1 image not sent"]
    run(turn)
    assert engine.calls[-1]["messages"][-1] == {"role": "user", "content": "What is it?"}
    assert s.pending_images == []


def test_image_goes_as_content_part_when_engine_supports_it(vocab, tmp_path):
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.new("RGB", (30, 20), (200, 120, 40)).save(img)
    engine = ScriptedEngine(vocab, [("A cat.", False)], supports_images=True)
    s = ChatSession(engine)
    assert s.execute(Command("image", str(img))).kind == "info"
    turn = s.send("What is it?")
    run(turn)
    assert turn.notices == []
    assert engine.calls[-1]["messages"][-1] == {"role": "user", "content": [
        {"type": "image", "image": str(img)}, {"type": "text", "text": "What is it?"}]}
    assert "[IMG]What is it?[/INST]" in s.last_prompt


def test_a_bad_image_is_refused_at_image_and_the_chat_goes_on(vocab, tmp_path):
    from ms4local.errors import ImageError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)], supports_images=True))
    with pytest.raises(ImageError, match="bad.png"):
        s.execute(Command("image", str(bad)))
    assert s.pending_images == []
    run(s.send("Hi"))
    assert s.history[-1] == {"role": "assistant", "content": "ok"}


def test_prompt_and_stats_commands(vocab):
    s = ChatSession(ScriptedEngine(vocab, [("ok", False)]))
    assert s.execute(Command("prompt")).text == "nothing sent yet"
    run(s.send("Hi"))
    reply = s.execute(Command("prompt"))
    n = len(vocab.tokenize(s.last_prompt))
    assert reply.kind == "prompt" and reply.text.splitlines()[0] == f"--- last prompt: {n} tokens ---"
    assert s.last_prompt in reply.text
    stats = s.execute(Command("stats")).text
    context = len(vocab.tokenize(s.render()))
    assert stats.startswith(f"1 turn · 2 tokens generated · context {context}/4096 tokens · reasoning effort none")
    assert s.execute(Command("exit")).kind == "exit" and s.execute(Command("quit")).kind == "exit"
    assert "/think [high|none]" in s.execute(Command("help")).text


# ----------------------------------------------------------------------------------- real engine
def _greedy(effort):
    return Sampling(temperature=0.0, max_tokens=12, seed=0)


def _fresh_answer(model, messages):
    with Engine(model, EngineOptions(ctx_size=1024, threads=1)) as fresh:
        return "".join(e.text for e in fresh.chat(messages, _greedy("none")) if isinstance(e, Delta))


def test_stopped_turn_leaves_kv_cache_consistent(model):
    """After Ctrl-C the next answer reuses the cache and equals a fresh engine's answer."""
    with Engine(model, EngineOptions(ctx_size=1024, threads=1)) as engine:
        s = ChatSession(engine, sampling=_greedy)
        run(s.send("Hello"), stop_after=4)
        assert s.history[-1]["interrupted"] is True
        turn = s.send("Go on")
        answer = "".join(d.text for d in run(turn))
        assert turn.done is not None and turn.done.usage.cached_tokens > 0
        expected = _fresh_answer(model, s.model_messages()[:-1])
    assert answer == expected


def interrupt_third_token(engine, monkeypatch):
    """Make the engine raise KeyboardInterrupt right after its third one-token llama_decode (the
    worst moment: the cache already holds the token); returns the real decode to restore."""
    real = engine._decode
    count = {"n": 0}

    def decode_then_interrupt(tokens, start, want_all):
        real(tokens, start, want_all)
        if len(tokens) == 1:
            count["n"] += 1
            if count["n"] == 3:
                raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_decode", decode_then_interrupt)
    return real


def test_interrupt_inside_engine_then_next_turn_works(model, monkeypatch):
    """A KeyboardInterrupt right after a llama_decode (the worst moment) must not break the next turn."""
    with Engine(model, EngineOptions(ctx_size=1024, threads=1)) as engine:
        s = ChatSession(engine, sampling=_greedy)
        real = interrupt_third_token(engine, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            run(s.send("Hello"))
        monkeypatch.setattr(engine, "_decode", real)
        assert s.history[-1]["interrupted"] is True
        answer = "".join(d.text for d in run(s.send("Go on")))
        expected = _fresh_answer(model, s.model_messages()[:-1])
    assert answer == expected


def test_engine_alone_survives_interrupt_after_decode(model, monkeypatch):
    with Engine(model, EngineOptions(ctx_size=1024, threads=1)) as engine:
        messages = [{"role": "user", "content": "Hello"}]
        real = interrupt_third_token(engine, monkeypatch)
        parts = []
        with pytest.raises(KeyboardInterrupt):
            for e in engine.chat(messages, _greedy("none")):
                parts.append(e.text)
        monkeypatch.setattr(engine, "_decode", real)
        messages += [{"role": "assistant", "content": "".join(parts)}, {"role": "user", "content": "Go on"}]
        list(engine.chat(messages, _greedy("none")))
