"""`ms4local doctor`: declares the command, hands off to `ms4local.doctor.collect` and draws the report."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.table import Table

from .. import ui
from ..doctor import collect
from . import options
from .errors import handle_errors


@handle_errors
@options.isolate_rpc
def doctor(as_json: options.Json = False, rpc: options.Rpc = None) -> None:
    """Show llama.cpp's backends and devices, memory, whether it runs Mistral 4 (through --rpc servers too)."""
    report = collect(rpc)
    if as_json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print(report)
    if not report["mistral4"]["ok"]:
        raise typer.Exit(1)


def _print(r: dict[str, Any]) -> None:
    h = ui.human_bytes
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("python", f"{r['python']} ({sys.executable})")
    facts.add_row("llama-cpp-python", r["llama_cpp_python"])
    facts.add_row("gguf", r["gguf"])
    facts.add_row("backends", ", ".join(f"{b['name']} ({b['devices']} device{'s' * (b['devices'] != 1)})"
                                        for b in r["backends"]) or "none")
    facts.add_row("CPU features", r["system_info"])
    facts.add_row("RAM", f"{h(r['ram']['total'])} total, {h(r['ram']['available'])} available")
    facts.add_row("GPU offload", "yes" if r["gpu_offload"] else
                  "no: this build is CPU-only (`make install-cuda` or `make install-metal` rebuilds it)")
    rpc = r["rpc"]
    facts.add_row("RPC", f"yes ({rpc['library']})" if rpc["available"] else
                  "no: built without -DGGML_RPC=on, so no rpc-server or --rpc (`make install` rebuilds it)")
    for s in rpc["servers"]:
        mem = ", ".join(f"#{d['index']} {h(d['free'])} free of {h(d['total'])}" for d in s["devices"])
        facts.add_row("", f"rpc-server {s['endpoint']}: protocol {s['protocol']}, {mem}")
    m4 = r["mistral4"]
    facts.add_row("mistral4", ("[green]yes[/]: " if m4["ok"] else "[red]no[/]: ") + m4["detail"].replace("[", r"\["))
    ui.out.print(facts)
    devices = Table(title="devices", header_style="bold")
    for col, just in (("name", "left"), ("kind", "left"), ("description", "left"), ("free", "right"), ("total", "right")):
        devices.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in r["devices"]:
        devices.add_row(d["name"], d["kind"], d["description"], h(d["free"]), h(d["total"]))
    ui.out.print(devices)
