"""Option types shared by several commands, declared once with llama.cpp's names."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Argument(help="A GGUF file (the first file of a split set).", show_default=False)]
CtxSize = Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")]
Threads = Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads (default: all cores).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: random).")]
Temp = Annotated[Optional[float], typer.Option("--temp", help="Temperature (default 0.7 with high effort, 0.1 with none).")]
MaxTokens = Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens to generate.")]
ReasoningEffort = Annotated[str, typer.Option("--reasoning-effort", help="none: answer directly; high: think first.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
