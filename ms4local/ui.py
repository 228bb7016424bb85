"""Terminal presentation with rich: progress bars, plan tables, streamed answers. No logic here."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich bar over bytes with throughput and ETA; yields the callback the library calls.

    The bar appears on the first callback, so a run that fails its checks prints only its error.
    """
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[tensor]}"))
    progress = Progress(*columns, console=err, transient=False)
    task = None

    def update(done: int, total: int, tensor: str) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(description, total=total, tensor="")
        progress.update(task, completed=done, total=total, tensor=tensor)

    try:
        yield update
    finally:
        if task is not None:
            progress.stop()


@contextmanager
def fraction_progress(description: str) -> Iterator[Callable[[float], None]]:
    """A bar over a 0..1 fraction (llama.cpp's load progress)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(description, total=1.0)
        yield lambda p: progress.update(task, completed=p)


def plan_table(rows: list[Any], total_bytes: int, n_params: int, title: str) -> Table:
    table = Table(title=title, show_lines=False, header_style="bold")
    for col, just in (("tensor", "left"), ("shape (ne)", "left"), ("source", "left"), ("type", "left"),
                      ("bytes", "right"), ("why", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r.name, "×".join(map(str, r.shape)), r.source_dtype, r.type, human_bytes(r.nbytes), r.rule)
    bpw = 8 * total_bytes / max(n_params, 1)
    table.caption = f"{len(rows)} tensors, {n_params:,} parameters, {human_bytes(total_bytes)}, {bpw:.2f} bits per weight"
    return table


class Streamer:
    """Writes streamed deltas: the answer to stdout, reasoning dimmed to stderr."""

    def __init__(self) -> None:
        self.in_reasoning = False

    def write(self, text: str, reasoning: bool) -> None:
        if reasoning:
            err.print(text, style="dim", end="", soft_wrap=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


def stats_line(done: Any) -> str:
    u, t = done.usage, done.timings
    return (f"prompt {u.prompt_tokens} tok ({u.cached_tokens} cached) · {u.completion_tokens} generated · "
            f"TTFT {t.ttft_seconds * 1000:.0f} ms · {t.decode_tps:.1f} tok/s · {done.finish_reason}")
