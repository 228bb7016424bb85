"""`ms4local rpc-server`: share this machine's devices with another host's ms4local (or llama.cpp)
through llama.cpp's own RPC server, as `tools/rpc/rpc-server` does.

llama.cpp's server loop blocks for good and has no stop call, so it runs in a daemon thread while
the main thread waits for Ctrl-C or SIGTERM; then the process ends at once (`os._exit`, after
flushing), since a normal interpreter exit would run C++ destructors under the thread still
serving. Everything that can fail is checked first in Python — the address, the port, the
devices, the cache folder — because llama.cpp would only print a line and return.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import ui
from ..engine import devices as list_devices
from ..engine import rpc as engine_rpc
from ..engine import set_log_listener
from ..errors import OptionsError, RpcError
from ..rpc import DEFAULT_PORT, PROTOCOL, is_loopback, probe
from .errors import handle_errors

GGML_LOG_WARN, GGML_LOG_ERROR = 3, 4
READY_TIMEOUT = 20.0  # seconds for llama.cpp to open the port (backends start first)

Host = Annotated[str, typer.Option(
    "--host", help="IPv4 address to bind. Anything but loopback exposes the devices without authentication or "
                   "encryption: a private network or an SSH tunnel only.")]
Port = Annotated[int, typer.Option("--port", help="TCP port.")]
ServerThreads = Annotated[Optional[int], typer.Option(
    "-t", "--threads", show_default=False, help="Threads of the CPU device (default: half the cores, as llama.cpp's).")]
Cache = Annotated[Optional[Path], typer.Option(
    "--cache", metavar="DIR", show_default=False,
    help="llama.cpp's tensor cache: weights over 10 MiB are kept here by hash, so loading the model again does "
         "not send them over the network.")]
DeviceNames = Annotated[Optional[list[str]], typer.Option(
    "--device", metavar="NAME[,NAME…]", show_default=False,
    help="Devices to share (CPU, CUDA0, Metal …; see `ms4local doctor`). Default: every GPU, or the CPU when "
         "there is none.")]


def check_address(host: str, port: int) -> str:
    """`host:port` for llama.cpp (which binds IPv4 literals only), after checking that it can bind."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise OptionsError(f"--host must be an IPv4 address (llama.cpp's rpc-server binds no names or IPv6), "
                           f"got {host!r}") from None
    if not 0 < port < 65536:
        raise OptionsError(f"--port must be within 1-65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp binds it
        try:
            s.bind((host, port))
        except OSError as e:
            raise RpcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return f"{host}:{port}"


def pick_devices(names: list[str] | None) -> tuple[list[int], list[str]]:
    """Handles and names of the devices to share: the named ones, or llama.cpp's default choice."""
    wanted = [n.strip() for value in names or [] for n in value.replace("/", ",").split(",") if n.strip()]
    devs = list_devices()
    if wanted:
        handles = []
        for name in wanted:
            handle = engine_rpc.local_device(name)
            if handle is None:
                have = ", ".join(d.name for d in devs if d.backend != "RPC")
                raise OptionsError(f"--device {name}: no such device here; this build has {have}")
            handles.append(handle)
        return handles, wanted
    # tools/rpc/rpc-server.cpp: every accelerator (GPU, iGPU), else the CPU.
    chosen = [d.name for d in devs if d.kind not in ("CPU", "ACCEL") and d.backend != "RPC"] or \
        [d.name for d in devs if d.kind == "CPU"][:1]
    return [h for n in chosen if (h := engine_rpc.local_device(n)) is not None], chosen


@handle_errors
def rpc_server(
    host: Host = "127.0.0.1",
    port: Port = DEFAULT_PORT,
    threads: ServerThreads = None,
    cache: Cache = None,
    device: DeviceNames = None,
) -> None:
    """Share this machine's devices with ms4local on another host (`--rpc HOST:PORT` there)."""
    endpoint = check_address(host, port)
    n_threads = threads if threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if n_threads < 1:
        raise OptionsError(f"-t/--threads must be at least 1, got {n_threads}")
    cache_dir = None
    if cache is not None:
        try:
            cache.expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptionsError(f"--cache {cache}: {e.strerror or e}") from None
        cache_dir = str(cache.expanduser().resolve())
    if not engine_rpc.available():
        raise RpcError(engine_rpc.NO_RPC)
    handles, names = pick_devices(device)
    if not handles:
        raise RpcError("no device to share")
    if not is_loopback(host):
        ui.err.print(f"warning: rpc-server on {host}: llama.cpp's RPC has no authentication and no encryption — "
                     "anyone who reaches this port can run code on these devices and read what they hold. Use it on "
                     "a private network, or bind 127.0.0.1 and reach it through an SSH tunnel (see the README).",
                     style="yellow", markup=False, highlight=False, soft_wrap=True)
    set_log_listener(_show_warnings)
    serve_until_signal(endpoint, handles, names, n_threads, cache_dir)


def _show_warnings(level: int, text: str) -> None:
    """llama.cpp's warnings and errors (an unknown command, a bad tensor from a client) on stderr,
    where its own rpc-server prints them."""
    if level in (GGML_LOG_WARN, GGML_LOG_ERROR):
        sys.stderr.write(text)


def serve_until_signal(endpoint: str, handles: list[int], names: list[str], n_threads: int,
                       cache_dir: str | None) -> None:
    """Run llama.cpp's server in a daemon thread; return never (the process ends on a signal)."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server = threading.Thread(target=engine_rpc.start_server, name="rpc-server", daemon=True,
                              kwargs={"endpoint": endpoint, "devices": handles, "threads": n_threads,
                                      "cache_dir": cache_dir})
    server.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not stop.is_set():
        if not server.is_alive():
            _end(1, f"error: llama.cpp's rpc-server did not start on {endpoint} (its reason is above)")
        try:
            probe(endpoint, timeout=2.0)
            break
        except RpcError:
            if time.monotonic() > deadline:
                _end(1, f"error: llama.cpp's rpc-server did not open {endpoint} within {READY_TIMEOUT:g} s")
            stop.wait(0.1)
    if not stop.is_set():
        version = ".".join(map(str, PROTOCOL))
        cache_note = f", tensor cache {cache_dir}" if cache_dir else ""
        print(f"ms4local rpc-server listening on {endpoint} (RPC protocol {version}), sharing {', '.join(names)} "
              f"with {n_threads} CPU thread{'s' * (n_threads != 1)}{cache_note}; Ctrl-C stops it",
              file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        if not server.is_alive():
            _end(1, f"error: llama.cpp's rpc-server on {endpoint} stopped (its reason is above)")
    name = signal.Signals(received[0]).name if received else "signal"
    _end(0, f"rpc-server on {endpoint} stopped ({name})")


def _end(code: int, message: str) -> None:
    """Say why, flush Python's and C's buffers, and end the process now (see the module docstring)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)  # llama.cpp's printf lines (accepted / closed connections)
    except (OSError, AttributeError):
        pass
    os._exit(code)
