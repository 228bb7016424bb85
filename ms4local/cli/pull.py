"""`ms4local pull NAME`: fetch a GGUF quant (or the HF checkpoint) from the Hugging Face Hub into its
cache. Declares options and hands off to `options.fetch` (the same plan and bar every command that
takes a model name shows)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from .. import hub, ui
from . import options
from .errors import handle_errors

Name = Annotated[str, typer.Argument(
    help="org/repo:QUANT of a GGUF repo (the quant is matched in file and folder names, any case; "
         "default Q4_K_M), or org/repo of a safetensors checkpoint.", show_default=False)]
NoMmproj = Annotated[bool, typer.Option("--no-mmproj", help="Do not fetch the repo's vision projector.")]


@handle_errors
def pull(name: Name, no_mmproj: NoMmproj = False) -> None:
    """Download a model from the Hugging Face Hub into its local cache (HF_HUB_CACHE): only the files
    of that quant (every part of a split set) and its vision projector; for a checkpoint only what
    `ms4local quantize` reads. Interrupted, the same command resumes."""
    resolved = options.fetch(hub.require_name(name), mmproj=not no_mmproj, always=True)
    ui.err.print(f"{escape(str(resolved.name))} ({ui.human_bytes(resolved.nbytes)}"
                 + (f", projector {escape(resolved.mmproj.name)}" if resolved.mmproj else "")
                 + f"): {escape(str(resolved.model))}", soft_wrap=True)
