"""ms4local against llama.cpp's own C++ programs on the same GGUF, threads, context and --parallel.

    make bench-llamacpp        (or: .venv/bin/python bench/llamacpp_bench.py [--quick] --help)

Builds `llama-server` and `llama-bench` once from the llama.cpp that llama-cpp-python vendors
(bench/llamacpp_build.py; cached), makes one generated Mistral-Small-4-shaped checkpoint as Q8_0, then:

  a. `ms4local serve --parallel 8` vs `llama-server --parallel 8` (both running, one loaded at a
     time): 1, 4 and 8 streaming clients, each sending ROUNDS chat requests in a row; the same
     prompts, max_tokens, temperature 0, and the end-of-sequence token banned (logit_bias -100) so
     both generate exactly max_tokens. One client code for both (httpx, SSE lines parsed with
     json): tokens are counted from the final usage chunk, time to first token is the first chunk
     carrying any generated text. Runs alternate a/b/b/a so the shared machine's noise hits both;
     medians of the repeats and the ratio ms4local / llama.cpp.
  b. the engine (`Engine.generate`) prefill of 512 tokens and decode of 128 tokens at depth 512 vs
     `llama-bench -p 512 -n 128 -d 512` (prefill: 512 new tokens after 512 cached; decode: 128
     single-token decodes after 512).
  c. `ms4local chat --json` (its reported timings) vs `llama-bench -p <its prompt tokens> -n 128`.

Writes bench/results/llamacpp.md. About 10 minutes on 2 cores; `--quick` for a ~3 minute check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx2 as httpx  # noqa: E402  (the HTTP client the openai package ships with)

from llamacpp_build import BuildError, build, llama_cpp_python_version  # noqa: E402
from quantize import convert  # noqa: E402
from quantize.synth import make_checkpoint  # noqa: E402

from server_bench import BIN, SHAPE, free_port  # noqa: E402  (bench-server's model; bench/ is on sys.path)


class Server:
    """A server process on 127.0.0.1 at a free port, up once /health answers 200."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name, self.port = name, free_port()
        self.cmd = cmd + ["--host", "127.0.0.1", "--port", str(self.port)]
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise SystemExit(f"{name} did not come up in 300 s; see {log}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def stream_one(client: httpx.Client, url: str, prompt: str, n: int, eos: int) -> tuple[int, float, float]:
    """(completion tokens from usage, time to first generated text, latency) of one streamed chat request."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n,
            "temperature": 0.0, "seed": 1, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(eos): -100}}
    t0 = time.perf_counter()
    ttft = None
    tokens = None
    # A fresh connection per request: llama-server closes idle keep-alive connections, which a
    # pooled client only notices when its next request fails.
    with client.stream("POST", url + "/v1/chat/completions", json=body, headers={"Connection": "close"}) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"{url}: {chunk['error']}")
            if ttft is None:
                for c in chunk.get("choices") or ():
                    d = c.get("delta") or {}
                    if d.get("content") or d.get("reasoning_content") or d.get("tool_calls"):
                        ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None:
        raise SystemExit(f"{url}: no usage in the stream")
    return tokens, ttft if ttft is not None else time.perf_counter() - t0, time.perf_counter() - t0


def load(url: str, clients: int, rounds: int, n: int, eos: int) -> dict:
    """`clients` concurrent clients, `rounds` requests each: aggregate t/s and median TTFT."""
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=16)) as client:
        stream_one(client, url, "warm-up", 2, eos)

        def worker(c: int) -> list[tuple[int, float, float]]:
            return [stream_one(client, url, f"Client {c}, question {r}: tell me a long story about the sea.", n, eos)
                    for r in range(rounds)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            res = [x for xs in pool.map(worker, range(clients)) for x in xs]
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in res)
    return {"tokens": tokens, "expected": clients * rounds * n, "tps": tokens / wall,
            "ttft": statistics.median(r[1] for r in res)}


def llama_bench(exe: Path, model: Path, threads: int, reps: int, args: list[str]) -> dict[str, float]:
    """llama-bench's average t/s per test ('pp' / 'tg'), from its JSON output."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-r", str(reps), "-o", "json", *args],
                         capture_output=True, text=True, check=True).stdout
    res = {}
    for t in json.loads(out):
        res["pp" if t["n_prompt"] and not t["n_gen"] else "tg"] = float(t["avg_ts"])
    return res


def engine_at_depth(model: Path, threads: int, ctx: int, depth: int, n_prompt: int, n_gen: int, eos: int) -> dict[str, float]:
    """The engine's prefill t/s of `n_prompt` tokens after `depth` cached ones, and decode t/s of
    `n_gen` single-token decodes after `depth` (the EOS token banned, as llama-bench never samples)."""
    from ms4local import Engine, EngineOptions
    from ms4local.engine import Done, Sampling

    with Engine(model, EngineOptions(ctx_size=ctx, threads=threads)) as e:
        ids = e.tokenize("The quick brown fox jumps over the lazy dog. " * 400, add_special=True)
        prompt = ids[: depth + n_prompt]

        def done(p: list[int], n: int) -> Done:
            out = [ev for ev in e.generate(p, Sampling(temperature=0.0, max_tokens=n, logit_bias=((eos, -100.0),)))
                   if isinstance(ev, Done)]
            return out[-1]

        e.reset()
        done(prompt[:depth], 1)
        d = done(prompt, 1)  # reuses the `depth` cached ids, evaluates the rest
        pp = d.timings.prompt_eval_tokens / d.timings.prompt_seconds
        e.reset()
        # n_gen + 1 samples = n_gen decodes (the first sample reads the prompt's logits)
        d = done(prompt[:depth], n_gen + 1)
        tg = (d.usage.completion_tokens - 1) / d.timings.decode_seconds
    return {"pp": pp, "tg": tg}


def chat_json(model: Path, threads: int, ctx: int, prompt: str, n: int) -> dict:
    out = subprocess.run([str(BIN / "ms4local"), "chat", str(model), "-p", prompt, "--json", "-n", str(n),
                          "--temp", "0", "-t", str(threads), "-c", str(ctx)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def interleaved(reps: int, name: str, ours: Callable[[], dict[str, float]],
                theirs: Callable[[list[dict[str, float]]], dict[str, float]],
                log: Callable[[str], None]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """`reps` runs of each side, a/b then b/a in turn, so a slow spell of the machine hits both;
    `theirs` sees ours so far (to measure what ours did)."""
    a: list[dict[str, float]] = []
    b: list[dict[str, float]] = []
    for r in range(reps):
        for who in ("ab" if r % 2 == 0 else "ba"):
            if who == "a":
                a.append(ours())
                log(f"{name}: {a[-1]}")
            else:
                b.append(theirs(a))
                log(f"llama-bench: {b[-1]}")
    return a, b


def ratio_table(ours: list[dict[str, float]], theirs: list[dict[str, float]], prefill: str, decode: str) -> list[str]:
    """Markdown rows of the medians' prefill ('pp') and decode ('tg') t/s and their ratios."""
    rows = ["| measure | ms4local t/s | llama-bench t/s | ratio |", "| --- | ---: | ---: | ---: |"]
    for label, key in ((prefill, "pp"), (decode, "tg")):
        a, b = median([x[key] for x in ours]), median([x[key] for x in theirs])
        rows.append(f"| {label} | {a:.1f} | {b:.1f} | **{a / b:.2f}** |")
    return rows + [""]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=8192, help="-c of both servers (split over --parallel slots)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client per run")
    ap.add_argument("--repeats", type=int, default=6, help="a/b pairs per client count")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds (~3 min); skips c")
    ap.add_argument("--only", default="abc", help="which parts to run (a, b, c)")
    ap.add_argument("--model", type=Path, help="use this GGUF instead of generating one")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "llamacpp.md")
    args = ap.parse_args()
    # `ms4local serve` / `chat` run this checkout's code
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.quick:
        args.repeats, args.rounds = 2, 2
        args.only = args.only.replace("c", "")
    clients = [int(c) for c in args.clients.split(",")]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        bindir = build(["llama-server", "llama-bench"], log=log)
    except BuildError as e:
        raise SystemExit(f"error: {e}") from None
    ver = llama_cpp_python_version()
    T = args.threads
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ms4local-llamacpp-bench-") as tmp:
        tmpd = Path(tmp)
        if args.model:
            model = args.model
        else:
            log("generating the model")
            model = convert(make_checkpoint(tmpd / "ckpt", SHAPE), out=tmpd / "Bench-Q8_0.gguf", out_type="Q8_0",
                            threads=T, quant_report=False).output
        size = model.stat().st_size
        from ms4local import Engine, EngineOptions
        with Engine(model, EngineOptions(vocab_only=True)) as e:
            eos = e.eos_id
        head = [
            "# ms4local vs llama.cpp's own programs (`make bench-llamacpp`)", "",
            f"{time.strftime('%Y-%m-%d %H:%M')} UTC. Machine: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores (shared with other work: medians of interleaved runs), CPU only; "
            f"{T} threads everywhere. llama.cpp: the sources vendored by llama-cpp-python {ver}, built by "
            "bench/llamacpp_build.py (CPU, Release).", "",
            f"Model: generated Mistral-Small-4-shaped checkpoint ({SHAPE.layers} layers, hidden {SHAPE.hidden}, "
            f"{SHAPE.experts} experts top-{SHAPE.top_k}, MLA q_lora {SHAPE.q_lora} / kv_lora {SHAPE.kv_lora}, "
            f"vocab {SHAPE.vocab}) as Q8_0, {size / 2**20:.0f} MiB. Ratios are ms4local / llama.cpp "
            "(goal ≥ 1.0, floor 0.95).", ""]
        lines += head

        if "a" in args.only:
            common = ["-c", str(args.ctx), "-t", str(T), "-b", "512", "-ub", "512"]
            ours_cmd = [str(BIN / "ms4local"), "serve", str(model), "--parallel", str(args.parallel), *common]
            theirs_cmd = [str(bindir / "llama-server"), "-m", str(model), "-np", str(args.parallel), *common,
                          "--no-warmup", "--no-webui"]
            servers = [Server("ms4local", ours_cmd, tmpd / "ms4local.log"),
                       Server("llama-server", theirs_cmd, tmpd / "llama-server.log")]
            res: dict[tuple[str, int], list[dict]] = {}
            try:
                for r in range(args.repeats):
                    for c in clients:
                        for s in (servers if (r + c) % 2 == 0 else servers[::-1]):
                            x = load(s.url, c, args.rounds, args.tokens, eos)
                            if x["tokens"] != x["expected"]:
                                raise SystemExit(f"{s.name}: {x['tokens']} tokens, expected {x['expected']}")
                            res.setdefault((s.name, c), []).append(x)
                            log(f"repeat {r + 1}, {c} clients, {s.name}: {x['tps']:.1f} t/s, TTFT {x['ttft'] * 1000:.0f} ms")
            finally:
                for s in servers:
                    s.close()
            lines += ["## a. `ms4local serve` vs `llama-server`", "",
                      f"`{' '.join(['ms4local serve MODEL', '--parallel', str(args.parallel), *common])}` vs "
                      f"`{' '.join(['llama-server -m MODEL', '-np', str(args.parallel), *common, '--no-warmup', '--no-webui'])}`. "
                      f"Each client sends {args.rounds} streamed chat requests in a row (max_tokens {args.tokens}, "
                      "temperature 0, EOS banned with logit_bias so every request generates max_tokens; tokens from "
                      f"the usage chunk); {args.repeats} interleaved runs per row, medians.", "",
                      "| clients | ms4local t/s | llama-server t/s | ratio | ms4local TTFT ms | llama-server TTFT ms | TTFT ratio (llama/ours) |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for c in clients:
                a, b = res[("ms4local", c)], res[("llama-server", c)]
                ta, tb = median([x["tps"] for x in a]), median([x["tps"] for x in b])
                fa, fb = median([x["ttft"] for x in a]), median([x["ttft"] for x in b])
                lines.append(f"| {c} | {ta:.1f} | {tb:.1f} | **{ta / tb:.2f}** | {fa * 1000:.0f} | {fb * 1000:.0f} | "
                             f"**{fb / fa:.2f}** |")
            lines += ["", "Per-run t/s (ms4local / llama-server): " + "; ".join(
                f"{c} clients: " + ", ".join(f"{x['tps']:.0f}" for x in res[("ms4local", c)]) + " / "
                + ", ".join(f"{x['tps']:.0f}" for x in res[("llama-server", c)]) for c in clients), ""]

        reps = 2 if args.quick else 5
        if "b" in args.only:
            ours, theirs = interleaved(reps, "engine", lambda: engine_at_depth(model, T, 2048, 512, 512, 128, eos),
                                       lambda _ours: llama_bench(bindir / "llama-bench", model, T, 1,
                                                                 ["-p", "512", "-n", "128", "-d", "512", "-b", "512",
                                                                  "-ub", "512"]), log)
            lines += ["## b. Engine vs `llama-bench` at depth 512", "",
                      f"`Engine.generate` (prefill: 512 new tokens after 512 cached; decode: 128 decodes after a "
                      f"512-token prompt, EOS banned) vs `llama-bench -m MODEL -t {T} -r 1 -p 512 -n 128 -d 512 -b 512 "
                      f"-ub 512`; {reps} interleaved runs, medians.", "",
                      *ratio_table(ours, theirs, "prefill 512 @ depth 512", "decode 128 @ depth 512")]

        if "c" in args.only:
            prompt = "Tell me about the sea. " * 100

            def chat_run() -> dict[str, float]:
                t = chat_json(model, T, 2048, prompt, 128)["timings"]
                return {"pp": t["prompt_eval_tokens"] / t["prompt_seconds"], "tg": t["decode_tps"],
                        "n_prompt": t["prompt_eval_tokens"], "n_gen": t["decoded_tokens"]}

            def bench_run(ours_so_far: list[dict[str, float]]) -> dict[str, float]:
                n_p = int(ours_so_far[-1]["n_prompt"]) if ours_so_far else 512
                n_g = int(ours_so_far[-1]["n_gen"]) if ours_so_far else 128
                # prefill from an empty context; decode after the prompt (-d), as chat does
                pp = llama_bench(bindir / "llama-bench", model, T, 1, ["-p", str(n_p), "-n", "0", "-b", "512",
                                                                     "-ub", "512"])
                tg = llama_bench(bindir / "llama-bench", model, T, 1, ["-p", "0", "-n", str(n_g), "-d", str(n_p),
                                                                     "-b", "512", "-ub", "512"])
                return {**pp, **tg}

            ours, theirs = interleaved(reps, "chat --json", chat_run, bench_run, log)
            lines += ["## c. `ms4local chat --json` vs `llama-bench`", "",
                      f"`ms4local chat MODEL -p '<{len(prompt)} characters>' --json -n 128 --temp 0 -t {T} -c 2048` "
                      f"({ours[0]['n_prompt']} prompt tokens, {ours[0]['n_gen']} tokens generated: chat cannot ban EOS, so llama-bench decodes as many) — "
                      "its `timings` (prefill: prompt tokens / prompt seconds; decode: `decode_tps`, which also counts "
                      "sampling and detokenizing) vs `llama-bench -p <those prompt tokens> -n 0` (prefill) and "
                      "`llama-bench -p 0 -n <those generated tokens> -d <those prompt tokens>` (decode after the "
                      f"prompt), `-b 512 -ub 512 -t {T} -r 1`; {reps} interleaved runs, medians.", "",
                      *ratio_table(ours, theirs, "prefill", "decode")]

    tail = args.out.read_text().split("\n## What each change bought", 1) if args.out.exists() else [""]
    text = "\n".join(lines)
    if len(tail) == 2:  # keep the hand-written history of the server changes
        text += "\n## What each change bought" + tail[1]
    tmp_out = args.out.with_suffix(".md.tmp")
    tmp_out.write_text(text.rstrip() + "\n")
    os.replace(tmp_out, args.out)
    print(text)


if __name__ == "__main__":
    main()
