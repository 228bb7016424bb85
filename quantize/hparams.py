"""config.json → typed, validated hyper-parameters.

Tolerant constructors: unknown keys are ignored (configs grow fields every transformers
release), missing required keys raise `ConfigError` naming the key. Values the spec marks as
unconfirmed for the real checkpoint (rope key spelling, `head_dim`, the FP8 scale layout) are
read from the file, never assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def load_config_json(directory: Path) -> dict[str, Any]:
    """Read and parse config.json, with errors that say what to do."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {directory}; point SRC at a Hugging Face checkpoint directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config.json in {directory} is not valid JSON ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config.json in {directory} is not a JSON object; re-download it")
    return data


def _get(cfg: dict[str, Any], key: str, kind: type = int, default: Any = ..., aliases: tuple[str, ...] = ()) -> Any:
    for k in (key, *aliases):
        if k in cfg and cfg[k] is not None:
            value = cfg[k]
            break
    else:
        if default is ...:
            raise ConfigError(f"config.json lacks '{key}' in its text config; the checkpoint is incomplete")
        return default
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int and (isinstance(value, bool) or float(value) != int(value)):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config.json: '{key}' should be {kind.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class RopeParams:
    theta: float
    type: str  # "yarn" or "default"
    factor: float = 1.0
    original_context: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    llama4_beta: float = 0.0


@dataclass(frozen=True)
class TextHParams:
    """The text model's shape, in the names of the HF `mistral4` config."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int
    first_k_dense_replace: int
    n_group: int | None
    topk_group: int | None
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeParams
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the main ones

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """What the converter knows about a checkpoint from its config.json."""

    architecture: str  # registry key, e.g. "mistral4"
    text: TextHParams
    vision: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False)
    fp8: bool = False


def _rope(cfg: dict[str, Any]) -> RopeParams:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ConfigError("config.json: rope_parameters/rope_scaling should be an object")
    theta = _get(rp, "rope_theta", float, default=None)
    if theta is None:
        theta = _get(cfg, "rope_theta", float, default=10000.0)
    rtype = str(rp.get("rope_type") or rp.get("type") or "default")
    if rtype not in ("yarn", "default"):
        raise ConfigError(f"config.json: rope type '{rtype}' is not supported for mistral4 (expected yarn)")
    if rtype == "default":
        return RopeParams(theta=theta, type=rtype, llama4_beta=_get(rp, "llama_4_scaling_beta", float, 0.0))
    return RopeParams(
        theta=theta,
        type=rtype,
        factor=_get(rp, "factor", float),
        original_context=_get(rp, "original_max_position_embeddings", int),
        beta_fast=_get(rp, "beta_fast", float, 32.0),
        beta_slow=_get(rp, "beta_slow", float, 1.0),
        mscale=_get(rp, "mscale", float, 1.0),
        mscale_all_dim=_get(rp, "mscale_all_dim", float, 0.0),
        llama4_beta=_get(rp, "llama_4_scaling_beta", float, 0.0),
    )


def text_hparams(cfg: dict[str, Any], top: dict[str, Any] | None = None) -> TextHParams:
    """Build and validate the text hyper-parameters of a `mistral4` config."""
    top = top or {}
    tie = cfg.get("tie_word_embeddings", top.get("tie_word_embeddings", False))
    hp = TextHParams(
        vocab_size=_get(cfg, "vocab_size"),
        hidden_size=_get(cfg, "hidden_size"),
        num_hidden_layers=_get(cfg, "num_hidden_layers"),
        num_attention_heads=_get(cfg, "num_attention_heads"),
        num_key_value_heads=_get(cfg, "num_key_value_heads", default=_get(cfg, "num_attention_heads")),
        q_lora_rank=_get(cfg, "q_lora_rank"),
        kv_lora_rank=_get(cfg, "kv_lora_rank"),
        qk_nope_head_dim=_get(cfg, "qk_nope_head_dim"),
        qk_rope_head_dim=_get(cfg, "qk_rope_head_dim"),
        v_head_dim=_get(cfg, "v_head_dim"),
        n_routed_experts=_get(cfg, "n_routed_experts", aliases=("num_local_experts",)),
        n_shared_experts=_get(cfg, "n_shared_experts"),
        num_experts_per_tok=_get(cfg, "num_experts_per_tok"),
        moe_intermediate_size=_get(cfg, "moe_intermediate_size"),
        intermediate_size=_get(cfg, "intermediate_size", default=0),
        first_k_dense_replace=_get(cfg, "first_k_dense_replace", default=0),
        n_group=_get(cfg, "n_group", default=None),
        topk_group=_get(cfg, "topk_group", default=None),
        norm_topk_prob=_get(cfg, "norm_topk_prob", bool, default=False),
        routed_scaling_factor=_get(cfg, "routed_scaling_factor", float, default=1.0),
        rms_norm_eps=_get(cfg, "rms_norm_eps", float, default=1e-6),
        max_position_embeddings=_get(cfg, "max_position_embeddings"),
        tie_word_embeddings=bool(tie),
        rope=_rope(cfg),
        bos_token_id=_get(cfg, "bos_token_id", default=_get(top, "bos_token_id", default=None)),
        eos_token_id=_get(cfg, "eos_token_id", default=_get(top, "eos_token_id", default=None)),
        pad_token_id=_get(cfg, "pad_token_id", default=_get(top, "pad_token_id", default=None)),
        num_nextn_predict_layers=_get(cfg, "num_nextn_predict_layers", default=0) or 0,
    )
    _validate(hp)
    return hp


def _validate(hp: TextHParams) -> None:
    """Reject configs llama.cpp would assert on, with the reason (spec §8.3)."""
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings")
    for name in positive:
        if getattr(hp, name) <= 0:
            raise ConfigError(f"config.json: '{name}' must be positive, got {getattr(hp, name)}")
    if hp.num_key_value_heads != hp.num_attention_heads:
        raise ConfigError("config.json: MLA needs num_key_value_heads == num_attention_heads "
                          f"({hp.num_key_value_heads} != {hp.num_attention_heads})")
    if hp.qk_rope_head_dim % 2:
        raise ConfigError(f"config.json: qk_rope_head_dim must be even (rotary pairs), got {hp.qk_rope_head_dim}")
    if not 1 <= hp.num_experts_per_tok <= hp.n_routed_experts:
        raise ConfigError(f"config.json: num_experts_per_tok {hp.num_experts_per_tok} must be between 1 and "
                          f"n_routed_experts {hp.n_routed_experts}")
    if not 0 <= hp.first_k_dense_replace <= hp.num_hidden_layers:
        raise ConfigError("config.json: first_k_dense_replace must be between 0 and num_hidden_layers")
    if hp.first_k_dense_replace and hp.intermediate_size <= 0:
        raise ConfigError("config.json: dense lead layers (first_k_dense_replace > 0) need intermediate_size")
    if hp.rope.type == "yarn" and (hp.rope.factor <= 0 or hp.rope.original_context <= 0):
        raise ConfigError("config.json: yarn rope needs a positive factor and original_max_position_embeddings")


def load_model_config(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (top-level config, text config) with the nesting resolved."""
    top = load_config_json(directory)
    text = top.get("text_config")
    if text is None:
        return top, top
    if not isinstance(text, dict):
        raise ConfigError("config.json: text_config should be an object")
    return top, text
