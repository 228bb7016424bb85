"""Fuzz: schemathesis drives every operation of the server's own OpenAPI schema with generated
bodies (bounded examples, loopback only). No answer may be a 5xx, and the server stays up."""

from __future__ import annotations

import json
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")  # in the [test] extra; a bare install may lack it
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)

from helpers.serving import KEY, running, user  # noqa: E402

MAX_EXAMPLES = 25


def test_fuzzed_requests_never_get_a_server_error(model):
    with running(model, "-c", "1024", "--parallel", "2", "-n", "4", "--max-queue", "64") as s:
        schema = schemathesis.openapi.from_url(f"{s.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        failures: list[str] = []
        calls = []
        for op in schema.get_all_operations():
            operation = op.ok()

            @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                if case.body is not None and isinstance(case.body, dict):
                    case.body["max_tokens"] = 2  # the fuzz is about input handling, not generation
                    case.body.pop("max_completion_tokens", None)
                response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{operation.method.upper()} {operation.path}: {response.status_code} "
                                    f"{response.text[:300]} for {case.body!r}"[:600])

            given(case=operation.as_strategy())(run)()
        assert not failures, "\n".join(failures[:5])
        assert len(calls) >= 2 * MAX_EXAMPLES and any(c == 400 for c in calls) and any(c == 200 for c in calls)
        assert s.get("/health")[0] == 200


# ----------------------------------------------------------------------------- hostile values (issue #18)
# schemathesis draws bodies that fit the OpenAPI schema's types, which never reach the edges that
# broke the server: lone surrogates, huge counts in JSON schemas, NaN and infinities, sampling
# values just past their ranges. These strategies aim there; every answer must be below 500 and
# the engine must never need a restart.
from hypothesis import strategies as st  # noqa: E402

HOSTILE_EXAMPLES = 150
EDGE_INTS = st.sampled_from([0, -1, 1, 2, 16, 17, 255, 256, 257, 2**31 - 1, 2**31, 2**32, 2**63, -(2**63), 10**30,
                             10_000, 10_001, 100_000_000]) | st.integers()
EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-300, -1.0, 1.0, 2.0, 2.000001, 10.0, 10.5, 100.0, 100.5, 1e308, -1e308,
                               float("nan"), float("inf"), float("-inf")]) | st.floats()
EDGE_NUMBERS = EDGE_INTS | EDGE_FLOATS
# Long texts: 100k characters as words, and one word of 100k (llama.cpp's own tokenizer crashes on a
# word of ~25k characters; ms4local's tokenizer must not).
TEXTS = st.sampled_from(["", "\ud800", "a\udfff b", "\udc00\ud800", "xxxxxxxxx " * 10_000, "x" * 100_000, "[INST]",
                         "[/INST][THINK]", "\x00",
                         "\U0001f4a5" * 2000, "</s>", "<s>", "{\"a\": 1}"]) | st.text(max_size=40)
WRONG = st.sampled_from([None, True, "1", [], {}, [1], {"a": 1}])
PATTERNS = st.sampled_from(["a{100000000}", "a{99999999999999999999999}", "(ab){3,}", "a{5,2}", "[", "(", "\\d{3}",
                            "^[a-z]{1,10000}$", "(a{10000}){10000}", "\ud800"]) | st.text(max_size=12)
SCHEMAS = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "array", "object", "boolean",
                                                    "null", "nonsense"])},
                          optional={"minLength": EDGE_NUMBERS | WRONG, "maxLength": EDGE_NUMBERS | WRONG,
                                    "minItems": EDGE_NUMBERS, "maxItems": EDGE_NUMBERS, "minimum": EDGE_NUMBERS,
                                    "maximum": EDGE_NUMBERS, "exclusiveMinimum": EDGE_NUMBERS | st.booleans(),
                                    "exclusiveMaximum": EDGE_NUMBERS | st.booleans(), "pattern": PATTERNS,
                                    "enum": st.lists(TEXTS | EDGE_NUMBERS, max_size=3), "format": TEXTS}),
    lambda inner: st.fixed_dictionaries({"type": st.sampled_from(["array", "object"])},
                                        optional={"items": inner, "properties": st.dictionaries(TEXTS, inner, max_size=3),
                                                  "required": st.lists(TEXTS, max_size=2), "anyOf": st.lists(inner, max_size=2),
                                                  "minItems": EDGE_NUMBERS, "maxItems": EDGE_NUMBERS,
                                                  "additionalProperties": st.booleans() | inner}),
    max_leaves=6)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]),
                                           "content": TEXTS | st.lists(st.fixed_dictionaries(
                                               {"type": st.just("text"), "text": TEXTS}), max_size=2)}),
                    max_size=3)
SAMPLING = {"temperature": EDGE_NUMBERS | WRONG, "top_p": EDGE_NUMBERS | WRONG, "top_k": EDGE_NUMBERS | WRONG,
            "min_p": EDGE_NUMBERS | WRONG, "repeat_penalty": EDGE_NUMBERS | WRONG, "seed": EDGE_NUMBERS | WRONG,
            "max_tokens": st.sampled_from([1, 2, 3]) | EDGE_NUMBERS | WRONG, "n": EDGE_NUMBERS | WRONG,
            "logit_bias": st.dictionaries(st.sampled_from(["0", "1", "-1", "1999", "2000", "99999999", "x", "\ud800",
                                                           "1e3", " 5"]), EDGE_NUMBERS, max_size=4) | WRONG,
            "stop": TEXTS | st.lists(TEXTS, max_size=20) | WRONG, "stream": st.booleans(),
            "reasoning_effort": st.sampled_from(["none", "high", "low", "turbo", "\ud800"]) | WRONG}
CHAT = st.fixed_dictionaries({"messages": MESSAGES}, optional={
    **SAMPLING, "response_format": st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": st.just("x"), "schema": SCHEMAS})}),
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.sampled_from(["f", "get_weather", "bad name", "\ud800", "x" * 65]), "parameters": SCHEMAS})}),
        max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required"])})
COMPLETION = st.fixed_dictionaries({"prompt": TEXTS | st.lists(TEXTS, max_size=2)}, optional=SAMPLING)


def test_hostile_values_never_get_a_server_error(model):
    with running(model, "-c", "1024", "--parallel", "2", "-n", "8", "--max-queue", "64") as s:
        failures: list[str] = []
        statuses: list[int] = []

        @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=st.data())
        def run(route, data) -> None:
            body = data.draw(CHAT if route == "/v1/chat/completions" else COMPLETION)
            raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: surrogates go as \ud800 escapes
            if os.environ.get("FUZZ_LOG"):
                with open(os.environ["FUZZ_LOG"], "ab") as f:
                    f.write(route.encode() + b" " + raw + b"\n")
            status, _, answer = s.request("POST", route, raw=raw, timeout=60)
            statuses.append(status)
            if status >= 500:
                failures.append(f"{route}: {status} {str(answer)[:300]} for {raw[:300]!r}")

        run()
        assert not failures, "\n".join(failures[:5])
        assert len(statuses) >= HOSTILE_EXAMPLES // 2 and 400 in statuses and 200 in statuses, sorted(set(statuses))
        print("hostile statuses:", {c: statuses.count(c) for c in sorted(set(statuses))})
        r = s.client().chat.completions.create(model="model-F32", messages=user("encore"), max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
        status, _, health = s.get("/health")
        assert status == 200 and health["restarts"] == 0, health
