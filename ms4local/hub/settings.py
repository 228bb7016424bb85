"""Where the Hub and its cache are: huggingface_hub's own settings, one object to pass around.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE and HF_TOKEN (or the
token `hf auth login` saved); ms4local takes them from it rather than parsing them again, so the
files it downloads are the ones every other tool that uses the Hub's cache sees.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..system import cache_root


@dataclass(frozen=True)
class HubSettings:
    """The Hub's address, the cache directory, whether the network is forbidden, the token (None:
    huggingface_hub's own lookup, HF_TOKEN then the saved login), and where ms4local keeps the last
    listing of each repo it saw (listings.py; None: nowhere)."""

    endpoint: str
    cache_dir: Path
    offline: bool = False
    token: str | bool | None = None
    listings_dir: Path | None = None

    @classmethod
    def from_env(cls) -> HubSettings:
        from huggingface_hub import constants

        return cls(endpoint=constants.ENDPOINT.rstrip("/"), cache_dir=Path(constants.HF_HUB_CACHE),
                   offline=bool(constants.HF_HUB_OFFLINE), listings_dir=cache_root() / "hub")


def free_space(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return 0
