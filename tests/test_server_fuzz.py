"""Fuzz: schemathesis drives every operation of the server's own OpenAPI schema with generated
bodies (bounded examples, loopback only). No answer may be a 5xx, and the server stays up."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")  # in the [test] extra; a bare install may lack it
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)

from test_server import KEY, running  # noqa: E402

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def model(ckpt, gguf_file):
    return gguf_file(ckpt(), "F32")


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
