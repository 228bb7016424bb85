"""The engine across turns: KV-cache reuse, a full context, llama.cpp's reasons, seeds.

"Evaluated" is measured with llama.cpp's own counters (`Engine.perf`), not with the engine's
bookkeeping, so a cache that was silently not reused would show up here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ms4local import Engine, EngineOptions, Sampling
from ms4local import engine as eng
from ms4local.engine import core
from ms4local.engine import Delta
from ms4local.errors import ContextError, ModelLoadError

SYSTEM = {"role": "system", "content": "Réponds en une phrase."}


@pytest.fixture(scope="module")
def model(ckpt, gguf_file):
    return gguf_file(ckpt(), "F32")


def turn(e: Engine, messages, *, effort=None, max_tokens=8):
    """Run one chat turn greedily: (answer, reasoning, Done, tokens llama.cpp evaluated)."""
    before = e.perf()
    parts = {True: [], False: []}
    done = None
    for ev in e.chat(messages, Sampling(temperature=0, max_tokens=max_tokens), reasoning_effort=effort):
        if isinstance(ev, Delta):
            parts[ev.reasoning].append(ev.text)
        else:
            done = ev
    after = e.perf()
    evaluated = sum(after[k] - before[k] for k in after)
    return "".join(parts[False]), "".join(parts[True]), done, evaluated


def test_public_import():
    out = subprocess.run([sys.executable, "-c", "from ms4local import Engine, EngineOptions, Sampling; print(Engine)"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "ms4local.engine." in out.stdout and "Engine'>" in out.stdout


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("effort, reasoning", [(None, None), ("high", None), ("high", "6 fois 7, c'est 42.")])
def test_next_turn_evaluates_only_the_new_tokens(model, effort, reasoning):
    """Turn 1's output is put in the cache as the model emits it ([THINK]…[/THINK] answer); the
    next prompt renders it back from the history (`reasoning_content`), and llama.cpp evaluates
    only the new user message."""
    with Engine(model, EngineOptions(ctx_size=1024)) as e:
        turn(e, [{"role": "user", "content": "warm-up"}])  # llama.cpp's counters start at a floor of 1
        e.reset()
        history = [SYSTEM, {"role": "user", "content": "Combien font 6 fois 7 ?"}]
        p1 = e.prompt_tokens(history, reasoning_effort=effort)
        produced = e.tokenize("42.")
        if reasoning:
            think_open, think_close = e.think_ids
            assert think_open is not None and think_close is not None
            produced = [think_open, *e.tokenize(reasoning), think_close, *produced]
        list(e.generate(p1 + produced, Sampling(max_tokens=0)))  # the cache as after that answer
        history += [{"role": "assistant", "content": "42.", **({"reasoning_content": reasoning} if reasoning else {})},
                    {"role": "user", "content": "Et 6 fois 8 ?"}]
        p2 = e.prompt_tokens(history, reasoning_effort=effort)
        assert p2[:len(p1) + len(produced)] == p1 + produced
        _, _, done, evaluated = turn(e, history, effort=effort)
        new = len(p2) - len(p1) - len(produced)
        assert 0 < new < 20
        assert done.usage.cached_tokens == len(p1) + len(produced)
        assert done.timings.prompt_eval_tokens == new
        assert evaluated == new + done.usage.completion_tokens  # llama.cpp evaluated nothing else


@pytest.mark.parametrize("effort", [None, "high"])
def test_generated_turn_is_reused(model, effort):
    """With a generated answer: everything up to the first token whose text does not tokenize
    back to itself is reused (a random model emits byte pieces that are not valid UTF-8)."""
    with Engine(model, EngineOptions(ctx_size=1024)) as e:
        turn(e, [{"role": "user", "content": "warm-up"}])
        e.reset()
        history = [SYSTEM, {"role": "user", "content": "Quelle est la capitale de la France ?"}]
        p1 = e.prompt_tokens(history, reasoning_effort=effort)
        answer, reasoning, d1, ev1 = turn(e, history, effort=effort)
        assert d1.usage.cached_tokens == 0 and ev1 == len(p1) + d1.usage.completion_tokens
        held = e.cached_tokens
        history += [{"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})},
                    {"role": "user", "content": "Et celle de l'Italie ?"}]
        p2 = e.prompt_tokens(history, reasoning_effort=effort)
        reuse = _common(p2, held)
        assert reuse >= len(p1)
        _, _, d2, ev2 = turn(e, history, effort=effort)
        assert d2.usage.cached_tokens == reuse
        assert ev2 == len(p2) - reuse + d2.usage.completion_tokens


def test_reused_cache_gives_the_same_answer_as_a_fresh_one(model):
    history = [SYSTEM, {"role": "user", "content": "Bonjour !"}]
    with Engine(model, EngineOptions(ctx_size=1024, type_k="f32", type_v="f32")) as e:
        answer, _, _, _ = turn(e, history)
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Encore ?"}]
        reused, _, d, _ = turn(e, history, max_tokens=12)
        assert d.usage.cached_tokens > 0
    with Engine(model, EngineOptions(ctx_size=1024, type_k="f32", type_v="f32")) as fresh:
        again, _, d, _ = turn(fresh, history, max_tokens=12)
        assert d.usage.cached_tokens == 0
    assert reused == again


def _long_chat(n_turns: int):
    msgs = [SYSTEM]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"Question numéro {i} : " + "bla " * 20},
                 {"role": "assistant", "content": f"Réponse numéro {i} : " + "ok " * 20}]
    return msgs + [{"role": "user", "content": "Dernière question ?"}]


def test_full_context_drops_the_oldest_turns_never_the_system_prompt(model):
    msgs = _long_chat(12)
    with Engine(model, EngineOptions(ctx_size=256)) as e:
        assert len(e.prompt_tokens(msgs)) > 256
        answer, _, done, _ = turn(e, msgs, max_tokens=16)
        k = done.dropped_messages
        assert k > 0 and k % 2 == 0  # whole turns: a question and its answer
        kept = [SYSTEM] + msgs[1 + k:]
        assert done.usage.prompt_tokens == len(e.prompt_tokens(kept))
        # Down to half the context, not just enough to answer: the next turns then fit as they
        # are, with the same prefix. One turn more would have gone past half.
        assert done.usage.prompt_tokens <= e.n_ctx // 2
        assert len(e.prompt_tokens([SYSTEM] + msgs[k - 1:])) > e.n_ctx // 2
        assert e.cached_tokens[:len(e.tokenize("<s>" + SYSTEM["content"]))] == \
            e.prompt_tokens(kept)[:len(e.tokenize("<s>" + SYSTEM["content"]))]
        # A caller that drops the same messages keeps the prefix, so the next turns reuse the cache.
        for question in ("Et ensuite ?", "Et après ?"):
            kept += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
            answer, _, d2, _ = turn(e, kept, max_tokens=4)
            # Everything up to the last answer came from the cache (a random model's answer may not
            # tokenize back to the ids it generated, so the answer itself may be evaluated again).
            assert d2.dropped_messages == 0 and d2.usage.cached_tokens >= len(e.prompt_tokens(kept[:-2]))


def test_finding_the_cut_costs_what_is_kept_not_the_whole_history(model, monkeypatch):
    """A loaded history of thousands of messages: the messages rendered to find the cut follow
    the context, not the history (a search over whole renders costs ~log2(n) × n messages)."""
    msgs = _long_chat(1500)
    with Engine(model, EngineOptions(ctx_size=256)) as e:
        rendered = []
        real = e.prompt_tokens
        monkeypatch.setattr(e, "prompt_tokens", lambda m, **kw: rendered.append(len(m)) or real(m, **kw))
        stream = e.chat(msgs, Sampling(temperature=0, max_tokens=1))  # the cut is chosen before the first event
        counted = sum(rendered)
        monkeypatch.undo()
        done = [ev for ev in stream if not isinstance(ev, Delta)][-1]
        assert done.dropped_messages == stream.dropped_messages > 2900
        assert done.usage.prompt_tokens == len(e.prompt_tokens([SYSTEM] + msgs[1 + done.dropped_messages:]))
        assert done.usage.prompt_tokens <= e.n_ctx // 2
        assert counted < 100, rendered


def test_full_context_without_a_system_prompt(model):
    msgs = _long_chat(12)[1:]
    with Engine(model, EngineOptions(ctx_size=256)) as e:
        _, _, done, _ = turn(e, msgs, max_tokens=16)
        assert done.dropped_messages > 0
        assert done.usage.prompt_tokens == len(e.prompt_tokens(msgs[done.dropped_messages:]))


def test_a_last_message_bigger_than_the_context_is_one_typed_error(model):
    msgs = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "mot " * 400}]
    with Engine(model, EngineOptions(ctx_size=256)) as e:
        with pytest.raises(ContextError, match="raise -c") as err:
            e.chat(msgs, Sampling(max_tokens=8))
        assert "\n" not in str(err.value)


def test_load_errors_carry_llamas_reason_even_after_a_long_log(model, tmp_path):
    # Each load logs ~1000 lines; the buffer keeps 4000. Fill it past that first.
    start = eng.log_mark()
    while eng.log_mark() - start < 5000:
        Engine(model, EngineOptions(vocab_only=True)).close()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="invalid magic characters") as err:
        Engine(bad)
    assert "could not load bad.gguf" in str(err.value) and "no reason given" not in str(err.value)
    cut = tmp_path / "cut.gguf"
    data = model.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="not within the file bounds"):
        Engine(cut)


def test_context_errors_carry_llamas_reason(model, monkeypatch):
    monkeypatch.setattr(core, "check_cache_types", lambda *a: None)  # let llama.cpp refuse it itself
    with pytest.raises(ContextError, match=r"does not support different K \(f32\) and V \(f16\)"):
        Engine(model, EngineOptions(ctx_size=64, type_k="f32", type_v="f16"))


def test_seed_is_random_by_default_and_fixed_on_request(model):
    with Engine(model, EngineOptions(ctx_size=256)) as e:
        prompt = e.tokenize("Il était une fois", add_special=True)

        def sample(seed):
            return "".join(ev.text for ev in e.generate(prompt, Sampling(temperature=1.5, top_k=0, top_p=1.0,
                                                                          min_p=0.0, max_tokens=16, seed=seed))
                           if isinstance(ev, Delta))

        assert sample(3) == sample(3)
        assert len({sample(None) for _ in range(3)}) > 1


def test_a_decode_interrupted_before_it_was_recorded_is_trimmed(model, monkeypatch):
    """Ctrl-C can land between llama_decode and the engine noting the token: the KV cache then
    holds a position the engine does not know. The next turn must trim it, not fail on it."""
    with Engine(model, EngineOptions(ctx_size=512)) as e:
        real = e._decode
        calls = {"n": 0}

        def decode_then_interrupt(tokens, start, want_all):
            real(tokens, start, want_all)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        monkeypatch.setattr(e, "_decode", decode_then_interrupt)
        msgs = [{"role": "user", "content": "Hello"}]
        with pytest.raises(KeyboardInterrupt):
            list(e.chat(msgs, Sampling(temperature=0, max_tokens=8)))
        monkeypatch.setattr(e, "_decode", real)
        held = e.cached_tokens  # the prompt and the one answer token that was recorded
        events = list(e.generate(held + e.tokenize(" Go on"), Sampling(temperature=0, max_tokens=4)))
        assert events[-1].usage.cached_tokens == len(held)


def test_ctx_size_is_judged_from_the_header_before_loading(model):
    from ms4local.errors import OptionsError
    from ms4local.gguf_model import read_model
    from ms4local.placement import kv_cache_bytes

    notices = eng.place(model, EngineOptions(ctx_size=65536)).notices
    assert f"-c 65536 is above the 32768 tokens {model.name} was trained for; answers may degrade past that length" \
        in notices  # a notice, as llama.cpp warns and goes on
    assert not any("trained for" in n for n in eng.place(model, EngineOptions(ctx_size=32768)).notices)
    # The KV cache from the header (MLA: one 48-value f16 row per token and layer) against the memory.
    info = read_model(model)
    assert kv_cache_bytes(info, 4096) == 4096 * 48 * 2 * 2
    with pytest.raises(OptionsError) as err:
        EngineOptions(ctx_size=4096).check_model(info, memory=4096 * 192 - 1)
    assert str(err.value) == ("-c 4096 needs a 0.8 MiB KV cache (-ctk f16), more than the 0.7 MiB of free RAM and "
                              "GPU memory; try -c 3072")
    assert EngineOptions(ctx_size=4096).check_model(info, memory=4096 * 192) == []
    # Through the engine: refused before llama.cpp allocates (it took 52 s and ended in std::bad_alloc).
    with pytest.raises(OptionsError, match=r"^-c 4000000000 needs a 715\.3 GiB KV cache \(-ctk f16\), more than the "
                                           r"[\d.]+ GiB of free RAM and GPU memory; try -c 32768$"):
        Engine(model, EngineOptions(ctx_size=4_000_000_000))
    with pytest.raises(OptionsError, match="at most 4294967040"):
        EngineOptions(ctx_size=2**32).check()  # llama.cpp's n_ctx is a uint32: it would wrap


def test_load_mode_chooses_how_llama_cpp_reads_the_weights(model):
    """-lm/--load-mode is llama.cpp's: mapped from the file, or read into RAM; the answer is the same.
    (The option was once a `use_mmap` field that this llama.cpp's struct no longer has, so it
    did nothing: llama.cpp's own log says which buffer the weights are in.)"""
    from ms4local.engine import library
    from ms4local.errors import OptionsError

    answers, buffers = {}, {}
    for mode in ("mmap", "none"):
        mark = library.log_mark()
        with Engine(model, EngineOptions(ctx_size=256, load_mode=mode)) as e:
            answers[mode] = [ev.text for ev in e.generate(e.tokenize("Bonjour", add_special=True),
                                                          Sampling(temperature=0, max_tokens=6)) if isinstance(ev, Delta)]
        buffers[mode] = [line.split("model buffer")[0].split()[-1] for line in library.log_text(mark).splitlines()
                         if "model buffer size" in line]
    assert buffers == {"mmap": ["CPU_Mapped"], "none": ["CPU"]}
    assert answers["mmap"] == answers["none"]
    with pytest.raises(OptionsError, match="^-lm/--load-mode must be one of auto, none, mmap, mlock, mmap\\+mlock, dio, got 'ram'$"):
        EngineOptions(load_mode="ram").check()


def test_slots_decode_in_sequence_order_so_llama_cpp_reuses_the_step_graph(ckpt, gguf_file):
    """The batch rows go in sequence order whatever order the runs started in. llama.cpp reorders
    a batch whose sequences come out of order and cannot then reuse the previous step's graph:
    under `serve --parallel 8` that made every step after the first round ~15% slower (31 vs 26 ms
    on the bench model, bench/results/llamacpp.md). Read from llama.cpp's own counter; the model's
    temperature length covers the context, so nothing else keeps the graph from being reused."""
    from ms4local.engine.slots import Slots
    from quantize.synth import TinySpec

    path = gguf_file(ckpt(TinySpec(vocab=4096, orig_ctx=512, layers=3)), "F32")
    with Engine(path, EngineOptions(ctx_size=512, parallel=4)) as e:
        slots = Slots(e)
        for seq in (2, 0, 3, 1):
            slots.start(seq, e.tokenize("Bonjour", add_special=True),
                        Sampling(temperature=0, max_tokens=12, logit_bias=((e.eos_id, -100.0),)))
        slots.step()  # the four prompts
        e.reset_perf()
        steps = 0
        while slots.runs:
            slots.step()
            steps += 1
        slots.close()
        assert steps >= 10 and e.graphs_reused() >= steps - 2
