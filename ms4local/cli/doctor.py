"""`ms4local doctor`: what this installation can run, checked rather than assumed.

The llama.cpp inside llama-cpp-python decides everything that matters here: which backends
were compiled in (a pip install without CMAKE_ARGS is CPU-only), which devices they see, and
whether it knows the `mistral4` architecture at all. The last is checked the only way that
cannot be fooled: a tiny Mistral-4-shaped GGUF is generated, loaded and run.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from quantize import convert
from quantize.synth import TinySpec, make_checkpoint

from .. import engine, ui
from ..engine import Engine, EngineOptions
from ..engine import rpc as engine_rpc
from ..errors import Ms4localError
from ..rpc import parse_endpoints, preflight
from . import options
from .errors import handle_errors
from .isolate import isolate_rpc


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def memory() -> dict[str, int]:
    """Total and available RAM in bytes (Linux: /proc/meminfo; elsewhere what sysconf knows)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree", 0))}
    except (OSError, KeyError, ValueError, IndexError):
        import os

        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            avail = 0
        return {"total": total, "available": avail}


def check_mistral4(rpc: list[str] | None = None) -> tuple[bool, str]:
    """Generate a tiny Mistral 4 GGUF, load it with this llama.cpp and evaluate a few tokens
    (with `rpc`, every layer on those rpc-servers)."""
    with tempfile.TemporaryDirectory(prefix="ms4local-doctor-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "Tiny-Mistral4", TinySpec(vocab=2000, seed=0))
        gguf = convert(ckpt, out=Path(tmp) / "tiny.gguf", out_type="F32").output
        try:
            with Engine(gguf, EngineOptions(ctx_size=64, rpc=list(rpc or []))) as e:
                ids = e.tokenize("Bonjour le monde", add_special=True)
                e.logits(ids)
                arch = e.metadata.get("general.architecture", "?")
        except Ms4localError as err:
            return False, str(err)
    where = f" with every layer on {', '.join(rpc)}" if rpc else ""
    return True, f"a generated tiny {arch} GGUF loads and runs{where}"


def collect(rpc: list[str] | None = None) -> dict[str, Any]:
    """Everything `doctor` reports, as plain data (with `rpc`, those servers and a run through them)."""
    servers = preflight(parse_endpoints(rpc)) if rpc else []
    library = engine_rpc.library_file()
    rpc_report = {"available": engine_rpc.available(), "library": str(library) if library else None,
                  "servers": [s.to_json() for s in servers]}
    ok, detail = check_mistral4(rpc)
    devs = engine.devices()
    return {
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama-cpp-python"),
        "gguf": _version("gguf"),
        "ms4local": _version("ms4local"),
        "system_info": engine.system_info(),
        "backends": [{"name": n, "devices": c} for n, c in engine.backends()],
        "devices": [vars(d) for d in devs],
        "gpu_offload": any(d.kind in ("GPU", "iGPU") for d in devs),
        "ram": memory(),
        "rpc": rpc_report,
        "mistral4": {"ok": ok, "detail": detail},
    }


@handle_errors
@isolate_rpc
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
