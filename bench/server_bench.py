"""Server benchmark: aggregate generated tokens/s and request latency of `ms4local serve` for 1, 4
and 8 concurrent streaming clients, with --parallel 1 (one request at a time) and --parallel 8
(up to 8 conversations in one llama_decode batch).

    make bench-server          (or: .venv/bin/python bench/server_bench.py --help)

The model is a generated Mistral-Small-4-shaped checkpoint (quantize.synth) converted to Q8_0,
big enough that a decode step costs real compute, small enough for a few minutes on 2 cores. Each
client sends ROUNDS streaming chat requests one after another (different prompts, up to N tokens
each, counted from usage), through the real `openai` client running on the same machine (so the
clients' own SSE parsing shares the cores with the server). Writes bench/results/server.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from quantize import convert  # noqa: E402
from quantize.synth import TinySpec, make_checkpoint  # noqa: E402

SHAPE = TinySpec(layers=4, hidden=1024, heads=8, q_lora=256, kv_lora=256, nope=64, rope=64, v_dim=64,
                 experts=16, top_k=4, moe_inter=512, inter=2048, vocab=8192, chat_template=True, seed=11)
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, parallel: int, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "ms4local"), "serve", str(model), "--port", str(port), "--parallel",
                             str(parallel), "-c", str(ctx), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    for _ in range(600):
        try:
            client.models.list()
            import urllib.request
            with urllib.request.urlopen(url + "/health") as r:
                if r.status == 200:
                    return proc, url
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def one(client: openai.OpenAI, prompt: str, n: int) -> tuple[float, int, float]:
    """(latency s, completion tokens, time to first token s) of one streamed request."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    for chunk in client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=n, temperature=0.8, seed=1, stream=True,
                                                stream_options={"include_usage": True}):
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - t0, tokens, ttft or 0.0


def run(url: str, clients: int, rounds: int, n: int) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    one(client, "warm-up", 4)

    def worker(c: int) -> list[tuple[float, int, float]]:
        return [one(client, f"Client {c}, question {r}: tell me a long story about the sea.", n) for r in range(rounds)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(worker, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "ttft": statistics.median(r[2] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--parallel", default="1,8")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "bench.gguf"
        convert(make_checkpoint(Path(tmp) / "ckpt", SHAPE), out=model, out_type="Q8_0")
        size = model.stat().st_size
        rows = []
        for parallel in [int(p) for p in args.parallel.split(",")]:
            proc, url = start(model, parallel, args.threads, args.ctx)
            try:
                for clients in [int(c) for c in args.clients.split(",")]:
                    r = run(url, clients, args.rounds, args.tokens)
                    r["parallel"] = parallel
                    rows.append(r)
                    print(f"--parallel {parallel}, {clients} clients: {r['tps']:.1f} t/s, p50 {r['p50']:.2f} s, "
                          f"p99 {r['p99']:.2f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    lines = ["# `ms4local serve`: concurrent streaming clients", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, CPU only. "
             f"Model: generated Mistral-Small-4-shaped checkpoint ({SHAPE.layers} layers, hidden {SHAPE.hidden}, "
             f"{SHAPE.experts} experts top-{SHAPE.top_k}, vocab {SHAPE.vocab}), Q8_0, {size / 2**20:.0f} MiB; "
             f"-c {args.ctx}. Each client sends {args.rounds} streamed requests of up to {args.tokens} tokens "
             "in a row (the openai client; tokens counted from usage).", "",
             "| --parallel | clients | requests | tokens | aggregate t/s | p50 latency (s) | p99 latency (s) | median TTFT (s) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['parallel']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tps']:.1f} | "
                     f"{r['p50']:.2f} | {r['p99']:.2f} | {r['ttft']:.2f} |")
    lines.append("")
    for parallel in sorted({r["parallel"] for r in rows}):
        base = next((r for r in rows if r["parallel"] == parallel and r["clients"] == 1), None)
        top = max((r for r in rows if r["parallel"] == parallel), key=lambda r: r["clients"])
        if base and top is not base:
            lines.append(f"- --parallel {parallel}: {top['clients']} clients / 1 client aggregate throughput = "
                         f"**{top['tps'] / base['tps']:.2f}×**")
    lines += ["", "Goal (issue #6): 8 clients ≥ 1 client in aggregate throughput, higher with --parallel 8; "
              "no errors (any error aborts the run)."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
