"""`ms4local quantize`: HF checkpoint → GGUF. Declares options, hands off to `quantize.convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import quantize as converter
from quantize.policy import OUTPUT_TYPES

from .. import ui
from .errors import handle_errors

TYPES = list(OUTPUT_TYPES)


@handle_errors
def quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint directory, or a Hugging Face repo id in the local HF cache.",
                                       show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (default: models/<Name>-<TYPE>.gguf).")] = None,
    out_type: Annotated[str, typer.Option("--type", help=f"Output type: {', '.join(TYPES)}.")] = "Q8_0",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-tensor plan and write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Convert a Mistral Small 4 checkpoint (FP8/BF16/F16/F32 safetensors) to GGUF."""
    if dry_run:
        plan = converter.convert(src, out=output, out_type=out_type, dry_run=True)
        ui.out.print(ui.plan_table(plan.rows, plan.total_bytes, plan.n_params, f"{plan.name} → {plan.output} ({plan.out_type})"))
        return
    with ui.byte_progress(f"{out_type.upper()}") as progress:
        result = converter.convert(src, out=output, out_type=out_type, force=force, progress=progress)
    ui.err.print(f"wrote [bold]{result.output}[/] ({ui.human_bytes(result.total_bytes)}, "
                 f"{8 * result.total_bytes / max(result.n_params, 1):.2f} bpw; chat template: {result.chat_template_source})")
