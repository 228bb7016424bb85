"""`ms4local rm NAME[:QUANT]`: free a model from the Hugging Face cache (huggingface_hub's own
deletion). Hands off to `ms4local.hub.remove`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from .. import hub, ui
from .errors import handle_errors


@handle_errors
def rm(name: Annotated[str, typer.Argument(
        help="org/repo (the whole repo) or org/repo:QUANT (that quant, every part).", show_default=False)]) -> None:
    """Delete a model from the Hugging Face cache: `org/repo:QUANT` that quant's files (and the
    projector when no other quant of the repo stays), `org/repo` the whole repo."""
    parsed = hub.require_name(name)
    freed = hub.remove(parsed, hub=hub.HubSettings.from_env())
    ui.err.print(f"removed {escape(str(parsed))} from the Hugging Face cache, freed {ui.human_bytes(freed)}")
