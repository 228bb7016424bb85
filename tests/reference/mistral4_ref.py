"""Float64 numpy reference forward pass of the Mistral Small 4 text model — a test oracle.

Follows Hugging Face transformers (`models/mistral4/modeling_mistral4.py`, the DeepSeek-V3 MLA
attention it reuses, and `modeling_rope_utils._compute_yarn_parameters`), not llama.cpp, and shares
no code with the converter: it parses safetensors itself and decodes BF16 and FP8 by formula.

- attention: q = q_b(RMSNorm(q_a x)); [latent | k_rope] = kv_a x; [k_nope | v] = kv_b(RMSNorm(latent))
  per head; RoPE (YaRN inv_freq, interleaved pairs) on q_rope and the shared k_rope; softmax scale
  qk_head_dim^-0.5 · mscale² with mscale = 0.1·mscale_all_dim·ln(factor) + 1;
  Llama-4 query scaling q · (1 + β·ln(1 + ⌊pos / original_max_position_embeddings⌋));
- MoE: softmax router, top-k, renormalised when norm_topk_prob, × routed_scaling_factor, SwiGLU
  experts (gate rows first in gate_up_proj) + the shared expert; dense lead layers a plain SwiGLU.

`forward(..., f16_matmuls=True)` is a second oracle, for F16 GGUF files. It computes the same
model the way ggml's CPU backend runs an F16 file on x86, so that its distance to llama.cpp no
longer includes the runtime's F16 roundings. The rounding points below come from the upstream
ggml / llama.cpp source and were confirmed one tensor role at a time against the vendored build
(numbers in test_numerics.py). Values are rounded to F16 at:
- every matrix the converter stores as F16, which is all of them except the router `mlp.gate`
  (kept F32). On an F16 checkpoint this rounding changes nothing;
- the activation operand of every mat-mul with such a weight. For an F16 `src0`, the CPU mul_mat
  and mul_mat_id convert `src1` to the weight's `vec_dot_type`, which for F16 is F16; on x86,
  llamafile's tinyBLAS also takes F16 weights only with F16 activations. The products are then
  summed in F32. mistral4 flags the expert down mat-mul for F32 precision (spec §7.5), but the CPU
  backend ignores that flag, so the expert down input is rounded too.
Values are not rounded at the token-embedding lookup (get_rows F16 → F32 is exact), the norms, the
router, RoPE, the softmax, or KQ / KQV with an F32 KV cache (F32 × F32).
llama.cpp runs MLA in absorbed form (spec §9), which moves two rounding points. `attn_k_b` (the
k_nope half of kv_b) multiplies q_nope, which is rounded. `attn_v_b` (the value half) multiplies
the attention output in latent space, which is rounded. With `f16_matmuls` the attention is
computed that way; in exact arithmetic it equals the HF form used by default.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np


def _fp8(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.int64)
    e, m = (b >> 3) & 0xF, b & 7
    v = np.where(e == 0, np.ldexp(m / 8.0, -6), np.ldexp(1 + m / 8.0, (e - 7).astype(np.int32)))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    return np.where(b & 0x80, -v, v)


def _decode(raw: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    if dtype == "F32":
        a = np.frombuffer(raw, "<f4").astype(np.float64)
    elif dtype == "F16":
        a = np.frombuffer(raw, "<f2").astype(np.float64)
    elif dtype == "BF16":
        a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    elif dtype == "F8_E4M3":
        a = _fp8(np.frombuffer(raw, np.uint8))
    else:
        raise ValueError(dtype)
    return a.reshape(shape)


class Checkpoint:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        self.config = {**cfg, **cfg["text_config"]} if "text_config" in cfg else cfg
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            with open(path / f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    self._where[k.replace("language_model.", "")] = (path / f, 8 + n, v)

    def _raw(self, name: str) -> np.ndarray:
        f, base, info = self._where[name]
        a, b = info["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(base + a)
            return _decode(fh.read(b - a), info["dtype"], info["shape"])

    def tensor(self, name: str) -> np.ndarray:
        w = self._raw(name)
        scale = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        if scale in self._where:
            s = self._raw(scale)
            w = w * (s.reshape(-1, *([1] * (w.ndim - 1))) if s.size > 1 else s.reshape(()))
        return w


def load_checkpoint(path: str | Path) -> Checkpoint:
    return Checkpoint(path)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _yarn(cfg: dict) -> tuple[np.ndarray, float, float]:
    """(inv_freq, attention_factor, softmax mscale²) as HF computes them for rope_type yarn."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    dim = cfg["qk_rope_head_dim"]
    base = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if (rp.get("rope_type") or rp.get("type")) != "yarn":
        return 1.0 / pos_freqs, 1.0, 1.0
    factor = rp["factor"]
    orig = rp["original_max_position_embeddings"]
    beta_fast, beta_slow = rp.get("beta_fast", 32.0), rp.get("beta_slow", 1.0)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
    attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor)

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    softmax_m = get_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0
    return inv_freq, attention_factor, softmax_m


def _rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle i; x [..., T, D], cos/sin [T, D/2]."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def _f16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest F16 (ties to even, as F16C and ggml's scalar fallback do)."""
    return a.astype(np.float16).astype(np.float64)


def forward(ck: Checkpoint, token_ids: list[int], *, f16_matmuls: bool = False) -> np.ndarray:
    """Logits [T, vocab] for `token_ids` at positions 0..T-1, in float64.

    `f16_matmuls`: emulate ggml's CPU arithmetic on an F16 GGUF (see the module docstring); the
    default is plain HF semantics.
    """
    c = ck.config
    rnd = _f16 if f16_matmuls else (lambda a: a)

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        """x @ W.T, with both operands as ggml sees them."""
        return rnd(x) @ rnd(ck.tensor(name)).T

    T = len(token_ids)
    Nh = c["num_attention_heads"]
    Dn, Dr, Dv, Lkv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    eps = c.get("rms_norm_eps", 1e-6)
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    inv_freq, att_factor, msq = _yarn(c)
    pos = np.arange(T, dtype=np.float64)
    ang = np.outer(pos, inv_freq)
    cos, sin = np.cos(ang) * att_factor, np.sin(ang) * att_factor
    scaling = (Dn + Dr) ** -0.5 * msq
    beta = rp.get("llama_4_scaling_beta") or 0.0
    orig = rp.get("original_max_position_embeddings") or c["max_position_embeddings"]
    q_temp = 1.0 + beta * np.log1p(np.floor(pos / orig))
    mask = np.triu(np.full((T, T), -np.inf), 1)

    x = rnd(ck.tensor("model.embed_tokens.weight"))[token_ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, ck.tensor(p + "input_layernorm.weight"), eps)
        q = _rms(linear(h, p + "self_attn.q_a_proj.weight"), ck.tensor(p + "self_attn.q_a_layernorm.weight"), eps)
        q = linear(q, p + "self_attn.q_b_proj.weight").reshape(T, Nh, Dn + Dr).transpose(1, 0, 2)
        ckv = linear(h, p + "self_attn.kv_a_proj_with_mqa.weight")
        latent, k_pe = ckv[:, :Lkv], ckv[:, Lkv:]
        latent = _rms(latent, ck.tensor(p + "self_attn.kv_a_layernorm.weight"), eps)
        q_pe = _rope_interleaved(q[..., Dn:], cos, sin)
        k_pe = _rope_interleaved(k_pe, cos, sin)
        if not f16_matmuls:
            kv = latent @ ck.tensor(p + "self_attn.kv_b_proj.weight").T
            kv = kv.reshape(T, Nh, Dn + Dv).transpose(1, 0, 2)
            k_nope, v = kv[..., :Dn], kv[..., Dn:]
            query = np.concatenate([q[..., :Dn], q_pe], -1) * q_temp[None, :, None]
            key = np.concatenate([k_nope, np.broadcast_to(k_pe, (Nh, T, Dr))], -1)
            s = query @ key.transpose(0, 2, 1) * scaling + mask
        else:  # absorbed MLA, llama.cpp's order: one shared [latent | k_rope] key, the latent as value
            kv_b = _f16(ck.tensor(p + "self_attn.kv_b_proj.weight")).reshape(Nh, Dn + Dv, Lkv)
            q_lat = _f16(q[..., :Dn]) @ kv_b[:, :Dn]  # [Nh, T, Lkv]: attn_k_b · q_nope
            s = (q_lat @ latent.T + q_pe @ k_pe.T) * q_temp[None, :, None] * scaling + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        if not f16_matmuls:
            attn = s @ v
        else:
            attn = _f16(s @ latent) @ kv_b[:, Dn:].transpose(0, 2, 1)  # attn_v_b · latent output
        attn = attn.transpose(1, 0, 2).reshape(T, Nh * Dv)
        x = x + linear(attn, p + "self_attn.o_proj.weight")

        h = _rms(x, ck.tensor(p + "post_attention_layernorm.weight"), eps)
        if i < c.get("first_k_dense_replace", 0):
            g, u = linear(h, p + "mlp.gate_proj.weight"), linear(h, p + "mlp.up_proj.weight")
            x = x + linear(_silu(g) * u, p + "mlp.down_proj.weight")
            continue
        logits = h @ ck.tensor(p + "mlp.gate.weight").T  # the router stays F32 in every file type
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        k = c["num_experts_per_tok"]
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, top, -1)
        if c.get("norm_topk_prob"):
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * c.get("routed_scaling_factor", 1.0)
        gate_up = rnd(ck.tensor(p + "mlp.experts.gate_up_proj"))
        down = rnd(ck.tensor(p + "mlp.experts.down_proj"))
        F = gate_up.shape[1] // 2
        out = np.zeros_like(h)
        for t in range(T):
            for j in range(k):
                e = top[t, j]
                gu = gate_up[e] @ rnd(h[t])
                out[t] += w[t, j] * (down[e] @ rnd(_silu(gu[:F]) * gu[F:]))
        g = linear(h, p + "mlp.shared_experts.gate_proj.weight")
        u = linear(h, p + "mlp.shared_experts.up_proj.weight")
        out += linear(_silu(g) * u, p + "mlp.shared_experts.down_proj.weight")
        x = x + out
    x = _rms(x, ck.tensor("model.norm.weight"), eps)
    head = "lm_head.weight" if "lm_head.weight" in ck._where else "model.embed_tokens.weight"
    return linear(x, head)
