"""`ms4local eval`: perplexity over a text, and KL divergence against a reference GGUF.

Declares options and hands off to `ms4local.evaluate.evaluate`; the progress bar and the result
table are `ui.eval_progress` and `ui.eval_table` (which `quantize --eval-against` draws too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import ui
from ..evaluate import DEFAULT_CTX, evaluate, read_text
from . import options
from .errors import handle_errors

Reference = Annotated[Optional[str], typer.Option(
    "--reference", metavar="REF.gguf", show_default=False,
    help="Compare with this GGUF (e.g. the F32/BF16 file the quantization came from): KL divergence, top-1 agreement.")]
TextFile = Annotated[Optional[Path], typer.Option(
    "--text", metavar="FILE", show_default=False,
    help="UTF-8 text to score (default: a bundled public-domain sample, ~9 KB).")]
Chunks = Annotated[int, typer.Option("--chunks", help="Score at most this many chunks of -c tokens (0: all).")]


@handle_errors
@options.from_hub(projector=False)
@options.isolate_rpc
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
    fit: options.Fit = None,
    vram: options.Vram = None,
    no_repair: options.NoRepair = False,
    as_json: options.Json = False,
) -> None:
    """Perplexity of MODEL over a text (chunked like llama-perplexity); with --reference the KL divergence
    of its next-token distributions from the reference's, computed in one pass over both."""
    opts = options.engine_options(ctx_size=ctx_size, threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                                  no_repair=no_repair, tensor_split=tensor_split, rpc=rpc, fit=fit, vram=vram)
    content, name = read_text(text) if text is not None else (None, None)
    with ui.eval_progress("eval" if reference is None else "eval vs reference") as progress:
        result = evaluate(model, reference=reference, text=content, text_name=name, n_ctx=ctx_size,
                          chunks=chunks or None, options=opts, progress=progress)
    if as_json:
        print(json.dumps(result.to_json(), indent=1))
        return
    ui.out.print(ui.eval_table(result))
