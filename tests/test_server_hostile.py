"""Issue #18: nothing a client sends may kill, hang or corrupt `ms4local serve`. Each case is sent
with the real `openai` client or raw HTTP to a real server (loopback), and each checks that the
next request still gets its answer and /health stays 200: before the fixes, several of these
killed the engine thread, after which every request answered 503 while the process stayed up.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time

import openai
import pytest

from helpers import BIN
from helpers.serving import KEY, assert_error, metric, running, stream, user
from ms4local.grammar import MAX_REPEAT
from ms4local.server.translate import MAX_STOP_CHARS


@pytest.fixture(scope="module")
def server(model):
    with running(model, "-c", "4096", "--parallel", "2") as s:
        yield s


def still_serves(server) -> None:
    """The server answers the next request and says it is healthy."""
    r = server.client().chat.completions.create(model="model-F32", messages=user("encore"), max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    status, _, health = server.get("/health")
    assert status == 200 and health["status"] == "ok", health


def post_raw(server, path: str, text: str, content_type: str = "application/json", timeout: float = 60):
    """POST a body given as JSON text (so that escapes like \\ud800 go on the wire as written)."""
    return server.request("POST", path, raw=text.encode("utf-8"), headers={"Content-Type": content_type},
                          timeout=timeout)


# ----------------------------------------------------------------------------- 1. repeat_penalty
def test_repeat_penalty_in_a_request_answers_and_the_server_lives(server):
    for penalty in (1.1, 0.5, 10):
        r = server.client().chat.completions.create(model="model-F32", messages=user("répète"), max_tokens=8,
                                                    extra_body={"repeat_penalty": penalty})
        assert r.usage.completion_tokens >= 1
    status, _, body = server.post("/v1/completions", {"prompt": "abc", "max_tokens": 4, "repeat_penalty": 1.3})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    still_serves(server)


def test_repeat_penalty_as_the_server_default(model):
    with running(model, "-c", "1024", "--repeat-penalty", "1.1") as s:
        r = s.client().chat.completions.create(model="model-F32", messages=user("bonjour"), max_tokens=6)
        assert r.usage.completion_tokens >= 1
        still_serves(s)


# ----------------------------------------------------------------------------- 2. invalid Unicode
LONE = '"\\ud800 x"'  # JSON text: a lone high surrogate, valid JSON, no valid Unicode


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "a"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "stop": [%s]}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "reasoning_effort": %s}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "response_format": {"type": '
                             '"json_schema", "json_schema": {"name": "x", "schema": {"enum": [%s]}}}}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"\\ud800": 1}}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "unknown\\udc00": 1}'),
    ("/v1/completions", '{"prompt": %s, "max_tokens": 2}' % LONE),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 2, "stream": true, "stop": %s}' % LONE),
])
def test_lone_surrogates_are_a_400_before_the_queue(server, path, body):
    status, _, err = post_raw(server, path, body)
    assert_error(status, err, 400, code="invalid_unicode", contains="surrogate")
    still_serves(server)


def test_lone_surrogate_as_a_javascript_client_sends_it(server):
    """JSON.stringify keeps a lone surrogate as a \\ud800 escape (the openai Python client cannot
    even encode one); http.client sends the body as such a client would, chunked, no Content-Length."""
    body = json.dumps({"model": "model-F32", "messages": user("\ud800 x"), "max_tokens": 2})  # ensure_ascii: escaped
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", iter([body.encode()]), encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert_error(r.status, json.loads(r.read()), 400, code="invalid_unicode", contains="messages[0].content")
    conn.close()
    still_serves(server)


# ----------------------------------------------------------------------------- 3. what a schema may allocate
def schema_body(schema: dict) -> dict:
    return {"messages": user("json"), "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


@pytest.mark.parametrize("schema, contains", [
    ({"type": "string", "minLength": 100_000_000}, "minLength"),
    ({"type": "string", "minLength": 200_000_000}, "minLength"),
    ({"type": "string", "maxLength": 100_000_000}, "maxLength"),
    ({"type": "string", "minLength": 1e300}, "minLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 50_000_000}, "minItems"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 10**18}, "maxItems"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "maxLength": MAX_REPEAT + 1}}}},
     "maxLength"),
    ({"type": "string", "pattern": "a{100000000}"}, "pattern"),
    ({"type": "string", "pattern": "(ab){5,99999999999999999999}"}, "pattern"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "minLength": MAX_REPEAT} for i in range(20)}},
     "add up"),
    ({"type": "string", "maxLength": 1001}, "at most 1000"),
    ({"type": "string", "minLength": -1}, "whole number"),
    ({"type": "string", "minLength": 2.5}, "whole number"),
    ({"type": "string", "minLength": "many"}, "whole number"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "below"),
])
def test_schema_repetitions_are_bounded(server, schema, contains):
    t = time.monotonic()
    status, _, err = server.post("/v1/chat/completions", schema_body(schema))
    assert_error(status, err, 400, code="invalid_schema", contains=contains)
    assert time.monotonic() - t < 10  # refused before anything is built (it took minutes and GBs)
    still_serves(server)


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 3, "maxLength": 40},
    {"type": "array", "items": {"type": "integer", "minimum": -1e300, "maximum": 1e300}, "maxItems": 3},
    {"type": "integer", "minimum": 10**15, "maximum": 10**15 + 3},
])
def test_schemas_within_the_limits_still_work(server, schema):
    status, _, body = server.post("/v1/chat/completions", {**schema_body(schema), "max_tokens": 60, "temperature": 0})
    assert status == 200, body
    still_serves(server)


def test_schema_limit_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(
            model="model-F32", messages=user("json"), max_tokens=2,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 100_000_000}}})
    assert "minLength" in str(info.value) and str(MAX_REPEAT) in str(info.value)
    still_serves(server)


# ----------------------------------------------------------------------------- 4. a non-streamed request's client goes away
def test_a_non_streamed_request_stops_when_its_client_leaves(model, endless):
    with running(model, "-c", "8192", "--parallel", "1") as s:
        body = {"messages": user("Une très longue histoire"), "max_tokens": 8000, "temperature": 1, **endless}
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        deadline = time.monotonic() + 10
        while metric(s, "ms4local_generated_tokens_total") < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.get("/health")[2]["busy"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()  # goes away while its answer is generated
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.get("/health")[2]["busy"] == 0
        assert metric(s, "ms4local_requests_cancelled_total") == 1
        assert metric(s, "ms4local_generated_tokens_total") < 4000
        still_serves(s)


# ----------------------------------------------------------------------------- 5. --max-queue 0
def test_max_queue_zero_serves_the_free_slots_and_queues_none(model, endless):
    with running(model, "-c", "8192", "--parallel", "1", "--max-queue", "0") as s:
        still_serves(s)  # an idle server answers (it refused everything with 429)
        conn, _ = stream(s, {"messages": user("occupé"), "max_tokens": 8000, "temperature": 1, **endless})
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["busy"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, headers, err = s.post("/v1/chat/completions", {"messages": user("encore"), "max_tokens": 2})
        assert_error(status, err, 429, code="queue_full", contains="--max-queue 0")
        conn.close()
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["busy"] and time.monotonic() < deadline:
            time.sleep(0.02)
        still_serves(s)


def test_max_queue_counts_the_waiting_beyond_the_slots(model, endless):
    """--parallel 2 --max-queue 1: two generate, one waits, the fourth gets 429."""
    with running(model, "-c", "8192", "--parallel", "2", "--max-queue", "1") as s:
        long = {"messages": user("occupé"), "max_tokens": 8000, "temperature": 1, **endless}
        first, second = stream(s, long), stream(s, long)
        waiting = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)  # not streamed: it waits
        waiting.request("POST", "/v1/chat/completions", json.dumps(long),
                        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["queue"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, _, err = s.post("/v1/chat/completions", {"messages": user("encore"), "max_tokens": 2})
        assert_error(status, err, 429, code="queue_full")
        waiting.close()  # a queued client that leaves is dropped from the queue
        deadline = time.monotonic() + 5
        while s.get("/health")[2]["queue"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.get("/health")[2]["queue"] == 0
        first[0].close()
        second[0].close()


# ----------------------------------------------------------------------------- Content-Type, --api-key ""
def test_json_sent_as_text_plain_is_read_as_json(server):
    body = json.dumps({"messages": user("hi"), "max_tokens": 2})
    for content_type in ("text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded"):
        status, _, ok = post_raw(server, "/v1/chat/completions", body, content_type)
        assert status == 200 and ok["choices"], ok
    status, _, err = post_raw(server, "/v1/chat/completions", "hello there", "text/plain")
    assert_error(status, err, 400, code="invalid_json")
    still_serves(server)


@pytest.mark.parametrize("key", ["", "   ", " padded ", "clé"])
def test_an_empty_or_unsendable_api_key_is_refused_at_start(model, cli_env, key):
    p = subprocess.run([str(BIN / "ms4local"), "serve", str(model), "--api-key", key], capture_output=True, text=True,
                       env=cli_env, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --api-key"), p.stderr


# ----------------------------------------------------------------------------- sampling fields at their edges
BAD = [
    ("temperature", -0.01), ("temperature", 2.01), ("temperature", "NaN"), ("temperature", "Infinity"),
    ("top_p", 0), ("top_p", 1.5), ("top_p", "NaN"), ("top_k", -1), ("min_p", -0.1), ("min_p", 1.01),
    ("min_p", "NaN"), ("repeat_penalty", 0), ("repeat_penalty", -1), ("repeat_penalty", 10.5),
    ("repeat_penalty", "Infinity"), ("repeat_penalty", "NaN"), ("max_tokens", 0), ("max_tokens", -5),
    ("max_completion_tokens", 0), ("seed", "Infinity"), ("seed", 1.5), ("n", 0), ("n", 2), ("n", 10**12),
    ("logit_bias", {"-1": 1}), ("logit_bias", {"abc": 1}), ("logit_bias", {"1": "NaN"}),
    ("logit_bias", {"1": 1e300}), ("logit_bias", {"99999999999999999999": 1}),
    ("logit_bias", {str(i): 1 for i in range(5000)}), ("stop", ["x"] * 17), ("stop", "y" * (MAX_STOP_CHARS + 1)),
    ("temperature", "hot"), ("top_k", 1.5), ("stop", 5),
]
GOOD = [
    ("temperature", 0), ("temperature", 2), ("top_p", 1), ("top_p", 1e-9), ("top_k", 0), ("top_k", 10**12),
    ("min_p", 0), ("min_p", 1), ("repeat_penalty", 1e-6), ("repeat_penalty", 10), ("seed", -1), ("seed", 2**64),
    ("seed", -(2**70)), ("max_tokens", 10**12), ("logit_bias", {"0": -100, "1": 100}), ("stop", ["z"] * 16),
    ("stop", "w" * MAX_STOP_CHARS), ("n", 1),
]


def edge_body(field: str, value) -> str:
    """A chat body as JSON text; "NaN" and "Infinity" go as Python's json writes them (bare)."""
    text = json.dumps({"messages": user("bord"), "max_tokens": 2, field: value})
    return text.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={str(v)[:20]}" for f, v in BAD])
def test_sampling_fields_beyond_their_edges_are_400(server, field, value):
    status, _, err = post_raw(server, "/v1/chat/completions", edge_body(field, value))
    assert_error(status, err, 400)
    named = "max_tokens" if field == "max_completion_tokens" else field
    assert named in (err["error"]["param"] or "") + err["error"]["message"], err
    if field != "max_completion_tokens":  # a chat-only field
        status, _, err = post_raw(server, "/v1/completions", edge_body(field, value).replace('"messages"', '"prompt": "a", "x"'))
        assert_error(status, err, 400)


@pytest.mark.parametrize("field, value", GOOD, ids=[f"{f}={str(v)[:20]}" for f, v in GOOD])
def test_sampling_fields_at_their_edges_are_served(server, field, value):
    # max_tokens 10**12 answers until the slot's 2048 cells are full: minutes on a loaded 2-core machine.
    timeout = 300 if field == "max_tokens" else 60
    status, _, body = post_raw(server, "/v1/chat/completions", edge_body(field, value), timeout=timeout)
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_server_lives_after_the_edges(server):
    still_serves(server)
    assert metric(server, "ms4local_engine_restarts_total") == 0
