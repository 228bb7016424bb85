"""`image_url` parts → image parts the engine reads, under the server's fetch policy.

The engine reads a path, a `data:` URI or bytes. A request must not make the server read its
files or reach the network unless the operator said so, so only `data:` URIs pass by default;
`http(s)://` needs `--allow-image-urls` and `file://` needs `--allow-local-files`. Anything else
(a bare path, another scheme) is refused: a bare path is a local file read in disguise.
Decoding and validation (formats, sizes, truncation) stay in the engine (ms4local/images.py).
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import APIError, bad_request

MAX_FETCH_BYTES = 20 * 2**20
FETCH_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ImagePolicy:
    allow_urls: bool = False
    allow_local_files: bool = False
    max_bytes: int = MAX_FETCH_BYTES


def resolve(url: str, policy: ImagePolicy, param: str) -> Any:
    """What the engine gets for one image URL: the data: URI itself, or the fetched/read bytes.

    Blocking (network, disk): call it in a worker thread.
    """
    text = url.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme == "data":
        return text
    if scheme in ("http", "https"):
        if not policy.allow_urls:
            raise bad_request("image URLs are not fetched by this server (start it with --allow-image-urls); "
                              "send the image as a data: URI", param, "image_url_not_allowed")
        return _fetch(text, policy, param)
    if scheme == "file":
        if not policy.allow_local_files:
            raise bad_request("file:// images are not read by this server (start it with --allow-local-files); "
                              "send the image as a data: URI", param, "image_url_not_allowed")
        return _read(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)), policy, param)
    raise bad_request("an image_url must be a data: URI (or http(s):// / file:// where the server allows them)",
                      param, "invalid_image_url")


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "ms4local"})
    try:
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310 (scheme checked above)
            data = resp.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"could not fetch the image {url[:80]}: {getattr(e, 'reason', e)}", param,
                          "invalid_image_url") from None
    if len(data) > policy.max_bytes:
        raise APIError(400, f"the image at {url[:80]} is larger than {policy.max_bytes // 2**20} MiB", param=param,
                       code="image_too_large")
    return data


def _read(path: Path, policy: ImagePolicy, param: str) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise bad_request(f"{path} is not a file", param, "invalid_image_url")
        if size > policy.max_bytes:
            raise bad_request(f"{path} is larger than {policy.max_bytes // 2**20} MiB", param, "image_too_large")
        return path.read_bytes()
    except OSError as e:
        raise bad_request(f"cannot read {path}: {e.strerror or e}", param, "invalid_image_url") from None
