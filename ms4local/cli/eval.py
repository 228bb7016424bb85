"""`ms4local eval`: perplexity over a text, and KL divergence against a reference GGUF.

Declares options and hands off to `ms4local.evaluate.evaluate`; the progress bar and the result
table are drawn here (and reused by `quantize --eval-against`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import ui
from ..errors import EvalError
from ..evaluate import DEFAULT_CTX, EvalResult, evaluate
from . import options
from .errors import handle_errors
from .isolate import isolate_rpc

Reference = Annotated[Optional[str], typer.Option(
    "--reference", metavar="REF.gguf", show_default=False,
    help="Compare with this GGUF (e.g. the F32/BF16 file the quantization came from): KL divergence, top-1 agreement.")]
TextFile = Annotated[Optional[Path], typer.Option(
    "--text", metavar="FILE", show_default=False,
    help="UTF-8 text to score (default: a bundled public-domain sample, ~9 KB).")]
Chunks = Annotated[int, typer.Option("--chunks", help="Score at most this many chunks of -c tokens (0: all).")]


@contextmanager
def eval_progress(description: str) -> Iterator[Callable[[int, int, float], None]]:
    """A rich bar over chunks with the running perplexity; yields the callback `evaluate` calls."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
               TimeRemainingColumn(), TextColumn("[dim]PPL {task.fields[ppl]}"))
    with ui.lazy_progress(description, columns, transient=True, ppl="…") as update:
        yield lambda done, total, ppl: update(done, total, ppl=f"{ppl:.4g}")


def result_table(r: EvalResult, *, size: int | None = None) -> Table:
    """The figures of one evaluation (with the file size when given, as after quantizing)."""
    title = f"{r.model.name}" + (f" vs {r.reference.name}" if r.reference else "")
    t = Table(title=title, header_style="bold", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    if size is not None:
        t.add_row("file size", ui.human_bytes(size))
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


def run_eval(model: str | Path, *, reference: str | None, text: Path | None, ctx_size: int, chunks: int,
             engine_opts: object | None = None) -> EvalResult:
    """Read the text, evaluate with a progress bar; shared by `eval` and `quantize --eval-against`."""
    content = name = None
    if text is not None:
        try:
            content, name = text.read_text(encoding="utf-8"), str(text)
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read --text {text}: {getattr(e, 'strerror', None) or e}") from None
    with eval_progress("eval" if reference is None else "eval vs reference") as progress:
        return evaluate(model, reference=reference, text=content, text_name=name, n_ctx=ctx_size,
                        chunks=chunks or None, options=engine_opts, progress=progress)  # type: ignore[arg-type]


@handle_errors
@isolate_rpc
def eval_command(
    model: options.Model,
    reference: Reference = None,
    text: TextFile = None,
    ctx_size: options.CtxSize = DEFAULT_CTX,
    chunks: Chunks = 0,
    threads: options.Threads = None,
    n_gpu_layers: options.NGpuLayers = None,
    tensor_split: options.TensorSplit = None,
    flash_attn: options.FlashAttn = "auto",
    rpc: options.Rpc = None,
    as_json: options.Json = False,
) -> None:
    """Perplexity of MODEL over a text (chunked like llama-perplexity); with --reference the KL divergence
    of its next-token distributions from the reference's, computed in one pass over both."""
    opts = options.engine_options(ctx_size=ctx_size, threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                  tensor_split=tensor_split, rpc=rpc)
    result = run_eval(model, reference=reference, text=text, ctx_size=ctx_size, chunks=chunks, engine_opts=opts)
    if as_json:
        print(json.dumps(result.to_json(), indent=1))
        return
    ui.out.print(result_table(result))
