"""`ms4local tokenize`: the ids llama.cpp produces for a text with a GGUF's vocabulary."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .. import ui
from ..engine import Engine, EngineOptions
from . import options
from .errors import handle_errors


@handle_errors
def tokenize(
    model: options.Model,
    text: Annotated[str, typer.Argument(help="Text to tokenize; control tokens like [INST] are parsed.", show_default=False)],
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Add BOS as the model's metadata asks.")] = True,
    as_json: options.Json = False,
) -> None:
    """Print token ids and pieces, like llama.cpp's llama-tokenize."""
    with Engine(model, EngineOptions(vocab_only=True)) as engine:
        ids = engine.tokenize(text, add_special=bos, parse_special=True)
        pieces = [engine.piece(i).decode("utf-8", "replace") for i in ids]
    if as_json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
        return
    for i, p in zip(ids, pieces):
        ui.out.print(f"{i:>7} -> {p!r}", markup=False)
