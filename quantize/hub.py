"""Find a checkpoint: a directory, or a Hugging Face repo id already in the local HF cache.

Offline only: the converter never downloads (the `ms4local quantize` command pulls a repo the cache
lacks before it calls the converter, through ms4local/hub/). The cache layout is huggingface_hub's
(`$HF_HUB_CACHE` or `$HF_HOME/hub` or `~/.cache/huggingface/hub`,
`models--ORG--NAME/refs/main` → `snapshots/<commit>`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return home.expanduser() / "hub"


def resolve_source(src: str | os.PathLike[str]) -> tuple[Path, str]:
    """(directory, model name) for SRC; the name is the repo's or the directory's."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    text = str(src)
    if REPO_ID.match(text) and not path.exists():
        org, name = text.split("/")
        repo = hf_cache_dir() / f"models--{org}--{name}"
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip(), name
        if snapshots.is_dir():
            candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
            if candidates:
                return candidates[-1], name
        raise ConfigError(
            f"{text} is not in the local Hugging Face cache ({hf_cache_dir()}); the converter does not download — "
            f"fetch it first (`ms4local pull {text}`) or pass a directory"
        )
    if path.exists():
        raise ConfigError(f"{src} is a file; SRC must be a checkpoint directory or a Hugging Face repo id")
    raise ConfigError(f"{src} does not exist; SRC must be a checkpoint directory or a Hugging Face repo id")
