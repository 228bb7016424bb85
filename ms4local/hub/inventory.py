"""What the Hugging Face cache and the models directory hold for Mistral Small 4 (`ms4local list`).

One entry per model: a GGUF (all parts of a split set together) or an HF-format checkpoint, with its
size, parts, projector and whether it is complete. Headers only; nothing is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quantize.gguf_header import GGUFHeaderError, read_file

from ..engine.repair import has_img_break, temperature_overrides
from ..errors import ModelLoadError
from ..gguf_model import read_model
from ..info import file_type_name
from . import listings
from .cache import CachedRepo, checkpoint_complete, scan
from .names import HubName, find_mmproj, is_checkpoint, is_mmproj, is_model_gguf, quant_of, split_parts
from .settings import HubSettings

FAMILY_ARCH = "mistral4"
FAMILY_NAME = "mistral-small-4"


@dataclass(frozen=True)
class Entry:
    """One model on disk. `name` is what a command takes: `org/repo:QUANT`, `org/repo`, or a path."""

    name: str
    where: str  # "hub cache" or "models"
    kind: str  # "gguf" or "checkpoint"
    quant: str | None
    nbytes: int  # on disk, `.incomplete` downloads included
    parts: tuple[int, int]  # (present, expected)
    projector: str | None  # file name of the projector that goes with it
    complete: bool
    path: Path  # the first GGUF, or the checkpoint directory
    repair: tuple[str, ...] = ()  # what the engine makes right at load (engine/repair.py)


def inventory(*, hub: HubSettings, models_dir: Path | None = None) -> list[Entry]:
    """Every Mistral Small 4 model in the Hub's cache, then in `models_dir`."""
    entries: list[Entry] = []
    for repo in scan(hub):
        entries += _repo_entries(repo, hub)
    if models_dir is not None and models_dir.is_dir():
        entries += _models_entries(models_dir)
    return entries


def _repo_entries(repo: CachedRepo, hub: HubSettings) -> list[Entry]:
    files = repo.files
    seen = listings.load(hub, repo.repo_id) or {}
    # An interrupted download is a `.incomplete` blob; the last listing says which file it was.
    by_blob = {blob: path for path, (_, blob) in seen.items()}
    partial: dict[str, int] = {}
    blobs = repo.snapshot.parent.parent / "blobs"
    for p in blobs.glob("*.incomplete"):
        path = by_blob.get(p.name[: -len(".incomplete")])
        if path is not None:
            partial[path] = p.stat().st_size
    firsts = sorted({split_parts(p)[0] for p in [*files, *partial] if is_model_gguf(p)})
    out = []
    for first in firsts:
        parts = split_parts(first)
        present = [p for p in parts if p in files]
        if not _family(repo.repo_id, files.get(present[0]) if present and present[0] == first else None):
            continue
        quant = quant_of(first)
        name = HubName(repo.repo_id, quant) if quant else HubName(repo.repo_id)
        projector = find_mmproj(files, first)
        out.append(Entry(str(name), "hub cache", "gguf", quant,
                         sum(repo.sizes[p] for p in present) + sum(partial.get(p, 0) for p in parts),
                         (len(present), len(parts)), projector.rsplit("/", 1)[-1] if projector else None,
                         len(present) == len(parts), repo.snapshot / first,
                         _repairs(repo.snapshot / first, repo.snapshot / projector if projector else None)
                         if len(present) == len(parts) else ()))
    if is_checkpoint(files) or ("config.json" in files and any(p.endswith(".safetensors") for p in partial)):
        if _checkpoint_family(repo.repo_id, files.get("config.json")):
            weights = [p for p in files if p.endswith(".safetensors")]
            expected = _expected_shards(files) or weights
            out.append(Entry(repo.repo_id, "hub cache", "checkpoint", "safetensors",
                             sum(repo.sizes.values()) + sum(partial.values()),
                             (len([w for w in expected if w in files]), len(expected)), None,
                             checkpoint_complete(files), repo.snapshot))
    return out


def _models_entries(models_dir: Path) -> list[Entry]:
    out = []
    ggufs = sorted(p for p in [*models_dir.glob("*.gguf"), *models_dir.glob("*/*.gguf")] if p.is_file())
    for path in ggufs:
        rel = path.relative_to(models_dir).as_posix()
        if not is_model_gguf(rel) or split_parts(rel)[0] != rel:
            continue
        meta = _meta(path)
        if not _family(path.name, path, meta):
            continue
        parts = [models_dir / p for p in split_parts(rel)]
        present = [p for p in parts if p.is_file()]
        near = [p.relative_to(models_dir).as_posix() for p in path.parent.glob("*.gguf") if is_mmproj(p.name)]
        projector = find_mmproj(near, rel)
        out.append(Entry(str(path), "models", "gguf", quant_of(rel) or _file_type(meta),
                         sum(p.stat().st_size for p in present), (len(present), len(parts)),
                         projector.rsplit("/", 1)[-1] if projector else None, len(present) == len(parts), path,
                         _repairs(path, models_dir / projector if projector else None)
                         if len(present) == len(parts) else ()))
    return out


def _repairs(model: Path, projector: Path | None) -> tuple[str, ...]:
    """What a complete GGUF (and its projector) needs at load, from the headers: "temperature keys",
    "[IMG_BREAK] row"; nothing for a file that cannot be read (commands name its fault)."""
    out = []
    try:
        if temperature_overrides(read_model(model)):
            out.append("temperature keys")
        if projector is not None and not has_img_break(projector):
            out.append("[IMG_BREAK] row")
    except ModelLoadError:
        return ()
    return tuple(out)


def _meta(path: Path) -> dict[str, object] | None:
    try:
        return read_file(path)[0]
    except (GGUFHeaderError, OSError, ValueError):
        return None


def _family(name: str, path: Path | None, meta: dict[str, object] | None = None) -> bool:
    """A Mistral Small 4 GGUF: arch `mistral4`, or the name says so (a deepseek2-labelled
    native-format conversion, or a file not yet downloaded)."""
    if FAMILY_NAME in name.lower() or (path is not None and FAMILY_NAME in path.name.lower()):
        return True
    if meta is None and path is not None:
        meta = _meta(path)
    return meta is not None and meta.get("general.architecture") == FAMILY_ARCH


def _checkpoint_family(repo_id: str, config: Path | None) -> bool:
    if FAMILY_NAME in repo_id.lower():
        return True
    try:
        data = json.loads(config.read_text()) if config else {}
    except (OSError, ValueError):
        return False
    text = data.get("text_config") if isinstance(data, dict) else None
    return FAMILY_ARCH in (data.get("model_type"), text.get("model_type") if isinstance(text, dict) else None)


def _expected_shards(files: dict[str, Path]) -> list[str]:
    index = files.get("model.safetensors.index.json")
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _file_type(meta: dict[str, object] | None) -> str | None:
    ft = meta.get("general.file_type") if meta else None
    return file_type_name(ft) if ft is not None else None
