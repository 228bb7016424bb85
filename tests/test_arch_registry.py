"""The architecture registry is the only door: a toy architecture defined in this file, registered
from here, converts through `quantize.convert` without a change to any generic module (issue #14).

The toy is a tiny dense Llama (GQA attention, SwiGLU FFN, HF's half-split RoPE) written as GGUF
arch `llama`. Its file is read back with gguf's reader, and llama.cpp's logits on it are compared
with a float64 numpy forward pass written here from the HF Llama equations (shares no code with the
converter), so the q/k re-permutation the toy does on the way is checked by the runtime.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader

from helpers import ROOT
from quantize import arch, convert
from quantize.arch import ATTN, DENSE, EMBED, NORM, OUTPUT, Architecture, TensorJob, Weights
from quantize.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from quantize.synth import N_SPECIAL, v15_tekken, write_safetensors

CONFIG = {"architectures": ["ToyLlamaForCausalLM"], "model_type": "toy_llama", "vocab_size": 2000,
          "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
          "bos_token_id": 1, "eos_token_id": 2}


# --- the toy architecture: everything a model module provides, and nothing more ----------------------

@dataclass(frozen=True)
class ToyHParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    n_routed_experts: int = 0  # dense

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF half-split rotary rows → the interleaved pairs of llama.cpp's `llama` RoPE."""
    return np.ascontiguousarray(w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape))


class ToyLlama(Architecture):
    arch = "llama"
    model_types = ("toy_llama",)
    description = "Toy Llama (defined in tests/test_arch_registry.py)"

    def hparams(self, top, text):
        try:
            return ToyHParams(**{k: text[k] for k in ToyHParams.__dataclass_fields__ if k in text})
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None

    def plan(self, hp, source):
        w = Weights(source)
        H, I, D = hp.hidden_size, hp.intermediate_size, hp.head_dim
        Nh, Nkv = hp.num_attention_heads, hp.num_key_value_heads
        jobs: list[TensorJob] = []

        def add(gguf, hf, shape, role, layer=None, heads=0):
            w.expect(hf, shape)

            def chunks(hf=hf) -> Iterator[np.ndarray]:
                if heads:
                    yield permute(w.read(hf), heads)
                else:
                    yield from w.chunks(hf)

            jobs.append(TensorJob(gguf, shape, role, (hf,), chunks, layer))

        add("token_embd.weight", "model.embed_tokens.weight", (hp.vocab_size, H), EMBED)
        for i in range(hp.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            add(b + "attn_norm.weight", p + "input_layernorm.weight", (H,), NORM, i)
            add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (Nh * D, H), ATTN, i, heads=Nh)
            add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (Nkv * D, H), ATTN, i, heads=Nkv)
            add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (Nkv * D, H), ATTN, i)
            add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (H, Nh * D), ATTN, i)
            add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), NORM, i)
            add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (I, H), DENSE, i)
            add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (I, H), DENSE, i)
            add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (H, I), DENSE, i)
        add("output_norm.weight", "model.norm.weight", (H,), NORM)
        add("output.weight", "lm_head.weight", (hp.vocab_size, H), OUTPUT)
        if w.leftovers():
            raise CheckpointError(f"unexpected tensor {w.leftovers()[0]} in the checkpoint")
        return jobs

    def add_metadata(self, writer, hp):
        writer.add_context_length(hp.max_position_embeddings)
        writer.add_embedding_length(hp.hidden_size)
        writer.add_block_count(hp.num_hidden_layers)
        writer.add_feed_forward_length(hp.intermediate_size)
        writer.add_head_count(hp.num_attention_heads)
        writer.add_head_count_kv(hp.num_key_value_heads)
        writer.add_rope_dimension_count(hp.head_dim)
        writer.add_rope_freq_base(hp.rope_theta)
        writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
        writer.add_vocab_size(hp.vocab_size)


@pytest.fixture
def toy():
    a = arch.register(ToyLlama())
    yield a
    arch.unregister(a)


# --- a checkpoint of it, and its HF forward pass -----------------------------------------------------

def toy_tensors(c: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(14)
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    D = H // c["num_attention_heads"]
    Nq, Nkv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(H), p + "self_attn.q_proj.weight": mat(Nq, H),
              p + "self_attn.k_proj.weight": mat(Nkv, H), p + "self_attn.v_proj.weight": mat(Nkv, H),
              p + "self_attn.o_proj.weight": mat(H, Nq), p + "post_attention_layernorm.weight": norm(H),
              p + "mlp.gate_proj.weight": mat(I, H), p + "mlp.up_proj.weight": mat(I, H),
              p + "mlp.down_proj.weight": mat(H, I)}
    t |= {"model.norm.weight": norm(H), "lm_head.weight": mat(V, H)}
    return t


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("toy") / "Toy-Llama"
    d.mkdir()
    tensors = toy_tensors(CONFIG)
    (d / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(d / "model.safetensors", [(n, "F32", a.shape, lambda a=a: a) for n, a in tensors.items()])
    (d / "tekken.json").write_text(json.dumps(v15_tekken(CONFIG["vocab_size"])))
    return d, tensors


def hf_llama_forward(t: dict[str, np.ndarray], c: dict, tokens: list[int]) -> np.ndarray:
    """HF LlamaForCausalLM's logits in float64 (rotate_half RoPE, GQA, SwiGLU, RMSNorm)."""
    w = {k: v.astype(np.float64) for k, v in t.items()}
    Nh, Nkv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["rms_norm_eps"]
    D = c["hidden_size"] // Nh
    n = len(tokens)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    ang = np.arange(n)[:, None] * c["rope_theta"] ** (-np.arange(0, D, 2) / D)[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1))[:, None], np.sin(np.concatenate([ang, ang], 1))[:, None]

    def rope(x):  # [n, heads, D]
        return x * cos + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * sin

    mask = np.triu(np.full((n, n), -np.inf), 1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, Nh, D))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, Nkv, D)).repeat(Nh // Nkv, axis=1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, Nkv, D).repeat(Nh // Nkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", s, v).reshape(n, Nh * D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


# --- tests ---------------------------------------------------------------------------------------------

def field(r: GGUFReader, key: str):
    return r.fields[key].contents()


def test_toy_architecture_converts_through_the_registry(toy, toy_ckpt, tmp_path):
    src, tensors = toy_ckpt
    res = convert(src, out=tmp_path / "toy.gguf", out_type="F32", quant_report=False)
    r = GGUFReader(res.output)
    assert field(r, "general.architecture") == "llama"
    assert (field(r, "llama.block_count"), field(r, "llama.embedding_length"), field(r, "llama.attention.head_count_kv"),
            field(r, "llama.rope.dimension_count")) == (2, 64, 2, 16)
    n_params = sum(a.size for a in tensors.values())
    assert field(r, "general.size_label") == gguf.size_label(n_params, n_params, 0, 0)  # dense: no expert count
    got = {t.name: t for t in r.tensors}
    assert len(got) == 2 + 9 * 2 + 1 and all(T(t.tensor_type) == T.F32 for t in got.values())
    np.testing.assert_array_equal(got["token_embd.weight"].data, tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight"].data, tensors["model.layers.1.mlp.down_proj.weight"])
    # GGUF stores ne order; gguf's reader gives the numpy shape back.
    assert tuple(got["blk.0.attn_k.weight"].data.shape) == (32, 64)
    assert [r.name for r in res.rows][:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert {r.source_dtype for r in res.rows} == {"F32"}


def test_toy_logits_through_llama_cpp_match_an_hf_forward_pass(toy, toy_ckpt, tmp_path):
    from ms4local import Engine, EngineOptions

    src, tensors = toy_ckpt
    out = convert(src, out=tmp_path / "toy.gguf", out_type="F32", quant_report=False).output
    tokens = [1, *np.random.default_rng(3).integers(N_SPECIAL, CONFIG["vocab_size"], 40).tolist()]
    ref = hf_llama_forward(tensors, CONFIG, tokens)
    with Engine(out, EngineOptions(ctx_size=128, type_k="f32", type_v="f32", flash_attn="off")) as e:
        got = e.logits(tokens).astype(np.float64)
    err = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert err.max() < 1e-3, err.max()
    # Without the re-permutation of q/k the runtime's RoPE pairs the wrong dimensions: far off.
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_unknown_model_lists_what_is_registered(toy, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**CONFIG, "model_type": "nope", "architectures": ["NopeForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        convert(d, out=tmp_path / "x.gguf")
    assert "NopeForCausalLM" in str(e.value) and "Toy Llama" in str(e.value) and "Mistral Small 4" in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_unregistered_toy_is_unsupported(toy_ckpt, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="ToyLlamaForCausalLM"):
        convert(toy_ckpt[0], out=tmp_path / "x.gguf")


def test_a_leftover_tensor_fails_the_toy_plan(toy, toy_ckpt, tmp_path):
    src, tensors = toy_ckpt
    d = tmp_path / "extra"
    d.mkdir()
    for f in ("config.json", "tekken.json"):
        (d / f).write_bytes((src / f).read_bytes())
    extra = {**tensors, "model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)}
    write_safetensors(d / "model.safetensors", [(n, "F32", a.shape, lambda a=a: a) for n, a in extra.items()])
    with pytest.raises(CheckpointError, match="extra.weight"):
        convert(d, out=tmp_path / "x.gguf", dry_run=True)


def test_generic_modules_reach_architectures_only_through_the_registry():
    """No generic module imports an architecture module or a private name of another module."""
    bad = []
    for path in sorted((ROOT / "quantize").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                if (node.module or "").startswith("arch."):
                    bad.append(f"{path.name}: from .{node.module}")
                bad += [f"{path.name}: {a.name} from .{node.module}" for a in node.names if a.name.startswith("_")]
    assert bad == []
