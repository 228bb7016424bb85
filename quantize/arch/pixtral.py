"""The Pixtral vision tower + projector → an mmproj GGUF (arch `clip`, projector `pixtral`), spec §6.

llama.cpp's own converter writes an mmproj for this model that does not load: its tensor filter
drops `language_model.*` keys, so the required `v.token_embd.img_break` row never gets written
(spec §6.4). We copy row `[IMG_BREAK]` of the text embedding ourselves. The vision q/k weights are
re-permuted from HF's half-split rotary order to the interleaved pairs llama.cpp's 2-D RoPE
expects (§6.3). Everything streams a tensor at a time through the same writer as the text model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, VocabError
from ..source import FLOAT_DTYPES, SafetensorsSource
from .base import KEEP, NORM, VISION, TensorJob, VisionTower, Weights

# Where the tower's tensors live in a checkpoint (transformers 4 and 5 layouts); the text model skips them.
PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
IMG_BREAK = "[IMG_BREAK]"


@dataclass(frozen=True)
class VisionHParams:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    patch: int
    image_size: int
    merge: int
    projection_dim: int
    act: str
    projector_bias: bool


def vision_hparams(top: dict[str, Any], text_hidden: int) -> VisionHParams | None:
    """The tower's shape from config.json, or None for a text-only checkpoint."""
    v = top.get("vision_config")
    if not isinstance(v, dict):
        return None
    try:
        hidden, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
        hp = VisionHParams(
            hidden=hidden, intermediate=int(v["intermediate_size"]), layers=int(v["num_hidden_layers"]),
            heads=heads, head_dim=int(v.get("head_dim") or hidden // heads), patch=int(v.get("patch_size", 14)),
            image_size=int(v.get("image_size", 1540)), merge=int(top.get("spatial_merge_size", 1)),
            projection_dim=text_hidden, act=str(v.get("hidden_act", "silu")),
            projector_bias=bool(top.get("multimodal_projector_bias", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config.json: vision_config is incomplete or malformed ({e})") from None
    if v.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(f"config.json: vision_config.model_type {v.get('model_type')!r} is not pixtral")
    if hp.head_dim % 4 or hp.heads * hp.head_dim != hp.hidden:
        raise ConfigError("config.json: vision head_dim must divide into 2-D RoPE pairs and heads×head_dim = hidden_size")
    return hp


class _Vision:
    """Reads vision tensors by their name after the model prefix (`vision_tower.…`, `multi_modal_projector.…`)."""

    def __init__(self, source: SafetensorsSource) -> None:
        self.source = source
        self.names = {}
        for raw in source.names():
            key = raw[len("model."):] if raw.startswith(PREFIXES[2:]) else raw
            if key.startswith(("vision_tower.", "multi_modal_projector.")):
                self.names[key] = raw

    def has(self, name: str) -> bool:
        return name in self.names

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.names:
            raise CheckpointError(f"vision tensor {name} is missing from the checkpoint; the download may be incomplete")
        ref = self.source.ref(self.names[name])
        if ref.dtype not in FLOAT_DTYPES or ref.dtype == "F8_E4M3":
            raise CheckpointError(f"vision tensor {name} has dtype {ref.dtype}; expected F32, F16 or BF16")
        return ref.shape

    def read(self, name: str) -> np.ndarray:
        self.shape(name)
        return self.source.read(self.names[name])


def _permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """HF half-split rotary rows → interleaved pairs (spec §6.3)."""
    out, inp = w.shape
    return np.ascontiguousarray(w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp))


def _plan(vh: VisionHParams, source: SafetensorsSource, img_break: int, text_hidden: int,
          text: Callable[[SafetensorsSource], Weights], embedding: str) -> list[TensorJob]:
    """Every mmproj tensor (spec §6.2), shapes checked against the config."""
    v = _Vision(source)
    jobs: list[TensorJob] = []
    V, I, M = vh.hidden, vh.intermediate, vh.merge

    def add(gguf: str, hf: str, shape: tuple[int, ...], role: str, transform=None) -> None:
        got = v.shape(hf)
        if tuple(got) != shape:
            raise CheckpointError(f"vision tensor {hf} has shape {list(got)} but config.json implies {list(shape)}; "
                                  "the config and the weights do not belong together")

        def chunks(hf: str = hf) -> Iterator[np.ndarray]:
            x = v.read(hf)
            yield transform(x) if transform else x

        jobs.append(TensorJob(gguf, shape, role, (v.names[hf],), chunks))

    add("v.patch_embd.weight", "vision_tower.patch_conv.weight", (V, 3, vh.patch, vh.patch), KEEP)
    add("v.pre_ln.weight", "vision_tower.ln_pre.weight", (V,), NORM)
    for j in range(vh.layers):
        p, b = f"vision_tower.transformer.layers.{j}.", f"v.blk.{j}."
        add(b + "ln1.weight", p + "attention_norm.weight", (V,), NORM)
        add(b + "attn_q.weight", p + "attention.q_proj.weight", (V, V), VISION, lambda w: _permute_qk(w, vh.heads))
        add(b + "attn_k.weight", p + "attention.k_proj.weight", (V, V), VISION, lambda w: _permute_qk(w, vh.heads))
        add(b + "attn_v.weight", p + "attention.v_proj.weight", (V, V), VISION)
        add(b + "attn_out.weight", p + "attention.o_proj.weight", (V, V), VISION)
        add(b + "ln2.weight", p + "ffn_norm.weight", (V,), NORM)
        add(b + "ffn_gate.weight", p + "feed_forward.gate_proj.weight", (I, V), VISION)
        add(b + "ffn_up.weight", p + "feed_forward.up_proj.weight", (I, V), VISION)
        add(b + "ffn_down.weight", p + "feed_forward.down_proj.weight", (V, I), VISION)
    add("mm.input_norm.weight", "multi_modal_projector.norm.weight", (V,), NORM)
    if M > 1:
        add("mm.patch_merger.weight", "multi_modal_projector.patch_merger.merging_layer.weight", (V, V * M * M), KEEP)
    add("mm.1.weight", "multi_modal_projector.linear_1.weight", (text_hidden, V), VISION)
    add("mm.2.weight", "multi_modal_projector.linear_2.weight", (text_hidden, text_hidden), VISION)
    for n in (1, 2):
        if vh.projector_bias:
            add(f"mm.{n}.bias", f"multi_modal_projector.linear_{n}.bias", (text_hidden,), NORM)
    used = {raw for j in jobs for raw in j.sources}
    extra = sorted(raw for raw in v.names.values() if raw not in used)
    if extra:
        raise CheckpointError(f"unexpected vision tensor {extra[0]} in the checkpoint; it does not look like Pixtral")

    words = text(source)

    def img_break_row() -> Iterator[np.ndarray]:
        yield words.read_rows(embedding, img_break, img_break + 1).reshape(-1)

    jobs.append(TensorJob("v.token_embd.img_break", (text_hidden,), NORM, (embedding,), img_break_row))
    return jobs


class Pixtral(VisionTower):
    """The tower of one checkpoint. `text` reads the text model's tensors and `embedding` names its
    token embedding, whose [IMG_BREAK] row the projector needs (the text architecture knows both)."""

    def __init__(self, vh: VisionHParams, text: Callable[[SafetensorsSource], Weights], embedding: str) -> None:
        self.hparams, self.text, self.embedding = vh, text, embedding

    def plan(self, source: SafetensorsSource, tokens: Sequence[str]) -> list[TensorJob]:
        if IMG_BREAK not in tokens:
            raise VocabError("the vocabulary has no [IMG_BREAK] token, which the vision projector needs")
        img_break = tokens.index(IMG_BREAK)
        return _plan(self.hparams, source, img_break, self.hparams.projection_dim, self.text, self.embedding)

    def add_metadata(self, writer: Any, mean: tuple[float, ...], std: tuple[float, ...], file_type: int,
                     name: str) -> None:
        _add_metadata(writer, self.hparams, mean, std, file_type, name)


def _add_metadata(w: Any, vh: VisionHParams, mean: tuple[float, ...], std: tuple[float, ...], file_type: int,
                  name: str) -> None:
    """clip.* keys of spec §6.5."""
    import gguf

    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type("pixtral")
    w.add_vision_projection_dim(vh.projection_dim)
    w.add_vision_image_size(vh.image_size)
    w.add_vision_patch_size(vh.patch)
    w.add_vision_embedding_length(vh.hidden)
    w.add_vision_feed_forward_length(vh.intermediate)
    w.add_vision_block_count(vh.layers)
    w.add_vision_head_count(vh.heads)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean(list(mean))
    w.add_vision_image_std(list(std))
    if vh.act == "silu":
        w.add_vision_use_silu(True)
    elif vh.act == "gelu":
        w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(vh.merge)
