"""Issue #18, item 1 (repeat_penalty) and the engine thread that never dies.

The repeat penalty is checked against a float64 numpy reference: greedy decoding over the model's
own logits (`Engine.logits`, a fresh full evaluation per step), with llama.cpp's penalty rule
applied by hand to the last 64 generated ids (a positive logit divided by the penalty, a negative
one multiplied). Before the fix, any penalty other than 1.0 raised TypeError in the engine thread
and the server answered 503 from then on; `chat --repeat-penalty` crashed with a traceback.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import numpy as np
import pytest

from helpers import BIN
from helpers.serving import running
from ms4local import Engine, EngineOptions
from ms4local.engine import Delta, Done, Sampling
from ms4local.server import Scheduler
from ms4local.server.scheduler import Failed, Job, Started

PROMPT = "[INST]Le chat répète le chat[/INST]"
STEPS = 48  # this tiny model first repeats an id (greedy, no penalty) after 32
LAST_N = 64  # llama.cpp's default window, the one the engine uses
NEAR_TIE = 1e-3  # logits closer than this may order differently in a batched decode


def greedy_reference(engine: Engine, prompt: list[int], penalty: float, banned: int) -> tuple[list[int], int]:
    """(greedy ids under the penalty, how many of them are decided by a margin of at least
    NEAR_TIE); stops at an end-of-generation id. `banned` gets logit_bias -100, as the request."""
    gen: list[int] = []
    decided = None
    for _ in range(STEPS):
        logits = engine.logits(prompt + gen)[-1].astype(np.float64)
        logits[banned] += -100.0
        for t in set(gen[-LAST_N:]):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        top2 = np.sort(logits)[-2:]
        if decided is None and top2[1] - top2[0] < NEAR_TIE:
            decided = len(gen)
        tok = int(np.argmax(logits))
        if tok == engine.eos_id:
            break
        gen.append(tok)
    return gen, len(gen) if decided is None else decided


def text_of(engine: Engine, ids: list[int]) -> str:
    return b"".join(engine.piece(t) for t in ids).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def engine(model):
    with Engine(model, EngineOptions(ctx_size=512, logits_all=True)) as e:
        yield e


@pytest.mark.parametrize("penalty", [1.5, 10.0, 0.7])
def test_repeat_penalty_follows_the_reference(model, engine, penalty):
    prompt = engine.tokenize(PROMPT, add_special=True, parse_special=True)
    plain, _ = greedy_reference(engine, prompt, 1.0, engine.eos_id)
    want, decided = greedy_reference(engine, prompt, penalty, engine.eos_id)
    assert len(set(plain)) < len(plain)  # unpenalized greedy repeats itself within the window
    assert want != plain  # and the penalty changes that path (else the test proves nothing)
    assert decided >= 24
    if penalty > 1:  # a strong penalty: no id follows itself, where plain greedy loops on one
        assert all(want[i] != want[i - 1] for i in range(1, decided)), want
    with running(model, "-c", "1024") as s:
        got = {}
        for p in (1.0, penalty):
            status, _, body = s.post("/v1/completions", {"prompt": PROMPT, "max_tokens": STEPS, "temperature": 0,
                                                         "repeat_penalty": p, "logit_bias": {str(engine.eos_id): -100}})
            assert status == 200, body
            got[p] = body["choices"][0]["text"]
    assert got[1.0].startswith(text_of(engine, plain[:decided]))
    assert got[penalty].startswith(text_of(engine, want[:decided]))
    assert got[penalty] != got[1.0]


def test_repeat_penalty_in_the_engine_generate_path(engine):
    """`chat` uses Engine.generate: the same sampler, same ids as the reference."""
    prompt = engine.tokenize(PROMPT, add_special=True, parse_special=True)
    want, decided = greedy_reference(engine, prompt, 4.0, engine.eos_id)
    events = list(engine.generate(prompt, Sampling(temperature=0, repeat_penalty=4.0, max_tokens=decided,
                                                   logit_bias=((engine.eos_id, -100.0),))))
    assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == decided
    assert engine.cached_tokens[len(prompt):] == want[:decided]


def test_chat_cli_with_a_repeat_penalty(model, cli_env):
    for penalty in ("1.3", "0.8"):
        p = subprocess.run([str(BIN / "ms4local"), "chat", str(model), "-p", "Bonjour", "-n", "6", "--seed", "3",
                            "--repeat-penalty", penalty, "--json"], capture_output=True, text=True, env=cli_env,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert 1 <= out["usage"]["completion_tokens"] <= 6


# ----------------------------------------------------------------------------- the engine thread never dies
class Exploding(Job):
    """A job whose delivery fails once it generates: a stand-in for a bug in the serving loop
    (the error escapes `Scheduler._serve`, not one request's preparation)."""

    def post(self, item) -> None:
        if isinstance(item, Delta):
            raise RuntimeError("boom while delivering")
        super().post(item)

    def stage(self, item, outbox) -> None:  # the path a decode step's events take
        if isinstance(item, Delta):
            raise RuntimeError("boom while delivering")
        super().stage(item, outbox)


async def answer(scheduler: Scheduler, job: Job) -> list:
    scheduler.submit(job)
    items = []
    while True:
        item = await asyncio.wait_for(job.queue.get(), 60)
        items.append(item)
        if isinstance(item, (Done, Failed)):
            return items


def test_the_engine_thread_restarts_after_an_unexpected_error(model):
    log: list[str] = []
    scheduler = Scheduler(lambda: Engine(model, EngineOptions(ctx_size=1024, parallel=2)), log=log.append)
    scheduler.start()
    try:
        deadline = time.monotonic() + 60
        while scheduler.state == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.state == "ready"

        async def scenario() -> tuple[list, list, list]:
            loop = asyncio.get_running_loop()
            sampling = Sampling(temperature=0, max_tokens=4)
            hello = lambda e: e.tokenize("hello", add_special=True)  # noqa: E731
            bad_prompt = await answer(scheduler, Job(prompt=lambda e: 1 // 0, sampling=sampling, loop=loop))
            exploding = await answer(scheduler, Exploding(prompt=hello, sampling=sampling, loop=loop))
            after = await answer(scheduler, Job(prompt=hello, sampling=sampling, loop=loop))
            return bad_prompt, exploding, after

        bad_prompt, exploding, after = asyncio.run(scenario())
        # a bug met while preparing one request: that request's 500, no restart
        assert isinstance(bad_prompt[-1], Failed) and bad_prompt[-1].error.status == 500
        assert "ZeroDivisionError" in bad_prompt[-1].error.message
        # a bug in the loop: the requests in flight get a 500, the slots are rebuilt, and it says so
        assert isinstance(exploding[0], Started) and isinstance(exploding[-1], Failed)
        assert exploding[-1].error.status == 500 and "restarted" in exploding[-1].error.message
        assert scheduler.restarts == 1 and scheduler.state == "ready"
        assert any("engine restarted" in line for line in log) and any("boom while delivering" in line for line in log)
        # and the next request is served as before
        assert isinstance(after[-1], Done) and after[-1].usage.completion_tokens >= 1
    finally:
        scheduler.stop(30)
    assert scheduler.state == "stopped"
