"""Architecture registry: one module per HF `model_type`, found by the text config's model_type.

Adding a model is adding a module with an `Architecture` subclass (see base.py) and registering an
instance: listed here for the built-in ones, or `register(MyArch())` from outside (a test does).
Generic modules import from this package only: the registry and base.py's public names.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedArchitectureError
from .base import (ATTN, DENSE, EMBED, EXPERTS, KEEP, NORM, OUTPUT, ROUTER, SHEXP, VISION, Architecture,
                   TensorJob, TextShape, VisionTower, Weights, gguf_role, normalize, parameter_counts)
from .mistral4 import Mistral4

_ARCHS: list[Architecture] = [Mistral4()]


def register(arch: Architecture) -> Architecture:
    """Make `convert` (and `requant`, for its GGUF architecture name) handle `arch`'s model types."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"{arch!r} is not a quantize.arch.Architecture")
    taken = {t for a in _ARCHS for t in a.model_types}.intersection(arch.model_types)
    if taken:
        raise ValueError(f"model_type {sorted(taken)[0]!r} is already registered")
    _ARCHS.append(arch)
    return arch


def unregister(arch: Architecture) -> None:
    """Undo `register` (a test's toy architecture)."""
    _ARCHS.remove(arch)


def supported() -> list[str]:
    """One line per architecture, for error messages."""
    return [a.description for a in _ARCHS]


def detect(top: dict[str, Any], text: dict[str, Any]) -> Architecture:
    """The architecture that converts this config, or a clear error listing what is supported."""
    model_type = text.get("model_type")
    for arch in _ARCHS:
        if model_type in arch.model_types:
            return arch
    archs = top.get("architectures") or [top.get("model_type", "unknown")]
    what = archs[0] if isinstance(archs, list) and archs else archs
    inner = f" (text model_type {model_type!r})" if "text_config" in top else ""
    raise UnsupportedArchitectureError(
        f"unsupported architecture {what}{inner}; supported: " + "; ".join(supported())
    )


def by_gguf_name(name: object) -> Architecture | None:
    """The architecture whose GGUFs say `general.architecture = name`, or None."""
    return next((a for a in _ARCHS if a.arch == name), None)


def gguf_names() -> list[str]:
    """The `general.architecture` values of the registered architectures."""
    return [a.arch for a in _ARCHS]


__all__ = ["ATTN", "DENSE", "EMBED", "EXPERTS", "KEEP", "NORM", "OUTPUT", "ROUTER", "SHEXP", "VISION",
           "Architecture", "TensorJob", "TextShape", "VisionTower", "Weights", "by_gguf_name", "detect",
           "gguf_names", "gguf_role", "normalize", "parameter_counts", "register", "supported", "unregister"]
