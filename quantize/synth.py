"""Seeded, Mistral-Small-4-shaped HF checkpoints with random weights, for the demo and the tests.

A checkpoint here is exactly what the converter reads from the real model: `config.json`
(nested `Mistral3ForConditionalGeneration` or bare `mistral4`), single or sharded safetensors
with an index, F32/F16/BF16 or FP8 E4M3 with per-tensor or per-expert inverse scales, and a
*real* tekken vocabulary (mistral-common ships `tekken_240911.json`; we add the v15 special
tokens) as `tokenizer.json` and/or `tekken.json`. Tensors are generated and written one at a
time, so a multi-GB checkpoint costs one tensor of memory. Every tensor's values depend only on
(seed, name), so the same model can be written in several dtypes and shardings.

It lives in the package, not in tests/, because `ms4local demo` runs the real pipeline on it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .source import FP8_E4M3FN
from .vocab import bytes_to_piece, tekken_merges

# v15 special-token layout (spec §4.3): the legacy 0..19, then [ARGS]/[CALL_ID], [THINK]/[/THINK]
# and [MODEL_SETTINGS]/[/MODEL_SETTINGS]; the rest of the 1000 special ranks are <SPECIAL_n>.
V15_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]",
    37: "[/MODEL_SETTINGS]",
}
N_SPECIAL = 1000
FULL_VOCAB = 131072


@dataclass(frozen=True)
class TinySpec:
    """Shape and storage of a generated checkpoint (defaults: spec §8.1, with 4 experts, top-2)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 2
    q_lora: int = 32
    kv_lora: int = 32
    nope: int = 16
    rope: int = 16
    v_dim: int = 32
    experts: int = 4
    top_k: int = 2
    shared: int = 1
    moe_inter: int = 32
    inter: int = 128
    first_dense: int = 0
    vocab: int = FULL_VOCAB
    orig_ctx: int = 8192
    factor: float = 128.0
    llama4_beta: float = 0.1
    max_pos: int = 32768
    dtype: str = "F32"  # F32 | F16 | BF16 | FP8 (per-tensor scales) | FP8E (per-expert scales for stacks)
    shards: int = 1
    layout: str = "legacy"  # legacy: language_model.model.* | new: model.language_model.* | flat: bare mistral4
    tokenizer: str = "json"  # json | tekken | both
    chat_template: bool = False
    seed: int = 0
    # Pixtral vision tower (spec §8.1); 0 layers = a text-only checkpoint.
    vision_layers: int = 0
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_inter: int = 64
    patch: int = 14
    merge: int = 2


def tekken_source() -> Path:
    """The tekken vocabulary that mistral-common ships (found without importing it)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed; run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "tekken_240911.json"


def v15_tekken(vocab_size: int = FULL_VOCAB) -> dict:
    """mistral-common's tekken vocabulary as a v15 tokenizer file, truncated to `vocab_size`."""
    data = json.loads(tekken_source().read_text(encoding="utf-8"))
    inner = vocab_size - N_SPECIAL
    data["vocab"] = data["vocab"][:inner]
    data["config"].update(version="v15", default_vocab_size=vocab_size, num_vocab_tokens=inner,
                          default_num_special_tokens=N_SPECIAL)
    # Every rank listed, as real tekken files do: mistral-common names special i by position i.
    data["special_tokens"] = [
        {"rank": r, "token_str": V15_SPECIALS.get(r, f"<SPECIAL_{r}>"), "is_control": True} for r in range(N_SPECIAL)
    ]
    data["model_settings_builder"] = {
        "reasoning_effort": {"type": "enum", "accepts_none": True, "values": ["none", "high"], "default": "none"}
    }
    return data


def tokenizer_json(tekken: dict) -> dict:
    """The same vocabulary as an HF `tokenizers` byte-level BPE (what HF checkpoints ship)."""
    n_special = tekken["config"]["default_num_special_tokens"]
    inner = [base64.b64decode(t["token_bytes"]) for t in tekken["vocab"]]
    specials = {t["rank"]: t["token_str"] for t in tekken["special_tokens"]}
    added = [{"id": i, "content": specials.get(i, f"<SPECIAL_{i}>"), "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for i in range(n_special)]
    vocab = {bytes_to_piece(tok): r + n_special for r, tok in enumerate(inner)}
    merges = [f"{bytes_to_piece(a)} {bytes_to_piece(b)}" for a, b in tekken_merges(inner)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tekken["config"]["pattern"]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def text_config(s: TinySpec) -> dict:
    return {
        "model_type": "mistral4", "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "moe_intermediate_size": s.moe_inter, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.heads, "n_routed_experts": s.experts, "n_shared_experts": s.shared,
        "num_experts_per_tok": s.top_k, "q_lora_rank": s.q_lora, "kv_lora_rank": s.kv_lora,
        "qk_rope_head_dim": s.rope, "qk_nope_head_dim": s.nope, "v_head_dim": s.v_dim, "head_dim": s.nope + s.rope,
        "first_k_dense_replace": s.first_dense, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False,
        "max_position_embeddings": s.max_pos, "rope_interleave": True, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11,
        "rope_parameters": {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": s.factor,
                            "original_max_position_embeddings": s.orig_ctx, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": s.llama4_beta,
                            "partial_rotary_factor": s.rope / (s.nope + s.rope), "max_position_embeddings": s.max_pos},
    }


def config_json(s: TinySpec) -> dict:
    text = text_config(s)
    if s.layout == "flat":
        return {"architectures": ["Mistral4ForCausalLM"], **text}
    fp8 = s.dtype.startswith("FP8")
    cfg = {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
        "spatial_merge_size": 2, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
        "vision_feature_layer": -1, "tie_word_embeddings": False, "text_config": text,
    }
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "static", "quant_method": "fp8", "weight_block_size": None}
    if s.vision_layers:
        cfg["spatial_merge_size"] = s.merge
        cfg["vision_config"] = {
            "model_type": "pixtral", "hidden_size": s.vision_hidden, "intermediate_size": s.vision_inter,
            "num_hidden_layers": s.vision_layers, "num_attention_heads": s.vision_heads,
            "head_dim": s.vision_hidden // s.vision_heads, "image_size": 1540, "patch_size": s.patch,
            "num_channels": 3, "hidden_act": "silu", "rope_parameters": {"rope_theta": 10000.0}}
    return cfg


def vision_tensors(s: TinySpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name without the model prefix, shape, kind) of the Pixtral tower and projector."""
    V, I, H = s.vision_hidden, s.vision_inter, s.hidden
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("vision_tower.patch_conv.weight", (V, 3, s.patch, s.patch), "conv"),
        ("vision_tower.ln_pre.weight", (V,), "norm")]
    for j in range(s.vision_layers):
        p = f"vision_tower.transformer.layers.{j}."
        out += [(p + "attention_norm.weight", (V,), "norm"), (p + "ffn_norm.weight", (V,), "norm")]
        out += [(p + f"attention.{x}_proj.weight", (V, V), "vlinear") for x in "qkvo"]
        out += [(p + "feed_forward.gate_proj.weight", (I, V), "vlinear"),
                (p + "feed_forward.up_proj.weight", (I, V), "vlinear"),
                (p + "feed_forward.down_proj.weight", (V, I), "vlinear")]
    out += [("multi_modal_projector.norm.weight", (V,), "norm"),
            ("multi_modal_projector.patch_merger.merging_layer.weight", (V, V * s.merge ** 2), "vlinear"),
            ("multi_modal_projector.linear_1.weight", (H, V), "vlinear"),
            ("multi_modal_projector.linear_2.weight", (H, H), "vlinear")]
    return out


def text_tensors(s: TinySpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name without prefix, shape, kind) of every text tensor; kind picks the init."""
    H, E, F, I = s.hidden, s.experts, s.moe_inter, s.inter
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (s.vocab, H), "embed")]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (H,), "norm"),
            (p + "self_attn.q_a_proj.weight", (s.q_lora, H), "linear"),
            (p + "self_attn.q_a_layernorm.weight", (s.q_lora,), "norm"),
            (p + "self_attn.q_b_proj.weight", (s.heads * (s.nope + s.rope), s.q_lora), "linear"),
            (p + "self_attn.kv_a_proj_with_mqa.weight", (s.kv_lora + s.rope, H), "linear"),
            (p + "self_attn.kv_a_layernorm.weight", (s.kv_lora,), "norm"),
            (p + "self_attn.kv_b_proj.weight", (s.heads * (s.nope + s.v_dim), s.kv_lora), "linear"),
            (p + "self_attn.o_proj.weight", (H, s.heads * s.v_dim), "linear"),
            (p + "post_attention_layernorm.weight", (H,), "norm"),
        ]
        if i < s.first_dense:
            out += [(p + "mlp.gate_proj.weight", (I, H), "linear"), (p + "mlp.up_proj.weight", (I, H), "linear"),
                    (p + "mlp.down_proj.weight", (H, I), "linear")]
            continue
        out += [
            (p + "mlp.gate.weight", (E, H), "router"),
            (p + "mlp.experts.gate_up_proj", (E, 2 * F, H), "experts"),
            (p + "mlp.experts.down_proj", (E, H, F), "experts"),
            (p + "mlp.shared_experts.gate_proj.weight", (F * s.shared, H), "linear"),
            (p + "mlp.shared_experts.up_proj.weight", (F * s.shared, H), "linear"),
            (p + "mlp.shared_experts.down_proj.weight", (H, F * s.shared), "linear"),
        ]
    out += [("model.norm.weight", (H,), "norm"), ("lm_head.weight", (s.vocab, H), "linear")]
    return out


def values(s: TinySpec, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    """The float32 values of one tensor: a function of (seed, name) only."""
    rng = np.random.default_rng([s.seed, zlib.crc32(name.encode())])
    if kind == "norm":
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    fan_in = shape[-1]
    if kind == "conv":
        fan_in = math.prod(shape[1:])
    scale = {"embed": 1.0, "router": 2.0 / math.sqrt(fan_in)}.get(kind, 1.0 / math.sqrt(fan_in))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


_FP8_ORDER = np.argsort(np.nan_to_num(FP8_E4M3FN, nan=1e9), kind="stable")
_FP8_SORTED = np.nan_to_num(FP8_E4M3FN, nan=1e9)[_FP8_ORDER]


def to_fp8_bits(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3FN code (saturating at ±448)."""
    x = np.clip(x, -448.0, 448.0).astype(np.float32)
    idx = np.clip(np.searchsorted(_FP8_SORTED, x), 1, len(_FP8_SORTED) - 1)
    lo, hi = _FP8_SORTED[idx - 1], _FP8_SORTED[idx]
    pick = np.where(np.abs(x - lo) <= np.abs(hi - x), idx - 1, idx)
    return _FP8_ORDER[pick].astype(np.uint8)


Entry = tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]


def _encoded(s: TinySpec, name: str, shape: tuple[int, ...], kind: str) -> list[Entry]:
    """The stored form of one tensor: (name, dtype, shape, bytes-producer) entries, scales included."""
    fp8 = s.dtype.startswith("FP8") and kind in ("linear", "experts")
    if not fp8:
        dtype = s.dtype if s.dtype in ("F32", "F16", "BF16") else "BF16"  # FP8 checkpoints keep the rest BF16
        enc = {"F32": lambda a: a.astype("<f4"), "F16": lambda a: a.astype("<f2"), "BF16": to_bf16_bits}[dtype]
        return [(name, dtype, shape, lambda: enc(values(s, name, shape, kind)))]
    per_expert = kind == "experts" and s.dtype == "FP8E"
    scale_name = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
    act_name = name[: -len(".weight")] + ".activation_scale" if name.endswith(".weight") else name + "_activation_scale"

    def scales() -> np.ndarray:
        v = np.abs(values(s, name, shape, kind))
        if per_expert:
            return (v.reshape(shape[0], -1).max(axis=1) / 448.0).astype(np.float32).reshape(shape[0], 1, 1)
        return np.array(v.max() / 448.0, dtype=np.float32)

    def weight() -> np.ndarray:
        return to_fp8_bits(values(s, name, shape, kind) / scales())

    scale_shape = (shape[0], 1, 1) if per_expert else ()
    act_shape = (shape[0],) if kind == "experts" else ()
    return [
        (name, "F8_E4M3", shape, weight),
        (scale_name, "F32", scale_shape, lambda: scales().astype("<f4")),
        (act_name, "F32", act_shape, lambda: np.ones(act_shape, dtype="<f4")),
    ]


def write_safetensors(path: Path, entries: list[Entry]) -> int:
    """A safetensors file written one tensor at a time (the header is computed from shapes first)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, _, make in entries:
            f.write(np.ascontiguousarray(make()).tobytes())
    return offset


def _full_name(s: TinySpec, name: str) -> str:
    if s.layout == "flat":
        return name
    if s.layout == "new":
        return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
    return "language_model." + name


def make_checkpoint(out_dir: str | Path, spec: TinySpec | None = None, **overrides: object) -> Path:
    """Write a checkpoint directory for `spec` (fields may be overridden by keyword)."""
    s = replace(spec or TinySpec(), **overrides)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json(s), indent=2))
    entries: list[Entry] = []
    for name, shape, kind in text_tensors(s):
        for full, dtype, shp, make in _encoded(s, name, shape, kind):
            entries.append((_full_name(s, full), dtype, shp, make))
    if s.vision_layers and s.layout != "flat":
        prefix = "model." if s.layout == "new" else ""
        for name, shape, kind in vision_tensors(s):
            for full, dtype, shp, make in _encoded(s, name, shape, kind):
                entries.append((prefix + full, dtype, shp, make))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "patch_size": s.patch, "image_processor_type": "PixtralImageProcessor"}))
    if s.shards <= 1:
        write_safetensors(out / "model.safetensors", entries)
    else:
        per = math.ceil(len(entries) / s.shards)
        weight_map, total = {}, 0
        for k in range(s.shards):
            part = entries[k * per:(k + 1) * per]
            fname = f"model-{k + 1:05d}-of-{s.shards:05d}.safetensors"
            total += write_safetensors(out / fname, part)
            weight_map.update({e[0]: fname for e in part})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tek = v15_tekken(s.vocab)
    if s.tokenizer in ("tekken", "both"):
        (out / "tekken.json").write_text(json.dumps(tek))
    if s.tokenizer in ("json", "both"):
        (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(tek), ensure_ascii=False))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}))
    if s.chat_template:
        from .vocab import default_chat_template
        (out / "chat_template.jinja").write_text(default_chat_template())
    (out / "ms4local-synth.json").write_text(json.dumps(asdict(s), indent=2))
    return out
