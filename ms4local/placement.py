"""Where the weights go: the `--fit` planner and the KV-cache sizes it needs. Pure Python, no llama_cpp.

Mistral Small 4 is a 119 B-parameter MoE whose routed experts are ~95 % of the bytes but only
4 of 128 run per token. So the placement that wins on one GPU is the one llama.cpp users reach
for by hand with `-ngl 99 --n-cpu-moe N`: every layer's attention, norms, router and shared
expert on the GPU (they run for every token), the output matrix too, and then as many layers'
routed experts as still fit; the rest of the experts stay in RAM, where the CPU reads only the
4 it needs. The planner chooses N from the file's own tensor sizes, the KV cache and a compute
allowance, so it is right for every quantization and context size without a table.

The model's sizes come from its header (`ms4local/gguf_model.py`), never from its tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from quantize.gguf_header import TensorInfo

from .errors import ModelLoadError, PlacementError
from .gguf_model import ModelInfo

MiB = 1 << 20
GiB = 1 << 30

# What llama.cpp's --cpu-moe keeps in RAM: the routed expert stacks, separate or fused gate/up.
# Shared experts (`_shexp`) are not matched: they run for every token and belong on the GPU.
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_exps"
_EXPERT = re.compile(r"^blk\.(\d+)" + EXPERTS_REGEX)
_LAYER = re.compile(r"^blk\.(\d+)\.")

# Default memory left free on the device: the CUDA/Metal runtime's own allocations, cuBLAS
# workspaces and fragmentation are not in any buffer llama.cpp reports (llama.cpp's own
# --fit leaves 1 GiB by default, `--fit-target`).
DEFAULT_HEADROOM = 1 * GiB


# ----------------------------------------------------------------------------- sizes
# Bytes per block and elements per block of the KV cache types llama.cpp accepts.
CACHE_TYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18),
               "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18)}


def cache_row_bytes(elements: int, cache_type: str) -> int:
    block, size = CACHE_TYPES[cache_type]
    return elements // block * size


def kv_cells(n_ctx: int) -> int:
    """The cache cells llama.cpp allocates for `-c n_ctx`: rounded up to a multiple of 256
    (measured on this build: -c 64 → 256, -c 300 → 512, -c 4097 → 4352)."""
    return -(-n_ctx // 256) * 256


def kv_cache_bytes(model: ModelInfo, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of the KV cache for a context of `n_ctx` tokens over all layers.

    MLA caches only the K row (kv_lora + rope elements, one KV head); V is a view into its
    first kv_lora elements, so it costs nothing (llama.cpp logs `V (f16): 0.00 MiB`).
    """
    per_token = cache_row_bytes(model.head_k * model.head_count_kv, type_k)
    if not model.is_mla:
        per_token += cache_row_bytes(model.head_v * model.head_count_kv, type_v)
    return per_token * kv_cells(n_ctx) * model.n_layer


def compute_allowance(model: ModelInfo, *, n_ctx: int, n_ubatch: int = 512, flash_attn: str = "auto") -> int:
    """An estimate of llama.cpp's device compute buffer, before any expert copies.

    1 MiB per token of the micro-batch covers the activations and MoE intermediates of one
    layer at Mistral 4's sizes (measured buffers are a few hundred MiB at -ub 512). Without
    flash attention the scores of every head over the whole context are materialised in F32;
    with `auto` the attention kernel for MLA's 320/256 head sizes may be missing on the device,
    so the estimate assumes the worst.
    """
    heads = int(model.key("attention.head_count", 1))  # type: ignore[arg-type]
    scores = 0 if flash_attn == "on" else heads * kv_cells(n_ctx) * n_ubatch * 4
    return n_ubatch * MiB + scores


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PlanRow:
    what: str
    device: str  # "GPU" or "CPU"
    nbytes: int
    tensors: int = 0


@dataclass(frozen=True)
class Plan:
    """A placement in llama.cpp's own terms (-ngl and --n-cpu-moe) and what it costs where."""

    device: str  # the GPU it was planned for, e.g. CUDA0
    budget: int  # device bytes the plan may use (free memory - headroom)
    n_layer: int
    n_gpu_layers: int  # llama.cpp's count: the output layer first, then the last blocks; n_layer + 1 = all
    n_cpu_moe: int  # routed experts of blocks 0 .. n_cpu_moe-1 stay in RAM
    kv_bytes: int  # on the GPU
    compute_bytes: int  # on the GPU (estimate, including the copy of one CPU expert stack)
    rows: tuple[PlanRow, ...] = field(default=())

    @property
    def gpu_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.device == "GPU")

    @property
    def cpu_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.device == "CPU")

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= self.budget

    @property
    def overrides(self) -> list[str]:
        """The plan as -ot rules (REGEX=CPU), empty when every expert is on the GPU."""
        return expert_overrides(self.n_cpu_moe, self.n_layer)


def expert_overrides(n_cpu_moe: int, n_layer: int | None = None) -> list[str]:
    """`--n-cpu-moe N` as -ot rules: one regex for the routed experts of blocks 0..N-1.

    One alternation instead of llama.cpp's one rule per block: the loader compiles every rule
    for every tensor, so 36 rules cost 36 regex compilations per tensor.
    """
    if n_cpu_moe <= 0:
        return []
    if n_layer is not None and n_cpu_moe >= n_layer:
        return [EXPERTS_REGEX + "=CPU"]
    blocks = "|".join(str(i) for i in range(n_cpu_moe))
    return [rf"blk\.({blocks})" + EXPERTS_REGEX + "=CPU"]


@dataclass
class _Layer:
    dense: int = 0  # attention, norms, router, shared expert
    dense_n: int = 0
    shexp: int = 0
    experts: int = 0
    experts_n: int = 0
    largest_expert: int = 0


def _classify(tensors: Iterable[TensorInfo], n_layer: int) -> tuple[list[_Layer], int, int, int, int]:
    layers = [_Layer() for _ in range(n_layer)]
    out = out_n = embd = embd_n = 0
    for t in tensors:
        m = _EXPERT.match(t.name)
        if m and int(m[1]) < n_layer:
            lay = layers[int(m[1])]
            lay.experts += t.nbytes
            lay.experts_n += 1
            lay.largest_expert = max(lay.largest_expert, t.nbytes)
            continue
        m = _LAYER.match(t.name)
        if m and int(m[1]) < n_layer:
            lay = layers[int(m[1])]
            lay.dense += t.nbytes
            lay.dense_n += 1
            if "_shexp" in t.name:
                lay.shexp += t.nbytes
            continue
        if t.name.startswith("token_embd."):
            embd += t.nbytes
            embd_n += 1
        else:  # output, output_norm and anything global: placed with the output layer
            out += t.nbytes
            out_n += 1
    return layers, out, out_n, embd, embd_n


def plan(model: ModelInfo, *, budget: int, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
         n_ubatch: int = 512, flash_attn: str = "auto", reserve: int | None = None,
         device: str = "GPU") -> Plan:
    """Choose -ngl and --n-cpu-moe for one GPU with `budget` bytes to spend.

    Order of preference, each step taken only if everything before it fits:
      1. the output layer and every block's attention, norms, router and shared expert, with
         the block's KV cache (-ngl all, --n-cpu-moe n_layer);
      2. the routed experts of as many blocks as fit, from the last block down, which is what
         --n-cpu-moe N expresses (blocks 0..N-1 keep their experts in RAM).
    If step 1 does not fit, every expert stays in RAM and -ngl shrinks (llama.cpp offloads the
    output layer first, then blocks from the last one down).

    The token embeddings always stay in RAM: llama.cpp keeps the input layer on the CPU (a
    row lookup per token gains nothing on a GPU). `reserve` replaces the compute-buffer
    estimate (`compute_allowance`); whenever some experts stay in RAM the largest such stack
    is added to it, because llama.cpp copies a CPU expert stack to the GPU to run a prompt
    batch there.
    """
    n = model.n_layer
    if n <= 0:
        raise ModelLoadError(f"{model.path.name} declares no layers ({model.arch}.block_count)")
    layers, out, out_n, embd, embd_n = _classify(model.tensors, n)
    kv_layer = kv_cache_bytes(model, n_ctx, type_k, type_v) // n
    base = reserve if reserve is not None else compute_allowance(model, n_ctx=n_ctx, n_ubatch=n_ubatch,
                                                                 flash_attn=flash_attn)

    def gpu_blocks(ngl: int) -> range:
        return range(max(n + 1 - ngl, 0), n)

    def compute(ngl: int, n_cpu_moe: int) -> int:
        if ngl == 0:
            return 0
        on_cpu = [lay.largest_expert for i, lay in enumerate(layers) if i < n_cpu_moe or i not in gpu_blocks(ngl)]
        return base + max(on_cpu, default=0)

    def need(ngl: int, n_cpu_moe: int) -> int:
        blocks = gpu_blocks(ngl)
        total = (out if ngl >= 1 else 0) + compute(ngl, n_cpu_moe)
        for i in blocks:
            total += layers[i].dense + kv_layer + (layers[i].experts if i >= n_cpu_moe else 0)
        return total

    if need(n + 1, n) <= budget:
        ngl = n + 1
        n_cpu_moe = next(k for k in range(n + 1) if need(ngl, k) <= budget)
    else:
        n_cpu_moe = n
        ngl = next(k for k in range(n, -1, -1) if need(k, n_cpu_moe) <= budget)

    blocks = gpu_blocks(ngl)
    rows: list[PlanRow] = []

    def add(what: str, device: str, nbytes: int, count: int = 0) -> None:
        if nbytes or count:
            rows.append(PlanRow(what, device, nbytes, count))

    def span(idx: list[int]) -> str:
        if not idx:
            return "no blocks"
        return f"block {idx[0]}" if len(idx) == 1 else f"blocks {idx[0]}–{idx[-1]}"

    gpu_idx = list(blocks)
    cpu_idx = [i for i in range(n) if i not in blocks]
    exp_gpu = [i for i in gpu_idx if i >= n_cpu_moe]
    exp_cpu = [i for i in range(n) if i not in exp_gpu]
    add("output layer", "GPU" if ngl >= 1 else "CPU", out, out_n)
    add(f"attention, norms, router, shared expert ({span(gpu_idx)})", "GPU",
        sum(layers[i].dense for i in gpu_idx), sum(layers[i].dense_n for i in gpu_idx))
    add(f"attention, norms, router, shared expert ({span(cpu_idx)})", "CPU",
        sum(layers[i].dense for i in cpu_idx), sum(layers[i].dense_n for i in cpu_idx))
    add(f"routed experts ({span(exp_gpu)})", "GPU",
        sum(layers[i].experts for i in exp_gpu), sum(layers[i].experts_n for i in exp_gpu))
    add(f"routed experts ({span(exp_cpu)})", "CPU",
        sum(layers[i].experts for i in exp_cpu), sum(layers[i].experts_n for i in exp_cpu))
    add("token embeddings (input layer)", "CPU", embd, embd_n)
    add(f"KV cache ({kv_cells(n_ctx)} tokens, {type_k}, {len(gpu_idx)} blocks)", "GPU", kv_layer * len(gpu_idx))
    add(f"KV cache ({kv_cells(n_ctx)} tokens, {type_k}, {len(cpu_idx)} blocks)", "CPU", kv_layer * len(cpu_idx))
    comp = compute(ngl, n_cpu_moe)
    add("compute buffers (estimate)", "GPU", comp)
    return Plan(device=device, budget=budget, n_layer=n, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe,
                kv_bytes=kv_layer * len(gpu_idx), compute_bytes=comp, rows=tuple(rows))


# ----------------------------------------------------------------------------- across hosts (--rpc --fit)
@dataclass(frozen=True)
class Target:
    """One device a plan across hosts may put tensors on."""

    device: str  # the buffer type an -ot rule names: CUDA0, RPC0[10.0.0.2:50052] …
    host: str  # "local", or the rpc-server's HOST:PORT
    free: int  # bytes the device reports free
    budget: int  # bytes the plan may use there (free - headroom, or --vram - headroom on the main device)


@dataclass(frozen=True)
class HostRow:
    """One line of a plan across hosts: what goes to which device of which host, and its size."""

    host: str
    device: str
    free: int | None  # the device's free memory (None: RAM of unknown size)
    what: str
    nbytes: int


@dataclass(frozen=True)
class SpreadPlan:
    """`--fit` across hosts: one main device for every block's dense part, routed experts spread.

    In llama.cpp's terms: -ngl `n_gpu_layers` with a tensor split that gives every layer to the main
    device (`split`, one share per device in llama.cpp's order), and -ot rules that send blocks'
    routed experts to the other devices or keep them in RAM (`overrides`).
    """

    main: Plan  # the one-device plan of the main device (what it holds, -ngl)
    targets: tuple[Target, ...]  # targets[0] is the main device
    experts: tuple[tuple[int, ...], ...]  # blocks whose routed experts each target holds
    cpu_experts: tuple[int, ...]  # blocks whose routed experts stay in RAM
    rows: tuple[HostRow, ...]
    ram: int | None = None  # RAM the CPU part was checked against (None: not checked)

    @property
    def n_gpu_layers(self) -> int:
        return self.main.n_gpu_layers

    @property
    def cpu_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows if r.device == "CPU")

    def device_bytes(self, device: str) -> int:
        return sum(r.nbytes for r in self.rows if r.device == device)

    def split(self, order: list[str]) -> list[float]:
        """-ts for llama.cpp's device order (device names as in `Target.device`): all to the main one."""
        return [1.0 if name == self.targets[0].device else 0.0 for name in order]

    @property
    def overrides(self) -> list[str]:
        """The -ot rules, in the order llama.cpp tries them (the first match wins): experts to each
        other device, then those left for RAM. The main device's experts need no rule: they follow
        their block there."""
        n = self.main.n_layer
        rules = [_blocks_rule(blocks, n) + "=" + t.device
                 for t, blocks in zip(self.targets[1:], self.experts[1:]) if blocks]
        if self.cpu_experts:
            on_main = bool(self.experts[0])
            rules.append((_blocks_rule(self.cpu_experts, n) if on_main else EXPERTS_REGEX) + "=CPU")
        return rules


def order_targets(local: list[tuple[str, int]], remote: list[tuple[str, str, int]], *,
                  vram: int | None = None, headroom: int = DEFAULT_HEADROOM) -> list[Target]:
    """The devices of a plan across hosts, main first: this machine's GPUs (name, free bytes), then
    the rpc-servers' devices (name, HOST:PORT, free bytes) in --rpc order.

    The main device is the first local GPU when there is one, else the first remote device
    (`engine.devices.rpc_targets` says why). Each budget is its free memory less `headroom`;
    `vram` replaces the main device's free memory.
    """
    cands = [(name, "local", free) for name, free in local] + list(remote)
    return [Target(name, host, free, max((vram if i == 0 and vram is not None else free) - headroom, 0))
            for i, (name, host, free) in enumerate(cands)]


def _blocks_rule(blocks: Iterable[int], n_layer: int) -> str:
    """One regex for the routed experts of `blocks` (all blocks: the bare expert regex)."""
    idx = sorted(set(blocks))
    if len(idx) >= n_layer:
        return EXPERTS_REGEX
    return r"blk\.(" + "|".join(map(str, idx)) + ")" + EXPERTS_REGEX


def _span(idx: Iterable[int]) -> str:
    s = sorted(idx)
    if not s:
        return "no blocks"
    if s == list(range(s[0], s[-1] + 1)):
        return f"block {s[0]}" if len(s) == 1 else f"blocks {s[0]}–{s[-1]}"
    return "blocks " + ", ".join(map(str, s))


def plan_across(model: ModelInfo, targets: list[Target], *, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
                n_ubatch: int = 512, flash_attn: str = "auto", reserve: int | None = None,
                ram: int | None = None) -> SpreadPlan:
    """Plan a model over several devices on several hosts; `targets[0]` is the main device.

    The main device gets what `plan` gives one GPU: the output layer, every block's attention,
    norms, router and shared expert with its KV cache (they run for every token, and a block split
    across hosts would send its activations over the network in the middle of the block), and then
    as many blocks' routed experts as fit, from the last block down. The routed experts of the
    other blocks go to the other targets in their order, from the highest block down, as many
    whole blocks as each one's budget holds after a compute allowance of its own (1 MiB per token
    of the micro-batch: the expert matmuls of one layer run there); what is left stays in RAM.
    `ram` (bytes) checks that rest: a model that does not fit is a PlacementError naming every
    size, before a byte is loaded. Pure: the sizes come from the header, the memory from the caller.
    """
    if not targets:
        raise ModelLoadError("no device to plan for")
    n = model.n_layer
    main = plan(model, budget=targets[0].budget, n_ctx=n_ctx, type_k=type_k, type_v=type_v, n_ubatch=n_ubatch,
                flash_attn=flash_attn, reserve=reserve, device=targets[0].device)
    layers = _classify(model.tensors, n)[0]
    on_main = range(max(main.n_cpu_moe, n + 1 - main.n_gpu_layers), n)  # blocks whose experts the main device holds
    main_blocks = tuple(i for i in on_main if layers[i].experts)
    left = [i for i in range(n - 1, -1, -1) if layers[i].experts and i not in on_main]  # highest first
    taken: list[tuple[int, ...]] = [main_blocks]
    side_reserve = n_ubatch * MiB
    for t in targets[1:]:
        room = t.budget - side_reserve
        mine: list[int] = []
        while left and layers[left[0]].experts <= room:
            room -= layers[left[0]].experts
            mine.append(left.pop(0))
        taken.append(tuple(sorted(mine)))
    cpu_experts = tuple(sorted(left))

    rows: list[HostRow] = []
    m = targets[0]
    for r in main.rows:
        if r.device == "GPU":
            rows.append(HostRow(m.host, m.device, m.free, r.what, r.nbytes))
    for t, blocks in zip(targets[1:], taken[1:]):
        if blocks:
            rows.append(HostRow(t.host, t.device, t.free, f"routed experts ({_span(blocks)})",
                                sum(layers[i].experts for i in blocks)))
            rows.append(HostRow(t.host, t.device, t.free, "compute buffers (estimate)", side_reserve))
    for r in main.rows:
        if r.device == "CPU" and not r.what.startswith("routed experts"):
            rows.append(HostRow("local", "CPU", ram, r.what, r.nbytes))
    if cpu_experts:
        rows.append(HostRow("local", "CPU", ram, f"routed experts ({_span(cpu_experts)})",
                            sum(layers[i].experts for i in cpu_experts)))
    spread = SpreadPlan(main=main, targets=tuple(targets), experts=tuple(taken), cpu_experts=cpu_experts,
                        rows=tuple(rows), ram=ram)
    if ram is not None and spread.cpu_bytes > ram:
        used = ", ".join(f"{t.device} {_gib(spread.device_bytes(t.device))} of {_gib(t.budget)}" for t in targets)
        raise PlacementError(f"{model.path.name} does not fit: {_gib(sum(r.nbytes for r in rows))} to place, "
                             f"{used}, and the {_gib(spread.cpu_bytes)} left for the CPU exceed its "
                             f"{_gib(ram)} of free RAM; add a host (--rpc) or use a smaller quantization")
    return spread


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
