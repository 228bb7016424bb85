"""Bad input to the converter: the typed error, its message, and nothing left behind."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

import quantize.writer as writer_mod
from quantize import convert
from quantize.errors import (CheckpointError, ConfigError, MissingTensorError, OutputError, ShapeError,
                             UnsupportedArchitectureError, UnsupportedTypeError)
from quantize.synth import write_safetensors


@pytest.fixture
def work(ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ckpt(), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return src, out_dir


@pytest.fixture
def sharded(ckpt, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(ckpt(shards=3), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return src, out_dir


def expect(src, out_dir, exc, *words, out_type="F16", **kw):
    with pytest.raises(exc) as info:
        convert(src, out=out_dir / "m.gguf", out_type=out_type, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert "\n" not in str(info.value)
    assert not list(out_dir.glob("*.gguf")) and not list(out_dir.glob("*.part"))
    return str(info.value)


def test_missing_config(work):
    (work[0] / "config.json").unlink()
    expect(*work, ConfigError, "no config.json")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_malformed_config(work, text):
    (work[0] / "config.json").write_text(text)
    expect(*work, ConfigError, "config.json")


def test_unsupported_architecture(work):
    cfg = json.loads((work[0] / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"
    (work[0] / "config.json").write_text(json.dumps(cfg))
    expect(*work, UnsupportedArchitectureError, "unsupported architecture", "supported:", "mistral4")


def test_missing_shard(sharded):
    (sharded[0] / "model-00002-of-00003.safetensors").unlink()
    expect(*sharded, CheckpointError, "model-00002-of-00003.safetensors", "missing")


def test_index_points_to_wrong_shard(sharded):
    index = json.loads((sharded[0] / "model.safetensors.index.json").read_text())
    name = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    index["weight_map"][name] = "model-00002-of-00003.safetensors"
    (sharded[0] / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(*sharded, CheckpointError, "does not match the shards", name)


def test_index_lists_absent_tensor(sharded):
    index = json.loads((sharded[0] / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.model.layers.0.extra.weight"] = "model-00001-of-00003.safetensors"
    (sharded[0] / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(*sharded, CheckpointError, "language_model.model.layers.0.extra.weight", "not there")


def test_missing_tensor_is_named(work):
    import numpy as np
    from safetensors.numpy import load_file
    path = work[0] / "model.safetensors"
    data = load_file(str(path))
    victim = "language_model.model.layers.1.self_attn.o_proj.weight"
    del data[victim]
    entries = [(k, "F32", v.shape, (lambda v=v: v.astype(np.float32))) for k, v in data.items()]
    write_safetensors(path, entries)
    expect(*work, MissingTensorError, "model.layers.1.self_attn.o_proj.weight", "missing")


def test_truncated_file(work):
    path = work[0] / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    expect(*work, CheckpointError, "truncated", "re-download")


def test_shape_contradicts_config(work):
    cfg = json.loads((work[0] / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 48
    (work[0] / "config.json").write_text(json.dumps(cfg))
    expect(*work, ShapeError, "config.json implies", "do not belong together")


def test_output_exists_without_force(work):
    src, out_dir = work
    target = out_dir / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists.*--force"):
        convert(src, out=target, out_type="F16")
    assert target.read_bytes() == b"precious" and not list(out_dir.glob("*.part"))


def test_unsupported_type(work):
    expect(*work, UnsupportedTypeError, "Q3_X", "Q8_0", out_type="Q3_X")


def test_output_directory_missing(work, tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        convert(work[0], out=tmp_path / "nope" / "m.gguf", out_type="F16")


def test_output_directory_unwritable(work, monkeypatch):
    # Tests run as root, which ignores permission bits, so the access check itself is simulated.
    monkeypatch.setattr(writer_mod.os, "access", lambda *a, **k: False)
    expect(*work, OutputError, "not writable")


def test_disk_too_small_is_refused_up_front(work, monkeypatch):
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
    expect(*work, OutputError, "not enough disk space")


def test_disk_full_while_writing(work, monkeypatch):
    """ENOSPC from the filesystem part-way through: one message, the .part file removed."""
    real = writer_mod.gguf.GGUFWriter.write_padding
    calls = {"n": 0}

    def failing(self, fp, n, align=None):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, n, align)

    monkeypatch.setattr(writer_mod.gguf.GGUFWriter, "write_padding", failing)
    expect(*work, OutputError, "disk full")


def test_interrupt_leaves_nothing(work):
    def boom(done, total, name):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(work[0], out=work[1] / "m.gguf", out_type="F16", progress=boom)
    assert not list(work[1].iterdir())
