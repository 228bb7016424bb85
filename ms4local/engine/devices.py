"""Devices and placement: which ggml devices this llama.cpp build has, and where a model's tensors go.

Placement is llama.cpp's own machinery driven from here: `n_gpu_layers` and
`tensor_buft_overrides` rules (--cpu-moe, --n-cpu-moe, -ot), with buffer types taken from the
ggml copy libllama is linked to; `place` resolves the options against the devices of this build
and runs the --fit planner (ms4local/placement.py) when asked, from the header it reads once and
hands on in `Placement.info` so that the engine does not read it again.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ModelLoadError, OptionsError
from ..gguf_model import ModelInfo, read_model
from ..placement import (DEFAULT_HEADROOM, EXPERTS_REGEX, Plan, SpreadPlan, Target, expert_overrides, order_targets, plan,
                         plan_across)
from .library import ggml_fn, llama
from ..system import free_ram
from ..rpc import RemoteServer
from .options import EngineOptions, parse_override
from .rpc import device_handles, register_servers, registered_handles

GGML_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "ACCEL"}
_OFFLOAD_TYPES = ("GPU", "iGPU")

@dataclass(frozen=True)
class Device:
    """A ggml backend device as llama.cpp sees it."""

    name: str  # CPU, CUDA0, Metal, Vulkan0 …
    description: str
    kind: str  # CPU | GPU | iGPU | ACCEL
    backend: str  # the registry it belongs to
    free: int  # bytes
    total: int  # bytes


def _dev_handles() -> list[int]:
    count = ggml_fn("ggml_backend_dev_count", ctypes.c_size_t)
    get = ggml_fn("ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
    return [get(i) for i in range(count())]


def _device(dev: int) -> Device:
    """The Device behind a ggml_backend_dev_t (an RPC device asks its server for its memory)."""
    name = ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
    desc = ggml_fn("ggml_backend_dev_description", ctypes.c_char_p, ctypes.c_void_p)
    dtype = ggml_fn("ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
    memory = ggml_fn("ggml_backend_dev_memory", None, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
    reg = ggml_fn("ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)
    reg_name = ggml_fn("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(name=(name(dev) or b"?").decode(), description=(desc(dev) or b"").decode(),
                  kind=GGML_DEVICE_TYPES.get(dtype(dev), "other"), backend=(reg_name(reg(dev)) or b"?").decode(),
                  free=int(free.value), total=int(total.value))


def devices() -> list[Device]:
    """Every device of this llama.cpp build (and of the rpc-servers registered), with its memory."""
    return [_device(dev) for dev in _dev_handles()]


def _local_offload_handles() -> list[int]:
    """This machine's GPUs as llama.cpp picks them by default: discrete ones, or the integrated
    ones when there is no discrete GPU."""
    rpc = registered_handles()
    local = [(h, _device(h).kind) for h in _dev_handles() if h not in rpc]
    gpus = [h for h, kind in local if kind == "GPU"]
    return gpus or [h for h, kind in local if kind == "iGPU"]


def gpu_devices() -> list[Device]:
    """This machine's devices that llama.cpp can offload layers to (discrete or integrated GPUs)."""
    rpc = registered_handles()
    return [d for h in _dev_handles() if h not in rpc and (d := _device(h)).kind in _OFFLOAD_TYPES]


def model_device_handles(opts: EngineOptions) -> list[int] | None:
    """The devices to hand llama.cpp in `llama_model_params.devices` for these options.

    None (llama.cpp's own choice) while no rpc-server is registered in this process. Once one
    is, llama.cpp would offload to every registered server, also for a model that names none, so
    the list is given explicitly, in llama.cpp's default order: this model's --rpc devices first
    (fewer transfers: the output layer stays local), then the local GPUs.
    """
    if not registered_handles():
        return None
    return device_handles(opts.rpc) + _local_offload_handles()


def offload_devices(opts: EngineOptions) -> list[Device]:
    """The devices layers may go to for these options, in llama.cpp's order (what -ts splits over)."""
    handles = model_device_handles(opts)
    if handles is None:
        return gpu_devices()
    return [_device(h) for h in handles]


def backends() -> list[tuple[str, int]]:
    """The backend registry: (name, number of devices) for each backend compiled in."""
    count = ggml_fn("ggml_backend_reg_count", ctypes.c_size_t)
    get = ggml_fn("ggml_backend_reg_get", ctypes.c_void_p, ctypes.c_size_t)
    reg_name = ggml_fn("ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    dev_count = ggml_fn("ggml_backend_reg_dev_count", ctypes.c_size_t, ctypes.c_void_p)
    return [((reg_name(get(i)) or b"?").decode(), int(dev_count(get(i)))) for i in range(count())]


def system_info() -> str:
    """llama.cpp's own summary of the CPU features it was built with."""
    return llama().llama_print_system_info().decode("utf-8", "replace").strip()


def buffer_types() -> dict[str, int]:
    """Buffer types an -ot rule may name, by buffer-type name and by device name (CPU, CUDA0 …).

    "CPU" is ggml_backend_cpu_buffer_type() itself: llama.cpp recognises it by pointer and then
    picks the best CPU buffer (repacked, or the GPU backend's pinned host memory).
    """
    dev_name = ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)
    dev_buft = ggml_fn("ggml_backend_dev_buffer_type", ctypes.c_void_p, ctypes.c_void_p)
    buft_name = ggml_fn("ggml_backend_buft_name", ctypes.c_char_p, ctypes.c_void_p)
    out: dict[str, int] = {}
    for dev in _dev_handles():
        buft = dev_buft(dev)
        if buft:
            out.setdefault((buft_name(buft) or b"?").decode(), buft)
            out.setdefault((dev_name(dev) or b"?").decode(), buft)
    out["CPU"] = ggml_fn("ggml_backend_cpu_buffer_type", ctypes.c_void_p)()
    return out


class BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override` (llama-cpp-python declares the field
    of llama_model_params as a bare pointer and no struct)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_rules(opts: EngineOptions, n_layer: int | None = None) -> list[str]:
    """All REGEX=BUFT rules a set of options asks for, in the order llama.cpp tries them:
    the user's -ot first (the first match wins), then --cpu-moe / --n-cpu-moe."""
    rules = list(opts.override_tensor)
    if opts.cpu_moe:
        rules.append(EXPERTS_REGEX + "=CPU")
    elif opts.n_cpu_moe > 0:
        rules += expert_overrides(opts.n_cpu_moe, n_layer)
    return rules


# ----------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """How a model will be placed: concrete options (--fit resolved), the plan, remarks for the user."""

    options: EngineOptions  # fit resolved into n_gpu_layers / n_cpu_moe; fit is False
    plan: Plan | None = None  # what --fit chose, when it ran
    applied: bool = True  # False when the plan was only computed (no GPU in this build)
    notices: tuple[str, ...] = ()
    single_gpu: str | None = None  # --fit plans for one device: the model goes to this one only
    info: ModelInfo | None = None  # the model's header as `place` read it (None: unreadable, left to llama.cpp)
    spread: SpreadPlan | None = None  # what --fit chose across hosts (--rpc), when it ran


def place(model_path: str | os.PathLike[str], options: EngineOptions, info: ModelInfo | None = None) -> Placement:
    """Resolve the placement options against the devices of this build (and plan when --fit is on).

    Without a GPU backend every GPU flag is a no-op: say so once instead of silently ignoring
    it. With one, --fit (the default unless tensors were placed by hand) reads the GGUF header
    and plans for the first GPU's free memory, or for `vram` bytes.
    """
    opts = options
    opts.check()
    servers = register_servers(opts.rpc) if opts.rpc else []  # probed first: an unusable one is an RpcError, not an abort
    gpus = offload_devices(opts)
    notices: list[str] = []
    try:
        info = info or read_model(model_path)
    except ModelLoadError:
        info = None  # llama.cpp's own reason is the one to show, at load
    if info is not None:
        ram = free_ram()
        memory = None if ram is None else ram + sum(d.free for d in gpus)
        notices += opts.check_model(info, memory)
    if not gpus:
        flags = [flag for flag, on in (("-ngl", opts.n_gpu_layers not in (None, 0)), ("--cpu-moe", opts.cpu_moe),
                                       ("--n-cpu-moe", opts.n_cpu_moe > 0), ("-ts", bool(opts.tensor_split)), ("--fit", bool(opts.fit)),
                                       ("--vram", opts.vram is not None)) if on]
        plan_ = None
        if flags:
            verb = "has" if len(flags) == 1 else "have"
            notices.append(f"this llama.cpp build has no GPU backend, so everything runs on the CPU and {', '.join(flags)} "
                           f"{verb} no effect; `make install-cuda` or `make install-metal` rebuilds it with one")
        if opts.fit and opts.vram is not None:
            info = info or read_model(model_path)
            plan_ = plan(info, budget=max(opts.vram - DEFAULT_HEADROOM, 0), n_ctx=opts.ctx_size, type_k=opts.type_k,
                         type_v=opts.type_v, n_ubatch=min(opts.ubatch_size, opts.batch_size),
                         flash_attn=opts.flash_attn, device="GPU")
            notices.append(f"the --fit plan for --vram {opts.vram / 2**30:.1f} GiB is shown, not applied")
        # -ot rules for a device this build lacks are dropped with a notice, like the other GPU
        # flags: the same command line then runs on a CPU-only machine.
        known = buffer_types()
        kept, dropped = [], []
        for rule in opts.override_tensor:
            name = parse_override(rule)[1]
            (kept if name in known or name.lower() in {k.lower() for k in known} else dropped).append(rule)
        if dropped:
            notices.append(f"-ot {', '.join(repr(r) for r in dropped)} ignored: this build has no such device, "
                           f"only {', '.join(sorted(known))}")
        resolved = replace(opts, fit=False, n_gpu_layers=0, override_tensor=kept)
        return Placement(resolved, plan_, applied=False, notices=tuple(notices), info=info)
    if len(opts.tensor_split) > len(gpus):
        raise OptionsError(f"-ts/--tensor-split gives {len(opts.tensor_split)} shares for {len(gpus)} devices "
                           f"({', '.join(d.name for d in gpus)})")
    fit = opts.fit if opts.fit is not None else not (opts.manual_placement or opts.rpc)
    if fit and opts.rpc:
        info = info or read_model(model_path)
        spread, order = rpc_plan(info, opts, servers)
        main = spread.targets[0]
        if spread.n_gpu_layers <= spread.main.n_layer:
            notices.append(f"{info.path.name} does not fit on {main.device} even with every routed expert elsewhere: "
                           f"{max(spread.n_gpu_layers - 1, 0)} of {spread.main.n_layer} blocks there, the rest in RAM")
        resolved = replace(opts, fit=False, n_gpu_layers=spread.n_gpu_layers, n_cpu_moe=0, cpu_moe=False,
                           override_tensor=spread.overrides, tensor_split=spread.split(order))
        return Placement(resolved, notices=tuple(notices), info=info, spread=spread)
    if not fit:
        if opts.rpc:
            notices.append(rpc_notice(gpus, opts))
        return Placement(replace(opts, fit=False, n_gpu_layers=-1 if opts.n_gpu_layers is None else opts.n_gpu_layers),
                         notices=tuple(notices), info=info)
    dev = gpus[0]
    info = info or read_model(model_path)
    memory = opts.vram if opts.vram is not None else dev.free
    plan_ = plan(info, budget=max(memory - DEFAULT_HEADROOM, 0), n_ctx=opts.ctx_size, type_k=opts.type_k,
                 type_v=opts.type_v, n_ubatch=min(opts.ubatch_size, opts.batch_size), flash_attn=opts.flash_attn,
                 device=dev.name)
    if len(gpus) > 1:
        notices.append(f"--fit plans for one GPU and puts the model on {dev.name} only; "
                       "place it by hand (-ngl, -ot) to use the others")
    if plan_.n_gpu_layers <= plan_.n_layer:
        notices.append(f"{info.path.name} does not fit on {dev.name} even with every routed expert in RAM: "
                       f"{max(plan_.n_gpu_layers - 1, 0)} of {plan_.n_layer} blocks on the GPU")
    resolved = replace(opts, fit=False, n_gpu_layers=plan_.n_gpu_layers, n_cpu_moe=plan_.n_cpu_moe, cpu_moe=False)
    return Placement(resolved, plan_, notices=tuple(notices), single_gpu=dev.name, info=info)


def rpc_targets(opts: EngineOptions, servers: list[RemoteServer]) -> tuple[list[Target], list[str]]:
    """The devices --fit plans over with --rpc, main device first, and llama.cpp's device order.

    The main device is this machine's first GPU when it has one, else the first device of the first
    rpc-server. A local GPU is the fastest place for the part that runs for every token: no network
    hop for each of the dozens of per-layer steps of every token, and no activations on the wire.
    Without one, which remote device is fastest cannot be known before running on it, so the order
    the user gave (--rpc) decides: name the strongest host first. `--vram` replaces the main
    device's free memory. Remote memory is what each server's probe reported (the server's own
    `ggml_backend_dev_memory`); RPC devices are named by their buffer type, RPC<i>[HOST:PORT], which
    is what an -ot rule needs and stays unique across servers (their device names do not).
    """
    buft = ggml_fn("ggml_backend_dev_buffer_type", ctypes.c_void_p, ctypes.c_void_p)
    buft_name = ggml_fn("ggml_backend_buft_name", ctypes.c_char_p, ctypes.c_void_p)
    local = [((buft_name(buft(h)) or b"?").decode(), _device(h).free) for h in _local_offload_handles()]
    remote = [(f"RPC{d.index}[{s.endpoint}]", str(s.endpoint), d.free) for s in servers for d in s.devices]
    targets = order_targets(local, remote, vram=opts.vram)
    if not targets:
        raise OptionsError("--fit with --rpc needs at least one device: the rpc-servers shared none")
    return targets, [name for name, _, _ in remote] + [name for name, _ in local]


def rpc_plan(info: ModelInfo, opts: EngineOptions, servers: list[RemoteServer]) -> tuple[SpreadPlan, list[str]]:
    """The --fit plan across this machine and the rpc-servers (and llama.cpp's device order, for -ts).

    `info` and `place` both call this, with the memory the probe of each server just reported, so
    the plan `info --rpc` prints is the one `chat/serve/eval --rpc --fit` apply.
    """
    targets, order = rpc_targets(opts, servers)
    spread = plan_across(info, targets, n_ctx=opts.ctx_size, type_k=opts.type_k, type_v=opts.type_v,
                         n_ubatch=min(opts.ubatch_size, opts.batch_size), flash_attn=opts.flash_attn,
                         ram=free_ram())
    return spread, order


def rpc_notice(gpus: list[Device], opts: EngineOptions) -> str:
    """Where llama.cpp will put the offloaded layers, said once: which devices, and how they share them."""
    names = ", ".join(f"{d.name} ({d.description if d.backend == 'RPC' else 'local'}, {d.free / 2**30:.1f} GiB free)"
                      for d in gpus)
    share = ("-ts " + ",".join(f"{x:g}" for x in opts.tensor_split)) if opts.tensor_split else \
        "in proportion to their free memory (-ts to choose)"
    layers = "all layers" if opts.n_gpu_layers in (None, -1) else f"{opts.n_gpu_layers} layers (-ngl)"
    return f"{layers} go to {names}, {share}"


def override_array(rules: list[str]) -> Any:
    """A NULL-terminated llama_model_tensor_buft_override[] for `rules` (None when there are none).

    llama.cpp keeps the pointer in the model's parameters and reads the patterns while it
    loads, so the caller keeps the array (which owns the pattern bytes) as long as the model.
    """
    if not rules:
        return None
    bufts = buffer_types()
    arr = (BuftOverride * (len(rules) + 1))()
    for i, rule in enumerate(rules):
        pattern, name = parse_override(rule)
        buft = bufts.get(name) or next((v for k, v in bufts.items() if k.lower() == name.lower()), None)
        if buft is None:
            raise OptionsError(f"-ot {rule!r}: no buffer type {name!r} in this llama.cpp build; "
                               f"it has {', '.join(sorted(bufts))}")
        arr[i].pattern = pattern.encode()
        arr[i].buft = buft
    return arr  # the zeroed last entry is the terminator
