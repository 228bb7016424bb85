"""`ms4local serve` under load: clients at once, a client that leaves, a full queue, SIGTERM.

Each test starts its own server (a few hundred ms with the tiny model) so that slot and queue
states do not leak between tests.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers.serving import KEY, Server, assert_error, metric, running, stream, user


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_eight_clients_at_once_all_get_the_right_answer(model, parallel):
    """Greedy answers to one prompt: every client gets the answer a lone client gets, whether the
    slots batch them (4) or the queue serialises them (1)."""
    with running(model, "-c", "4096", "--parallel", parallel) as s:
        client = s.client()

        def ask(i: int) -> tuple[str, str]:
            r = client.chat.completions.create(model="model-F32", messages=user("Huit clients"), max_tokens=24,
                                               temperature=0)
            return r.choices[0].message.content, r.choices[0].finish_reason

        alone = ask(-1)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert answers == [alone] * 8
        if parallel == "4":
            # the batches carried several slots: fewer decode steps than tokens generated
            assert metric(s, "ms4local_decode_steps_total") < metric(s, "ms4local_generated_tokens_total")


def test_a_client_that_disconnects_frees_its_slot(model, endless):
    with running(model, "-c", "8192", "--parallel", "1") as s:
        conn, resp = stream(s, {"messages": user("Une très longue histoire"), "max_tokens": 8000, "temperature": 1, **endless})
        for _ in range(3):
            resp.readline()
        assert s.get("/health")[2]["busy"] == 1
        conn.close()  # goes away mid-stream
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.get("/health")[2]["busy"] == 0
        t = time.monotonic()
        r = s.client().chat.completions.create(model="model-F32", messages=user("suivant"), max_tokens=4)
        assert r.choices[0].message is not None and time.monotonic() - t < 10.0  # not behind 8000 tokens (~50 s)
        assert metric(s, "ms4local_requests_cancelled_total") == 1
        assert metric(s, "ms4local_generated_tokens_total") < 4000


def test_full_queue_answers_429_with_retry_after(model, endless):
    with running(model, "-c", "8192", "--parallel", "1", "--max-queue", "1") as s:
        long = {"messages": user("occupé"), "max_tokens": 8000, "temperature": 1, **endless}
        first = stream(s, long)  # has the slot
        waiting = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)  # waits in the queue
        waiting.request("POST", "/v1/chat/completions", json.dumps(long),
                        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["queue"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, err = s.post("/v1/chat/completions", {"messages": user("encore"), "max_tokens": 2})
        assert_error(status, err, 429, code="queue_full", contains="--max-queue 1")
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
        assert metric(s, "ms4local_requests_rejected_queue_full_total") == 1
        waiting.close()  # leaves the queue (else it would take the slot for 8000 tokens and delay the exit)
        first[0].close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams(model, endless, sig):
    """SIGTERM and SIGINT (Ctrl-C) alike: no new work, the stream in flight runs to its end, exit 0."""
    s = Server(model, "-c", "4096", "--parallel", "2")
    try:
        conn, resp = stream(s, {"messages": user("drain"), "max_tokens": 300, "temperature": 1, **endless})
        resp.readline()
        s.proc.send_signal(sig)
        time.sleep(0.2)
        try:  # no new work: uvicorn closed its socket, or (a kept-alive connection) 503
            status, _, body = s.get("/health")
            assert status == 503 and body["status"] == "shutting_down"
        except OSError:
            pass
        rest = resp.read().decode()
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert rest.rstrip().endswith("data: [DONE]")
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # all 300 tokens were generated
        assert s.proc.wait(30) == 0
        assert "finishing the requests in flight" in s.proc.stdout.read()
    finally:
        s.kill()
