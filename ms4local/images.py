"""Images for the vision projector: read, validate and size them before libmtmd sees a byte.

libmtmd decodes with stb_image and asserts on inputs it cannot handle (a 1×1 image aborts the
process), and nothing stops it from decoding a 20000×20000 PNG into gigabytes. So every image is
opened here with Pillow first, restricted to the formats we accept, checked (empty, not an image,
truncated, too small, too large), and handed to libmtmd as raw RGB pixels already at the size the
model will see. No llama_cpp here: the engine imports this module, not the other way round.

Sizing follows mistral-common (the reference encoder of Mistral Small 4): the longest side is
brought down to the vision tower's reference resolution (1540 px), then each side is rounded up to
whole merged patches (patch × spatial merge = 28 px), and the image is resized there with bicubic
filtering; transparent pixels become white. On top of that, `max_tokens` caps the merged patches
(p_x·p_y) as llama.cpp's `image_max_tokens` does (its default is 1024, i.e. about 896×896 px for a
square image; the reference resolution needs up to 55×55 = 3025). Because the pixels libmtmd gets
are already a multiple of 28 px and within its token bounds, its own preprocessor copies them
unresized, and the engine knows the layout of the embeddings it gets back (p_x·p_y + p_y − 1 rows:
an [IMG_BREAK] after every row but the last).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# Pillow plugins we let near user input: the formats the issue asks for (MPO is how some cameras
# write JPEG). Restricting `Image.open` to them also keeps plugins that shell out (EPS) away.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"
MIN_SIDE = 2  # llama.cpp's preprocessor asserts on a side of 1
# Decoding cost is bounded before any pixel is decoded: formats decoded at full size may hold at
# most MAX_DECODE_PIXELS (64 MP: ~256 MB as RGBA while converting); JPEG can be decoded at 1/2,
# 1/4 or 1/8 scale (`draft`), so it may be up to 64× larger.
MAX_DECODE_PIXELS = 64 * 2**20
MAX_FILE_BYTES = 256 * 2**20
LOAD_MAX_PIXELS = 16 * 2**20  # `load_image` hands back at most this many pixels
# Pillow's own decompression-bomb guard, checked in Image.open from the header: above twice this
# it raises, which we report as "too large". Our per-format limits above are the real ones.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_DECODE_PIXELS * 64 // 2)



def _formats() -> list[str]:
    """FORMATS as this Pillow knows them (plugins register themselves on `Image.init()`)."""
    Image.init()
    return [f for f in FORMATS if f in Image.OPEN]


REFERENCE_SIDE = 1540  # Pixtral's max image size in Mistral Small 4 (mistral-common, HF processor)
DEFAULT_MAX_TOKENS = 1024  # llama.cpp's default cap on merged image tokens


@dataclass(frozen=True)
class Source:
    """The raw bytes of an image and how to name it in a message."""

    data: bytes
    label: str

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()


@dataclass(frozen=True)
class Pixels:
    """A decoded RGB image (row-major, 3 bytes per pixel)."""

    width: int
    height: int
    rgb: bytes


def read_source(source: Any) -> Source:
    """The bytes of an image given as a path, a `data:` URI, a `file://` URL or bytes.

    Raises ImageError for a missing, unreadable, empty or oversized file, a malformed data URI,
    or a remote URL (nothing is downloaded).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("the image data is empty")
        return Source(data, "the image data")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ImageError("an image must be given as a file path, a data: URI or bytes")
    text = source.strip()
    lower = text[:8].lower()
    if lower.startswith("data:"):
        return Source(_data_uri(text), "the data: URI image")
    if lower.startswith(("http://", "https:/")):
        raise ImageError(f"remote images are not fetched ({text[:60]}); download it and pass the file or a data: URI")
    if lower.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    return Source(_read_file(Path(text).expanduser(), source), source)


def _data_uri(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("the data: URI has no ',' before its data")
    if head.lower().endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URI is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageError("the data: URI holds no data")
    return data


def _read_file(path: Path, shown: str) -> bytes:
    try:
        if path.is_dir():
            raise ImageError(f"{shown} is a directory, not an image file")
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"no image file at {shown}") from None
    except OSError as e:
        raise ImageError(f"cannot read {shown}: {e.strerror or e}") from None
    if size == 0:
        raise ImageError(f"{shown} is empty")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{shown} is {size / 2**20:.0f} MiB; images up to {MAX_FILE_BYTES // 2**20} MiB are accepted")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {shown}: {e.strerror or e}") from None
    if not data:
        raise ImageError(f"{shown} is empty")
    return data


def _open(src: Source) -> Image.Image:
    """Open (header only) and check what can be checked without decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src.data), formats=_formats())
    except Image.DecompressionBombError:
        raise ImageError(f"{src.label} is far too large to decode; downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{src.label} is not an image in a supported format ({FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{src.label} is not a readable image ({e})") from None
    w, h = img.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(f"{src.label} is {w}×{h} pixels; images need at least {MIN_SIDE}×{MIN_SIDE}")
    limit = MAX_DECODE_PIXELS * (64 if img.format in ("JPEG", "MPO") else 1)
    if w * h > limit:
        raise ImageError(f"{src.label} is {w}×{h} pixels, too large to decode safely (at most "
                         f"{limit / 1e6:.0f} megapixels for {img.format}); downscale it first")
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int, bool]:
    """Size after the EXIF orientation is applied, and whether it swaps the sides."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a reason to refuse the picture
        orientation = 1
    w, h = img.size
    swap = orientation in (5, 6, 7, 8)
    return (h, w, True) if swap else (w, h, False)


def _decode(img: Image.Image, src: Source, draft: tuple[int, int] | None) -> Image.Image:
    """Decode the first frame (at a reduced JPEG scale when `draft` allows), upright, as RGB."""
    try:
        if draft is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", draft)  # decodes at the smallest 1/2^k scale still >= draft
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        reason = str(e) or type(e).__name__
        raise ImageError(f"{src.label} is truncated or corrupt ({reason})") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:
        pass
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparent areas made white, as mistral-common does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grey PNGs
        scale = 1 / 257 if img.mode.startswith("I;16") else (1 / 257 if img.getextrema()[1] > 255 else 1)
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        has_alpha = img.mode in ("LA", "PA", "La", "RGBa") or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        if img.mode == "RGB":
            return img
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    white.alpha_composite(img)
    return white.convert("RGB")


def grid_size(width: int, height: int, *, unit: int = 28, max_side: int = REFERENCE_SIDE,
              max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[int, int]:
    """Merged patches per row and rows (p_x, p_y) for an image of width × height.

    mistral-common's rule (longest side down to `max_side`, sides rounded up to whole `unit`s),
    then at most `max_tokens` merged patches, keeping the aspect ratio.
    """
    w, h = float(width), float(height)
    ratio = max(w, h) / max_side
    if ratio > 1:
        w, h = max(round(w / ratio), 1), max(round(h / ratio), 1)
    px, py = max(1, math.ceil(w / unit)), max(1, math.ceil(h / unit))
    if px * py > max_tokens:
        s = math.sqrt(max_tokens / (px * py))
        px, py = max(1, math.floor(px * s)), max(1, math.floor(py * s))
        while px * py > max_tokens:  # only when a side was clamped to 1
            if px >= py:
                px -= 1
            else:
                py -= 1
    return px, py


def prepare(source: Any, *, unit: int = 28, max_side: int = REFERENCE_SIDE,
            max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[Source, Pixels, tuple[int, int]]:
    """Read, validate and resize an image for the vision tower: (source, RGB pixels, (p_x, p_y)).

    The pixels are (p_x·unit) × (p_y·unit). Raises ImageError (one line) for anything unusable.
    """
    src = source if isinstance(source, Source) else read_source(source)
    return (src, *prepare_bytes(src, unit=unit, max_side=max_side, max_tokens=max_tokens))


def prepare_bytes(src: Source, *, unit: int, max_side: int, max_tokens: int) -> tuple[Pixels, tuple[int, int]]:
    img = _open(src)
    w, h, swap = _oriented_size(img)
    px, py = grid_size(w, h, unit=unit, max_side=max_side, max_tokens=max_tokens)
    tw, th = px * unit, py * unit
    rgb = _decode(img, src, (th, tw) if swap else (tw, th))
    if rgb.size != (tw, th):
        rgb = rgb.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return Pixels(tw, th, rgb.tobytes()), (px, py)


def load_image(source: str | bytes | os.PathLike[str]) -> bytes:
    """Validate an image (path, `data:` URI, `file://` URL or bytes) and return it as PNG bytes.

    The result is RGB, upright (EXIF orientation applied), transparency on white, at the
    original size up to LOAD_MAX_PIXELS (16 MP, over 10× what the vision tower reads; larger
    images are scaled down, JPEGs already while decoding). Raises ImageError with a one-line
    reason. The engine takes these bytes in an image part (`{"type": "image", "image": png}`)
    as it takes a path.
    """
    src = read_source(source)
    img = _open(src)
    w, h = img.size
    target = None
    if w * h > LOAD_MAX_PIXELS:
        s = math.sqrt(LOAD_MAX_PIXELS / (w * h))
        target = (max(1, int(w * s)), max(1, int(h * s)))
    rgb = _decode(img, src, target)
    if target is not None and rgb.width * rgb.height > LOAD_MAX_PIXELS:
        s = math.sqrt(LOAD_MAX_PIXELS / (rgb.width * rgb.height))
        rgb = rgb.resize((max(1, int(rgb.width * s)), max(1, int(rgb.height * s))), Image.Resampling.BICUBIC,
                         reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def check_image(source: Any) -> None:
    """Raise ImageError if the image cannot be used (everything but the final resize is done)."""
    src = source if isinstance(source, Source) else read_source(source)
    img = _open(src)
    w, h, swap = _oriented_size(img)
    px, py = grid_size(w, h)
    _decode(img, src, (py * 28, px * 28) if swap else (px * 28, py * 28))


# ----------------------------------------------------------------------------- message parts
IMAGE_TYPES = ("image", "image_url")


def part_source(part: dict[str, Any]) -> Any:
    """Where an image content part keeps its image.

    `{"type": "image_url", "image_url": {"url": URL}}` (OpenAI; the URL may also be the value
    itself) and `{"type": "image", "image": PATH | DATA_URI | BYTES}` (mistral-common); `path`
    and `url` keys are read too.
    """
    if part.get("type") == "image_url":
        value = part.get("image_url")
        return value.get("url") if isinstance(value, dict) else value
    for key in ("image", "path", "url", "image_url"):
        if part.get(key) is not None:
            value = part[key]
            return value.get("url") if isinstance(value, dict) else value
    return None


def image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every image content part of the conversation, in message order."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            out += [p for p in content if isinstance(p, dict) and p.get("type") in IMAGE_TYPES]
    return out
