"""libmtmd's image embeddings on our mmproj files against an independent float64 reference (spec §6, §8.4).

The reference (tests/reference/pixtral_ref.py) follows Hugging Face's Pixtral + Mistral3 projector on
the checkpoint's own (HF-ordered) weights and shares no code with the converter. Images have sides
that are multiples of 28 px and hold 8..1024 merged patches, so libmtmd's pixtral preprocessor copies
them unresized; flash attention is off. A token's error is max |got − ref| over its row, in units of
the largest reference value of the image. The [IMG_BREAK] rows are left out: libmtmd builds them as
(uninitialised tensor × 0) + img_break, so NaN/Inf garbage leaks into them at random (an upstream
bug; test_mmproj checks them where finite).

Each file is held against two references (x86 CPU; distributions over 300 random images of the three
sizes below, besides the fixed images of the tests):
- plain HF semantics. F32 files: 3-7e-4 on the test images, against the spec's 1e-3 (median 5.7e-4,
  max 1.2e-3 over random images). None of that is the file: libmtmd runs the patch conv as an F16
  im2col (patches and kernel rounded to F16, whatever the file type), and ggml's CPU GELU is the
  tanh form read from an F16 table; HF does neither;
- the same model with those two roundings (`ggml_cpu=True`). For F32 files the median token is
  then off by ≤ 1.4e-7 (held to 1e-6): the file and libmtmd's graph are exact. The other tokens'
  max stays below 2.5e-4 (held to 5e-4): at most a fifth of the tokens carry an F16 rounding of the
  GELU table that flipped because float64 and F32 sat either side of a boundary. Fed libmtmd's own
  intermediate tensors (cb_eval), every step of tower and projector matches to ≤ 2.4e-7.
F16 mmproj files (from the F32 checkpoint): 0.5-1.7e-3 against plain HF (held to 3e-3); 0.4-1.2e-3
against F16 arithmetic, i.e. F16 weights and F16 activations into every F16 mat-mul (held to 2e-3).
That emulation cannot get closer end to end: each step still matches to ~1e-7 when fed the runtime's
inputs, but a 1e-7 difference flips an F16 rounding here and there, and attention spreads the flips
to every token (as for the text model, test_numerics.py).

A layout bug is orders of magnitude above these bounds (measured by corrupting the mmproj on
purpose): no q/k permutation 0.15-0.35; patch kernel kx/ky swapped 1.2-1.4; merger columns
spatial-major 1.4; merger ky/kx swapped 0.95-1.0. A reference with x and y exchanged in its 2-D RoPE
is 0.22-0.32 away, so the non-square images pin the orientation down.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from ms4local.engine import llama
from quantize import convert
from quantize.synth import TinySpec
from reference.pixtral_ref import encode, load_vision

VIS = TinySpec(vocab=2000, vision_layers=3)
PX = VIS.patch * VIS.merge  # 28: one merged token per PX × PX pixels
# (width, height): landscape 4×3 merged patches, portrait 2×5, portrait 3×6 (odd blocks per row).
SIZES = [(112, 84), (56, 140), (84, 168)]
# case: (checkpoint overrides, mmproj type). BF16 + the newer `model.vision_tower.*` key layout also
# exercises both readers on the other storage the real checkpoints use.
CASES = {"F32": ({}, "F32"), "BF16-new-keys": ({"dtype": "BF16", "layout": "new"}, "F32"), "F16": ({}, "F16")}
# Max token error against (plain HF, ggml arithmetic), and for F32 files the median token against
# ggml arithmetic; the module docstring has the measurements.
BOUNDS = {"F32": (1e-3, 5e-4), "F16": (3e-3, 2e-3)}
F32_MEDIAN_TOKEN = 1e-6
FLASH_ATTN_DISABLED = 0  # mtmd_context_params.flash_attn_type is an llama_flash_attn_type: -1 auto, 0 off, 1 on


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    """converted(case) -> (checkpoint dir, text GGUF, mmproj GGUF), converted once per case."""
    cache: dict[str, tuple] = {}

    def make(case: str):
        if case not in cache:
            overrides, mm_type = CASES[case]
            src = ckpt(VIS, **overrides)
            out = tmp_path_factory.mktemp("vision") / "Tiny.gguf"
            res = convert(src, out=out, out_type="F32", mmproj_type=mm_type)
            cache[case] = (src, res.output, res.mmproj)
        return cache[case]

    return make


def image(width: int, height: int) -> np.ndarray:
    return np.random.default_rng([width, height]).integers(0, 256, (height, width, 3), dtype=np.uint8)


@contextmanager
def mtmd_encoder(model_path, mmproj_path) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """encode(rgb) -> every image embedding libmtmd produces [n_tokens, n_embd], [IMG_BREAK] rows included."""
    from llama_cpp import mtmd_cpp as M

    L = llama()  # llama_cpp, with its log routed through the engine (whose decoder tolerates non-UTF-8 pieces)
    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    assert model
    p = M.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.warmup, p.flash_attn_type = False, 2, False, FLASH_ATTN_DISABLED
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), model, p)
    n_embd = L.llama_model_n_embd(model)

    def encode_image(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        bitmap = M.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
        chunks = M.mtmd_input_chunks_init()
        try:
            text = b"[INST]" + M.mtmd_get_marker(ctx) + b"Describe it.[/INST]"
            inp = M.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
            assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
            image_chunks = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            image_chunks = [c for c in image_chunks if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            assert len(image_chunks) == 1
            n = M.mtmd_input_chunk_get_n_tokens(image_chunks[0])
            assert M.mtmd_encode_chunk(ctx, image_chunks[0]) == 0
            out = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n * n_embd,))
            return out.reshape(n, n_embd).astype(np.float64)  # a copy: the buffer belongs to ctx
        finally:
            M.mtmd_input_chunks_free(chunks)
            M.mtmd_bitmap_free(bitmap)

    try:
        assert ctx, "libmtmd refused the projector"
        yield encode_image
    finally:
        if ctx:
            M.mtmd_free(ctx)
        L.llama_model_free(model)


def break_rows(width: int, height: int) -> list[int]:
    """Indices of the [IMG_BREAK] rows: after each row of p_x merged patches except the last."""
    p_x, p_y = width // PX, height // PX
    return [(r + 1) * p_x + r for r in range(p_y - 1)]


def patch_rows(embd: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.delete(embd, break_rows(width, height), axis=0)


def token_errors(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each token's max |got − ref|, in units of the image's largest reference value."""
    return np.abs(got - ref).max(axis=1) / np.abs(ref).max()


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_image_token_layout(converted, width, height):
    """p_x·p_y patch embeddings, one [IMG_BREAK] after each row but the last: p_x·p_y + p_y − 1 rows."""
    _, model, mmproj = converted("F32")
    p_x, p_y = width // PX, height // PX
    with mtmd_encoder(model, mmproj) as enc:
        embd = enc(image(width, height))
    assert embd.shape == (p_x * p_y + p_y - 1, VIS.hidden)
    assert np.isfinite(patch_rows(embd, width, height)).all()


@pytest.mark.parametrize("width,height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("case", list(CASES))
def test_image_embeddings_match_reference(converted, case, width, height):
    src, model, mmproj = converted(case)
    mm_type = CASES[case][1]
    rgb = image(width, height)
    with mtmd_encoder(model, mmproj) as enc:
        got = patch_rows(enc(rgb), width, height)
    ck = load_vision(src)
    plain = token_errors(got, encode(ck, rgb))
    ggml = token_errors(got, encode(ck, rgb, ggml_cpu=True, f16_matmuls=mm_type == "F16"))
    print(f"{case} mmproj {mm_type} {width}x{height}: max relative error {plain.max():.2e} vs HF, "
          f"{ggml.max():.2e} vs ggml arithmetic (median token {np.median(ggml):.1e})")
    plain_bound, ggml_bound = BOUNDS[mm_type]
    assert plain.max() <= plain_bound
    assert ggml.max() <= ggml_bound
    if mm_type == "F32":
        assert np.median(ggml) <= F32_MEDIAN_TOKEN
