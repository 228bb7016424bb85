"""What a GGUF holds and what it will cost to run: `ms4local info` as a library. No llama_cpp.

Everything here comes from the GGUF header (`gguf_model.read_model`, plus one walk over the
token arrays for the special tokens), so it answers in well under a second on a 67 GB file:
no tensor data is read. The placement is the engine's own `--fit` planner called with the
arguments `engine.place` gives it, so `info --vram 24G` shows exactly what `chat --vram 24G`
would load.

The decode-speed bound: generating one token reads every weight that runs for it (attention,
norms, router, shared expert, the output matrix, one embedding row and only `expert_used_count`
of `expert_count` routed experts) and the KV cache of the tokens so far, and nothing can read
memory faster than its bandwidth. Layers run one after another, so the GPU's and the CPU's times
add: tokens/s ≤ 1 / (GPU bytes / GPU bandwidth + CPU bytes / CPU bandwidth). Real decode is
slower (compute, kernel launches, routing), which is what makes it an upper bound.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from quantize.gguf_header import SPLIT, split_count

from .errors import ModelLoadError, OptionsError
from .engine.repair import has_img_break, temperature_overrides
from .gguf_model import ModelInfo, TensorInfo, find_mmproj, read_model, read_vocab
from .placement import DEFAULT_HEADROOM, Plan, compute_allowance, plan

# Tensor classes, in display order. The routed experts are what --n-cpu-moe moves to RAM;
# "norms/router" are the small F32 tensors every quantizer leaves alone.
ROUTED, SHARED, ATTENTION, DENSE_FFN, EMBED_OUT, NORMS, OTHER = (
    "routed experts", "shared experts", "attention", "dense FFN", "embeddings/output", "norms/router", "other")
CLASS_ORDER = (ROUTED, SHARED, ATTENTION, DENSE_FFN, EMBED_OUT, NORMS, OTHER)

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_CONTROL, _USER_DEFINED = 3, 4  # gguf TokenType values
_UNNAMED_SPECIAL = re.compile(r"^<SPECIAL_\d+>$")


def tensor_class(name: str) -> str:
    """The class of a GGUF tensor name (mistral4 / deepseek2 naming)."""
    if "_exps." in name:
        return ROUTED
    if "_shexp." in name:
        return SHARED
    if name.endswith("_norm.weight") or ".ffn_gate_inp." in name or ".exp_probs_b" in name:
        return NORMS
    if name.startswith(("token_embd.", "output.")):
        return EMBED_OUT
    if ".attn_" in name:
        return ATTENTION
    if re.search(r"\.ffn_(gate|up|down)\.", name):
        return DENSE_FFN
    return OTHER


def n_elements(t: TensorInfo) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


# ----------------------------------------------------------------------------- results
@dataclass
class TypeCount:
    tensors: int = 0
    params: int = 0
    nbytes: int = 0

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0

    def add(self, t: TensorInfo) -> None:
        self.tensors += 1
        self.params += n_elements(t)
        self.nbytes += t.nbytes

    def to_json(self) -> dict[str, object]:
        return {"tensors": self.tensors, "params": self.params, "bytes": self.nbytes, "bpw": round(self.bpw, 4)}


@dataclass
class ClassCount(TypeCount):
    types: dict[str, TypeCount] = field(default_factory=dict)

    def add(self, t: TensorInfo) -> None:
        super().add(t)
        self.types.setdefault(t.type, TypeCount()).add(t)

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "types": {k: v.to_json() for k, v in self.types.items()}}


@dataclass(frozen=True)
class Mmproj:
    path: Path
    projector: str
    projection_dim: int
    file_type: str
    nbytes: int


@dataclass(frozen=True)
class Device:
    """One memory pool of a placement: bytes held, bytes read per generated token, bandwidth."""

    name: str  # GPU | CPU
    weights: int
    kv_cache: int
    compute: int
    read_per_token: int  # weights read for one token (active experts only), KV excluded
    kv_read_full: int  # KV cache read per token at a full context
    bandwidth: float | None  # bytes/s; None when unknown
    bandwidth_source: str  # measured | given | unknown
    budget: int | None = None  # bytes the plan may use (GPU) / the RAM given (CPU)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget


@dataclass(frozen=True)
class Fit:
    """The --fit placement for a memory budget, the memory on each device and the speed bound."""

    vram: int  # the --vram given (0: no GPU, everything in RAM)
    ram: int | None
    n_ctx: int
    plan: Plan
    devices: tuple[Device, ...]

    def seconds_per_token(self, full_context: bool) -> float | None:
        """Time to stream the bytes one token reads, over the devices with a known bandwidth."""
        total = 0.0
        for d in self.devices:
            nbytes = d.read_per_token + (d.kv_read_full if full_context else 0)
            if nbytes and d.bandwidth:
                total += nbytes / d.bandwidth
        return total or None

    def max_tokens_per_second(self, full_context: bool = False) -> float | None:
        s = self.seconds_per_token(full_context)
        return None if s is None else 1.0 / s

    @property
    def bound_is_partial(self) -> bool:
        """Some bytes live on a device whose bandwidth is unknown: the bound ignores their time
        (still an upper bound, only a looser one)."""
        return any(d.read_per_token and not d.bandwidth for d in self.devices)


@dataclass(frozen=True)
class Info:
    path: Path
    files: tuple[tuple[Path, int], ...]  # (file, size on disk)
    model: ModelInfo
    file_type: str
    architecture: dict[str, object]
    tokenizer: dict[str, object]
    template: dict[str, object]
    classes: dict[str, ClassCount]
    types: dict[str, TypeCount]
    mmproj: Mmproj | None
    quant_report: dict[str, float] | None
    fit: Fit | None = None
    # What the engine makes right at load (engine/repair.py): the temperature keys it sets, and
    # whether the projector beside the model lacks its [IMG_BREAK] row.
    repair: dict[str, object] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.classes.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(c.nbytes for c in self.classes.values())

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.params if self.params else 0.0

    def to_json(self) -> dict[str, object]:
        """Everything `info` knows, as plain JSON types (bytes as integers, rates in bytes/s)."""
        fit = None
        if self.fit is not None:
            f = self.fit
            fit = {
                "vram": f.vram, "ram": f.ram, "ctx_size": f.n_ctx,
                "placement": {"device": f.plan.device, "budget": f.plan.budget, "n_gpu_layers": f.plan.n_gpu_layers,
                              "n_cpu_moe": f.plan.n_cpu_moe, "fits": f.plan.fits, "overrides": f.plan.overrides,
                              "rows": [asdict(r) for r in f.plan.rows]},
                "devices": {d.name: {"weights": d.weights, "kv_cache": d.kv_cache, "compute": d.compute,
                                     "total": d.total, "budget": d.budget, "fits": d.fits,
                                     "read_per_token": d.read_per_token, "kv_read_per_token_full_context": d.kv_read_full,
                                     "bandwidth": d.bandwidth, "bandwidth_source": d.bandwidth_source}
                            for d in f.devices},
                "decode_tokens_per_second_max": {"empty_context": f.max_tokens_per_second(False),
                                                 "full_context": f.max_tokens_per_second(True),
                                                 "partial": f.bound_is_partial},
            }
        return {
            "path": str(self.path),
            "files": [{"path": str(p), "bytes": n} for p, n in self.files],
            "file_type": self.file_type,
            "params": self.params,
            "tensor_bytes": self.tensor_bytes,
            "bpw": round(self.bpw, 4),
            "architecture": self.architecture,
            "tokenizer": self.tokenizer,
            "template": self.template,
            "classes": {k: v.to_json() for k, v in self.classes.items()},
            "types": {k: v.to_json() for k, v in self.types.items()},
            "mmproj": None if self.mmproj is None else {**asdict(self.mmproj), "path": str(self.mmproj.path)},
            "quant_report": self.quant_report,
            "fit": fit,
            "repair": self.repair,
        }


# ----------------------------------------------------------------------------- header facts
def file_type_name(value: object) -> str:
    """general.file_type as the name users know (15 → Q4_K_M)."""
    from gguf import LlamaFileType

    if value is None:
        return "unknown"
    try:
        return re.sub(r"^(MOSTLY|ALL)_", "", LlamaFileType(int(value)).name)  # type: ignore[arg-type]
    except ValueError:
        return f"file type {value}"


def architecture(m: ModelInfo) -> dict[str, object]:
    """The hyper-parameters a user asks about, with their GGUF meaning spelled out."""
    k = m.key
    kv_lora, rope = k("attention.kv_lora_rank"), k("rope.dimension_count")
    key_mla, value_mla = k("attention.key_length_mla"), k("attention.value_length_mla")
    out: dict[str, object] = {
        "arch": m.arch,
        "name": m.metadata.get("general.name"),
        "layers": m.n_layer,
        "embedding_length": k("embedding_length"),
        "vocab_size": vocab_size(m),
        "context_length": k("context_length"),
        "experts": {
            "routed": k("expert_count"), "active": k("expert_used_count"), "shared": k("expert_shared_count"),
            "expert_ffn_length": k("expert_feed_forward_length"), "leading_dense_blocks": k("leading_dense_block_count"),
            "dense_ffn_length": k("feed_forward_length"), "gating": {1: "softmax", 2: "sigmoid"}.get(
                k("expert_gating_func"), k("expert_gating_func")),  # type: ignore[arg-type]
            "weights_norm": k("expert_weights_norm"),
        },
        "attention": {
            "heads": k("attention.head_count"), "kv_heads": k("attention.head_count_kv"),
            "mla": m.is_mla, "q_lora_rank": k("attention.q_lora_rank"), "kv_lora_rank": kv_lora,
            "rope_dim": rope,
            # key_length_mla = nope + rope; the per-head q/k "nope" part is what is left.
            "nope_dim": key_mla - rope if isinstance(key_mla, int) and isinstance(rope, int) else None,
            "qk_head_dim": key_mla, "v_head_dim": value_mla,
            "cache_k_row": m.head_k, "cache_v_row": m.head_v if not m.is_mla else 0,
            "rms_eps": k("attention.layer_norm_rms_epsilon"),
            "temperature_scale": k("attention.temperature_scale"), "temperature_length": k("attention.temperature_length"),
        },
        "rope": {
            "freq_base": k("rope.freq_base"), "scaling": k("rope.scaling.type"), "factor": k("rope.scaling.factor"),
            "original_context_length": k("rope.scaling.original_context_length"),
            "yarn_log_multiplier": k("rope.scaling.yarn_log_multiplier"),
            "yarn_beta_fast": k("rope.scaling.yarn_beta_fast"), "yarn_beta_slow": k("rope.scaling.yarn_beta_slow"),
        },
    }
    return out


def vocab_size(m: ModelInfo) -> int | None:
    """Rows of the token embedding (what the logits have), else the metadata's count."""
    for t in m.tensors:
        if t.name == "token_embd.weight" and len(t.shape) == 2:
            return t.shape[1]
    v = m.key("vocab_size")
    return int(v) if v is not None else None  # type: ignore[arg-type]


def template_features(template: str | None) -> dict[str, object]:
    """What the chat template can do, read from its text (no rendering).

    The checks look for the variables and tags the template must use to do the thing:
    `reasoning_effort` and [MODEL_SETTINGS]/[THINK] for reasoning, `tools` and [AVAILABLE_TOOLS]
    for function calling, image content blocks or [IMG] for images.
    """
    if not template:
        return {"present": False, "reasoning_effort": False, "tools": False, "images": False, "chars": 0}
    return {
        "present": True,
        "reasoning_effort": "reasoning_effort" in template,
        "tools": bool(re.search(r"\btools\b", template)) and ("[AVAILABLE_TOOLS]" in template or "tool_calls" in template),
        "images": "[IMG]" in template or bool(re.search(r"['\"]image(_url)?['\"]", template)),
        "chars": len(template),
    }


def tokenizer_facts(m: ModelInfo) -> dict[str, object]:
    """BOS/EOS/UNK/PAD ids and the named control tokens ([INST], [THINK] …) with their ids."""
    md = m.metadata
    out: dict[str, object] = {
        "model": md.get("tokenizer.ggml.model"), "pre": md.get("tokenizer.ggml.pre"),
        "add_bos": md.get("tokenizer.ggml.add_bos_token"), "add_eos": md.get("tokenizer.ggml.add_eos_token"),
    }
    try:
        texts, types = read_vocab(m.path)
        arrays: tuple[list[str], np.ndarray] | None = texts, np.asarray(types)
    except ModelLoadError:  # no vocabulary (or the file changed since read_model checked it)
        texts, arrays = [], None
    ids: dict[str, object] = {}
    for role in ("bos", "eos", "unknown", "padding"):
        tid = md.get(f"tokenizer.ggml.{role}_token_id")
        if tid is not None:
            ids[role] = {"id": tid, "text": texts[tid] if tid < len(texts) and texts[tid] else None}  # type: ignore[operator]
    out["ids"] = ids
    if arrays is not None:
        texts, types = arrays
        special = np.nonzero((types == _CONTROL) | (types == _USER_DEFINED))[0]
        named = {}
        for i in special:
            s = texts[i]
            if not _UNNAMED_SPECIAL.match(s):
                named[s] = int(i)
        out["control_tokens"] = int(len(special))
        out["named_control_tokens"] = named
    return out


def mmproj_beside(m: ModelInfo) -> Mmproj | None:
    """The vision projector the engine would load beside the model (`gguf_model.find_mmproj`, the
    one rule both use), described from its header."""
    width = m.key("embedding_length")
    cand = find_mmproj(m.path, int(width or 0))  # type: ignore[arg-type]
    if cand is None:
        return None
    try:
        mm = read_model(cand)
    except ModelLoadError:
        return None
    return Mmproj(cand, str(mm.metadata.get("clip.projector_type", "?")), int(width),  # type: ignore[arg-type]
                  file_type_name(mm.metadata.get("general.file_type")), mm.nbytes)


def _quant_report(path: Path) -> dict[str, float] | None:
    """The quantizer's sidecar (`<name>.quant.json`): relative RMS error by class, if present."""
    import json

    side = path.with_name(path.name.removesuffix(".gguf") + ".quant.json")
    m = SPLIT.match(path.name)
    if m and not side.is_file():
        side = path.with_name(m["prefix"] + ".quant.json")
    try:
        data = json.loads(side.read_text())
        return {str(k): float(v) for k, v in data["by_class"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _files(m: ModelInfo) -> tuple[tuple[Path, int], ...]:
    count = split_count(m.metadata)
    if count <= 1:
        return ((m.path, m.path.stat().st_size),)
    sm = SPLIT.match(m.path.name)
    if sm is None:  # read_model already refused such a name; keep the one file
        return ((m.path, m.path.stat().st_size),)
    paths = [m.path.with_name(f"{sm['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    return tuple((p, p.stat().st_size) for p in paths)


# ----------------------------------------------------------------------------- fit and speed
def fit_plan(m: ModelInfo, *, vram: int, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
             n_ubatch: int = 512, flash_attn: str = "auto") -> Plan:
    """The plan `engine.place` makes for `--fit --vram vram` (same headroom, same arguments)."""
    return plan(m, budget=max(vram - DEFAULT_HEADROOM, 0), n_ctx=n_ctx, type_k=type_k, type_v=type_v,
                n_ubatch=n_ubatch, flash_attn=flash_attn, device="GPU")


def _tensor_device(name: str, p: Plan) -> str:
    """Where a tensor lives under plan `p`, by llama.cpp's rules for -ngl and --n-cpu-moe."""
    if name.startswith("token_embd."):
        return "CPU"
    blk = _BLOCK.match(name)
    if blk is None:
        return "GPU" if p.n_gpu_layers >= 1 else "CPU"
    i = int(blk[1])
    if i < p.n_layer + 1 - p.n_gpu_layers:
        return "CPU"
    if "_exps." in name and i < p.n_cpu_moe:
        return "CPU"
    return "GPU"


def bytes_per_token(m: ModelInfo, p: Plan) -> dict[str, int]:
    """Weight bytes read to generate one token, by device (KV cache not included).

    Routed expert stacks count expert_used / expert_count of their bytes (4 of 128 experts run);
    the token embedding one row; everything else in full.
    """
    used = int(m.key("expert_used_count", 0) or 0)  # type: ignore[arg-type]
    total = int(m.key("expert_count", 0) or 0)  # type: ignore[arg-type]
    out = {"GPU": 0, "CPU": 0}
    for t in m.tensors:
        if "_exps." in t.name and total:
            n = t.nbytes * used // total
        elif t.name.startswith("token_embd.") and len(t.shape) == 2:
            n = t.nbytes // t.shape[1]
        else:
            n = t.nbytes
        out[_tensor_device(t.name, p)] += n
    return out


def measure_cpu_bandwidth(seconds: float = 0.3, mib_per_thread: int = 64, threads: int | None = None) -> float:
    """RAM bandwidth in bytes/s from a short multi-threaded copy (STREAM's "copy": read + write).

    numpy releases the GIL while copying, so one thread per core loads the memory system as
    llama.cpp's CPU threads do. Arrays far larger than the caches; best of several rounds.
    """
    n_threads = threads or max(1, min(os.cpu_count() or 1, 16))
    n = mib_per_thread << 20
    src = [np.ones(n, dtype=np.uint8) for _ in range(n_threads)]
    dst = [np.empty(n, dtype=np.uint8) for _ in range(n_threads)]
    best = 0.0
    with ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(lambda i: np.copyto(dst[i], src[i]), range(n_threads)))  # touch the pages
        end = time.perf_counter() + seconds
        rounds = 0
        while rounds < 3 or time.perf_counter() < end:
            t0 = time.perf_counter()
            list(pool.map(lambda i: np.copyto(dst[i], src[i]), range(n_threads)))
            dt = time.perf_counter() - t0
            best = max(best, 2 * n * n_threads / dt)
            rounds += 1
            if rounds >= 50:
                break
    return best


def fit(m: ModelInfo, *, vram: int, ram: int | None = None, n_ctx: int = 4096, type_k: str = "f16",
        type_v: str = "f16", n_ubatch: int = 512, flash_attn: str = "auto", gpu_bandwidth: float | None = None,
        cpu_bandwidth: float | None = None, measure: bool = True) -> Fit:
    """Placement, memory per device and the decode-speed bound for `vram` bytes of GPU (0: none).

    The CPU bandwidth is measured (`measure_cpu_bandwidth`) unless given; the GPU's cannot be
    measured without running a kernel on it, so it must be given, and without it the bound
    counts only the CPU's time (still an upper bound).
    """
    if vram < 0:
        raise OptionsError("--vram must be 0 (no GPU) or a size such as 24G")
    p = fit_plan(m, vram=vram, n_ctx=n_ctx, type_k=type_k, type_v=type_v, n_ubatch=n_ubatch, flash_attn=flash_attn)
    read = bytes_per_token(m, p)
    weights = {"GPU": 0, "CPU": 0}
    for t in m.tensors:
        weights[_tensor_device(t.name, p)] += t.nbytes
    kv = {d: sum(r.nbytes for r in p.rows if r.device == d and r.what.startswith("KV cache")) for d in ("GPU", "CPU")}
    # A full context's cache is read by every token; the plan's KV rows are llama.cpp's cells
    # (n_ctx rounded up), the bytes read are for n_ctx tokens.
    cells = -(-n_ctx // 256) * 256
    kv_read = {d: kv[d] * n_ctx // cells for d in kv}
    cpu_blocks = p.n_layer + 1 - p.n_gpu_layers
    # The host needs compute buffers of its own once it runs whole blocks (the same estimate
    # as the GPU's); with every block on the GPU its share is small and not counted.
    cpu_compute = compute_allowance(m, n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn) if cpu_blocks > 0 else 0
    if cpu_bandwidth is None and measure:
        cpu_bw, cpu_src = measure_cpu_bandwidth(), "measured"
    else:
        cpu_bw, cpu_src = cpu_bandwidth, "given" if cpu_bandwidth else "unknown"
    devices = []
    if vram > 0:
        devices.append(Device("GPU", weights["GPU"], kv["GPU"], p.compute_bytes, read["GPU"], kv_read["GPU"],
                              gpu_bandwidth, "given" if gpu_bandwidth else "unknown", p.budget))
    devices.append(Device("CPU", weights["CPU"], kv["CPU"], cpu_compute, read["CPU"], kv_read["CPU"], cpu_bw, cpu_src, ram))
    return Fit(vram=vram, ram=ram, n_ctx=n_ctx, plan=p, devices=tuple(devices))


# ----------------------------------------------------------------------------- entry point
def inspect(path: str | os.PathLike[str], *, vram: int | None = None, ram: int | None = None, n_ctx: int = 4096,
            type_k: str = "f16", type_v: str = "f16", n_ubatch: int = 512, flash_attn: str = "auto",
            gpu_bandwidth: float | None = None, cpu_bandwidth: float | None = None) -> Info:
    """Describe a GGUF from its header; with `vram` (or `ram`) also plan it and bound its speed.

    `vram` None and `ram` None: no placement. `vram` 0 (or only `ram`): everything in RAM.
    """
    m = read_model(path)
    if m.arch == "clip":
        raise ModelLoadError(f"{m.path.name} is a vision projector (mmproj), not a language model; "
                             "give the text model's GGUF")
    if n_ctx < 1:
        raise OptionsError(f"-c/--ctx-size must be at least 1, got {n_ctx}")
    classes: dict[str, ClassCount] = {}
    types: dict[str, TypeCount] = {}
    for t in m.tensors:
        classes.setdefault(tensor_class(t.name), ClassCount()).add(t)
        types.setdefault(t.type, TypeCount()).add(t)
    classes = {c: classes[c] for c in CLASS_ORDER if c in classes}
    types = dict(sorted(types.items(), key=lambda kv: -kv[1].nbytes))
    info = Info(path=m.path, files=_files(m), model=m, file_type=file_type_name(m.metadata.get("general.file_type")),
                architecture=architecture(m), tokenizer=tokenizer_facts(m),
                template=template_features(m.metadata.get("tokenizer.chat_template")),  # type: ignore[arg-type]
                classes=classes, types=types, mmproj=mmproj_beside(m), quant_report=_quant_report(m.path))
    info = replace(info, repair={"temperature": temperature_overrides(m) or None,
                                 "mmproj_img_break": info.mmproj is not None and not has_img_break(info.mmproj.path)})
    if vram is None and ram is None and gpu_bandwidth is None and cpu_bandwidth is None:
        return info
    f = fit(m, vram=vram or 0, ram=ram, n_ctx=n_ctx, type_k=type_k, type_v=type_v, n_ubatch=n_ubatch,
            flash_attn=flash_attn, gpu_bandwidth=gpu_bandwidth, cpu_bandwidth=cpu_bandwidth)
    return replace(info, fit=f)
