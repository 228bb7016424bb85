"""The streaming path of `serve` made lean for speed (issue #17): the pre-encoded chunk JSON is the
compact JSON (OpenAI's wire form) of the whole chunk object, a decode step's events reach a stream
together, and the SSE response keeps what sse-starlette did (headers, pings, send timeout,
cancel on disconnect). Unit tests drive the pieces with a fake ASGI peer; one test reads the
raw bytes of a real server's streams."""

from __future__ import annotations

import asyncio
import http.client
import json

import pytest

from helpers.serving import KEY, running, user
from ms4local.engine import Delta, Done
from ms4local.engine.events import Timings, Usage
from ms4local.server.app import _batches, _framer, _string
from ms4local.server.errors import APIError
from ms4local.server.scheduler import Failed, Job
from ms4local.server.sse import SSEResponse, event

TRICKY = ["", "plain", "é à ü — 漢字 🙂", 'quo"te \\ back', "new\nline\r\ttab", "\x00\x1f\x7f", "\u2028\u2029\x85",
          "\ue000ms4local-slot\ue000", "</s>[THINK]", "\ud800"]


@pytest.mark.parametrize("text", TRICKY)
def test_framed_chunks_are_the_json_of_the_whole_object(text):
    obj = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": None,
           "usage": None}
    choice = {"index": 0, "delta": None, "finish_reason": None, "logprobs": None}
    frame, inner = _framer(obj, "choices"), _framer(choice, "delta")
    got = frame("[" + inner('{"content":' + _string(text) + "}") + "]")
    want = json.dumps({**obj, "choices": [{**choice, "delta": {"content": text}}]}, ensure_ascii=False,
                      separators=(",", ":"))
    assert got == want
    assert json.loads(got)["choices"][0]["delta"]["content"] == text


def _done() -> Done:
    return Done("length", Usage(3, 2, 0), Timings(3, 0.1, 0.1, 0.1, 2))


def _job(items: list) -> Job:
    loop = asyncio.get_running_loop()
    job = Job(prompt=lambda e: [1], sampling=None, loop=loop)  # type: ignore[arg-type]
    for item in items:
        job.queue.put_nowait(item)
    return job


def test_batches_take_everything_waiting_and_stop_at_done_or_failed():
    async def run(items: list, later: list) -> tuple[list, BaseException | None]:
        job = _job(items)
        got: list = []
        error = None

        async def feed() -> None:
            await asyncio.sleep(0.05)
            for item in later:
                job.queue.put_nowait(item)

        feeder = asyncio.ensure_future(feed())
        try:
            async for batch in _batches(job):
                got.append(batch)
        except APIError as e:
            error = e
        await feeder
        return got, error

    a, b, done = Delta("a"), Delta("b", reasoning=True), _done()
    got, error = asyncio.run(run([a, b], [Delta("c"), done, Delta("after")]))
    assert got == [[a, b], [Delta("c"), done]] and error is None
    failed = Failed(APIError(500, "boom"))
    got, error = asyncio.run(run([a, failed, Delta("never")], []))
    assert got == [[a]] and isinstance(error, APIError) and error.status == 500


class Peer:
    """A fake ASGI server side: records what is sent; `receive` waits until `leave()`; `stall`
    makes body sends hang (a client that stopped reading)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self.stall = False

    async def send(self, message: dict) -> None:
        if self.stall and message["type"] == "http.response.body":
            await asyncio.Event().wait()
        self.sent.append(message)

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.gone.set()

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def test_sse_response_streams_pings_when_idle_and_ends_the_body():
    closed = []

    async def body():
        try:
            yield event('{"a": 1}')
            await asyncio.sleep(0.5)
            yield event("[DONE]")
        finally:
            closed.append(True)

    async def run() -> Peer:
        peer = Peer()
        await asyncio.wait_for(SSEResponse(body(), ping=0.1, send_timeout=5)({"type": "http"}, peer.receive, peer.send), 10)
        return peer

    peer = asyncio.run(run())
    start = peer.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    text = peer.body().decode()
    assert text.startswith('data: {"a": 1}\n\n') and text.endswith("data: [DONE]\n\n")
    assert ": ping - " in text  # the stream was idle for 0.5 s with ping=0.1
    assert peer.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert closed == [True]


def test_sse_response_stops_the_body_when_the_client_leaves():
    closed = []

    async def endless():
        try:
            while True:
                yield event("{}")
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def run() -> Peer:
        peer = Peer()
        asyncio.get_running_loop().call_later(0.2, peer.leave)
        await asyncio.wait_for(SSEResponse(endless())({"type": "http"}, peer.receive, peer.send), 10)
        return peer

    peer = asyncio.run(run())
    assert closed == [True] and peer.body().startswith(b"data: {}\n\n")


def test_sse_response_gives_up_on_a_client_that_stopped_reading():
    closed = []

    async def body():
        try:
            yield event("{}")
            yield event("{}")
        finally:
            closed.append(True)

    async def run() -> None:
        peer = Peer()
        peer.stall = True
        await asyncio.wait_for(SSEResponse(body(), ping=10, send_timeout=0.3)({"type": "http"}, peer.receive,
                                                                              peer.send), 10)

    asyncio.run(run())
    assert closed == [True]


def test_sse_response_raises_what_the_body_raises():
    async def body():
        yield event("{}")
        raise ValueError("a bug")

    async def run() -> None:
        peer = Peer()
        await SSEResponse(body())({"type": "http"}, peer.receive, peer.send)

    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(run())


def _stream(port: int, path: str, body: dict) -> tuple[dict, list[str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    raw = r.read().decode("utf-8")
    conn.close()
    assert r.status == 200, raw
    events = raw.split("\n\n")
    assert events[-1] == ""
    return dict(r.getheaders()), [e.removeprefix("data: ") for e in events[:-1]]


def test_raw_streams_are_compact_json_and_say_the_same_as_whole_answers(model, endless):
    with running(model, "-c", "2048", "--parallel", "2") as s:
        client = s.client()
        for path, body in [
            ("/v1/chat/completions", {"messages": user("Écris un poème, s'il te plaît."), "max_tokens": 16,
                                      "temperature": 0, **endless}),
            ("/v1/chat/completions", {"messages": user("Réfléchis."), "max_tokens": 16, "temperature": 0,
                                      "reasoning_effort": "high", **endless}),
            ("/v1/completions", {"prompt": "[INST]Bonjour[/INST]", "max_tokens": 16, "temperature": 0,
                                 **endless}),
        ]:
            headers, events = _stream(s.port, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert events[-1] == "[DONE]" and all(not e.startswith(":") for e in events)
            chunks = [json.loads(e) for e in events[:-1]]
            for e, c in zip(events[:-1], chunks):  # byte for byte the compact JSON of each chunk
                assert e == json.dumps(c, ensure_ascii=False, separators=(",", ":"))
            usage = chunks[-1]["usage"]
            assert usage["completion_tokens"] == 16 and not chunks[-1]["choices"]
            if path == "/v1/chat/completions":
                whole = client.chat.completions.create(model="model-F32", **body).model_dump()
                deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
                assert "".join(d.get("content") or "" for d in deltas) == (whole["choices"][0]["message"]["content"] or "")
                assert "".join(d.get("reasoning_content") or "" for d in deltas) == \
                    (whole["choices"][0]["message"].get("reasoning_content") or "")
            else:
                whole = client.completions.create(model="model-F32", **body).model_dump()
                assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
            assert whole["usage"]["completion_tokens"] == usage["completion_tokens"]
            assert whole["usage"]["prompt_tokens"] == usage["prompt_tokens"]
