"""Terminal presentation with rich: progress bars, plan tables, streamed answers. No logic here."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

from markdown_it import MarkdownIt
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.text import Text
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .evaluate import EvalResult
    from .placement import Plan, SpreadPlan

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@contextmanager
def lazy_progress(description: str, columns: tuple[Any, ...], *, transient: bool = False,
                  **fields: Any) -> Iterator[Callable[..., None]]:
    """A rich bar that appears on the first update, so a run that fails its checks prints only its
    error; yields `update(done, total, **fields)`. `fields` are the initial values of the columns'
    `task.fields`."""
    progress = Progress(*columns, console=err, transient=transient)
    task = None

    def update(done: int, total: int, **values: Any) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(description, total=total, **fields)
        progress.update(task, completed=done, total=total, **values)

    try:
        yield update
    finally:
        if task is not None:
            progress.stop()


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar over bytes with throughput and ETA; yields the callback the library calls."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[tensor]}"))
    with lazy_progress(description, columns, tensor="") as update:
        yield lambda done, total, tensor: update(done, total, tensor=tensor)


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


@contextmanager
def eval_progress(description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A bar over chunks with the running perplexity; yields the callback `evaluate` calls."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
               TimeRemainingColumn(), TextColumn("[dim]PPL {task.fields[ppl]}"))
    with lazy_progress(description, columns, transient=True, ppl="…") as update:
        yield lambda done, total, ppl: update(done, total, ppl=f"{ppl:.4g}")


def eval_table(r: EvalResult, *, size: int | None = None) -> Table:
    """The figures of one evaluation (with the file size when given, as after quantizing)."""
    title = f"{r.model.name}" + (f" vs {r.reference.name}" if r.reference else "")
    t = Table(title=title, header_style="bold", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    if size is not None:
        t.add_row("file size", human_bytes(size))
    t.add_row("perplexity", f"{r.ppl:.4f} ± {r.ppl_stderr:.4f}")
    if r.kl is not None:
        k = r.kl
        t.add_row("reference perplexity", f"{k.reference_ppl:.4f}")
        t.add_row("ln(PPL / PPL ref)", f"{k.ln_ppl_ratio:+.5f}")
        t.add_row("KL divergence mean", f"{k.mean:.6f}")
        t.add_row("KL divergence median", f"{k.median:.6f}")
        t.add_row("KL divergence p99", f"{k.p99:.6f}")
        t.add_row("KL divergence max", f"{k.max:.6f}")
        t.add_row("same top token", f"{100 * k.top1_agreement:.2f}%")
        t.add_row("mean |Δp| of the reference's top token", f"{100 * k.mean_abs_dp_top:.3f}%")
    t.caption = (f"{r.chunks} chunks × {r.n_ctx} tokens, second half of each scored ({r.tokens} tokens) "
                 f"of {r.text}; {r.seconds:.1f} s")
    return t


def quant_error_table(by_class: dict[str, float]) -> Table:
    """The quantization-error report of a conversion: relative RMS error per tensor class, worst first."""
    table = Table(title="quantization error (relative RMS, sampled rows)", header_style="bold")
    table.add_column("class")
    table.add_column("rel. RMS error", justify="right")
    for cls, rms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        table.add_row(cls, f"{rms:.2e}")
    return table


def placement_table(plan: Plan, *, applied: bool = True) -> Table:
    """What goes where, with bytes per device, and the llama.cpp flags that express it."""
    how = f"-ngl {plan.n_gpu_layers} --n-cpu-moe {plan.n_cpu_moe}"
    title = f"--fit placement for {plan.device} ({human_bytes(plan.budget)} to spend): {how}"
    if not applied:
        title += " (not applied: no GPU)"
    table = Table(title=title, header_style="bold")
    table.add_column("what")
    table.add_column("device")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for row in plan.rows:
        table.add_row(row.what, row.device, str(row.tensors) if row.tensors else "", human_bytes(row.nbytes))
    table.caption = (f"GPU {human_bytes(plan.gpu_bytes)} of {human_bytes(plan.budget)} · "
                     f"RAM {human_bytes(plan.cpu_bytes)}")
    return table


def spread_table(spread: SpreadPlan) -> Table:
    """The --fit plan across hosts, one row per host, device and part, with the -ot rules it becomes."""
    main = spread.targets[0]
    title = (f"--fit placement across hosts: every block's attention, norms, router and shared expert on {main.device} "
             f"({main.host}), routed experts spread; -ngl {spread.n_gpu_layers}")
    table = Table(title=escape(title), header_style="bold")
    for col in ("host", "device", "free", "what", "size"):
        table.add_column(col, justify="right" if col in ("free", "size") else "left")
    for row in spread.rows:
        table.add_row(escape(row.host), escape(row.device), "–" if row.free is None else human_bytes(row.free),
                      escape(row.what), human_bytes(row.nbytes))
    per = [f"{t.device} {human_bytes(spread.device_bytes(t.device))} of {human_bytes(t.budget)}"
           for t in spread.targets if spread.device_bytes(t.device)]
    rules = ("\n-ot " + " -ot ".join(f"'{r}'" for r in spread.overrides)) if spread.overrides else ""
    table.caption = escape(" · ".join(per + [f"RAM {human_bytes(spread.cpu_bytes)}"]) + rules)
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


def turn_stats_line(turn: Any) -> str:
    """The line after a chat turn; a stopped turn has no `Done`, so it shows what is known."""
    if turn.done is not None and not turn.stopped:
        return stats_line(turn.done)
    kept = "partial answer kept" if turn.committed else "nothing kept"
    rate = ""
    if turn.first_token is not None and turn.generated > 1:
        # Tokens after the first over the time after it: the decode rate, as stats_line shows it.
        seconds = (turn.ended or time.perf_counter()) - turn.first_token
        rate = f" · {(turn.generated - 1) / seconds:.1f} tok/s" if seconds > 0 else ""
    return f"stopped · {turn.generated} generated{rate} · {kept}"


# ----------------------------------------------------------------------------------- chat turns
# Rich's Markdown drops raw HTML; an answer that writes <div> or <T> in prose must keep it.
_MD_PARSER = MarkdownIt("commonmark", {"html": False}).enable("strikethrough").enable("table")


class AnswerMarkdown(Markdown):
    """Rich's Markdown with raw HTML shown as text."""

    def __init__(self, text: str) -> None:
        super().__init__("")
        self.markup = text
        self.parsed = _MD_PARSER.parse(text)


class _Tail:
    """The last `max_lines` lines of a renderable: what a live view shows of a long answer."""

    def __init__(self, renderable: RenderableType, max_lines: int) -> None:
        self.renderable = renderable
        self.max_lines = max(1, max_lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options.reset_height(), pad=False)
        for line in lines[-self.max_lines:]:
            yield from line
            yield Segment.line()


class ChatView:
    """Draws one streamed chat turn: reasoning dim in its own panel above the answer (markdown).

    On an interactive terminal both are redrawn live, showing only their last lines so a long
    answer never scrolls out from under the redraw, then the whole turn is printed once. On a
    dumb terminal or a pipe the text is written as it comes, without markdown. With
    `hide_thinking` the reasoning folds to one line ("thought for N tokens").
    """

    REASONING_LINES = 6  # reasoning lines kept in view once the answer streams

    def __init__(self, console: Console | None = None, *, hide_thinking: bool = False) -> None:
        self.console = console or out
        self.hide_thinking = hide_thinking
        self.live = self.console.is_interactive
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.reasoning_tokens = 0
        self._t_first: float | None = None
        self._t_answer: float | None = None
        self._plain_state = ""  # "", "reasoning", "content": what the plain writer wrote last
        self._live: Live | None = None
        self._last = 0.0
        self._interval = 1 / 12

    # ------------------------------------------------------------------------------- lifetime
    def __enter__(self) -> ChatView:
        if self.live:
            self._live = Live(console=self.console, auto_refresh=False, transient=True, vertical_overflow="crop")
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._print_final()
        else:
            self._plain_end()

    def add(self, text: str, reasoning: bool) -> None:
        """One streamed delta."""
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
        if reasoning:
            self.reasoning.append(text)
            self.reasoning_tokens += 1
        else:
            if self._t_answer is None:
                self._t_answer = now
            self.content.append(text)
        if self._live is not None:
            if now - self._last >= self._interval:
                self._refresh()
        else:
            self._plain(text, reasoning)

    # ------------------------------------------------------------------------------- pieces
    def thought_line(self) -> str:
        end = self._t_answer or time.perf_counter()
        seconds = end - self._t_first if self._t_first is not None else 0.0
        return f"thought for {self.reasoning_tokens} tokens ({seconds:.1f} s)"

    def _reasoning_panel(self, body: RenderableType) -> Panel:
        return Panel(body, title="thinking", title_align="left", border_style="dim", style="dim")

    def _renderable(self) -> RenderableType:
        height = max(4, self.console.size.height - 2)
        parts: list[RenderableType] = []
        answer = "".join(self.content)
        if self.reasoning:
            if self.hide_thinking:
                parts.append(Text(f"thinking… {self.reasoning_tokens} tokens", style="dim"))
                height -= 1
            else:
                lines = min(self.REASONING_LINES, height // 3) if answer else height - 2
                parts.append(self._reasoning_panel(_Tail(Text("".join(self.reasoning).strip()), lines)))
                height -= lines + 2
        if answer:
            parts.append(_Tail(AnswerMarkdown(answer), height))
        return Group(*parts)

    def _refresh(self) -> None:
        if self._live is None:
            return
        t0 = time.perf_counter()
        self._live.update(self._renderable(), refresh=True)
        self._last = time.perf_counter()
        # Markdown is parsed again on each redraw; keep redraws to a small share of the time.
        self._interval = max(1 / 12, 4 * (self._last - t0))

    def _print_final(self) -> None:
        c = self.console
        if self.reasoning:
            if self.hide_thinking:
                c.print(self.thought_line(), style="dim", markup=False, highlight=False)
            else:
                c.print(self._reasoning_panel(Text("".join(self.reasoning).strip())))
        answer = "".join(self.content)
        if answer.strip():
            c.print(AnswerMarkdown(answer))

    def _plain(self, text: str, reasoning: bool) -> None:
        c = self.console
        if reasoning:
            if self.hide_thinking:
                return
            if self._plain_state != "reasoning":
                c.print("thinking:", style="dim", markup=False, highlight=False)
            c.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
            self._plain_state = "reasoning"
            return
        if self._plain_state != "content":
            if self.reasoning and self.hide_thinking:
                c.print(self.thought_line(), style="dim", markup=False, highlight=False)
            elif self._plain_state == "reasoning":
                c.print("\n", end="", markup=False)
        c.file.write(text)
        c.file.flush()
        self._plain_state = "content"

    def _plain_end(self) -> None:
        c = self.console
        if self.reasoning and self.hide_thinking and self._plain_state != "content":
            c.print(self.thought_line(), style="dim", markup=False, highlight=False)
        elif self._plain_state:
            c.file.write("\n")
            c.file.flush()
