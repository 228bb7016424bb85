"""One-pass quantization vs the two-step route, on a checkpoint shaped like Mistral Small 4.

Routes, each timed in its own process (peak RSS and CPU from that process and its children):
  a   ms4local in one pass: `quantize.convert(checkpoint, out_type=T)` (the quantization report on,
      as `ms4local quantize` runs it; a-noreport is the same with quant_report=False)
  b   the two-step route: a BF16 GGUF first (`convert(checkpoint, out_type="BF16")`), then llama.cpp's
      own quantizer on it (`convert(bf16.gguf, out_type=T)` runs llama_model_quantize); the BF16 file
      is written once and its cost is counted in b for each type
  c   reading the source once (`cat` of the weight files to /dev/null)

The checkpoint has the real model's shapes (hidden 4096, 128 experts × 2048, MLA 1024/256, 32 heads,
nope/rope 64, v 128, vocab 131072) and its storage (FP8 E4M3 weights with per-expert scales for the
stacks and per-tensor scales elsewhere; embeddings, norms, router and lm_head BF16), but only
--layers layers. Values are drawn from a pool of normally distributed codes (generating 3e9 fresh
FP8 values would take longer than the benchmark); the quantizers do not care.

Page cache: the machine's RAM holds the source and the BF16 file, so every route reads warm data and
c is a memory-speed read. On the real model (~120 GB of FP8, a 240 GB BF16 file) nothing stays
cached and b moves 2 × 240 GB more through the disk than a; the "I/O" column counts those bytes.

    .venv/bin/python bench/quantize_bench.py [--layers 1] [--types Q8_0,Q4_K_M] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quantize.md"
GOALS = {"Q8_0": 0.6, "Q4_K_M": 0.9}
RSS_GOAL = 2 * 10**9
POOL = 1 << 25  # 32 Mi codes per dtype pool


# --- the checkpoint --------------------------------------------------------------------------------

def spec(layers: int, dtype: str):
    from quantize.synth import TinySpec

    return TinySpec(layers=layers, hidden=4096, heads=32, q_lora=1024, kv_lora=256, nope=64, rope=64, v_dim=128,
                    experts=128, top_k=4, shared=1, moe_inter=2048, inter=12288, first_dense=0, vocab=131072,
                    dtype=dtype, max_pos=262144, orig_ctx=8192)


def write_checkpoint(directory: Path, s) -> int:
    """config.json, tokenizer.json and model.safetensors for spec `s`, written a slice at a time.

    Storage as in the FP8 release: linear weights and expert stacks F8_E4M3 with `weight_scale_inv`
    (per tensor, per expert for stacks) and `activation_scale`; embeddings, lm_head, norms, router BF16.
    With s.dtype == "BF16" everything is BF16. Returns the weight bytes."""
    from quantize.synth import config_json, text_tensors, to_bf16_bits, to_fp8_bits, tokenizer_json, v15_tekken

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config_json(s), indent=2))
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(v15_tekken(s.vocab)), ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True}))
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(POOL, dtype=np.float32)
    fp8_pool = to_fp8_bits(normal * np.float32(448 / 5.5))  # ±5.5σ spans the E4M3 range
    bf16_pool = to_bf16_bits(normal * np.float32(0.02))
    fp8 = s.dtype.startswith("FP8")

    entries: list[tuple[str, str, tuple[int, ...], object]] = []  # name, dtype, shape, producer
    for name, shape, kind in text_tensors(s):
        full = "language_model." + name
        if fp8 and kind in ("linear", "experts") and not name.startswith("lm_head"):
            base = full[: -len(".weight")] if full.endswith(".weight") else full
            scale_name, act_name = (base + ".weight_scale_inv", base + ".activation_scale") if full.endswith(
                ".weight") else (full + "_scale_inv", full + "_activation_scale")
            entries.append((full, "F8_E4M3", shape, ("pool", fp8_pool)))
            per = (shape[0], 1, 1) if kind == "experts" else ()
            sigma = 1 / math.sqrt(shape[-1])
            scales = (np.full(per, 5.5 * sigma / 448, np.float32) * (1 + 0.1 * rng.random(per, dtype=np.float32)))
            entries.append((scale_name, "F32", per, ("array", scales.astype("<f4"))))
            entries.append((act_name, "F32", (shape[0],) if kind == "experts" else (),
                            ("array", np.ones((shape[0],) if kind == "experts" else (), "<f4"))))
        elif kind == "norm":
            entries.append((full, "BF16", shape, ("array", to_bf16_bits(1 + 0.1 * rng.standard_normal(shape)))))
        else:
            entries.append((full, "BF16", shape, ("pool", bf16_pool)))

    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = size[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        k = 0
        for _, _, shape, (how, data) in entries:
            if how == "array":
                f.write(np.ascontiguousarray(data).tobytes())
                continue
            left = math.prod(shape)
            while left:  # slices of the pool, each starting elsewhere
                n = min(left, POOL // 2)
                start = (k * 7919 * 4096) % (POOL - n)
                f.write(data[start:start + n])
                left -= n
                k += 1
    return offset


# --- one measured process per route -------------------------------------------------------------------

@dataclass
class Measured:
    wall: float
    cpu: float  # user + system seconds of the process and its children
    peak: int  # bytes: max RSS of the process or any child (llama.cpp's quantizer runs in one)
    phases: dict[str, float] = field(default_factory=dict)


def worker(job: dict) -> dict:
    """Runs in a forked child: one route, with its phase timings."""
    from quantize import convert

    phases = {}
    t0 = time.perf_counter()
    if job["route"] == "a":
        convert(job["src"], out=job["out"], out_type=job["type"], threads=job["threads"],
                quant_report=job.get("report", True))
    elif job["route"] == "bf16":
        convert(job["src"], out=job["out"], out_type="BF16", threads=job["threads"], quant_report=False)
    elif job["route"] == "requant":
        convert(job["src"], out=job["out"], out_type=job["type"], threads=job["threads"])
    phases["total"] = time.perf_counter() - t0
    return phases


WORKER = """
import json, os, sys, time
job = json.loads(sys.argv[1])
sys.path.insert(0, job["bench_dir"])
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:  # fresh rusage: ru_maxrss of this child is the route's own peak, imports included
    code = 1
    try:
        import quantize_bench
        phases = quantize_bench.worker(job)
        with open(job["phases_file"], "w") as f:
            json.dump(phases, f)
        code = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
print(json.dumps({"status": os.waitstatus_to_exitcode(status), "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                  "peak_kib": ru.ru_maxrss}))
"""


def measure(job: dict, scratch: Path) -> Measured:
    job = {**job, "bench_dir": str(Path(__file__).parent), "phases_file": str(scratch / "phases.json")}
    p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"route {job['route']} failed:\n{p.stderr[-4000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if r["status"] != 0:
        sys.exit(f"route {job['route']} failed:\n{p.stderr[-4000:]}")
    phases = json.loads(Path(job["phases_file"]).read_text())
    return Measured(r["wall"], r["cpu"], r["peak_kib"] * 1024, phases)


def read_once(src: Path) -> Measured:
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Measured(time.perf_counter() - t0, cpu, after.ru_maxrss * 1024)


# --- where the one-pass time goes ---------------------------------------------------------------------

def profile(src: Path, types: list[str], threads: int, scratch: Path) -> list[tuple[str, str, float]]:
    """Each stage of the one-pass pipeline timed alone on real-shape expert slices, scaled to the whole
    checkpoint. Returns (stage, detail, seconds for the whole checkpoint) rows."""
    import zlib

    from gguf import GGMLQuantizationType as T

    from quantize.convert import convert
    from quantize.quants import Encoder
    from quantize.report import Report
    from quantize.source import FP8_E4M3FN, SafetensorsSource, decode

    source = SafetensorsSource(src)
    refs = list(source.refs.values())
    by_dtype: dict[str, int] = {}
    for r in refs:
        by_dtype[r.dtype] = by_dtype.get(r.dtype, 0) + math.prod(r.shape)
    stack = next(r for r in refs if r.name.endswith("gate_up_proj"))
    n = 4
    raws = [source.read_raw(stack.name, e * stack.nbytes // stack.shape[0], stack.nbytes // stack.shape[0])
            for e in range(n)]
    inner = stack.shape[1:]
    per = math.prod(inner) * n
    rows: list[tuple[str, str, float]] = []

    def timed(fn, reps: int = 1) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    t = timed(lambda: [source.read_raw(stack.name, e * stack.nbytes // stack.shape[0], stack.nbytes // stack.shape[0])
                       for e in range(n)])
    total_bytes = sum(r.nbytes for r in refs)
    rows.append(("read (page cache)", f"{per / t / 1e6:.0f} MB/s of FP8", t / per * total_bytes))
    fp8_n, bf16_n = by_dtype.get("F8_E4M3", 0), by_dtype.get("BF16", 0)
    scale = np.float32(0.001)
    if fp8_n:
        t = timed(lambda: [decode(r, "F8_E4M3", inner) for r in raws])
        rows.append(("FP8 decode (table lookup)", f"{per / t / 1e6:.0f} M/s, 1 thread", t / per * fp8_n))
        x = decode(raws[0], "F8_E4M3", inner)
        t = timed(lambda: [x * scale for _ in range(n)])
        rows.append(("FP8 scale multiply", f"{per / t / 1e6:.0f} M/s, 1 thread", t / per * fp8_n))
        # Candidate fix: fold the scale into the 256-entry table and decode with np.take (one pass).
        table = FP8_E4M3FN * scale
        codes = [np.frombuffer(r, np.uint8) for r in raws]
        t = timed(lambda: [np.take(table, c) for c in codes])
        rows.append(("  candidate: np.take on a scaled table", f"{per / t / 1e6:.0f} M/s, 1 thread", t / per * fp8_n))
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            def split_take() -> None:
                out = np.empty(codes[0].size, np.float32)
                for c in codes:
                    step = -(-c.size // threads)
                    list(pool.map(lambda a: np.take(table, c[a:a + step], out=out[a:a + step]),
                                  range(0, c.size, step)))
            t = timed(split_take)
        rows.append((f"  candidate: the same on {threads} threads", f"{per / t / 1e6:.0f} M/s", t / per * fp8_n))
    if bf16_n:
        emb = next(r for r in refs if r.name.endswith("embed_tokens.weight"))
        braw = source.read_raw(emb.name, 0, min(emb.nbytes, 64 << 20))
        t = timed(lambda: decode(braw, "BF16", (len(braw) // 2,)))
        rows.append(("BF16 decode", f"{len(braw) / 2 / t / 1e6:.0f} M/s, 1 thread", t / (len(braw) / 2) * bf16_n))
    x = [decode(r, "F8_E4M3", inner) * scale for r in raws] if fp8_n else [
        np.random.default_rng(0).standard_normal(inner, dtype=np.float32) for _ in range(n)]
    elements = sum(by_dtype.get(d, 0) for d in ("F8_E4M3", "BF16", "F16", "F32"))
    # Elements per stored type, from the plan of the real conversion.
    for out_type in types:
        plan = convert(src, out=scratch / "plan.gguf", out_type=out_type, dry_run=True)
        per_type: dict[str, int] = {}
        for r in plan.rows:
            per_type[r.type] = per_type.get(r.type, 0) + math.prod(r.shape)
        with Encoder(threads) as enc:
            for tname, count in sorted(per_type.items(), key=lambda kv: -kv[1]):
                if count < elements // 100:
                    continue
                qt = T[tname]
                t = timed(lambda: [enc.encode(a, qt) for a in x])
                rows.append((f"quantize {tname} ({out_type})", f"{per / t / 1e6:.0f} M/s, {threads} threads",
                             t / per * count))
            qt = T.Q8_0 if out_type == "Q8_0" else T.Q4_K
            encoded = [enc.encode(a, qt) for a in x]
        rep = Report()
        t = timed(lambda: [rep.add("t", "routed_experts", qt, a, e) for a, e in zip(x, encoded)])
        rows.append((f"quantization report ({out_type})", f"{per / t / 1e6:.0f} M/s", t / per * elements))
        t = timed(lambda: [zlib.crc32(memoryview(e).cast("B")) for e in encoded])
        nbytes = sum(e.nbytes for e in encoded)
        rows.append((f"CRC32 of the output ({out_type})", f"{nbytes / t / 1e6:.0f} MB/s", t / nbytes * plan.total_bytes))
        path = scratch / "write-test.bin"
        with open(path, "wb") as f:
            t0 = time.perf_counter()
            for _ in range(8):
                for e in encoded:
                    f.write(memoryview(e).cast("B"))
            f.flush()
            os.fsync(f.fileno())
            t = time.perf_counter() - t0
        path.unlink()
        rows.append((f"write + fsync ({out_type})", f"{8 * nbytes / t / 1e6:.0f} MB/s", t / (8 * nbytes) * plan.total_bytes))
    return rows


# --- the run ------------------------------------------------------------------------------------------

def human(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dtype", choices=["FP8E", "BF16"], default="FP8E", help="source storage (FP8E: the release's)")
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go (default: a temp dir)")
    ap.add_argument("--no-report-variant", action="store_true", help="skip route a with the quantization report off")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and files")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    s = spec(args.layers, args.dtype)

    work = Path(tempfile.mkdtemp(prefix="ms4local-bench-", dir=args.workdir))
    try:
        from quantize.synth import text_tensors

        n_params = sum(math.prod(shape) for _, shape, _ in text_tensors(s))
        fp8_bytes = sum(math.prod(sh) * (1 if s.dtype.startswith("FP8") and k in ("linear", "experts")
                                          and not n.startswith("lm_head") else 2) for n, sh, k in text_tensors(s))
        need = fp8_bytes + 2 * n_params + int(1.1 * n_params) + 2**30  # source + BF16 + largest output + slack
        free = shutil.disk_usage(work).free
        print(f"{n_params / 1e9:.2f} B parameters, source {human(fp8_bytes)}; needs {human(need)} of disk, "
              f"{human(free)} free in {work}")
        if free < need:
            print("not enough free disk; pass --workdir elsewhere or --layers 1", file=sys.stderr)
            return 1
        src = work / "Mistral-Small-4-shape"
        t0 = time.perf_counter()
        source_bytes = write_checkpoint(src, s)
        print(f"generated {human(source_bytes)} of weights in {time.perf_counter() - t0:.0f} s")

        results: dict[str, Measured] = {}
        sizes: dict[str, int] = {}

        def route(key: str, job: dict, out: Path) -> None:
            print(f"  {key} ...", end="", flush=True)
            m = measure({**job, "src": str(job.get("src", src)), "out": str(out), "threads": args.threads}, work)
            results[key] = m
            sizes[key] = sum(p.stat().st_size for p in out.parent.glob(out.name.removesuffix(".gguf") + "*.gguf"))
            print(f" {m.wall:.1f} s, peak {human(m.peak)}, CPU {m.cpu / m.wall / args.threads:.0%} of {args.threads}")

        reads = [read_once(src) for _ in range(2)]
        results["c"] = min(reads, key=lambda m: m.wall)
        print(f"  c: read the source once: {results['c'].wall:.1f} s")
        for t in types:
            route(f"a {t}", {"route": "a", "type": t}, work / f"a-{t}.gguf")
            (work / f"a-{t}.gguf").unlink()
            if not args.no_report_variant:
                route(f"a-noreport {t}", {"route": "a", "type": t, "report": False}, work / f"an-{t}.gguf")
                (work / f"an-{t}.gguf").unlink()
        for p in work.glob("*.quant.json"):
            p.unlink()
        bf16 = work / "bf16.gguf"
        route("b: BF16 GGUF", {"route": "bf16"}, bf16)
        for t in types:
            route(f"b: requant {t}", {"route": "requant", "type": t, "src": str(bf16)}, work / f"b-{t}.gguf")
            (work / f"b-{t}.gguf").unlink()
        bf16_size = bf16.stat().st_size
        bf16.unlink()
        prof = [] if args.no_profile else profile(src, types, args.threads, work)
        table = render(args, s, n_params, source_bytes, types, results, sizes, bf16_size, prof)
        print()
        print(table)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(table)
        print(f"\nwritten to {args.results}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def render(args, s, n_params: int, source_bytes: int, types: list[str], r: dict[str, Measured], sizes: dict[str, int],
           bf16_size: int, prof: list[tuple[str, str, float]]) -> str:
    ncpu = args.threads
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        from importlib.metadata import version
        llama = version("llama-cpp-python")
    except Exception:  # noqa: BLE001
        llama = "?"
    c = r["c"]
    out = [
        "# Quantizer benchmark: one pass vs BF16 GGUF + llama_model_quantize",
        "",
        f"`make bench-quantize` ({' '.join(sys.argv[1:]) or 'defaults'}), {time.strftime('%Y-%m-%d')}. "
        f"Machine: {cpu_name}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM; {ncpu} quantizer threads; "
        f"llama-cpp-python {llama}.",
        "",
        f"Checkpoint: Mistral Small 4 shapes, {s.layers} layer(s) (hidden {s.hidden}, {s.experts} experts × "
        f"{s.moe_inter}, q_lora {s.q_lora}, kv_lora {s.kv_lora}, {s.heads} heads, nope/rope {s.nope}/{s.rope}, "
        f"v {s.v_dim}, vocab {s.vocab}); {n_params / 1e9:.2f} B parameters, {human(source_bytes)} of "
        f"{'FP8 E4M3 (experts, attention, shared expert; per-expert / per-tensor scales) + BF16 (embeddings, lm_head, norms, router)' if s.dtype.startswith('FP8') else 'BF16'} weights.",
        "",
        "| type | route | wall s | peak RSS | CPU util | extra disk | I/O (read + written) | output |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    summary = []
    for t in types:
        a, pre, q = r[f"a {t}"], r["b: BF16 GGUF"], r[f"b: requant {t}"]
        b = Measured(pre.wall + q.wall, pre.cpu + q.cpu, max(pre.peak, q.peak))
        out_size = sizes[f"a {t}"]
        util = lambda m: f"{m.cpu / m.wall / ncpu:.0%}"  # noqa: E731
        out.append(f"| {t} | a: one pass (report on) | {a.wall:.1f} | {human(a.peak)} | {util(a)} | 0 | "
                   f"{human(source_bytes + out_size)} | {human(out_size)} |")
        if f"a-noreport {t}" in r:
            an = r[f"a-noreport {t}"]
            out.append(f"| {t} | a': one pass, report off | {an.wall:.1f} | {human(an.peak)} | {util(an)} | 0 | "
                       f"{human(source_bytes + sizes[f'a-noreport {t}'])} | {human(sizes[f'a-noreport {t}'])} |")
        out.append(f"| {t} | b: BF16 GGUF + llama_model_quantize | {b.wall:.1f} "
                   f"({pre.wall:.1f} + {q.wall:.1f}) | {human(b.peak)} ({human(pre.peak)} / {human(q.peak)}) | "
                   f"{util(b)} ({util(pre)} / {util(q)}) | {human(bf16_size)} | "
                   f"{human(source_bytes + 2 * bf16_size + sizes[f'b: requant {t}'])} | {human(sizes[f'b: requant {t}'])} |")
        out.append(f"| {t} | c: read the source once (cat, warm cache) | {c.wall:.1f} | – | – | – | {human(source_bytes)} | – |")
        goal = GOALS.get(t)
        ab = a.wall / b.wall
        verdict = "" if goal is None else (f"goal ≤ {goal}: **met**" if ab <= goal else
                                          f"goal ≤ {goal}: **missed** by {ab - goal:.2f} ({(ab / goal - 1):.0%} slower than the goal)")
        line = f"- {t}: a/b = **{ab:.2f}** ({verdict}); a/c = {a.wall / c.wall:.1f}"
        if f"a-noreport {t}" in r:
            an = r[f"a-noreport {t}"]
            line += (f"; without the report a'/b = {an.wall / b.wall:.2f}, the report costs "
                     f"{a.wall - an.wall:+.1f} s ({(a.wall / an.wall - 1):+.0%})")
        line += (f"; peak RSS {human(a.peak)} (goal ≤ 2 GB: {'met' if a.peak <= RSS_GOAL else 'missed'}); "
                 f"extra disk 0 (b: {human(bf16_size)})")
        summary.append(line)
    out += ["", "Ratios and goals (a/b ≤ 0.6 for Q8_0, ≤ 0.9 for Q4_K_M; peak RSS ≤ 2 GB; extra disk 0):", "", *summary]
    out += [
        "",
        "Notes: b's times are its two steps (BF16 GGUF, then the re-quantization; the BF16 file is written "
        "once and counted in full for each type). Peak RSS of b is the larger of its two processes "
        "(llama.cpp's quantizer runs in a child of the second). CPU util = (user + system time of the process "
        f"and its children) / (wall × {ncpu}). All routes read from the page cache (the source and the BF16 file "
        "fit in RAM here), so c is a memory-speed read and b's extra disk traffic costs it nothing here; on the "
        "real model it would.",
    ]
    if prof:
        one_pass = {t: r[f"a {t}"].wall for t in types}
        out += ["", "## Where one-pass time goes",
                "", "Each stage timed alone (4 real-shape expert slices, warm cache) and scaled to this checkpoint; "
                "stages overlap in the pipeline (reading + decoding in a prefetch thread, ggml on worker threads, "
                "CRC + writing on the main thread), so they do not add up to the wall time. Measured one-pass wall: "
                + ", ".join(f"{t} {w:.1f} s" for t, w in one_pass.items()) + ".",
                "", "| stage | speed | seconds for this checkpoint |", "| --- | --- | ---: |"]
        out += [f"| {name} | {detail} | {sec:.1f} |" for name, detail, sec in prof]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
