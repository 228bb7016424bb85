"""Float64 numpy reference of the Pixtral vision encoder and the Mistral3 projector — a test oracle.

Follows Hugging Face transformers (`models/pixtral/modeling_pixtral.py`, `models/mistral3/
modeling_mistral3.py`), not llama.cpp, and shares no code with the converter: it reads the HF
weights itself (through mistral4_ref's safetensors reader: F32/F16/BF16 decoded by formula) in
HF's own row order, so the q/k rows are the half-split rotary layout and RoPE is HF's rotate_half.

- preprocessing: RGB bytes / 255, then (x - mean) / std with the checkpoint's
  preprocessor_config.json. No resize: the caller gives sides that are multiples of
  patch × merge (28 px), which is also what libmtmd's pixtral preprocessor leaves untouched
  (its dyn_size resize copies the image when the target size equals the input size);
- patch_conv: kernel = stride = patch, no bias; patches in row-major order (y outer, x inner);
- ln_pre, then per block: RMSNorm attention_norm → attention (no mask: one image attends to
  itself) → residual; RMSNorm ffn_norm → down(silu(gate x) · up x) → residual. RMSNorm eps 1e-5,
  hard-coded in HF Pixtral;
- 2-D RoPE, θ from the config (10000): head_dim/2 frequencies θ^(-2i/head_dim); the even ones
  turn with the patch row, the odd ones with the patch column; the D/2 angles are repeated twice
  and applied with rotate_half (dim j pairs with j + D/2), as PixtralRotaryEmbedding does (it
  looks the angles up in a table of image_size / patch positions per side; same values);
- projector: RMSNorm `norm`, patch merger (a merge×merge unfold in torch's channel-major order,
  (c, ky, kx), blocks in row-major order, → merging_layer), linear_1 → exact (erf) GELU → linear_2.
  HF gives the projector norm the text rms_norm_eps (1e-6); libmtmd uses the vision eps (1e-5)
  for it, and so does this reference by default (`projector_eps`). On the tiny model the two
  differ by 2e-6 relative.

Two switches turn the HF oracle into one of ggml's CPU arithmetic, so that a comparison with
libmtmd no longer includes the runtime's own roundings (each confirmed on the vendored build by
dumping its intermediate tensors through `cb_eval`: with them, pre_ln and the GELU output match
to F32 precision):
- `ggml_cpu=True`, for every mmproj file: (1) the patch conv is an im2col whose output libmtmd
  makes F16 whatever the weight type, and ggml's mat-mul then converts the kernel to that F16
  type too, so both the normalized patches and the kernel are rounded to F16; (2) GELU is
  ggml's tanh approximation read from an F16 table, i.e. f16(gelu_tanh(f16(x))) for |x| < 10.
  Without these, an F32 mmproj sits ~7e-4 (relative) from the plain HF numbers;
- `f16_matmuls=True`, for mmproj files with F16 matrices: every stored matrix is F16, and the CPU
  mat-mul converts its activation operand to F16 too. The attention products (F32 × F32), the
  norms, RoPE and the softmax stay in full precision; the merger's unfold is an im2col of the
  F32 activations, so it rounds nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .mistral4_ref import Checkpoint

VISION_EPS = 1e-5


class VisionCheckpoint:
    """The vision tower and projector of an HF checkpoint directory, read in float64."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self._ck = Checkpoint(path)
        cfg = json.loads((path / "config.json").read_text())
        self.vision = cfg["vision_config"]
        self.merge = int(cfg.get("spatial_merge_size", 1))
        rp = self.vision.get("rope_parameters") or {}
        self.theta = float(rp.get("rope_theta", self.vision.get("rope_theta", 10000.0)))
        pre = json.loads((path / "preprocessor_config.json").read_text())
        pre = pre.get("image_processor", pre)
        self.mean = np.array(pre["image_mean"], dtype=np.float64)
        self.std = np.array(pre["image_std"], dtype=np.float64)

    def tensor(self, name: str) -> np.ndarray:
        """`vision_tower.…` / `multi_modal_projector.…`, with or without the newer `model.` prefix."""
        for key in (name, "model." + name):
            if key in self._ck._where:
                return self._ck.tensor(key)
        raise KeyError(name)


def load_vision(path: str | Path) -> VisionCheckpoint:
    return VisionCheckpoint(path)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _f16(a: np.ndarray) -> np.ndarray:
    """Round to the nearest F16 (ties to even, as F16C and ggml's scalar fallback do)."""
    return a.astype(np.float16).astype(np.float64)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x · Φ(x): HF's `gelu` (projector_hidden_act)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_ggml(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU: the tanh approximation, looked up in a table indexed by F16(x) and holding
    F16 values; identity above 10 and zero below -10."""
    h = _f16(x)
    t = _f16(0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * h * (1.0 + 0.044715 * h * h))))
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, t))


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


def rope_2d(rows: np.ndarray, cols: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [N, head_dim] for patches at (row, col), as PixtralRotaryEmbedding builds them."""
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # head_dim/2
    ang = np.concatenate([np.outer(rows, freqs[0::2]), np.outer(cols, freqs[1::2])], -1)  # [N, head_dim/2]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang), np.sin(ang)


def pixels(ck: VisionCheckpoint, rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → normalized float64 [3, H, W]."""
    x = rgb.astype(np.float64) / 255.0
    return ((x - ck.mean) / ck.std).transpose(2, 0, 1)


def encode(ck: VisionCheckpoint, rgb: np.ndarray, *, projector_eps: float = VISION_EPS,
           ggml_cpu: bool = False, f16_matmuls: bool = False) -> np.ndarray:
    """Image embeddings [p_y · p_x, text_hidden] (merged patches in row-major order) for an RGB
    image whose sides are multiples of patch × merge. No [IMG_BREAK] rows: those are the
    runtime's layout, not the encoder's output. `ggml_cpu` / `f16_matmuls`: see the module
    docstring; the default is plain HF semantics."""
    v = ck.vision
    P, M = int(v["patch_size"]), ck.merge
    V, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
    D = int(v.get("head_dim") or V // heads)
    H, W = rgb.shape[:2]
    if H % (P * M) or W % (P * M):
        raise ValueError(f"image {W}×{H}: sides must be multiples of {P * M} px (no resize in this reference)")
    gy, gx = H // P, W // P
    N = gy * gx
    rnd = _f16 if f16_matmuls else (lambda a: a)

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return rnd(x) @ rnd(ck.tensor(name)).T

    # patch_conv: kernel = stride = P is a mat-mul over each patch's (c, ky, kx) values.
    img = pixels(ck, rgb)
    patches = img.reshape(3, gy, P, gx, P).transpose(1, 3, 0, 2, 4).reshape(N, 3 * P * P)
    conv = _f16 if ggml_cpu or f16_matmuls else (lambda a: a)
    x = conv(patches) @ conv(ck.tensor("vision_tower.patch_conv.weight")).reshape(V, -1).T
    x = _rms(x, ck.tensor("vision_tower.ln_pre.weight"), VISION_EPS)

    idx = np.arange(N)
    cos, sin = rope_2d((idx // gx).astype(np.float64), (idx % gx).astype(np.float64), D, ck.theta)
    for j in range(int(v["num_hidden_layers"])):
        p = f"vision_tower.transformer.layers.{j}."
        h = _rms(x, ck.tensor(p + "attention_norm.weight"), VISION_EPS)
        q, k, val = (linear(h, p + f"attention.{n}_proj.weight").reshape(N, heads, D).transpose(1, 0, 2)
                     for n in "qkv")
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        s = q @ k.transpose(0, 2, 1) * D ** -0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        attn = (s @ val).transpose(1, 0, 2).reshape(N, V)
        x = x + linear(attn, p + "attention.o_proj.weight")
        h = _rms(x, ck.tensor(p + "ffn_norm.weight"), VISION_EPS)
        g, u = linear(h, p + "feed_forward.gate_proj.weight"), linear(h, p + "feed_forward.up_proj.weight")
        x = x + linear(_silu(g) * u, p + "feed_forward.down_proj.weight")

    mp = "multi_modal_projector."
    x = _rms(x, ck.tensor(mp + "norm.weight"), projector_eps)
    if M > 1:
        # torch.nn.functional.unfold on the [V, gy, gx] grid: each column is one M×M block (blocks
        # row-major), its entries ordered channel first, then kernel row, then kernel column.
        grid = x.reshape(gy // M, M, gx // M, M, V)
        x = grid.transpose(0, 2, 4, 1, 3).reshape((gy // M) * (gx // M), V * M * M)
        x = linear(x, mp + "patch_merger.merging_layer.weight")
    gelu = _gelu_ggml if ggml_cpu else _gelu
    x = gelu(linear(x, mp + "linear_1.weight") + _bias(ck, mp + "linear_1.bias"))
    return linear(x, mp + "linear_2.weight") + _bias(ck, mp + "linear_2.bias")


def _bias(ck: VisionCheckpoint, name: str) -> np.ndarray | float:
    try:
        return ck.tensor(name)
    except KeyError:
        return 0.0
