"""The converter's output, read back with gguf-py and checked against the spec and the source.

Expected values are computed here from the config and the safetensors files (read with the
`safetensors` package or decoded by hand), not taken from the converter.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGMLQuantizationType as T
from safetensors.numpy import load_file

from helpers import ROOT, SMALL
from quantize import convert
from quantize.synth import TinySpec, text_config


def kv(reader: GGUFReader, key: str):
    field = reader.fields[key]
    return field.contents()


def tensors(reader: GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def test_metadata_matches_spec(ckpt, gguf_file):
    s = SMALL
    r = GGUFReader(gguf_file(ckpt(), "F32"))
    a = "mistral4."
    assert kv(r, "general.architecture") == "mistral4"
    assert kv(r, "general.file_type") == 0
    assert kv(r, a + "block_count") == s.layers
    assert kv(r, a + "embedding_length") == s.hidden
    assert kv(r, a + "attention.head_count") == s.heads
    assert kv(r, a + "attention.head_count_kv") == 1
    assert kv(r, a + "attention.key_length") == s.kv_lora + s.rope
    assert kv(r, a + "attention.value_length") == s.kv_lora
    assert kv(r, a + "attention.key_length_mla") == s.nope + s.rope
    assert kv(r, a + "attention.value_length_mla") == s.v_dim
    assert kv(r, a + "attention.q_lora_rank") == s.q_lora
    assert kv(r, a + "attention.kv_lora_rank") == s.kv_lora
    assert kv(r, a + "rope.dimension_count") == s.rope
    assert kv(r, a + "rope.scaling.type") == "yarn"
    assert kv(r, a + "rope.scaling.factor") == pytest.approx(s.factor)
    assert kv(r, a + "rope.scaling.original_context_length") == s.orig_ctx
    assert kv(r, a + "rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)
    # The two keys llama.cpp's own converter forgets (spec §3.3): both, or the model is wrong past orig ctx.
    assert kv(r, a + "attention.temperature_scale") == pytest.approx(s.llama4_beta)
    assert kv(r, a + "attention.temperature_length") == s.orig_ctx
    assert kv(r, a + "expert_gating_func") == 1
    assert kv(r, a + "expert_count") == s.experts
    assert kv(r, a + "expert_used_count") == s.top_k
    assert kv(r, a + "expert_shared_count") == s.shared
    assert kv(r, a + "expert_feed_forward_length") == s.moe_inter
    assert kv(r, a + "expert_weights_norm") is True
    assert kv(r, a + "leading_dense_block_count") == 0
    assert kv(r, a + "context_length") == s.max_pos
    assert kv(r, "tokenizer.ggml.model") == "gpt2"
    assert kv(r, "tokenizer.ggml.pre") == "tekken"
    assert len(kv(r, "tokenizer.ggml.tokens")) == s.vocab
    assert kv(r, "tokenizer.ggml.bos_token_id") == 1
    assert kv(r, "tokenizer.ggml.eos_token_id") == 2
    assert kv(r, "tokenizer.ggml.padding_token_id") == 11
    assert "[MODEL_SETTINGS]" in kv(r, "tokenizer.chat_template")
    assert kv(r, "general.name") == "Tiny-Mistral4"


def test_tensor_names_shapes_and_count(ckpt, gguf_file):
    s = SMALL
    ts = tensors(GGUFReader(gguf_file(ckpt(), "F32")))
    assert len(ts) == 3 + 16 * s.layers
    H, E, F = s.hidden, s.experts, s.moe_inter
    expect = {  # GGUF ne order, spec §8.2
        "token_embd.weight": [H, s.vocab], "output.weight": [H, s.vocab], "output_norm.weight": [H],
        "blk.0.attn_q_a.weight": [H, s.q_lora], "blk.0.attn_q_b.weight": [s.q_lora, s.heads * (s.nope + s.rope)],
        "blk.0.attn_kv_a_mqa.weight": [H, s.kv_lora + s.rope], "blk.0.attn_kv_a_norm.weight": [s.kv_lora],
        "blk.0.attn_k_b.weight": [s.nope, s.kv_lora, s.heads], "blk.0.attn_v_b.weight": [s.kv_lora, s.v_dim, s.heads],
        "blk.0.attn_output.weight": [s.heads * s.v_dim, H], "blk.0.ffn_gate_inp.weight": [H, E],
        "blk.1.ffn_gate_up_exps.weight": [H, 2 * F, E], "blk.1.ffn_down_exps.weight": [F, H, E],
        "blk.1.ffn_gate_shexp.weight": [H, F], "blk.1.ffn_down_shexp.weight": [F, H],
    }
    for name, ne in expect.items():
        assert list(ts[name].shape) == ne, name


def _source(ck) -> dict[str, np.ndarray]:
    raw = load_file(str(ck / "model.safetensors"))
    return {k.replace("language_model.", ""): v for k, v in raw.items()}


def test_tensor_data_and_mla_split(ckpt, gguf_file):
    s = SMALL
    src = _source(ckpt())
    ts = tensors(GGUFReader(gguf_file(ckpt(), "F32")))
    np.testing.assert_array_equal(ts["token_embd.weight"].data, src["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ts["blk.1.ffn_gate_up_exps.weight"].data, src["model.layers.1.mlp.experts.gate_up_proj"])
    kv_b = src["model.layers.0.self_attn.kv_b_proj.weight"].reshape(s.heads, s.nope + s.v_dim, s.kv_lora)
    # k_b: per head, the k_nope rows transposed to [kv_lora, nope]; v_b: the value rows as they are.
    for h in range(s.heads):
        np.testing.assert_array_equal(ts["blk.0.attn_k_b.weight"].data[h], kv_b[h, : s.nope, :].T)
        np.testing.assert_array_equal(ts["blk.0.attn_v_b.weight"].data[h], kv_b[h, s.nope:, :])


def test_q8_0_types_and_fallbacks(ckpt, gguf_file):
    r = GGUFReader(gguf_file(ckpt(), "Q8_0"))
    ts = tensors(r)
    assert kv(r, "general.file_type") == 7
    assert ts["blk.0.attn_norm.weight"].tensor_type == T.F32
    assert ts["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32  # router never quantized
    assert ts["blk.0.attn_q_a.weight"].tensor_type == T.Q8_0
    assert ts["blk.0.ffn_gate_up_exps.weight"].tensor_type == T.Q8_0
    # attn_k_b has ne0 = nope = 16, not a multiple of Q8_0's block of 32 → F16 (spec §7.4)
    assert ts["blk.0.attn_k_b.weight"].tensor_type == T.F16


def test_bf16_and_f16_outputs_round_source(ckpt, gguf_file):
    src = _source(ckpt())
    w = src["model.layers.0.self_attn.q_b_proj.weight"]
    f16 = tensors(GGUFReader(gguf_file(ckpt(), "F16")))["blk.0.attn_q_b.weight"]
    assert f16.tensor_type == T.F16
    np.testing.assert_array_equal(f16.data, w.astype(np.float16))
    bf = tensors(GGUFReader(gguf_file(ckpt(), "BF16")))["blk.0.attn_q_b.weight"]
    assert bf.tensor_type == T.BF16
    got = (np.asarray(bf.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(w.shape)
    assert np.max(np.abs(got - w) / (np.abs(w) + 1e-30)) <= 2.0**-8  # bf16 keeps 8 significant bits


def _fp8_decode(bits: np.ndarray) -> np.ndarray:
    """E4M3FN by formula (independent of the converter's lookup table)."""
    b = bits.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 7
    val = np.where(e == 0, 2.0**-6 * m / 8.0, np.exp2(e - 7.0) * (1 + m / 8.0))
    return (sign * val).astype(np.float64)


@pytest.mark.parametrize("dtype", ["FP8", "FP8E"])
def test_fp8_dequantized_with_scales(ckpt, gguf_file, dtype):
    ck = ckpt(dtype=dtype)
    # safetensors' numpy loader cannot read F8_E4M3: read the file by hand.
    header_len = int.from_bytes((ck / "model.safetensors").read_bytes()[:8], "little")
    blob = (ck / "model.safetensors").read_bytes()
    header = json.loads(blob[8:8 + header_len])
    base = 8 + header_len

    def raw_tensor(name):
        h = header["language_model." + name]
        a, b = h["data_offsets"]
        dt = {"F8_E4M3": np.uint8, "F32": np.float32}[h["dtype"]]
        return np.frombuffer(blob[base + a: base + b], dtype=dt).reshape(h["shape"])

    ts = tensors(GGUFReader(gguf_file(ck, "F32")))
    stack = "model.layers.0.mlp.experts.down_proj"
    scale = raw_tensor(stack + "_scale_inv").astype(np.float64).reshape(-1)
    assert scale.size == (SMALL.experts if dtype == "FP8E" else 1)
    expect = _fp8_decode(raw_tensor(stack)) * (scale.reshape(-1, 1, 1) if scale.size > 1 else scale[0])
    np.testing.assert_allclose(ts["blk.0.ffn_down_exps.weight"].data, expect, rtol=1e-6)
    lin = "model.layers.1.self_attn.o_proj.weight"
    expect = _fp8_decode(raw_tensor(lin)) * raw_tensor(lin[: -len("weight")] + "weight_scale_inv").item()
    np.testing.assert_allclose(ts["blk.1.attn_output.weight"].data, expect, rtol=1e-6)
    # activation scales are dropped, nothing else appears
    assert len(ts) == 3 + 16 * SMALL.layers


@pytest.mark.parametrize("variant", [{"shards": 3}, {"layout": "new"}, {"layout": "flat"}, {"tokenizer": "tekken"}])
def test_layouts_give_identical_tensors(ckpt, gguf_file, variant):
    ref = tensors(GGUFReader(gguf_file(ckpt(), "F16")))
    other = tensors(GGUFReader(gguf_file(ckpt(**variant), "F16")))
    assert ref.keys() == other.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name].data, other[name].data, err_msg=name)


def test_tokenizer_json_and_tekken_give_same_vocab(ckpt, gguf_file):
    a = GGUFReader(gguf_file(ckpt(), "F16"))
    b = GGUFReader(gguf_file(ckpt(tokenizer="tekken"), "F16"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert kv(a, key) == kv(b, key), key


def test_dense_lead_layers(ckpt, gguf_file):
    r = GGUFReader(gguf_file(ckpt(first_dense=1), "F32"))
    ts = tensors(r)
    assert kv(r, "mistral4.leading_dense_block_count") == 1
    assert kv(r, "mistral4.feed_forward_length") == SMALL.inter
    assert list(ts["blk.0.ffn_gate.weight"].shape) == [SMALL.hidden, SMALL.inter]
    assert "blk.0.ffn_gate_inp.weight" not in ts and "blk.1.ffn_gate_inp.weight" in ts


def test_checkpoint_template_is_embedded(ckpt, gguf_file, tmp_path):
    ck = ckpt(chat_template=True)
    custom = tmp_path / "ck"
    import shutil
    shutil.copytree(ck, custom)
    (custom / "chat_template.jinja").write_text("{{ bos_token }}CUSTOM{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "x.gguf"
    res = convert(custom, out=out, out_type="F16")
    assert res.chat_template_source == "checkpoint"
    assert kv(GGUFReader(out), "tokenizer.chat_template").startswith("{{ bos_token }}CUSTOM")


def test_dry_run_plans_and_writes_nothing(ckpt, tmp_path):
    out = tmp_path / "plan.gguf"
    plan = convert(ckpt(), out=out, out_type="Q8_0", dry_run=True)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert len(plan.rows) == 3 + 16 * SMALL.layers
    row = next(r for r in plan.rows if r.name == "blk.0.attn_k_b.weight")
    assert row.type == "F16" and "not a multiple of 32" in row.rule
    n_q8 = sum(math.prod(r.shape) for r in plan.rows if r.type == "Q8_0")
    assert n_q8 > 0 and plan.total_bytes < plan.n_params * 4


def test_progress_reaches_total(ckpt, tmp_path):
    seen: list[tuple[int, int]] = []
    convert(ckpt(), out=tmp_path / "p.gguf", out_type="F16", progress=lambda d, t, n: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][1]


def test_hf_cache_repo_id_and_default_name(ckpt, tmp_path, monkeypatch):
    import shutil
    snap = tmp_path / "hub" / "models--mistralai--Tiny-Small-4" / "snapshots" / "abc123"
    shutil.copytree(ckpt(), snap)
    (tmp_path / "hub" / "models--mistralai--Tiny-Small-4" / "refs").mkdir()
    (tmp_path / "hub" / "models--mistralai--Tiny-Small-4" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MS4LOCAL_MODELS", str(tmp_path / "models"))
    res = convert("mistralai/Tiny-Small-4", out_type="Q8_0")
    assert res.output == tmp_path / "models" / "Tiny-Small-4-Q8_0.gguf" and res.output.is_file()
    assert kv(GGUFReader(res.output), "general.name") == "Tiny-Small-4"


def test_quantize_never_imports_the_runtime(ckpt, tmp_path):
    code = (
        "import sys, quantize\n"
        f"quantize.convert({str(ckpt())!r}, out={str(tmp_path / 'q.gguf')!r}, out_type='Q8_0')\n"
        "bad = [m for m in ('llama_cpp', 'ms4local', 'typer', 'rich') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import ms4local\n"
        "assert 'llama_cpp' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_config_nesting_is_read(ckpt):
    # A flat mistral4 config and the nested one describe the same text model.
    flat = json.loads((ckpt(layout="flat") / "config.json").read_text())
    nested = json.loads((ckpt() / "config.json").read_text())["text_config"]
    assert {k: v for k, v in flat.items() if k != "architectures"} == nested == text_config(TinySpec(vocab=2000))
