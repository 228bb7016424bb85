"""The last listing of each repo seen on the Hub (file → size and blob id), so that a name the
cache lacks can be answered offline with the size `ms4local pull` would fetch, and `list` can tell
which file an interrupted download (`blobs/<id>.incomplete`) belongs to.

Kept in ms4local's own cache directory, not in the Hub's: huggingface_hub's cache scan counts any
foreign folder there as corruption. A missing or unreadable listing only means the size is unknown.
"""

from __future__ import annotations

import json
import os
import tempfile

from .settings import HubSettings


def save(hub: HubSettings, repo_id: str, files: dict[str, tuple[int, str]]) -> None:
    """Remember `repo_id`'s files as path → (size, blob id) (atomically; a failure to write is ignored)."""
    if hub.listings_dir is None:
        return
    try:
        hub.listings_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=hub.listings_dir, prefix=".listing-")
        with os.fdopen(fd, "w") as f:
            json.dump({"repo": repo_id, "files": {p: list(v) for p, v in files.items()}}, f)
        os.replace(tmp, hub.listings_dir / _file(repo_id))
    except OSError:
        pass


def load(hub: HubSettings, repo_id: str) -> dict[str, tuple[int, str]] | None:
    """The files last seen for `repo_id` (path → (size, blob id)), or None."""
    if hub.listings_dir is None:
        return None
    try:
        data = json.loads((hub.listings_dir / _file(repo_id)).read_text())
        files = data["files"]
        if data.get("repo") == repo_id and isinstance(files, dict):
            return {str(k): (int(v[0]), str(v[1])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        pass
    return None


def _file(repo_id: str) -> str:
    return repo_id.replace("/", "--") + ".json"
