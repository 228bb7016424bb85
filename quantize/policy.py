"""Per-tensor output type: what each GGUF tensor is stored as, and the rule that decided it.

Two policies, both ending in llama.cpp's block-size fallback (spec §7.4):

- `llama` reproduces `llama_model_quantize`'s default mix exactly (llama.cpp's
  `llama_tensor_get_type`, as it applies to the tensors a mistral4 GGUF has), so users can compare
  like with like. The test suite checks it tensor for tensor against llama.cpp itself.
- `ms4local` (the default) starts from that mix — routed experts, and `ffn_down` bumped on the same
  layers — and raises the floor of everything every token touches: attention, the shared expert,
  dense FFN layers and the embeddings. In Mistral Small 4 those are ~2.5% of the parameters (the
  128 routed experts are the rest), so the floor costs ~1–2% of file size and never lowers a
  tensor below llama.cpp's choice.

Rules are data with names, so `--dry-run` can say why every tensor got its type, and
`--tensor-type REGEX=TYPE` (llama.cpp's syntax: first matching regex wins) overrides any rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT

from .arch import ATTN, DENSE, EMBED, NORM, OUTPUT, ROUTER, SHEXP, TensorJob
from .errors import UnsupportedTypeError


@dataclass(frozen=True)
class FileType:
    """An output type name (`--type`), its default tensor type and llama.cpp's `general.file_type`."""

    name: str
    default: T
    ftype: int


_FILE_TYPES = [
    FileType("F32", T.F32, FT.ALL_F32), FileType("F16", T.F16, FT.MOSTLY_F16),
    FileType("BF16", T.BF16, FT.MOSTLY_BF16), FileType("Q8_0", T.Q8_0, FT.MOSTLY_Q8_0),
    FileType("Q6_K", T.Q6_K, FT.MOSTLY_Q6_K), FileType("Q5_K_M", T.Q5_K, FT.MOSTLY_Q5_K_M),
    FileType("Q5_K_S", T.Q5_K, FT.MOSTLY_Q5_K_S), FileType("Q5_1", T.Q5_1, FT.MOSTLY_Q5_1),
    FileType("Q5_0", T.Q5_0, FT.MOSTLY_Q5_0), FileType("Q4_K_M", T.Q4_K, FT.MOSTLY_Q4_K_M),
    FileType("Q4_K_S", T.Q4_K, FT.MOSTLY_Q4_K_S), FileType("Q4_1", T.Q4_1, FT.MOSTLY_Q4_1),
    FileType("Q4_0", T.Q4_0, FT.MOSTLY_Q4_0), FileType("IQ4_NL", T.IQ4_NL, FT.MOSTLY_IQ4_NL),
    FileType("IQ4_XS", T.IQ4_XS, FT.MOSTLY_IQ4_XS), FileType("Q3_K_L", T.Q3_K, FT.MOSTLY_Q3_K_L),
    FileType("Q3_K_M", T.Q3_K, FT.MOSTLY_Q3_K_M), FileType("Q3_K_S", T.Q3_K, FT.MOSTLY_Q3_K_S),
    FileType("Q2_K", T.Q2_K, FT.MOSTLY_Q2_K),
]
FILE_TYPES: dict[str, FileType] = {f.name: f for f in _FILE_TYPES}
POLICIES = ("ms4local", "llama")

# Tensor types `--tensor-type` may name: everything ggml quantizes without an importance matrix.
TENSOR_TYPES: dict[str, T] = {t.name: t for t in (
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q5_1, T.Q5_0, T.Q4_K, T.Q4_1, T.Q4_0,
    T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K)}

# llama.cpp's fallback chain when ne0 is not a multiple of the block size (spec §7.4).
FALLBACK: dict[T, T] = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0,
                        T.IQ4_XS: T.IQ4_NL}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# ms4local floors for the tensors every token touches, by file type (None: no floor).
_ALWAYS_USED = (ATTN, SHEXP, DENSE)


def _floors(ft: FileType) -> dict[str, T]:
    """Floor per role: attention/shared/dense, token embeddings and output, for one file type."""
    b = bpw(ft.default)
    if ft.default in FLOAT_TYPES or ft.default == T.Q8_0:
        return {}
    if b >= 6.5:  # Q6_K
        hot = T.Q8_0
    elif b >= 5.5:  # Q5_K_*, Q5_0, Q5_1
        hot = T.Q8_0
    else:  # 4-bit and below
        hot = T.Q6_K
    return {**{r: hot for r in _ALWAYS_USED}, EMBED: T.Q6_K, OUTPUT: T.Q6_K}


@dataclass(frozen=True)
class Choice:
    type: T
    rule: str


@dataclass(frozen=True)
class Override:
    """One `--tensor-type REGEX=TYPE`."""

    pattern: re.Pattern[str]
    type: T
    text: str


def parse_type(name: str) -> FileType:
    """The file type of an output type name (`--type`), or a clear error."""
    key = name.upper()
    if key not in FILE_TYPES:
        raise UnsupportedTypeError(f"unsupported --type {name}; choose one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def parse_override(text: str) -> Override:
    """`REGEX=TYPE` as llama-quantize's `--tensor-type` takes it (the type name is case-insensitive)."""
    pattern, sep, type_name = text.rpartition("=")
    if not sep or not pattern or not type_name:
        raise UnsupportedTypeError(f"--tensor-type {text!r} is not REGEX=TYPE (e.g. 'ffn_down_exps=q6_k')")
    t = TENSOR_TYPES.get(type_name.upper())
    if t is None:
        raise UnsupportedTypeError(f"--tensor-type {text!r}: unknown type {type_name}; "
                                   f"choose one of {', '.join(TENSOR_TYPES)}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UnsupportedTypeError(f"--tensor-type {text!r}: bad regular expression ({e})") from None
    return Override(compiled, t, text)


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def bpw(t: T) -> float:
    block, size = GGML_QUANT_SIZES[t]
    return size * 8 / block


def nbytes(t: T, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[t]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def fits(t: T, shape: tuple[int, ...]) -> bool:
    return shape[-1] % block_size(t) == 0


def quantizable(job: TensorJob) -> bool:
    """llama.cpp's eligibility (spec §7.1): 2-D/3-D weights, not norms, not the router."""
    return job.role not in (NORM, ROUTER) and len(job.shape) >= 2 and job.name.endswith("weight")


# ---- llama.cpp's mix -------------------------------------------------------------------------------

def _category(name: str) -> str:
    """llama.cpp's `tensor_get_category`: substring tests, in its order."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for sub, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if sub in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class ModelShape:
    """What llama.cpp's mix depends on besides the tensor itself."""

    n_layer: int
    n_expert: int
    has_output: bool  # False: tied embeddings, token_embd is quantized like output


class _Counters:
    """llama.cpp's per-category counters (only used for the layer of `ffn_down` when n_expert <= 1)."""

    def __init__(self, names: list[str]) -> None:
        # llama.cpp walks tensors in its weight map's order: sorted by name.
        self.order = {n: i for i, n in enumerate(sorted(names))}
        self.ffn_down = {n: k for k, n in enumerate(sorted(n for n in names if _category(n) == "ffn_down"))}


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise UnsupportedTypeError(f"cannot determine the layer of {name}")
    return int(m.group(1))


def llama_mix(job: TensorJob, ft: FileType, model: ModelShape, counters: _Counters) -> Choice:
    """llama.cpp's `llama_tensor_get_type` for one quantizable tensor of a mistral4 GGUF, before fallback."""
    new, rule = ft.default, f"{ft.name} default"
    if new in FLOAT_TYPES:
        return Choice(new, rule)
    name, ne0, f = job.name, job.shape[-1], ft.ftype
    cat = _category(name)
    if cat == "output" or (not model.has_output and cat == "token_embd"):
        if ne0 % block_size(new) != 0:
            return Choice(T.Q8_0, f"output: ne0 {ne0} not a multiple of {block_size(new)} → Q8_0")
        if new != T.Q8_0:
            return Choice(T.Q6_K, "llama.cpp: output → Q6_K")
        return Choice(new, rule)
    if cat == "token_embd":
        return Choice(new, rule)
    moe8 = model.n_expert == 8
    if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        # Not written for mistral4 (MLA writes attn_k_b/attn_v_b); refuse rather than guess llama.cpp's counters.
        raise UnsupportedTypeError(f"{name}: attention-V-like tensors are not part of a mistral4 GGUF")
    if cat == "attn_k":
        return Choice(T.Q8_0, "llama.cpp: attn_k of an 8-expert model → Q8_0") if moe8 else Choice(new, rule)
    if cat == "ffn_down":
        if model.n_expert > 1:
            i, n = _layer_of(name), model.n_layer
        else:
            i, n = counters.ffn_down[name], model.n_layer
        more = _more_bits(i, n)
        table = {
            FT.MOSTLY_Q2_K: (T.Q3_K, "llama.cpp: ffn_down at Q2_K → Q3_K"),
            FT.MOSTLY_Q3_K_M: (T.Q5_K if i < n // 16 else T.Q4_K, "llama.cpp: ffn_down at Q3_K_M"),
            FT.MOSTLY_Q3_K_L: (T.Q5_K, "llama.cpp: ffn_down at Q3_K_L → Q5_K"),
        }
        if f in table:
            t, r = table[f]
            return Choice(t, r)
        if f == FT.MOSTLY_Q4_K_M:
            return Choice(T.Q6_K, f"llama.cpp: ffn_down on a more-bits layer ({i}) → Q6_K") if more else Choice(new, rule)
        if i < n // 8 and f in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS):
            return Choice(T.Q5_K, f"llama.cpp: ffn_down in the first eighth of layers ({i}) → Q5_K")
        if f == FT.MOSTLY_Q5_K_M and more:
            return Choice(T.Q6_K, f"llama.cpp: ffn_down on a more-bits layer ({i}) → Q6_K")
        if f == FT.MOSTLY_Q4_K_S and i < n // 8:
            return Choice(T.Q5_K, f"llama.cpp: ffn_down in the first eighth of layers ({i}) → Q5_K")
        return Choice(new, rule)
    if cat == "attn_output":
        if moe8:
            if f in (FT.MOSTLY_Q2_K, FT.MOSTLY_Q3_K_S, FT.MOSTLY_Q3_K_M, FT.MOSTLY_IQ4_NL, FT.MOSTLY_Q4_K_S,
                     FT.MOSTLY_Q4_K_M, FT.MOSTLY_IQ4_XS):
                return Choice(T.Q5_K, "llama.cpp: attn_output of an 8-expert model → Q5_K")
            return Choice(new, rule)
        bump = {FT.MOSTLY_Q2_K: T.Q3_K, FT.MOSTLY_Q3_K_M: T.Q4_K, FT.MOSTLY_Q3_K_L: T.Q5_K}.get(f)
        if bump is not None:
            return Choice(bump, f"llama.cpp: attn_output at {ft.name} → {bump.name}")
    return Choice(new, rule)


def fallback(choice: Choice, shape: tuple[int, ...], *, strict: bool) -> Choice:
    """llama.cpp's `tensor_type_fallback`. strict: fail where llama.cpp fails (no chain for the type)."""
    t = choice.type
    if t in FLOAT_TYPES or fits(t, shape):
        return choice
    ne0 = shape[-1]
    nxt = FALLBACK.get(t)
    if nxt is None:
        if strict:
            raise UnsupportedTypeError(
                f"llama.cpp cannot store a tensor with ne0 {ne0} as {t.name} (no fallback defined); "
                "use the default ms4local policy")
        nxt = T.F16
    if not fits(nxt, shape):
        nxt = T.F16
    return Choice(nxt, f"{choice.rule}; ne0 {ne0} not a multiple of {block_size(t)}: {t.name} → {nxt.name}")


class Policy:
    """Chooses every tensor's type for one file type, policy and set of overrides."""

    def __init__(self, ft: FileType, policy: str, overrides: list[Override], jobs: list[TensorJob],
                 n_layer: int, n_expert: int) -> None:
        if policy not in POLICIES:
            raise UnsupportedTypeError(f"unknown --policy {policy}; choose one of {', '.join(POLICIES)}")
        self.ft, self.policy, self.overrides = ft, policy, overrides
        names = [j.name for j in jobs]
        self.model = ModelShape(n_layer, max(1, n_expert), "output.weight" in names)
        self.counters = _Counters(names)

    def choose(self, job: TensorJob) -> Choice:
        if not quantizable(job):
            # Norms are tiny and the router decides which experts run: both stay exact (llama.cpp does the same).
            return Choice(T.F32, "norms, router and 1-D tensors stay F32")
        for o in self.overrides:
            if o.pattern.search(job.name):
                return fallback(Choice(o.type, f"--tensor-type {o.text}"), job.shape, strict=False)
        llama = llama_mix(job, self.ft, self.model, self.counters)
        if self.policy == "llama":
            return fallback(llama, job.shape, strict=True)
        mine = fallback(llama, job.shape, strict=False)
        floor = _floors(self.ft).get(job.role)
        if floor is not None:
            raised = fallback(Choice(floor, f"ms4local: {job.role.replace('_', ' ')} at least {floor.name}"),
                              job.shape, strict=False)
            if bpw(raised.type) > bpw(mine.type):
                return raised
        return mine
