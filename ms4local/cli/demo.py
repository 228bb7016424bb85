"""`ms4local demo`: the whole pipeline, offline, on a generated tiny model with random weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from quantize import convert
from quantize.synth import TinySpec, make_checkpoint

from .. import ui
from ..engine import Delta, Engine, EngineOptions, Sampling
from .errors import handle_errors

NAME = "Mistral-Small-4-Tiny-Random"
PROMPT = "Bonjour ! Quelle est la capitale de la France ?"


@handle_errors
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo checkpoint and GGUF go.")] = Path("models/demo"),
    out_type: Annotated[str, typer.Option("--type", help="GGUF type to convert to.")] = "Q8_0",
) -> None:
    """Generate a Mistral-Small-4-shaped checkpoint, convert it, and answer one prompt."""
    ui.err.print("[bold]ms4local demo[/] — the real pipeline on a tiny model. "
                 "[yellow]Its weights are RANDOM (seeded): expect gibberish, not an answer.[/]")
    ckpt = workdir / NAME
    if ckpt.exists():
        shutil.rmtree(ckpt)
    spec = TinySpec(dtype="FP8", seed=0)
    ui.err.print(f"1/3 checkpoint: {ckpt} (FP8 like the official weights, real tekken vocabulary, "
                 f"{spec.layers} layers, {spec.experts} experts + 1 shared, MLA)")
    make_checkpoint(ckpt, spec)
    gguf_path = workdir / f"{NAME}-{out_type.upper()}.gguf"
    with ui.byte_progress(f"2/3 {out_type.upper()}") as progress:
        result = convert(ckpt, out=gguf_path, out_type=out_type, force=True, progress=progress)
    ui.err.print(f"    wrote {result.output} ({ui.human_bytes(result.total_bytes)})")
    ui.err.print(f"3/3 llama.cpp answers through the embedded chat template: [italic]{PROMPT}[/]")
    with Engine(result.output, EngineOptions(ctx_size=512)) as engine:
        stream = ui.Streamer()
        for event in engine.chat([{"role": "user", "content": PROMPT}], Sampling(temperature=0.7, max_tokens=24, seed=0)):
            if isinstance(event, Delta):
                stream.write(event.text, event.reasoning)
            else:
                done = event
        stream.finish()
    ui.err.print(ui.stats_line(done), style="dim")
    ui.err.print("Random weights, real path: safetensors (FP8) → GGUF mistral4 → llama.cpp. "
                 "For the real model: ms4local quantize mistralai/Mistral-Small-4-119B-2603 --type Q8_0")
