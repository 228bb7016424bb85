"""`ms4local quantize`: HF checkpoint (or a GGUF) → GGUF. Declares options, hands off to `quantize.convert`."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantize.convert import convert, count_params, is_gguf_source
from quantize.policy import FILE_TYPES, parse_type
from quantize.units import parse_size

from .. import ui
from ..evaluate import evaluate
from ..gguf_model import read_model
from . import options
from .errors import fail, handle_errors

TYPES = list(FILE_TYPES)


@handle_errors
def _type_flag(ctx: typer.Context, value: str) -> str:
    """--type checked at parse time, before SRC is fetched from the Hub."""
    if not ctx.resilient_parsing:
        parse_type(value)
    return value


@handle_errors
@options.source_from_hub
def quantize_command(
    src: options.Source,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (default: models/<Name>-<TYPE>.gguf).")] = None,
    out_type: Annotated[str, typer.Option("--type", callback=_type_flag, help=f"Output type: {', '.join(TYPES)}.")] = "Q8_0",
    policy: Annotated[str, typer.Option("--policy", help="Tensor mix: ms4local (MoE-aware, default) or llama "
                                                         "(exactly llama-quantize's).")] = "ms4local",
    tensor_type: Annotated[Optional[list[str]], typer.Option(
        "--tensor-type", help="REGEX=TYPE, repeatable (llama-quantize's syntax; the first match wins).")] = None,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads", help="Quantizer threads (default: all cores).")] = None,
    split_max_size: Annotated[Optional[str], typer.Option(
        "--split-max-size", callback=options.size_flag, help="Split into files of at most this size (e.g. 50G, 500M).")] = None,
    split_max_tensors: Annotated[int, typer.Option("--split-max-tensors", help="Split into files of at most N tensors.")] = 0,
    mmproj_type: Annotated[str, typer.Option("--mmproj-type", help="Vision projector type: F16, F32 or Q8_0.")] = "F16",
    no_mmproj: Annotated[bool, typer.Option("--no-mmproj", help="Do not write the vision projector.")] = False,
    mmproj_only: Annotated[bool, typer.Option("--mmproj-only", help="Write only the vision projector.")] = False,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip the quantization-error report (<out>.quant.json).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-tensor plan and write nothing.")] = False,
    eval_against: Annotated[Optional[str], typer.Option(
        "--eval-against", metavar="REF.gguf", show_default=False,
        help="After writing, measure perplexity and KL divergence against this GGUF (as `ms4local eval --reference`).")] = None,
    eval_ctx: Annotated[int, typer.Option("--eval-ctx", help="Context size of the --eval-against chunks.")] = 512,
    eval_chunks: Annotated[int, typer.Option("--eval-chunks", help="Chunks scored by --eval-against (0: all).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file (never an input of the run, "
                                                        "never a device or pipe).")] = False,
) -> None:
    """Convert a Mistral Small 4 checkpoint (FP8/BF16/F16/F32 safetensors) to GGUF, in one pass.

    A killed checkpoint conversion resumes when the same command is run again; two runs never write the
    same output at once (the second one stops with the first one's pid)."""
    kwargs = dict(out=output, out_type=out_type, policy=policy, tensor_types=tensor_type or [], threads=threads,
                  split_max_tensors=split_max_tensors, split_max_size=parse_size(split_max_size) if split_max_size else 0,
                  mmproj=not no_mmproj, mmproj_type=mmproj_type, mmproj_only=mmproj_only)
    if not dry_run:
        kwargs["quant_report"] = not no_report
    if no_mmproj and mmproj_only:
        raise fail("--no-mmproj and --mmproj-only contradict each other", 2)
    if eval_against is not None and not dry_run:
        if mmproj_only:
            raise fail("--eval-against measures the text model; drop --mmproj-only", 2)
        read_model(eval_against)  # a missing or broken reference fails before an hour of quantizing
    if dry_run:
        plan = convert(src, dry_run=True, **kwargs)
        files = ", ".join(str(f) for f in plan.files)
        if plan.files:
            ui.out.print(ui.plan_table(plan.rows, plan.total_bytes, plan.n_params,
                                       f"{plan.name} → {files} ({plan.out_type}, policy {plan.policy})"))
        if plan.mmproj is not None:
            rows = plan.mmproj_rows
            ui.out.print(ui.plan_table(rows, sum(r.nbytes for r in rows), count_params(rows),
                                       f"vision projector → {plan.mmproj} ({mmproj_type.upper()})"))
        return
    start = time.monotonic()
    try:
        with ui.byte_progress(out_type.upper()) as progress:
            result = convert(src, force=force, progress=progress, **kwargs)
    except KeyboardInterrupt:
        if is_gguf_source(src):  # llama.cpp's quantizer writes in one go: nothing to resume from
            print("interrupted: re-quantizing a GGUF cannot resume; nothing was kept, and the same command "
                  "starts over", file=sys.stderr)
        else:
            print("interrupted: run the same command again to resume from the last complete tensor", file=sys.stderr)
        raise
    elapsed = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    files = ", ".join(str(f) for f in [*result.files, *([result.mmproj] if result.mmproj else [])])
    ui.err.print(f"wrote [bold]{files}[/] ({ui.human_bytes(result.total_bytes)}, {result.bits_per_weight:.2f} bpw, "
                 f"policy {result.policy}) in {elapsed:.1f} s, peak memory {ui.human_bytes(peak)}; "
                 f"chat template: {result.chat_template_source}")
    if result.report is not None:
        ui.err.print(ui.quant_error_table(result.report.by_class()))
    if eval_against is not None and result.files:
        with ui.eval_progress("eval vs reference") as progress:
            evaluation = evaluate(result.files[0], reference=eval_against, n_ctx=eval_ctx, chunks=eval_chunks or None,
                                  progress=progress)
        ui.out.print(ui.eval_table(evaluation, size=result.total_bytes))
