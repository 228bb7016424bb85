"""`ms4local pull NAME`: fetch a GGUF quant (or the HF checkpoint) from the Hugging Face Hub into its
cache. Declares options and hands off to `ms4local.hub.pull`; the plan and the bar are drawn here,
and reused by every command that takes a model name (`fetch`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .. import hub, ui
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
    resolved = fetch(hub.require_name(name), mmproj=not no_mmproj, always=True)
    ui.err.print(f"{escape(str(resolved.name))} ({ui.human_bytes(resolved.nbytes)}"
                 + (f", projector {escape(resolved.mmproj.name)}" if resolved.mmproj else "")
                 + f"): {escape(str(resolved.model))}", soft_wrap=True)


def fetch(name: hub.HubName, *, mmproj: bool = True, always: bool = False) -> hub.Resolved:
    """`name` from the cache, or pulled with the plan and a progress bar (`always`: ask the Hub for
    the current files even when the cache has them, as `pull` does)."""
    run = hub.pull if always else hub.resolve
    try:
        with ui.byte_progress("download") as bar:
            return run(name, mmproj=mmproj, on_plan=show_plan,
                       progress=lambda done, total, path: bar(done, total, path.rsplit("/", 1)[-1]))
    except KeyboardInterrupt:
        print(f"interrupted: run `ms4local pull {name}` again to resume where it stopped", file=sys.stderr)
        raise


def show_plan(plan: hub.PullPlan) -> None:
    """The files a pull fetches, their sizes and what the cache already has, on stderr."""
    ui.err.print(f"[bold]{escape(str(plan.name))}[/] from {escape(plan.selection.name.repo_id)} at commit "
                 f"{plan.revision[:12]}", soft_wrap=True)
    table = Table(header_style="bold")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("cache")
    for f in plan.files:
        state = ("in the cache" if f.path in plan.cached else
                 f"resume from {ui.human_bytes(plan.partial[f.path])}" if f.path in plan.partial else "")
        table.add_row(escape(f.path), ui.human_bytes(f.size), state)
    table.caption = (f"{len(plan.files)} files, {ui.human_bytes(plan.total)}; "
                     + (f"{ui.human_bytes(plan.to_fetch)} to download" if plan.to_fetch else "all in the cache"))
    ui.err.print(table)
