"""The generic side of a vision projector (mmproj) file: its `--mmproj-type`, the type of each of its
tensors, and the image normalisation read from the checkpoint's processor config.

The tower itself (which tensors, their layout, the clip.* keys) belongs to its architecture module
(`quantize/arch/pixtral.py`), reached through the text architecture's `vision()` hook.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGMLQuantizationType as T

from .arch import KEEP, NORM, TensorJob
from .errors import ConfigError, UnsupportedTypeError
from .policy import Choice, fits

MMPROJ_TYPES: dict[str, tuple[T, int]] = {"F32": (T.F32, 0), "F16": (T.F16, 1), "Q8_0": (T.Q8_0, 7)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_norm(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean/std from processor_config.json or preprocessor_config.json (CLIP values otherwise)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{name} is not valid JSON ({e}); re-download it") from None
        cfg = cfg.get("image_processor", cfg) if isinstance(cfg, dict) else {}
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean is not None and std is not None:
            if not (len(mean) == 3 == len(std) and all(float(x) > 0 for x in std)):
                raise ConfigError(f"{name}: image_mean/image_std must be three numbers each (std > 0)")
            return tuple(float(x) for x in mean), tuple(float(x) for x in std)
    return CLIP_MEAN, CLIP_STD


def choose(job: TensorJob, t: T) -> Choice:
    """Norms, biases and the [IMG_BREAK] row F32; patch embedding and merger never quantized."""
    if job.role == NORM or len(job.shape) == 1:
        return Choice(T.F32, "norms, biases and the [IMG_BREAK] row stay F32")
    if job.role == KEEP:
        kept = T.F32 if t == T.F32 else T.F16
        return Choice(kept, "patch embedding and merger are never quantized (llama.cpp's rule)")
    if not fits(t, job.shape):
        return Choice(T.F16, f"ne0 {job.shape[-1]} not a multiple of 32: {t.name} → F16")
    return Choice(t, "requested --mmproj-type")


def parse_mmproj_type(name: str) -> tuple[T, int]:
    key = name.upper()
    if key not in MMPROJ_TYPES:
        raise UnsupportedTypeError(f"unsupported --mmproj-type {name}; choose one of {', '.join(MMPROJ_TYPES)}")
    return MMPROJ_TYPES[key]
