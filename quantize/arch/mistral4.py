"""Mistral Small 4 (HF `mistral4` text model) → GGUF arch `mistral4`.

Spec §1–3. The mapping is a list of `TensorJob`s, each naming its source tensors and a generator
of float32 chunks (one expert at a time for the 3-D expert stacks), so the writer never holds
more than one expert slice of the model in memory.

Two deliberate differences from llama.cpp's own HF converter (spec §3.3): we write both
Llama-4 query-temperature keys (`attention.temperature_scale` / `temperature_length`) — without
them the model is wrong past `original_max_position_embeddings` — and `expert_gating_func`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..hparams import TextHParams, text_hparams
from ..source import SafetensorsSource
from . import pixtral
from .base import ATTN, DENSE, EMBED, EXPERTS, NORM, OUTPUT, ROUTER, SHEXP, Architecture, TensorJob, Weights

EMBEDDING = "model.embed_tokens.weight"


def weights(source: SafetensorsSource) -> Weights:
    """The text tensors of a checkpoint (the Pixtral tower's, beside them, are not the text model's)."""
    return Weights(source, skip=pixtral.PREFIXES)


def plan(hp: TextHParams, source: SafetensorsSource) -> list[TensorJob]:
    """Every text tensor of the GGUF, in llama.cpp's order, with shapes checked against the config."""
    w = weights(source)
    H, V = hp.hidden_size, hp.vocab_size
    Nh, Lq, Lkv = hp.num_attention_heads, hp.q_lora_rank, hp.kv_lora_rank
    Dn, Dr, Dv = hp.qk_nope_head_dim, hp.qk_rope_head_dim, hp.v_head_dim
    E, F, S = hp.n_routed_experts, hp.moe_intermediate_size, hp.n_shared_experts
    jobs: list[TensorJob] = []

    def simple(gguf: str, hf: str, shape: tuple[int, ...], role: str, layer: int | None = None) -> None:
        w.expect(hf, shape)
        jobs.append(TensorJob(gguf, shape, role, (hf,), lambda: w.chunks(hf), layer))

    def experts(gguf: str, hf: str, shape: tuple[int, ...], layer: int) -> None:
        w.expect(hf, shape)
        jobs.append(TensorJob(gguf, shape, EXPERTS, (hf,),
                              lambda: (w.read_expert(hf, e, shape[0]) for e in range(shape[0])), layer))

    simple("token_embd.weight", EMBEDDING, (V, H), EMBED)
    for i in range(hp.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        simple(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), NORM, i)
        simple(b + "attn_q_a.weight", p + "self_attn.q_a_proj.weight", (Lq, H), ATTN, i)
        simple(b + "attn_q_a_norm.weight", p + "self_attn.q_a_layernorm.weight", (Lq,), NORM, i)
        simple(b + "attn_q_b.weight", p + "self_attn.q_b_proj.weight", (Nh * (Dn + Dr), Lq), ATTN, i)
        simple(b + "attn_kv_a_mqa.weight", p + "self_attn.kv_a_proj_with_mqa.weight", (Lkv + Dr, H), ATTN, i)
        simple(b + "attn_kv_a_norm.weight", p + "self_attn.kv_a_layernorm.weight", (Lkv,), NORM, i)
        kv_b = p + "self_attn.kv_b_proj.weight"
        w.expect(kv_b, (Nh * (Dn + Dv), Lkv))

        # MLA split (spec §2.3): rows are head-major, [k_nope Dn | value Dv] per head.
        def k_b(kv_b: str = kv_b) -> Iterator[np.ndarray]:
            heads = w.read(kv_b).reshape(Nh, Dn + Dv, Lkv)
            yield np.ascontiguousarray(heads[:, :Dn, :].transpose(0, 2, 1))

        def v_b(kv_b: str = kv_b) -> Iterator[np.ndarray]:
            heads = w.read(kv_b).reshape(Nh, Dn + Dv, Lkv)
            yield np.ascontiguousarray(heads[:, Dn:, :])

        jobs.append(TensorJob(b + "attn_k_b.weight", (Nh, Lkv, Dn), ATTN, (kv_b,), k_b, i))
        jobs.append(TensorJob(b + "attn_v_b.weight", (Nh, Dv, Lkv), ATTN, (kv_b,), v_b, i))
        simple(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, Nh * Dv), ATTN, i)
        simple(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), NORM, i)
        if i < hp.first_k_dense_replace:
            I = hp.intermediate_size
            simple(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (I, H), DENSE, i)
            simple(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, I), DENSE, i)
            simple(b + "ffn_up.weight", p + "mlp.up_proj.weight", (I, H), DENSE, i)
            continue
        simple(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", (E, H), ROUTER, i)
        # Kept fused (gate rows first), as llama.cpp's converter writes it and the runtime reads it.
        experts(b + "ffn_gate_up_exps.weight", p + "mlp.experts.gate_up_proj", (E, 2 * F, H), i)
        experts(b + "ffn_down_exps.weight", p + "mlp.experts.down_proj", (E, H, F), i)
        simple(b + "ffn_gate_shexp.weight", p + "mlp.shared_experts.gate_proj.weight", (F * S, H), SHEXP, i)
        simple(b + "ffn_up_shexp.weight", p + "mlp.shared_experts.up_proj.weight", (F * S, H), SHEXP, i)
        simple(b + "ffn_down_shexp.weight", p + "mlp.shared_experts.down_proj.weight", (H, F * S), SHEXP, i)
    simple("output_norm.weight", "model.norm.weight", (H,), NORM)
    if w.has("lm_head.weight") or not hp.tie_word_embeddings:
        simple("output.weight", "lm_head.weight", (V, H), OUTPUT)

    # Nothing may be left over: an unknown tensor means this is not the model we think it is,
    # and silently dropping weights would produce a broken file.
    left = [n for n in w.leftovers() if not _is_known_extra(n, hp)]
    if left:
        raise CheckpointError(
            f"unexpected tensor {left[0]} in the checkpoint"
            + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
            + "; it does not look like a Mistral Small 4 checkpoint"
        )
    return jobs


def _is_known_extra(name: str, hp: TextHParams) -> bool:
    """Tensors that exist in real checkpoints but have no GGUF counterpart."""
    if name.endswith(("activation_scale", "_scale_inv")):
        return True  # scales of tensors consumed above (checked when read), or of tied lm_head
    m = re.match(r"model\.layers\.(\d+)\.", name)
    # Multi-token-prediction layers (declared by num_nextn_predict_layers) are not used at run time.
    # Any other layer past num_hidden_layers means the config and the weights disagree: converting
    # anyway would silently drop layers and give a broken model.
    n = hp.num_hidden_layers
    return bool(m and n <= int(m.group(1)) < n + hp.num_nextn_predict_layers)


def add_metadata(writer: Any, hp: TextHParams) -> None:
    """Arch keys of spec §3.1 plus the Llama-4 temperature pair and the gating function (§3.2–3.3)."""
    import gguf

    w = writer
    w.add_context_length(hp.max_position_embeddings)
    w.add_embedding_length(hp.hidden_size)
    w.add_block_count(hp.num_hidden_layers)
    if hp.intermediate_size:
        w.add_feed_forward_length(hp.intermediate_size)
    w.add_head_count(hp.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the compressed latent
    w.add_key_length(hp.kv_lora_rank + hp.qk_rope_head_dim)
    w.add_value_length(hp.kv_lora_rank)
    w.add_key_length_mla(hp.qk_nope_head_dim + hp.qk_rope_head_dim)
    w.add_value_length_mla(hp.v_head_dim)
    w.add_q_lora_rank(hp.q_lora_rank)
    w.add_kv_lora_rank(hp.kv_lora_rank)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_rope_dimension_count(hp.qk_rope_head_dim)
    w.add_rope_freq_base(hp.rope.theta)
    r = hp.rope
    if r.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_context)
        w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
        if r.mscale_all_dim:
            w.add_rope_scaling_yarn_log_mul(0.1 * r.mscale_all_dim)
    if r.llama4_beta:
        # Both or neither: the runtime asserts temperature_length != 0 when the scale is set.
        w.add_attn_temperature_scale(r.llama4_beta)
        w.add_attn_temperature_length(r.original_context or hp.max_position_embeddings)
    w.add_expert_count(hp.n_routed_experts)
    w.add_expert_used_count(hp.num_experts_per_tok)
    if hp.n_group is not None and hp.topk_group is not None and hp.n_group < hp.n_routed_experts:
        w.add_expert_group_count(hp.n_group)
        w.add_expert_group_used_count(hp.topk_group)
    w.add_expert_shared_count(hp.n_shared_experts)
    w.add_expert_feed_forward_length(hp.moe_intermediate_size)
    w.add_expert_weights_scale(hp.routed_scaling_factor)
    if hp.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(hp.first_k_dense_replace)
    w.add_vocab_size(hp.vocab_size)


class Mistral4(Architecture):
    """The `mistral4` text model, and the Pixtral tower when config.json declares one."""

    arch = "mistral4"
    model_types = ("mistral4",)
    description = ("Mistral Small 4 (Mistral3ForConditionalGeneration with text_config.model_type mistral4, "
                   "or Mistral4ForCausalLM)")

    def hparams(self, top: dict[str, Any], text: dict[str, Any]) -> TextHParams:
        return text_hparams(text, top)

    def plan(self, hp: TextHParams, source: SafetensorsSource) -> list[TensorJob]:
        return plan(hp, source)

    def add_metadata(self, writer: Any, hp: TextHParams) -> None:
        add_metadata(writer, hp)

    def vision(self, top: dict[str, Any], hp: TextHParams) -> pixtral.Pixtral | None:
        """Pixtral projects into this model's embeddings and breaks image rows with its [IMG_BREAK] row."""
        vh = pixtral.vision_hparams(top, hp.hidden_size)
        return None if vh is None else pixtral.Pixtral(vh, weights, EMBEDDING)
