"""Hand-made GGUF files: the real model's header over a sparse hole, and headers broken on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES


# Mistral Small 4 at its real sizes (spec §2/§7.3, Q4_K_M), header only: the data is a hole in a
# sparse file, so the test costs no disk and shows that nothing but the header is read.
def _real_tensors():
    H, V, E, F = 4096, 131072, 128, 2048
    yield "token_embd.weight", [H, V], Q.Q4_K
    for i in range(36):
        down = Q.Q6_K if i % 3 == 0 else Q.Q4_K
        yield from [(f"blk.{i}.attn_norm.weight", [H], Q.F32), (f"blk.{i}.attn_q_a.weight", [H, 1024], Q.Q4_K),
                    (f"blk.{i}.attn_q_a_norm.weight", [1024], Q.F32), (f"blk.{i}.attn_q_b.weight", [1024, 4096], Q.Q4_K),
                    (f"blk.{i}.attn_kv_a_mqa.weight", [H, 320], Q.Q4_K), (f"blk.{i}.attn_kv_a_norm.weight", [256], Q.F32),
                    (f"blk.{i}.attn_k_b.weight", [64, 256, 32], Q.Q5_0), (f"blk.{i}.attn_v_b.weight", [256, 128, 32], Q.Q4_K),
                    (f"blk.{i}.attn_output.weight", [H, H], Q.Q4_K), (f"blk.{i}.ffn_norm.weight", [H], Q.F32),
                    (f"blk.{i}.ffn_gate_inp.weight", [H, E], Q.F32),
                    (f"blk.{i}.ffn_gate_up_exps.weight", [H, 2 * F, E], Q.Q4_K),
                    (f"blk.{i}.ffn_down_exps.weight", [F, H, E], down),
                    (f"blk.{i}.ffn_gate_shexp.weight", [H, F], Q.Q4_K), (f"blk.{i}.ffn_up_shexp.weight", [H, F], Q.Q4_K),
                    (f"blk.{i}.ffn_down_shexp.weight", [F, H], down)]
    yield "output_norm.weight", [H], Q.F32
    yield "output.weight", [H, V], Q.Q6_K


def write_real_sized_header(path: Path, keys: dict[str, int], token_types: bool = False) -> tuple[Path, int]:
    """A GGUF header with the real model's tensors over a hole of their size (a sparse file); (path, tensor bytes)."""
    w = GGUFWriter(str(path), "mistral4")
    w.add_block_count(36)
    for key, value in keys.items():
        w.add_uint32(f"mistral4.{key}", value)
    w.add_token_list([f"tok{i}" for i in range(131072)])  # a real-sized array to step over
    if token_types:
        w.add_token_types([3 if i < 1000 else 1 for i in range(131072)])  # 1000 control tokens, as tekken v15
    total = 0
    for name, ne, q in _real_tensors():
        block, size = GGML_QUANT_SIZES[q]
        nbytes = int(np.prod(ne)) // block * size
        shape = list(reversed(ne))
        if q != Q.F32:
            shape[-1] = shape[-1] // block * size  # gguf-py takes quantized shapes in bytes
        w.add_tensor_info(name, shape, np.float32 if q == Q.F32 else np.uint8, nbytes, raw_dtype=q)
        total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        start = -(-f.seek(0, 2) // 32) * 32
        f.truncate(start + total)
    return path, total


# Broken headers (issue #18): faults that send gguf-py into an IndexError or a minutes-long walk.
def _gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return len(k).to_bytes(8, "little") + k + vtype.to_bytes(4, "little") + payload


def corrupt_gguf(kind: str, good: bytes) -> bytes:
    """`good` (the bytes of a valid GGUF) broken in the way `kind` (one of CORRUPT) names."""
    le = lambda n, width=8: n.to_bytes(width, "little")  # noqa: E731
    if kind == "big-endian":  # version 3 written big-endian, as a big-endian GGUF has it
        return good[:4] + (3).to_bytes(4, "big") + good[8:]
    if kind == "first-4-KB":
        return good[:4096]
    if kind == "half":
        return good[:len(good) // 2]
    if kind == "huge-tensor-count":
        return good[:8] + le(1 << 62) + good[16:]
    if kind == "huge-kv-count":
        return good[:16] + le(1 << 62) + good[24:]
    if kind == "huge-array":  # one key: an array of 2^60 uint32
        return b"GGUF" + le(3, 4) + le(0) + le(1) + _gguf_kv("a", 9, le(4, 4) + le(1 << 60))
    if kind == "huge-string":
        return b"GGUF" + le(3, 4) + le(0) + le(1) + _gguf_kv("a", 8, le(1 << 60))
    if kind == "array-of-arrays":  # 200,000 arrays of 2 arrays ... gguf-py walks them for minutes
        inner = le(9, 4) + le(0)  # an empty array of arrays
        return b"GGUF" + le(3, 4) + le(0) + le(1) + _gguf_kv("a", 9, le(9, 4) + le(200_000) + inner * 200_000)
    raise ValueError(kind)


CORRUPT = ["big-endian", "first-4-KB", "half", "huge-tensor-count", "huge-kv-count", "huge-array", "huge-string",
           "array-of-arrays"]
