"""Architecture registry: one module per HF `model_type`, found by the text config's model_type.

Adding a model is adding a module with ARCH, MODEL_TYPES, DESCRIPTION, hparams(), plan() and
add_metadata(), and listing it here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..errors import UnsupportedArchitectureError
from . import mistral4

_MODULES: tuple[ModuleType, ...] = (mistral4,)


def supported() -> list[str]:
    return [m.DESCRIPTION for m in _MODULES]


def detect(top: dict[str, Any], text: dict[str, Any]) -> ModuleType:
    """The module that converts this config, or a clear error listing what is supported."""
    model_type = text.get("model_type")
    for module in _MODULES:
        if model_type in module.MODEL_TYPES:
            return module
    archs = top.get("architectures") or [top.get("model_type", "unknown")]
    what = archs[0] if isinstance(archs, list) and archs else archs
    inner = f" (text model_type {model_type!r})" if "text_config" in top else ""
    raise UnsupportedArchitectureError(
        f"unsupported architecture {what}{inner}; supported: " + "; ".join(supported())
    )
