"""`ms4local info`: what a GGUF holds, and with --vram/--ram where it would go and how fast it can decode.

Declares options and hands off to `ms4local.info.inspect`; the tables are drawn here.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from quantize.units import parse_size

from .. import ui
from ..errors import OptionsError
from ..info import Info, inspect
from ..placement import SpreadPlan
from ..rpc import RemoteServer, parse_endpoints, preflight
from . import options
from .errors import handle_errors

Bandwidth = Annotated[Optional[list[str]], typer.Option(
    "--bandwidth", metavar="[GPU=|CPU=]GB/s", show_default=False,
    help="Memory bandwidth for the decode-speed bound, in GB/s; repeatable. A bare number is the GPU's "
         "(e.g. 936 for an RTX 3090); CPU=… replaces the measured RAM bandwidth.")]
Ram = Annotated[Optional[str], typer.Option(
    "--ram", metavar="SIZE", show_default=False, callback=options.size_flag, help="RAM to check the CPU side of the placement against (64G).")]


def parse_bandwidths(values: list[str] | None) -> tuple[float | None, float | None]:
    """`--bandwidth 936 --bandwidth CPU=60` → (GPU bytes/s, CPU bytes/s)."""
    gpu = cpu = None
    for v in values or []:
        dev, _, num = v.rpartition("=")
        dev = (dev or "GPU").strip().upper()
        try:
            rate = float(num) * 1e9
        except ValueError:
            raise OptionsError(f"--bandwidth wants GB/s as a number, optionally GPU=… or CPU=…; got {v!r}") from None
        if rate <= 0 or dev not in ("GPU", "CPU"):
            raise OptionsError(f"--bandwidth wants a positive GB/s for GPU or CPU, got {v!r}")
        if dev == "GPU":
            gpu = rate
        else:
            cpu = rate
    return gpu, cpu


@handle_errors
@options.from_hub(projector=True)
def info(
    model: options.Model,
    as_json: options.Json = False,
    vram: options.Vram = None,
    ram: Ram = None,
    ctx_size: options.CtxSize = 4096,
    cache_type_k: options.CacheTypeK = "f16",
    cache_type_v: options.CacheTypeV = "f16",
    flash_attn: options.FlashAttn = "auto",
    batch_size: options.BatchSize = 512,
    ubatch_size: options.UbatchSize = 512,
    bandwidth: Bandwidth = None,
    rpc: options.Rpc = None,
    fit: options.Fit = None,
) -> None:
    """Describe a GGUF from its header (no weights are read): architecture, tensor types by class,
    template features, split files, paired mmproj; with --vram/--ram the --fit placement, memory per
    device and an upper bound on decode speed; with --rpc the rpc-servers' devices and memory, and the
    --fit plan across the hosts (--vram: the main device's memory; --no-fit hides it)."""
    gpu_bw, cpu_bw = parse_bandwidths(bandwidth)
    servers = preflight(parse_endpoints(rpc)) if rpc else []  # an unusable server fails here, in seconds
    # The same checks and n_ubatch as the engine, so the plan equals the one `chat --vram` makes.
    opts = options.engine_options(ctx_size=ctx_size, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                                  flash_attn=flash_attn, batch_size=batch_size, ubatch_size=ubatch_size)
    vram_bytes = None
    if vram is not None:
        vram_bytes = 0 if vram.strip() in ("0", "0G", "0B") else parse_size(vram)
    spread = None
    if rpc and fit is not False:
        # The plan `chat --rpc --fit` makes, from the memory the probe just read; nothing is loaded.
        from ..engine import read_model, rpc_plan  # llama.cpp (for the local GPUs) only when asked

        spread = rpc_plan(read_model(model), options.engine_options(
            ctx_size=ctx_size, cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=flash_attn,
            batch_size=batch_size, ubatch_size=ubatch_size, vram=vram_bytes or None, rpc=rpc), servers)[0]
        vram_bytes = None  # --vram is the main device's memory in that plan, not a one-GPU plan
    result = inspect(model, vram=vram_bytes, ram=parse_size(ram) if ram else None, n_ctx=opts.ctx_size,
                     type_k=opts.type_k, type_v=opts.type_v, n_ubatch=min(opts.ubatch_size, opts.batch_size),
                     flash_attn=opts.flash_attn, gpu_bandwidth=gpu_bw, cpu_bandwidth=cpu_bw)
    if as_json:
        out = result.to_json()
        if rpc:
            out["rpc_servers"] = [s.to_json() for s in servers]
        if spread is not None:
            out["rpc_plan"] = spread_json(spread)
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return
    render(result)
    if servers:
        ui.out.print(servers_table(servers, result.tensor_bytes))
    if spread is not None:
        ui.out.print(ui.spread_table(spread))


def spread_json(spread: SpreadPlan) -> dict[str, object]:
    return {"main": spread.targets[0].device, "n_gpu_layers": spread.n_gpu_layers, "overrides": spread.overrides,
            "targets": [asdict(t) for t in spread.targets],
            "experts": {t.device: list(b) for t, b in zip(spread.targets, spread.experts)},
            "cpu_experts": list(spread.cpu_experts), "ram": spread.ram, "rows": [asdict(r) for r in spread.rows]}


def servers_table(servers: list[RemoteServer], model_bytes: int) -> Table:
    """The rpc-servers' devices as llama.cpp will number them (RPC0, RPC1 … in --rpc order), with
    the share of the layers each takes by default (in proportion to free memory, llama.cpp's -ts)."""
    t = Table(title="rpc-servers (devices in llama.cpp's order; layers go first to these, then to local GPUs)",
              header_style="bold")
    for col in ("device", "server", "free", "total", "default share"):
        t.add_column(col, justify="left" if col in ("device", "server") else "right")
    total_free = sum(s.free for s in servers) or 1
    n = 0
    for s in servers:
        for d in s.devices:
            share = d.free / total_free
            t.add_row(f"RPC{n}", f"{s.endpoint} #{d.index}", ui.human_bytes(d.free), ui.human_bytes(d.total),
                      f"{100 * share:.0f}% ≈ {ui.human_bytes(int(share * model_bytes))}")
            n += 1
    t.caption = (f"-ngl all puts every repeating layer on these (weights {ui.human_bytes(model_bytes)} in all); "
                 "-ts N0,N1,… sets the shares, -ot REGEX=RPCn places tensors by name")
    return t


def _v(x: object) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def render(r: Info) -> None:
    a = r.architecture
    e, att, rope = a["experts"], a["attention"], a["rope"]  # type: ignore[index]
    out = ui.out
    out.print(f"[bold]{r.path.name}[/]: {a['arch']} {_v(a['name'])}, {r.file_type}, {r.params:,} parameters, "
              f"{ui.human_bytes(r.tensor_bytes)} of tensors, {r.bpw:.2f} bits per weight")
    if len(r.files) > 1:
        out.print(f"split into {len(r.files)} files: " + ", ".join(f"{p.name} ({ui.human_bytes(n)})" for p, n in r.files))
    t = Table(title="architecture", header_style="bold", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("layers", f"{a['layers']} (first {_v(e['leading_dense_blocks'])} dense), hidden {_v(a['embedding_length'])}")  # type: ignore[index]
    t.add_row("experts", f"{_v(e['routed'])} routed, {_v(e['active'])} active per token, {_v(e['shared'])} shared; "  # type: ignore[index]
                         f"expert FFN {_v(e['expert_ffn_length'])}, gating {_v(e['gating'])}")  # type: ignore[index]
    t.add_row("attention", f"{_v(att['heads'])} heads, MLA q_lora {_v(att['q_lora_rank'])}, kv_lora {_v(att['kv_lora_rank'])}, "  # type: ignore[index]
                           f"nope/rope {_v(att['nope_dim'])}/{_v(att['rope_dim'])}, v {_v(att['v_head_dim'])}; "  # type: ignore[index]
                           f"cache row {_v(att['cache_k_row'])} values per token and layer")  # type: ignore[index]
    t.add_row("context", f"{_v(a['context_length'])} tokens; rope base {_v(rope['freq_base'])}, {_v(rope['scaling'])} "  # type: ignore[index]
                         f"×{_v(rope['factor'])} from {_v(rope['original_context_length'])} "  # type: ignore[index]
                         f"(log mult {_v(rope['yarn_log_multiplier'])}, β {_v(rope['yarn_beta_fast'])}/{_v(rope['yarn_beta_slow'])}); "  # type: ignore[index]
                         f"query temperature {_v(att['temperature_scale'])}/{_v(att['temperature_length'])}")  # type: ignore[index]
    tok = r.tokenizer
    ids = ", ".join(f"{k} {v['id']} {v['text'] or ''}".strip() for k, v in tok["ids"].items())  # type: ignore[union-attr]
    t.add_row("vocabulary", escape(f"{_v(a['vocab_size'])} tokens ({_v(tok['model'])}/{_v(tok['pre'])}); {ids}"))
    named = tok.get("named_control_tokens") or {}
    if named:
        t.add_row("control tokens", escape(f"{tok['control_tokens']}: " + " ".join(named)))  # type: ignore[arg-type]
    tf = r.template
    feats = [n for n in ("reasoning_effort", "tools", "images") if tf.get(n)]
    t.add_row("chat template", ("supports " + ", ".join(feats) if feats else "no reasoning_effort, tools or images")
              if tf["present"] else "none (re-convert with `ms4local quantize`)")
    t.add_row("vision projector", f"{r.mmproj.path.name} ({r.mmproj.projector}, {r.mmproj.file_type}, "
                                  f"{ui.human_bytes(r.mmproj.nbytes)})" if r.mmproj else "none found beside the model")
    fixes = []
    if r.repair.get("temperature"):
        fixes.append("query temperature keys missing (llama.cpp's converter): set at load to "
                     + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r.repair["temperature"].items()))  # type: ignore[union-attr]
    if r.repair.get("mmproj_img_break"):
        fixes.append("the projector lacks its [IMG_BREAK] row: a repaired copy is made at load")
    if fixes:
        t.add_row("repair at load", escape("; ".join(fixes) + " (--no-repair turns it off)"), style="yellow")
    out.print(t)

    h = Table(title="tensors by class and type", header_style="bold")
    for col, just in (("class", "left"), ("type", "left"), ("tensors", "right"), ("parameters", "right"),
                      ("bytes", "right"), ("share", "right"), ("bpw", "right")):
        h.add_column(col, justify=just)  # type: ignore[arg-type]
    total = max(r.tensor_bytes, 1)
    for name, c in r.classes.items():
        single = next(iter(c.types)) if len(c.types) == 1 else "all"
        h.add_row(f"[bold]{name}[/]", single, str(c.tensors), f"{c.params:,}", ui.human_bytes(c.nbytes),
                  f"{100 * c.nbytes / total:.1f}%", f"{c.bpw:.2f}")
        if len(c.types) > 1:
            for tname, tc in sorted(c.types.items(), key=lambda kv: -kv[1].nbytes):
                h.add_row("", tname, str(tc.tensors), f"{tc.params:,}", ui.human_bytes(tc.nbytes),
                          f"{100 * tc.nbytes / total:.1f}%", f"{tc.bpw:.2f}")
    h.caption = "types: " + ", ".join(f"{k} {ui.human_bytes(v.nbytes)}" for k, v in r.types.items())
    out.print(h)
    if r.quant_report:
        out.print("quantization error (relative RMS, from the .quant.json sidecar): " +
                  ", ".join(f"{k} {v:.2e}" for k, v in sorted(r.quant_report.items(), key=lambda kv: -kv[1])))
    if r.fit is not None:
        _render_fit(r)


def _render_fit(r: Info) -> None:
    f = r.fit
    if f is None:
        return
    out = ui.out
    if f.vram > 0:
        out.print(ui.placement_table(f.plan, applied=True))
    else:
        out.print("no GPU (--vram not given or 0): everything in RAM")
    t = Table(title=f"memory and bytes read per token at -c {f.n_ctx}", header_style="bold")
    for col in ("device", "weights", "KV cache", "compute", "total", "budget", "read/token", "+KV at full ctx",
                "bandwidth"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for d in f.devices:
        budget = "–" if d.budget is None else ui.human_bytes(d.budget) + ("" if d.fits else " [red](over)[/]")
        bw = "unknown" if not d.bandwidth else f"{d.bandwidth / 1e9:.1f} GB/s ({d.bandwidth_source})"
        t.add_row(d.name, ui.human_bytes(d.weights), ui.human_bytes(d.kv_cache), ui.human_bytes(d.compute),
                  ui.human_bytes(d.total), budget, ui.human_bytes(d.read_per_token), ui.human_bytes(d.kv_read_full), bw)
    out.print(t)
    empty, full = f.max_tokens_per_second(False), f.max_tokens_per_second(True)
    if empty is None:
        out.print("decode speed bound: give --bandwidth (GB/s) for the devices that hold weights")
        return
    note = " (GPU time not counted: give --bandwidth for the GPU)" if f.bound_is_partial else ""
    out.print(f"decode speed ≤ [bold]{empty:.1f}[/] tokens/s at an empty context, ≤ {full:.1f} at {f.n_ctx} tokens{note}")
