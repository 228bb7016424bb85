"""File size vs KL divergence over every quant type, on a generated Mistral-Small-4-shaped checkpoint.

For each `--type` of `ms4local quantize`: convert the checkpoint (one pass, the ms4local policy,
the quantization report on, as the CLI runs it), then `ms4local.evaluate.evaluate` against the F32
conversion over the bundled text: mean / p99 / max KL divergence, top-1 agreement, mean |Δp| of
the reference's top token, perplexity. Writes bench/results/README.md (this table, the plot, and
the tables of the other benchmarks found in bench/results/) and bench/results/eval_size_vs_kld.png.

The checkpoint has random weights, so its next-token distributions are flat and the KL
divergences are far smaller than on the real model; what carries over is the order of the types
and the size each one costs. Experts hold ~90% of the parameters, as in the real model (~95%).

    .venv/bin/python bench/eval_bench.py [--layers 2] [--types Q8_0,Q4_K_M] [--ctx 256] [--chunks 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLOT = "eval_size_vs_kld.png"
RAW = "eval.json"  # the measured rows, so that --replot can redraw without measuring again


def need_matplotlib() -> None:
    """Fail before an hour of work, with the one command that fixes it."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("bench/eval_bench.py draws its plot with matplotlib, which is not installed; run "
                 "`.venv/bin/python -m pip install -e '.[bench]'` (or `pip install matplotlib`)")


def spec(layers: int):
    from quantize.synth import TinySpec

    # Mistral Small 4's proportions at 1/8 of the width: 32 experts of which 4 run, one shared,
    # MLA 512/256 with nope/rope 64/64 (ne0 multiples of 256, so K-quants are stored as such).
    return TinySpec(layers=layers, hidden=512, heads=4, q_lora=512, kv_lora=256, nope=64, rope=64, v_dim=128,
                    experts=32, top_k=4, shared=1, moe_inter=512, inter=1024, first_dense=0, vocab=16384,
                    dtype="BF16", seed=42)


@dataclass
class Row:
    type: str
    nbytes: int
    bpw: float
    quantize_s: float
    eval_s: float
    ppl: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1: float
    dp_top: float


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run(args) -> tuple[list[Row], object, int, dict]:
    from ms4local.evaluate import evaluate
    from ms4local.engine import EngineOptions
    from quantize import convert
    from quantize.synth import make_checkpoint

    s = spec(args.layers)
    work = Path(tempfile.mkdtemp(prefix="eval-bench-", dir=args.workdir))
    rows: list[Row] = []
    info: dict = {}
    try:
        t0 = time.perf_counter()
        src = make_checkpoint(work / "ckpt", s)
        info["checkpoint_s"] = time.perf_counter() - t0
        ref = convert(src, out=work / "ref-F32.gguf", out_type="F32", quant_report=False)
        n_params = ref.n_params
        opts = EngineOptions(threads=args.threads)
        for t in args.types:
            out = work / f"m-{t}.gguf"
            t0 = time.perf_counter()
            res = convert(src, out=out, out_type=t, threads=args.threads)
            q_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ev = evaluate(out, reference=ref.output, n_ctx=args.ctx, chunks=args.chunks or None, options=opts)
            e_s = time.perf_counter() - t0
            k = ev.kl
            rows.append(Row(t, res.total_bytes, res.bits_per_weight, q_s, e_s, ev.ppl, k.mean, k.p99, k.max,
                            k.top1_agreement, k.mean_abs_dp_top))
            info.setdefault("eval", [ev.chunks, ev.tokens, ev.text_tokens, ev.kl.reference_ppl])
            print(f"{t:7s} {human(res.total_bytes):>10s} {res.bits_per_weight:5.2f} bpw  KLD mean {k.mean:.3e} "
                  f"p99 {k.p99:.3e}  top-1 {100 * k.top1_agreement:.2f}%  ({q_s:.1f} s + {e_s:.1f} s)", flush=True)
            out.unlink()
            out.with_name(out.name.removesuffix(".gguf") + ".quant.json").unlink(missing_ok=True)
        info["f32_bytes"] = ref.total_bytes
        return rows, s, n_params, info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Two panels: every type (log-log), and the 3–8-bit crowd with staggered labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts = sorted((r for r in rows if r.kld_mean > 0), key=lambda r: r.nbytes)  # F32 is the reference: KLD 0
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, gridspec_kw={"width_ratios": [1, 1.3]})
    cmap = plt.get_cmap("viridis")
    lo, hi = min(r.bpw for r in pts), max(r.bpw for r in pts)
    color = [cmap((r.bpw - lo) / max(hi - lo, 1e-9)) for r in pts]
    for ax in (full, zoom):
        ax.scatter([r.nbytes / 2**20 for r in pts], [r.kld_mean for r in pts], c=color, zorder=3)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("file size (MiB of tensors)")
    full.set_xscale("log")
    full.set_ylabel("mean KL divergence vs F32 (nats per token)")
    full.set_title("every type", fontsize=10)
    full.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    full.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    full.set_xticks([t for t in (25, 50, 100, 200, 400, 800) if min(r.nbytes for r in pts) / 2**20 / 1.5 < t
                     < max(r.nbytes for r in pts) / 2**20 * 1.5])
    edge = {min(pts, key=lambda r: r.nbytes).type}
    for r in pts:  # the crowd below 9 bpw is labelled in the right panel
        if r.bpw >= 8 or r.type in edge:
            full.annotate(r.type, (r.nbytes / 2**20, r.kld_mean), textcoords="offset points", xytext=(4, 3), fontsize=8)
    crowd = [r for r in pts if r.bpw < 9]
    zoom.set_title("quantized types (≤ 8.5 bpw)", fontsize=10)
    if crowd:
        # Several types share a size (Q4_0, Q4_K_S, IQ4_NL): the labels go in a column on the right,
        # in the order of their KL divergence, each with a line to its point.
        xs = [r.nbytes / 2**20 for r in crowd]
        x0, x1 = min(xs), max(xs)
        column = x1 + 0.12 * (x1 - x0)
        zoom.set_xlim(x0 - 0.03 * (x1 - x0), x1 + 0.3 * (x1 - x0))
        ylo, yhi = min(r.kld_mean for r in crowd) / 1.3, max(r.kld_mean for r in crowd) * 1.3
        zoom.set_ylim(ylo, yhi)
        order = sorted(crowd, key=lambda r: -r.kld_mean)
        n = len(order)
        for i, r in enumerate(order):
            y = math.exp(math.log(yhi / 1.1) - (i + 0.5) * (math.log(yhi / 1.1) - math.log(ylo * 1.1)) / n)
            zoom.annotate(f"{r.type} ({r.bpw:.2f} bpw)", (r.nbytes / 2**20, r.kld_mean), xytext=(column, y),
                          textcoords="data", fontsize=8, va="center",
                          arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5, "color": "grey"})
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def other_results(skip: set[str]) -> list[str]:
    """The other benchmarks' result files: a link, their title and their first table each."""
    out = []
    for md in sorted(RESULTS.glob("*.md")):
        if md.name in skip:
            continue
        lines = md.read_text().splitlines()
        title = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), md.stem)
        table, started = [], False
        for ln in lines:
            if ln.startswith("|"):
                table.append(ln)
                started = True
            elif started:
                break
        intro = next((ln for ln in lines if ln.strip() and not ln.startswith(("#", "|"))), "")
        out += [f"### {title}", "", f"From [{md.name}]({md.name}) (full details there). {intro}", "", *table, ""]
    return out


def render(args, rows: list[Row], s, n_params: int, info: dict) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        from importlib.metadata import version
        llama = version("llama-cpp-python")
    except Exception:  # noqa: BLE001
        llama = "?"
    chunks, tokens, text_tokens, ref_ppl = info["eval"]
    best = {r.type: r for r in rows}
    out = [
        "# Benchmark results",
        "",
        "`make bench` runs every benchmark and writes this page; each section names the script that produced it.",
        "",
        "## File size vs KL divergence, every quant type (`make bench-eval`)",
        "",
        f"`bench/eval_bench.py` ({' '.join(sys.argv[1:]) or 'defaults'}), {time.strftime('%Y-%m-%d')}. Machine: {cpu}, "
        f"{os.cpu_count()} cores; llama-cpp-python {llama}.",
        "",
        f"Checkpoint: generated, Mistral Small 4's proportions at 1/8 width — {s.layers} layers, hidden {s.hidden}, "
        f"{s.experts} experts × {s.moe_inter} (top-{s.top_k}) + {s.shared} shared, MLA q_lora {s.q_lora} / kv_lora "
        f"{s.kv_lora}, nope/rope {s.nope}/{s.rope}, v {s.v_dim}, vocab {s.vocab}; {n_params / 1e6:.1f} M parameters, "
        f"BF16, random weights (seed {s.seed}). Each type: `quantize.convert(..., out_type=T)` (policy ms4local), then "
        f"`ms4local.evaluate.evaluate(model, reference=F32)` over the bundled text: {chunks} chunks × {args.ctx} "
        f"tokens, second half scored ({tokens} of {text_tokens} tokens). Reference (F32) perplexity {ref_ppl:.1f}.",
        "",
        f"![file size vs mean KL divergence]({PLOT})",
        "",
        "| type | size | bpw | mean KLD | p99 KLD | max KLD | same top token | mean \\|Δp\\| top | PPL | quantize s | eval s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: -r.nbytes):
        out.append(f"| {r.type} | {human(r.nbytes)} | {r.bpw:.2f} | {r.kld_mean:.2e} | {r.kld_p99:.2e} | "
                   f"{r.kld_max:.2e} | {100 * r.top1:.2f}% | {100 * r.dp_top:.3f}% | {r.ppl:.2f} | {r.quantize_s:.1f} | "
                   f"{r.eval_s:.1f} |")
    out += [""]
    notes = []
    if "Q8_0" in best and "Q4_K_M" in best:
        q8, q4 = best["Q8_0"], best["Q4_K_M"]
        notes.append(f"Q4_K_M is {q4.nbytes / q8.nbytes:.0%} of Q8_0's size at {q4.kld_mean / max(q8.kld_mean, 1e-30):.0f}× "
                     "its mean KL divergence.")
    dominated = [r.type for r in rows if r.kld_mean > 0 and any(
        o is not r and o.kld_mean > 0 and o.nbytes <= r.nbytes and o.kld_mean < r.kld_mean for o in rows)]
    if dominated:
        notes.append("Dominated here (another type is no larger and has a lower mean KLD): " + ", ".join(dominated) + ".")
    if "BF16" in best and "F16" in best:
        notes.append("BF16 stores this BF16 checkpoint exactly, yet differs more than F16: llama.cpp's CPU matmul "
                     "rounds the activations to the weights' type as well, and BF16 keeps 8 significant bits to F16's 11.")
    notes.append("Random weights make a model that predicts nothing (its perplexity is above the vocabulary size) with "
                 "low-confidence distributions, so these KL divergences are much smaller than on the real model: the "
                 "order of the types and their sizes carry over, the absolute values do not. Sizes are tensor bytes "
                 "(the header adds ~1 MiB of vocabulary and template). Times are on a shared 2-core machine.")
    out += [f"- {n}" for n in notes] + [""]
    out += [f"Raw numbers: [{RAW}]({RAW}).", ""]
    others = other_results({"README.md"})
    if others:
        out += ["## Other benchmarks", ""] + others
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    from quantize.policy import FILE_TYPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--types", default=",".join(t for t in FILE_TYPES if t != "F32"),
                    help="comma-separated quant types (default: every type but the F32 reference)")
    ap.add_argument("--ctx", type=int, default=256, help="evaluation context (chunk) size")
    ap.add_argument("--chunks", type=int, default=6, help="chunks to score (0: all the bundled text holds)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary files go (default: $TMPDIR)")
    ap.add_argument("--results", type=Path, default=RESULTS / "README.md")
    ap.add_argument("--replot", action="store_true", help=f"only redraw the page and plot from {RAW} (no runs)")
    args = ap.parse_args(argv)
    need_matplotlib()
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in args.types if t not in FILE_TYPES]
    if unknown:
        ap.error(f"unknown --types {', '.join(unknown)}; choose from {', '.join(FILE_TYPES)}")
    t0 = time.perf_counter()
    raw = args.results.parent / RAW
    if args.replot:  # redraw the page and the plot from the last run's numbers
        data = json.loads(raw.read_text())
        rows, n_params, info = [Row(**r) for r in data["rows"]], data["n_params"], data["info"]
        s = spec(data["layers"])
        args.ctx, sys.argv[1:] = data["ctx"], data["argv"]
    else:
        rows, s, n_params, info = run(args)
        raw.write_text(json.dumps({"rows": [asdict(r) for r in rows], "n_params": n_params, "info": info,
                                   "layers": args.layers, "ctx": args.ctx, "argv": sys.argv[1:]}, indent=1))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, args.results.parent / PLOT,
         f"Generated Mistral-Small-4-shaped checkpoint ({n_params / 1e6:.0f} M params): size vs KL divergence to F32")
    args.results.write_text(render(args, rows, s, n_params, info))
    print(f"written {args.results} and {args.results.parent / PLOT} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
