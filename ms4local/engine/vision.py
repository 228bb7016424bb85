"""Images: the vision projector beside a model, loaded with libmtmd, and the images it has seen.

An image in a prompt is a run of pseudo-ids (negative numbers derived from the image's serial),
one per embedding libmtmd makes of it, followed by the text ids libmtmd puts after it
([IMG_END]). The ids compare equal across turns like any token, so the engine's KV-cache prefix
compare reuses an image without encoding it again; `Vision.encode` makes the embeddings when an
image must be evaluated. Images are known by the sha256 of their bytes; pixels not yet in the
cache are kept within a memory budget.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ContextError, ModelLoadError
from ..gguf_model import projection_dim, read_model
from ..images import REFERENCE_SIDE, part_source, prepare_bytes, read_source
from .library import last_error, log_mark, mtmd
from .options import FLASH_ATTN, EngineOptions

IMAGE_STRIDE = 1 << 20  # pseudo-ids of one image: -(1 + serial·stride + offset), offset < stride
IMAGE_PIXEL_BUDGET = 256 * 2**20  # decoded pixels kept for images not yet in the KV cache


def pseudo(token: int) -> tuple[int, int]:
    """(image serial, offset in the image) of a pseudo-id (< 0)."""
    return divmod(-token - 1, IMAGE_STRIDE)


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many ids of `prompt` a KV cache holding `cached` can keep: the common prefix, less the
    last prompt id (always evaluated again, so that its logits exist), and never part of an
    image (its embeddings are evaluated whole)."""
    limit = min(len(cached), len(prompt) - 1)
    keep = 0
    while keep < limit and cached[keep] == prompt[keep]:
        keep += 1
    while 0 < keep < len(prompt) and prompt[keep] < 0 and pseudo(prompt[keep])[1] > 0:
        keep -= 1
    return keep


@dataclass
class ImageEntry:
    """An image the engine has seen: its layout and, until evicted, the pixels to encode it from."""

    serial: int
    n_tokens: int  # embeddings libmtmd makes: p_x·p_y + p_y − 1 ([IMG_BREAK] after each row but the last)
    grid: tuple[int, int]  # (p_x, p_y) merged patches per row, rows
    after: tuple[int, ...]  # text ids libmtmd puts after the image ([IMG_END])
    size: tuple[int, int]  # pixels handed to libmtmd (multiples of the merged patch)
    pixels: bytes | None

    @property
    def ids(self) -> list[int]:
        base = 1 + self.serial * IMAGE_STRIDE
        return [-(base + j) for j in range(self.n_tokens)]

    def break_rows(self) -> list[int]:
        p_x, p_y = self.grid
        return [(r + 1) * p_x + r for r in range(p_y - 1)]


def img_break_row(path: Path, n_embd: int) -> np.ndarray:
    """`v.token_embd.img_break` from the mmproj, as float32 (the converter writes F32)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise ModelLoadError(f"cannot read {path.name}: {e}") from None
    for t in reader.tensors:
        if t.name == "v.token_embd.img_break":
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ModelLoadError(f"{path.name}: v.token_embd.img_break is {t.tensor_type.name}; expected F32 or F16 "
                                     "(re-convert the projector with `ms4local quantize --mmproj-only`)")
            row = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if row.size != n_embd:
                raise ModelLoadError(f"{path.name}: v.token_embd.img_break has {row.size} values, the model {n_embd}")
            return row.copy()
    raise ModelLoadError(f"{path.name} has no v.token_embd.img_break tensor (llama.cpp's own converter omits it); "
                         "convert the projector with `ms4local quantize --mmproj-only`")




class Vision:
    """A loaded projector: libmtmd's context, the images seen (by content) and their encoding.

    The engine owns one per model (or none without a projector); `entry` turns an image part
    into its pseudo-ids, `lookup` finds the image a run of pseudo-ids stands for, and `encode`
    makes its embeddings for the model to evaluate.
    """

    def __init__(self, path: Path, *, model: Any, model_name: str, n_embd: int, img_id: int | None,
                 options: EngineOptions, use_gpu: bool) -> None:
        """Load the projector with libmtmd, after checking from its header that it fits this model."""
        if not path.is_file():
            raise ModelLoadError(f"mmproj file {path} does not exist")
        info = read_model(path)
        dim = projection_dim(info)
        if dim is None:
            raise ModelLoadError(f"{path.name} is not a vision projector (an mmproj GGUF with a vision encoder)")
        if dim != n_embd:
            raise ModelLoadError(f"{path.name} projects images to {dim} values but {model_name} has an embedding "
                                 f"size of {n_embd}: it belongs to another model; use the mmproj converted from "
                                 "the same checkpoint (or --no-mmproj)")
        kind = info.metadata.get("clip.projector_type")
        if kind != "pixtral":
            raise ModelLoadError(f"{path.name} is a {kind!r} projector; ms4local drives Mistral's Pixtral projector only")
        if img_id is None:
            raise ModelLoadError(f"{model_name} has no [IMG] control token, so its template cannot place images")
        self.path = path
        self.n_embd = n_embd
        self.img_id = img_id  # the [IMG] token the chat template writes for each image
        self.img_break = img_break_row(path, n_embd)  # the [IMG_BREAK] embedding row
        patch = int(info.metadata.get("clip.vision.patch_size", 14))  # type: ignore[arg-type]
        merge = int(info.metadata.get("clip.vision.spatial_merge_size", 1) or 1)  # type: ignore[arg-type]
        self.unit = patch * merge  # pixels per merged patch side
        self.max_side = int(info.metadata.get("clip.vision.image_size", REFERENCE_SIDE) or REFERENCE_SIDE)  # type: ignore[arg-type]
        self.max_tokens = options.image_max_tokens
        self.images_encoded = 0  # images run through the vision tower (a turn that reuses one adds 0)
        self._images: OrderedDict[bytes, ImageEntry] = OrderedDict()  # by sha256 of the image bytes
        self._serials: dict[int, ImageEntry] = {}
        self._serial = itertools.count()
        M = mtmd()
        p = M.mtmd_context_params_default()
        p.use_gpu = use_gpu
        p.print_timings = False
        p.n_threads = options.threads or max(1, os.cpu_count() or 1)
        p.warmup = use_gpu  # reserves the GPU buffers now; on the CPU it only costs load time
        # Flash attention in the vision tower follows -fa on a GPU; the CPU path is the one the
        # numerics tests hold to the reference (tests/test_vision_numerics.py), with it off.
        p.flash_attn_type = FLASH_ATTN[options.flash_attn] if use_gpu else FLASH_ATTN["off"]
        # The engine sizes images itself (ms4local/images.py) to at most image_max_tokens merged
        # patches; min 1 keeps libmtmd from enlarging a small image to its default minimum of 8.
        p.image_min_tokens = 1
        p.image_max_tokens = options.image_max_tokens
        mark = log_mark()
        ctx = M.mtmd_init_from_file(str(path).encode(), model, p)
        if not ctx:
            raise ModelLoadError(f"libmtmd could not load {path.name}: {last_error(mark)}")
        if not M.mtmd_support_vision(ctx) or M.mtmd_decode_use_mrope(ctx):
            M.mtmd_free(ctx)
            raise ModelLoadError(f"{path.name} is not an image projector ms4local can drive (no vision input, or M-RoPE)")
        self.ctx = ctx

    def close(self) -> None:
        if self.ctx is not None:
            mtmd().mtmd_free(self.ctx)
            self.ctx = None

    def entry(self, part: dict[str, Any]) -> ImageEntry:
        """The entry of an image part, reading and validating the image (ImageError if unusable).

        Images are known by the sha256 of their bytes: the same picture in the next turn maps to
        the same pseudo-ids, so the KV-cache prefix compare reuses it without encoding it again.
        """
        src = read_source(part_source(part))
        digest = src.digest
        entry = self._images.get(digest)
        if entry is not None and entry.pixels is not None:
            self._images.move_to_end(digest)
            return entry
        pixels, grid = prepare_bytes(src, unit=self.unit, max_side=self.max_side, max_tokens=self.max_tokens)
        if entry is None:
            chunks, chunk = self._chunk(pixels.width, pixels.height, pixels.rgb)
            try:
                n_tokens, after = self._layout(chunks, chunk)
            finally:
                mtmd().mtmd_input_chunks_free(chunks)
            p_x, p_y = grid
            if n_tokens != p_x * p_y + p_y - 1:
                raise ContextError(f"libmtmd made {n_tokens} embeddings of a {pixels.width}×{pixels.height} image, "
                                   f"expected {p_x * p_y + p_y - 1} ({p_x}×{p_y} patches and row breaks)")
            entry = ImageEntry(serial=next(self._serial), n_tokens=n_tokens, grid=grid, after=after,
                               size=(pixels.width, pixels.height), pixels=None)
            self._serials[entry.serial] = entry
        entry.pixels = pixels.rgb
        self._images[digest] = entry
        self._images.move_to_end(digest)
        self._evict(keep=entry)
        return entry

    def lookup(self, ids: list[int]) -> ImageEntry:
        """The image whose pseudo-ids start `ids`; ContextError for ids this projector did not make."""
        serial, offset = pseudo(ids[0])
        entry = self._serials.get(serial)
        if entry is None or offset != 0 or ids[:entry.n_tokens] != entry.ids:
            raise ContextError("the prompt holds image ids this engine did not make (build prompts with "
                               "prompt_tokens or chat)")
        return entry

    def _evict(self, keep: ImageEntry) -> None:
        """Drop the pixels of the least recently used images beyond the memory budget (their layout
        stays, so the KV cache still recognises them), and forget the oldest beyond 4096 images."""
        total = sum(len(e.pixels) for e in self._images.values() if e.pixels is not None)
        for e in self._images.values():
            if total <= IMAGE_PIXEL_BUDGET:
                break
            if e is not keep and e.pixels is not None:
                total -= len(e.pixels)
                e.pixels = None
        while len(self._images) > 4096:
            _, old = self._images.popitem(last=False)
            self._serials.pop(old.serial, None)

    def _chunk(self, width: int, height: int, rgb: bytes) -> tuple[Any, Any]:
        """libmtmd's chunks for one RGB image (image chunk, then [IMG_END] text): (chunks, image chunk)."""
        M = mtmd()
        bitmap = M.mtmd_bitmap_init(width, height, (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb))
        if not bitmap:
            raise ContextError("libmtmd could not take the image")
        chunks = M.mtmd_input_chunks_init()
        try:
            part = M.mtmd_input_part()
            part.bitmap = bitmap
            parts = (ctypes.POINTER(M.mtmd_input_part) * 1)(ctypes.pointer(part))
            mark = log_mark()
            rc = M.mtmd_tokenize_from_parts(self.ctx, chunks, parts, 1, False)
            if rc != 0:
                raise ContextError(f"libmtmd could not prepare the image (code {rc}): {last_error(mark)}")
            found = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
            images = [c for c in found if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            if len(images) != 1:
                raise ContextError(f"libmtmd made {len(images)} image chunks of one image")
            return chunks, images[0]
        except BaseException:
            M.mtmd_input_chunks_free(chunks)
            raise
        finally:
            M.mtmd_bitmap_free(bitmap)

    @staticmethod
    def _layout(chunks: Any, image: Any) -> tuple[int, tuple[int, ...]]:
        """(embeddings of the image chunk, text ids libmtmd puts after it)."""
        M = mtmd()
        after: list[int] = []
        seen = False
        for i in range(M.mtmd_input_chunks_size(chunks)):
            c = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                seen = True
            elif seen and M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                after += [int(ptr[j]) for j in range(n.value)]
        n_tokens = int(M.mtmd_input_chunk_get_n_tokens(image))
        if int(M.mtmd_input_chunk_get_n_pos(image)) != n_tokens:
            raise ContextError("libmtmd gives this image fewer positions than embeddings (M-RoPE), which ms4local "
                               "does not drive")
        return n_tokens, tuple(after)

    def encode(self, entry: ImageEntry) -> np.ndarray:
        """The image's embeddings [n_tokens, n_embd] from the vision tower, [IMG_BREAK] rows exact.

        libmtmd builds the [IMG_BREAK] rows as (an uninitialised tensor × 0) + img_break, which is
        NaN where the garbage was Inf/NaN (an upstream bug, tests/test_vision_numerics.py); those
        rows are written here from the projector's own img_break row, which is what they should be.
        """
        M = mtmd()
        if entry.pixels is None:
            raise ContextError("this image's pixels were dropped from memory before it could be encoded; send it again")
        chunks, chunk = self._chunk(*entry.size, entry.pixels)
        try:
            n = int(M.mtmd_input_chunk_get_n_tokens(chunk))
            if n != entry.n_tokens:
                raise ContextError(f"libmtmd made {n} embeddings of an image it had counted as {entry.n_tokens}")
            mark = log_mark()
            rc = M.mtmd_encode_chunk(self.ctx, chunk)
            if rc != 0:
                raise ContextError(f"libmtmd could not encode the image (code {rc}): {last_error(mark)}")
            ptr = M.mtmd_get_output_embd(self.ctx)
            embd = np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
        finally:
            M.mtmd_input_chunks_free(chunks)
        embd[entry.break_rows()] = self.img_break
        self.images_encoded += 1
        return embd
