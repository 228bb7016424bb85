"""`ms4local serve` (issue #6) end to end: a real uvicorn server in a subprocess on a loopback port,
driven by the real `openai` client and plain HTTP. Nothing is mocked; the model is the tiny
seeded GGUF of conftest, whose answers are random tokens, so structure is asserted and
grammars make the shape deterministic (tool calls, JSON, a [THINK] block).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import jsonschema
import numpy as np
import openai
import pytest
from PIL import Image

from helpers.serving import KEY, assert_error, running, user
from ms4local import Engine, EngineOptions
from ms4local.server import is_loopback
from quantize import convert
from quantize.synth import TinySpec


def png_data_uri(side: int = 56, seed: int = 0) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(model):
    with running(model, "-c", "4096", "--parallel", "2", "--max-body-size", "256K") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def vocab(model):
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        yield e


# ----------------------------------------------------------------------------- chat
def test_chat_non_streamed(client):
    r = client.chat.completions.create(model="model-F32", messages=user("Bonjour, ça va ?"), max_tokens=6,
                                       temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "model-F32"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client):
    messages = user("Raconte une histoire courte.")
    whole = client.chat.completions.create(model="model-F32", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="model-F32", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the second identical prompt reused the slot's cache: all but the last prompt token
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    assert all(c.usage is None for c in chunks[:-1])


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_reasoning_effort_reaches_the_prompt(client, vocab):
    """The cache of the slot tells where two prompts part: none vs high differ exactly where the
    engine's own renders of the two efforts differ; minimal is none and low/medium are high."""
    messages = user("Combien font 6 fois 7 ? (effort)")
    none = vocab.prompt_tokens(messages, reasoning_effort="none")
    high = vocab.prompt_tokens(messages, reasoning_effort="high")
    assert none != high

    def ask(effort):
        return client.chat.completions.create(model="model-F32", messages=messages, max_tokens=2, temperature=0,
                                              reasoning_effort=effort).usage

    u = ask("none")
    assert u.prompt_tokens == len(none)
    u = ask("high")
    assert u.prompt_tokens == len(high)
    assert u.prompt_tokens_details.cached_tokens == _common(none, high)  # the effort changed the prompt
    for effort in ("low", "medium", "high"):
        u = ask(effort)
        assert u.prompt_tokens == len(high), effort
        assert u.prompt_tokens_details.cached_tokens == len(high) - 1, effort  # the same prompt as before
    u = ask("minimal")
    assert u.prompt_tokens == len(none)
    assert u.prompt_tokens_details.cached_tokens == _common(none, high)
    u = ask("none")
    assert u.prompt_tokens_details.cached_tokens == len(none) - 1


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"},
                                           "unit": {"enum": ["cm", "m"]}},
          "required": ["answer", "sure", "unit"], "additionalProperties": False}


def test_json_schema_output_validates(client):
    for stream in (False, True):
        kw = dict(model="model-F32", messages=user("Réponds en JSON."), max_tokens=120, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)


BOUNDED = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7},
                                            "m": {"type": "integer", "exclusiveMinimum": -4, "maximum": -1}},
           "required": ["n", "m"], "additionalProperties": False}


@pytest.mark.parametrize("schema", [BOUNDED, {"type": "integer", "minimum": 10, "maximum": 20}])
def test_json_schema_integer_bounds_hold_when_sampling(client, schema):
    """Sampled at temperature 1 (the random model would write any digits), every answer is within
    the schema's bounds; a schema whose top level is not an object works too."""
    for seed in range(4):
        r = client.chat.completions.create(model="model-F32", messages=user("Un nombre ?"), max_tokens=60,
                                           temperature=1, seed=seed,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "b", "schema": schema}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_output_is_an_object(client):
    r = client.chat.completions.create(model="model-F32", messages=user("JSON please"), max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may write a long string; what it wrote is still the start of an object
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_reasoning_content_is_separated(client):
    """At high effort the grammar opens with the [THINK] block: what is inside comes back as
    reasoning_content (message and stream deltas), never in content."""
    kw = dict(model="model-F32", messages=user("Pense d'abord."), max_tokens=40, temperature=0, reasoning_effort="high",
              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.reasoning_content  # the [THINK] block was written
    assert "[THINK]" not in (msg.content or "") and "[/THINK]" not in msg.reasoning_content
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == msg.reasoning_content and content == (msg.content or "")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]},
                                                    "days": {"enum": [1, 2, 3]}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_are_parsed_and_streamed(client, choice):
    kw = dict(model="model-F32", messages=user("Quel temps à Paris ?"), max_tokens=80, temperature=0,
              tools=[WEATHER, TIME], tool_choice=choice)
    r = client.chat.completions.create(**kw)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls"
    calls = choice0.message.tool_calls
    assert calls and all(c.type == "function" and c.id for c in calls)
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_weather"]
    for c in calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[c.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(c.function.arguments), schema)
    # streamed: the first delta of a call has its id and name, the arguments follow in pieces
    got: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.index not in got:
                assert d.id and d.function.name
                got[d.index] = {"name": d.function.name, "arguments": ""}
            got[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(g["name"], json.loads(g["arguments"])) for _, g in sorted(got.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_tool_choice_none_shows_the_tools_but_allows_no_call(client, vocab):
    """OpenAI's "none": the model is told about the tools (the prompt equals the one with tools)
    but cannot call one, even when the request itself pushes [TOOL_CALLS] with logit_bias; "auto"
    under the same push does start a call."""
    messages = user("Quel temps à Nice ?")
    calls_id = vocab.tokenize("[TOOL_CALLS]", parse_special=True)
    assert len(calls_id) == 1
    push = {str(calls_id[0]): 100}
    kw = dict(model="model-F32", messages=messages, tools=[WEATHER], max_tokens=8, temperature=0, logit_bias=push)
    auto = client.chat.completions.create(tool_choice="auto", **kw)
    assert auto.choices[0].finish_reason == "tool_calls" or auto.choices[0].message.tool_calls
    none = client.chat.completions.create(tool_choice="none", **kw)
    assert none.usage.prompt_tokens == len(vocab.prompt_tokens(messages, tools=[WEATHER]))
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    assert "[TOOL_CALLS]" not in (none.choices[0].message.content or "")


def test_tool_results_go_back_into_the_conversation(client):
    messages = [*user("Quel temps à Paris ?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 °C, soleil"}]
    r = client.chat.completions.create(model="model-F32", messages=messages, tools=[WEATHER], max_tokens=4)
    assert r.usage.prompt_tokens > 30


def test_logit_bias_forces_and_bans_tokens(client, vocab):
    """+100 on one token makes every sampled token that one (at temperature 1, so the bias and not
    the model decides); -100 on the token greedy picks (every id with its text) makes greedy pick
    another."""
    token = next(t for t in range(300, vocab.n_vocab) if vocab.piece(t).decode("utf-8", "replace").isalpha()
                 and len(vocab.piece(t)) >= 2)

    def ask(bias: dict[int, int], **kw):
        r = client.chat.completions.create(model="model-F32", messages=user("Répète"),
                                           logit_bias={str(k): v for k, v in bias.items()}, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    assert ask({token: 100}, max_tokens=5, temperature=1) == (vocab.piece(token).decode() * 5, "length")
    greedy, finish = ask({}, max_tokens=1, temperature=0)
    if finish == "stop":  # greedy ends at once: ban the end
        banned = [vocab.eos_id]
    else:
        banned = [t for t in range(vocab.n_vocab) if vocab.piece(t).decode("utf-8", "replace") == greedy]
    assert banned
    assert ask(dict.fromkeys(banned, -100), max_tokens=1, temperature=0) != (greedy, finish)


def test_stop_strings_cut_the_answer(client):
    first = client.chat.completions.create(model="model-F32", messages=user("stop test"), max_tokens=16, temperature=0)
    text = first.choices[0].message.content
    assert len(text) > 4
    stop = text[2:4]
    r = client.chat.completions.create(model="model-F32", messages=user("stop test"), max_tokens=16, temperature=0,
                                       stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


# ----------------------------------------------------------------------------- completions, models, health
def test_completions(client):
    r = client.completions.create(model="model-F32", prompt="[INST]Bonjour[/INST]", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.completion_tokens <= 5 and r.usage.prompt_tokens > 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="model-F32", prompt="[INST]Bonjour[/INST]", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_models_health_and_metrics(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["model-F32"]
    meta = models[0].model_extra["meta"]
    assert meta["architecture"] == "mistral4" and meta["parallel"] == 2 and meta["n_ctx"] == 2048
    assert client.models.retrieve("model-F32").id == "model-F32"
    status, _, body = server.get("/v1/models/gpt-4o")
    assert_error(status, body, 404, code="model_not_found")
    status, _, body = server.get("/health", key=None)  # open without a key (load balancers)
    assert status == 200 and body["status"] == "ok"
    status, _, text = server.get("/metrics")
    assert status == 200
    for name in ("ms4local_requests_total{", "ms4local_generated_tokens_total", "ms4local_queue_depth",
                 "ms4local_tokens_per_second", "ms4local_prompt_tokens_cached_total"):
        assert name in text
    generated = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("ms4local_generated_tokens_total")))
    assert generated > 0


# ----------------------------------------------------------------------------- auth and errors
def test_auth(server):
    body = {"messages": user("hi"), "max_tokens": 1}
    status, headers, err = server.post("/v1/chat/completions", body, key=None)
    assert_error(status, err, 401, code="invalid_api_key", contains="missing")
    assert {k.lower(): v for k, v in headers.items()}.get("www-authenticate") == "Bearer"
    status, _, err = server.post("/v1/chat/completions", body, key="sk-wrong")
    assert_error(status, err, 401, code="invalid_api_key", contains="invalid")
    status, _, err = server.get("/metrics", key=KEY[:-1])
    assert_error(status, err, 401)
    status, _, ok = server.post("/v1/chat/completions", body)
    assert status == 200 and ok["choices"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


LONG = "mot " * 3000  # more than the 2048 tokens a slot holds (-c 4096, --parallel 2)


@pytest.mark.parametrize("body, status, code, contains", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "first"}]}, 400, "invalid_prompt", ""),
    ({"messages": user("hi"), "reasoning_effort": "extreme"}, 400, "invalid_value", "reasoning_effort"),
    ({"messages": user("hi"), "n": 2}, 400, "unsupported_value", "n=1"),
    ({"messages": user("hi"), "temperature": 7}, 400, "invalid_value", "temperature"),
    ({"messages": user("hi"), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"messages": []}, 400, "invalid_value", "at least one"),
    ({}, 400, "invalid_value", "messages"),
    ({"messages": "hi"}, 400, "invalid_value", "messages"),
    ({"messages": user("hi"), "tool_choice": "required"}, 400, "invalid_value", "tool_choice needs tools"),
    ({"messages": user("hi"), "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, None, "nope"),
    ({"messages": user("hi"), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, None, "schema"),
    ({"messages": user("hi"), "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     400, "invalid_schema", ""),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400,
     "invalid_content", "input_audio"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
     400, "image_url_not_allowed", "--allow-image-urls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
     400, "image_url_not_allowed", "--allow-local-files"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
     400, "invalid_image_url", "data: URI"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}}]}]},
     400, "no_vision", "no vision projector"),
    ({"messages": user(LONG)}, 400, "context_length_exceeded", "tokens too many"),
    ({"messages": user("hi"), "logit_bias": {"a": 1}}, 400, "invalid_value", "token ids"),
    ({"messages": user("hi"), "logit_bias": {"5": 101}}, 400, "invalid_value", "[-100, 100]"),
    ({"messages": user("hi"), "logit_bias": {"99999999": 1}}, 400, "invalid_prompt", "outside the vocabulary"),
    ({"messages": user("hi"), "model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
])
def test_errors_have_openai_shape_and_status(server, body, status, code, contains):
    got, _, err = server.post("/v1/chat/completions", body)
    assert_error(got, err, status, code=code, contains=contains)


def test_context_overflow_says_by_how_much(server, vocab):
    messages = user(LONG)
    n = len(vocab.prompt_tokens(messages))
    _, _, err = server.post("/v1/chat/completions", {"messages": messages})
    assert f"{n} tokens" in err["error"]["message"] and f"{n - 2048 + 1} tokens too many" in err["error"]["message"]


def test_transport_errors(server):
    status, _, err = server.post("/v1/chat/completions", raw=b"{not json")
    assert_error(status, err, 400, code="invalid_json")
    status, _, err = server.post("/v1/nothing", {})
    assert_error(status, err, 404, code="not_found")
    status, _, err = server.get("/v1/chat/completions")
    assert_error(status, err, 405)
    big = {"messages": user("x" * 300_000)}  # over --max-body-size 256K
    status, _, err = server.post("/v1/chat/completions", big)
    assert_error(status, err, 413, code="request_too_large")
    status, _, err = server.post("/v1/completions", {"prompt": "hi", "logprobs": 3})
    assert_error(status, err, 400, code="unsupported_value")
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="model-F32", messages=[{"role": "user", "content": "x"}],
                                                reasoning_effort="turbo")


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_public_bind_without_key_warns(model):
    """Bound to every address without a key: the warning comes first; the server still serves."""
    with running(model, "--host", "0.0.0.0", key=None) as s:
        pass
    out = s.proc.stdout.read()
    assert "warning: serving on 0.0.0.0 without --api-key" in out


def test_missing_server_extra_says_how_to_install(model, tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from ms4local.cli.main import app\n"
            f"app(['serve', {str(model)!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert "pip install 'ms4local[server]'" in out.stderr and out.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- images
VIS = TinySpec(vocab=2000, vision_layers=3)


@pytest.fixture(scope="module")
def vision_model(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-vision")
    return convert(ckpt(VIS), out=d / "Tiny.gguf", out_type="F32", mmproj_type="F32").output


def test_image_as_data_uri(vision_model):
    with running(vision_model, "-c", "2048", key=None) as s:
        c = s.client()
        text_only = c.chat.completions.create(model="Tiny", messages=user("Décris."), max_tokens=3, temperature=0)
        msg = [{"role": "user", "content": [{"type": "text", "text": "Décris."},
                                            {"type": "image_url", "image_url": {"url": png_data_uri(84)}}]}]
        r = c.chat.completions.create(model="Tiny", messages=msg, max_tokens=3, temperature=0)
        # a 84×84 image is 3×3 merged patches: 9 embeddings, 2 row breaks and [IMG_END] instead of one [IMG]
        assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 9 + 2 + 1 - 1 + 1
        again = c.chat.completions.create(model="Tiny", messages=msg, max_tokens=3, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
        status, _, err = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]})
        assert_error(status, err, 400, code="invalid_image")
        status, _, err = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
        assert_error(status, err, 400, code="image_url_not_allowed")


def test_image_urls_and_local_files_when_allowed(vision_model, tmp_path):
    """With --allow-image-urls and --allow-local-files, an http:// image (from a loopback server in
    this test) and a file:// image give the same prompt as the same picture sent as a data: URI;
    a file over the 20 MiB limit and an unreachable URL are 400s."""
    import http.server
    import threading

    uri = png_data_uri(84, seed=3)
    png = base64.b64decode(uri.split(",", 1)[1])
    (tmp_path / "cat.png").write_bytes(png)
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(21 * 2**20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with running(vision_model, "-c", "2048", "--allow-image-urls", "--allow-local-files", key=None) as s:
            c = s.client()

            def ask(url: str):
                msg = [{"role": "user", "content": [{"type": "text", "text": "Décris."},
                                                    {"type": "image_url", "image_url": {"url": url}}]}]
                return c.chat.completions.create(model="Tiny", messages=msg, max_tokens=3, temperature=0)

            want = ask(uri)
            for url in (f"http://127.0.0.1:{httpd.server_address[1]}/cat.png", (tmp_path / "cat.png").as_uri()):
                got = ask(url)
                assert got.usage.prompt_tokens == want.usage.prompt_tokens
                # the same picture: the slot's cache holds its embeddings already
                assert got.usage.prompt_tokens_details.cached_tokens == want.usage.prompt_tokens - 1
                assert got.choices[0].message.content == want.choices[0].message.content
            for url, code in (((tmp_path / "huge.png").as_uri(), "image_too_large"),
                              ("http://127.0.0.1:9/cat.png", "invalid_image_url")):
                status, _, err = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}]}]})
                assert_error(status, err, 400, code=code)
    finally:
        httpd.shutdown()
