"""llama.cpp's RPC backend (ggml-rpc) through ggml's backend registry: whether this build has it,
rpc-servers registered as devices, and the server loop that shares this machine's devices.

Both directions use llama.cpp's own code, found as its tools find it: the "RPC" registry and
`ggml_backend_reg_get_proc_address` for `ggml_backend_rpc_add_server` (the client, as
`common/arg.cpp`'s --rpc) and `ggml_backend_rpc_start_server` (as `tools/rpc/rpc-server.cpp`).
The client aborts the process on any fault, so `register_servers` probes every endpoint in Python
first (ms4local/rpc.py); a server lost later still aborts it, which is why the CLI runs an engine
that uses RPC servers in a child process (ms4local/child.py).
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from pathlib import Path

from ..errors import RpcError
from ..rpc import Endpoint, RemoteServer, parse_endpoints, preflight
from .library import ggml_fn

_lock = threading.Lock()
_registered: dict[str, list[int]] = {}  # endpoint → its device handles, in the server's order

NO_RPC = ("this llama-cpp-python build has no RPC backend (libggml-rpc); `make install` rebuilds it with "
          "-DGGML_RPC=on")


def library_file() -> Path | None:
    """libggml-rpc in llama_cpp/lib of this environment, found without loading llama.cpp (None: absent)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for pattern in ("libggml-rpc.so*", "libggml-rpc.dylib", "ggml-rpc.dll"):
            found = sorted((Path(folder) / "lib").glob(pattern))
            if found:
                return found[0]
    return None


def _registry() -> int | None:
    return ggml_fn("ggml_backend_reg_by_name", ctypes.c_void_p, ctypes.c_char_p)(b"RPC")


def available() -> bool:
    """True when the loaded llama.cpp has the RPC backend in its registry."""
    return bool(_registry())


def _proc(name: str, restype: object, *argtypes: object) -> object:
    reg = _registry()
    if not reg:
        raise RpcError(NO_RPC)
    addr = ggml_fn("ggml_backend_reg_get_proc_address", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
        reg, name.encode())
    if not addr:
        raise RpcError(f"this llama.cpp's RPC backend has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def register_servers(endpoints: list[str] | list[Endpoint]) -> list[RemoteServer]:
    """Make each rpc-server's devices llama.cpp devices, as llama.cpp's --rpc does.

    Every endpoint is probed first (an unreachable, refused or mismatched one is an RpcError
    naming it, where llama.cpp would abort), then added once per process: the registry cannot
    drop a backend, and adding one twice would list its devices twice.
    """
    eps = parse_endpoints(str(e) for e in endpoints)
    servers = preflight(eps)
    add = _proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    register = ggml_fn("ggml_backend_register", None, ctypes.c_void_p)
    dev_count = ggml_fn("ggml_backend_reg_dev_count", ctypes.c_size_t, ctypes.c_void_p)
    dev_get = ggml_fn("ggml_backend_reg_dev_get", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    with _lock:
        for ep in eps:
            key = str(ep)
            if key in _registered:
                continue
            reg = add(key.encode())  # connects again (the probe has closed): the server serves one client at a time
            if not reg:
                raise RpcError(f"rpc-server {key} shares no device", endpoint=key)
            register(reg)
            _registered[key] = [dev_get(reg, i) for i in range(dev_count(reg))]
    return servers


def device_handles(endpoints: list[str] | list[Endpoint]) -> list[int]:
    """The registered devices of these endpoints, in --rpc order (register them first)."""
    with _lock:
        return [h for ep in endpoints for h in _registered.get(str(ep), [])]


def registered_handles() -> set[int]:
    """Every RPC device registered in this process (llama.cpp would offload to all of them)."""
    with _lock:
        return {h for hs in _registered.values() for h in hs}


def local_device(name: str) -> int | None:
    """A device of this machine by ggml name (CPU, CUDA0, Metal …), or None."""
    return ggml_fn("ggml_backend_dev_by_name", ctypes.c_void_p, ctypes.c_char_p)(name.encode()) or None


def start_server(endpoint: str, *, devices: list[int], threads: int, cache_dir: str | None = None) -> None:
    """Serve `devices` (handles) on `endpoint` with llama.cpp's RPC server; blocks while it serves.

    It returns only when it could not start (a bad address, a port in use: llama.cpp prints why on
    stderr); it has no stop call, so whoever runs it ends the process to stop it.
    """
    start = _proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    arr = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), arr)
