"""/metrics in Prometheus' text format: the scheduler's counters and gauges under their `ms4local_*` names.

The names and labels are a public interface (dashboards and alerts read them), so they are all
written here, the endpoint label included.
"""

from __future__ import annotations

from .scheduler import Scheduler

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def endpoint_of(path: str) -> str:
    """The `endpoint` label of a request to `path`: the route, or "other" (a label per unknown path
    would let any client grow the metrics without bound)."""
    return path if path in ENDPOINTS else "other"


def prometheus(s: Scheduler) -> str:
    """The text a scrape of /metrics gets."""
    m = s.metrics
    lines = ["# HELP ms4local_requests_total HTTP requests by endpoint and status.",
             "# TYPE ms4local_requests_total counter"]
    for (endpoint, status), n in sorted(m.requests.items()):
        lines.append(f'ms4local_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    for name, kind, help_, value in (
            ("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", m.prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens reused from a slot's KV cache.", m.cached_tokens),
            ("generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens),
            ("decode_steps_total", "counter", "llama_decode steps (each carries every busy slot).", m.decode_steps),
            ("requests_rejected_queue_full_total", "counter", "Requests refused with 429.", m.rejected_queue_full),
            ("requests_cancelled_total", "counter", "Generations stopped by a client going away.", m.cancelled),
            ("engine_restarts_total", "counter", "Times the slots were rebuilt after an unexpected error.", s.restarts),
            ("queue_depth", "gauge", "Requests waiting for a slot.", s.queue_depth),
            ("slots_busy", "gauge", "Slots generating now.", s.busy_slots),
            ("slots_total", "gauge", "Slots (--parallel).", s.n_slots),
            ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.", round(m.tokens_per_second(), 3)),
            ("ready", "gauge", "1 when the model is loaded and requests are accepted.",
             int(s.state == "ready" and not s.draining))):
        lines += [f"# HELP ms4local_{name} {help_}", f"# TYPE ms4local_{name} {kind}", f"ms4local_{name} {value}"]
    return "\n".join(lines) + "\n"
