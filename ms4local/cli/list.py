"""`ms4local list`: the Mistral Small 4 models in the Hugging Face cache and in models/.
Hands off to `ms4local.hub.inventory`; the table is drawn here."""

from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table

from quantize.convert import models_dir

from .. import ui
from ..hub import HubSettings
from ..hub.inventory import inventory
from . import options
from .errors import handle_errors


@handle_errors
def list_models(as_json: options.Json = False) -> None:
    """List the Mistral Small 4 GGUFs and checkpoints in the Hugging Face cache (HF_HUB_CACHE) and in
    models/ (MS4LOCAL_MODELS): name to pass to a command, quant, size, split parts, projector, and
    whether the download is complete."""
    hub = HubSettings.from_env()
    entries = inventory(hub=hub, models_dir=models_dir())
    if as_json:
        print(json.dumps([{"name": e.name, "where": e.where, "kind": e.kind, "quant": e.quant, "bytes": e.nbytes,
                           "parts": list(e.parts), "projector": e.projector, "complete": e.complete,
                           "path": str(e.path), "repair": list(e.repair)} for e in entries], indent=1))
        return
    if not entries:
        ui.err.print(f"no Mistral Small 4 model in {hub.cache_dir} or {models_dir()}; "
                     "`ms4local pull org/repo:QUANT` fetches one", highlight=False, markup=False)
        return
    table = Table(header_style="bold")
    for col, just in (("name", "left"), ("quant", "left"), ("size", "right"), ("parts", "right"),
                      ("projector", "left"), ("state", "left"), ("repair at load", "left"), ("where", "left")):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for e in entries:
        table.add_row(escape(e.name), e.quant or "", ui.human_bytes(e.nbytes), f"{e.parts[0]}/{e.parts[1]}",
                      escape(e.projector or "–"), "complete" if e.complete else "[yellow]incomplete[/]",
                      escape(", ".join(e.repair)), e.where)
    ui.out.print(table)
