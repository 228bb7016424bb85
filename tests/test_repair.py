"""Third-party files repaired at load (spec §3.3, §6.4; ms4local/engine/repair.py).

The third-party files are made as llama.cpp's HF converter makes them: our conversion of the same
checkpoint with what that converter leaves out taken away by gguf-py (the two Llama-4 temperature
keys; the mmproj's `v.token_embd.img_break`). The checks are against independent references: the
float64 forward pass for logits past the original context, and the checkpoint's own
`embed_tokens` row for the [IMG_BREAK] rows of the image embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from ms4local import Engine, EngineOptions
from ms4local.engine.repair import unit_temperature
from ms4local.errors import ModelLoadError
from ms4local.gguf_model import ModelInfo
from quantize import convert
from quantize.synth import TinySpec
from reference.mistral4_ref import forward, load_checkpoint

BASE = TinySpec(vocab=4096, orig_ctx=16, layers=3)
VIS = TinySpec(vocab=2000, vision_layers=3)
TEMPERATURE_KEYS = ("mistral4.attention.temperature_scale", "mistral4.attention.temperature_length")


def strip(src: Path, dst: Path, *, keys: tuple[str, ...] = (), tensors: tuple[str, ...] = (),
          arch: str | None = None) -> Path:
    """Copy a GGUF without some metadata keys and tensors (and with `arch`, relabelled as another
    architecture: its keys renamed), with gguf-py alone."""
    reader = gguf.GGUFReader(src)
    old = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch or old)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in keys:
            continue
        kind = field.types[0]
        name = f"{arch}{field.name[len(old):]}" if arch and field.name.startswith(f"{old}.") else field.name
        writer.add_key_value(name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    kept = [t for t in reader.tensors if t.name not in tensors]
    assert len(kept) == len(reader.tensors) - len(tensors)
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def repair_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MS4LOCAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def third_party(ckpt, gguf_file, tmp_path_factory):
    src = ckpt(BASE)
    ours = gguf_file(src, "F32")
    d = tmp_path_factory.mktemp("third-party")
    return src, strip(ours, d / "Tiny-F32.gguf", keys=TEMPERATURE_KEYS)


def logits(path: Path, tokens: list[int], **kw) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Engine(path, EngineOptions(ctx_size=256, type_k="f32", type_v="f32", flash_attn="off", **kw)) as e:
            return e.logits(tokens).astype(np.float64), list(e.repairs)


def test_missing_temperature_keys_are_set_at_load_and_match_the_reference(third_party):
    src, path = third_party
    reader = gguf.GGUFReader(path)
    assert not any(k in reader.fields for k in TEMPERATURE_KEYS)  # as llama.cpp's converter writes it
    assert reader.fields["mistral4.rope.scaling.original_context_length"].contents() == BASE.orig_ctx
    before = sha(path)
    with Engine(path, EngineOptions(vocab_only=True)) as e:
        tokens = e.tokenize("[INST]" + " ".join(f"word{i}" for i in range(40)) + "[/INST]", add_special=True)
    assert len(tokens) > 3 * BASE.orig_ctx
    ref = forward(load_checkpoint(src), tokens)
    scale = np.abs(ref).max(axis=1, keepdims=True)

    fixed, repairs = logits(path, tokens)
    plain, none = logits(path, tokens, repair=False)
    late = slice(BASE.orig_ctx, None)
    assert np.abs((fixed - ref) / scale)[late].max() <= 1e-3
    assert np.abs((plain - ref) / scale)[late].max() > 1e-2  # the repair is what makes it right
    assert np.abs((plain - ref) / scale)[: BASE.orig_ctx].max() <= 1e-3  # the keys only act past it
    assert len(repairs) == 1 and "temperature_scale = 0.1" in repairs[0] and "temperature_length = 16" in repairs[0]
    assert none == []
    assert sha(path) == before  # the file itself is never edited


def test_a_file_with_the_keys_is_left_alone(ckpt, gguf_file):
    path = gguf_file(ckpt(BASE), "F32")
    with Engine(path, EngineOptions(ctx_size=64)) as e:
        assert e.repairs == []


SCALE, LENGTH = "mistral4.attention.temperature_scale", "mistral4.attention.temperature_length"


@pytest.mark.parametrize("n_ctx,off", [(256, True), (500, True), (512, True), (513, False), (8192, False)])
def test_the_temperature_is_turned_off_only_where_no_position_reaches_its_length(n_ctx, off):
    """The factor is 1 below L = 512; llama.cpp rounds n_ctx up to a multiple of 256 (500 -> 512,
    513 -> 768), and a context of 768 has positions 512.. where it is not."""
    info = ModelInfo(Path("m.gguf"), "mistral4", {SCALE: 0.1, LENGTH: 512}, ())
    assert unit_temperature(info, {}, n_ctx) == ({SCALE: 0.0} if off else {})


@pytest.mark.parametrize("n_ctx,n_seq,off", [(2048, 4, True), (2049, 4, False), (512, 4, True), (512, 1, True),
                                             (4096, 2, False)])
def test_with_several_sequences_each_one_s_cells_count(n_ctx, n_seq, off):
    """`--parallel N`: each sequence gets n_ctx/N cells, rounded up to 256 again (512/4 -> 256;
    2049 -> 2304, /4 = 576 -> 768), and its positions stay below that."""
    info = ModelInfo(Path("m.gguf"), "mistral4", {SCALE: 0.1, LENGTH: 512}, ())
    assert unit_temperature(info, {}, n_ctx, n_seq) == ({SCALE: 0.0} if off else {})


def test_the_temperature_is_turned_off_from_the_keys_in_effect():
    bare = ModelInfo(Path("m.gguf"), "mistral4", {}, ())
    assert unit_temperature(bare, {}, 256) == {}  # no scaling to turn off
    assert unit_temperature(bare, {SCALE: 0.1, LENGTH: 8192}, 4096) == {SCALE: 0.0}  # the repair's keys
    other = ModelInfo(Path("m.gguf"), "llama", {"llama.attention.temperature_scale": 0.1,
                                                "llama.attention.temperature_length": 8192}, ())
    assert unit_temperature(other, {}, 256) == {}  # another family's formula may have an offset


def test_the_cli_announces_the_repair_once_and_info_shows_it(third_party, cli_env):
    import subprocess

    from helpers import BIN

    _, path = third_party
    out = subprocess.run([str(BIN / "ms4local"), "chat", str(path), "--prompt", "hello", "-n", "2", "-c", "256"],
                         capture_output=True, text=True,
                         env=cli_env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Llama-4 query temperature keys") == 1, out.stderr  # said once, on stderr
    assert "Llama-4" not in out.stdout
    info = subprocess.run([str(BIN / "ms4local"), "info", str(path), "--json"], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["repair"]["temperature"] == {
        "mistral4.attention.temperature_length": 16, "mistral4.attention.temperature_scale": 0.1}


def test_a_file_that_cannot_run_is_one_line_that_says_what_it_is(ckpt, gguf_file, tmp_path, cli_env):
    """Another model family, or a Mistral Small 4 file without a key this llama.cpp reads (an older
    converter's): llama.cpp refuses both; the error names what the file is, in one line."""
    import subprocess

    from helpers import BIN

    ours = gguf_file(ckpt(BASE), "F32")
    other = strip(ours, tmp_path / "Other.gguf", arch="llama")
    old = strip(ours, tmp_path / "Old.gguf", keys=("mistral4.attention.kv_lora_rank",))
    with pytest.raises(ModelLoadError) as err:
        Engine(other, EngineOptions(ctx_size=64))
    assert "Other.gguf is a 'llama' model" in str(err.value) and "not Mistral Small 4" in str(err.value)
    p = subprocess.run([str(BIN / "ms4local"), "chat", str(old), "-p", "hi", "-n", "1"], capture_output=True,
                       text=True, env=cli_env, timeout=120)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "Old.gguf is a 'mistral4' model" in p.stderr and "mistral4.attention.kv_lora_rank" in p.stderr
    assert "ms4local quantize" in p.stderr


@pytest.fixture(scope="module")
def vision_pair(ckpt, tmp_path_factory):
    src = ckpt(VIS)
    d = tmp_path_factory.mktemp("vision-ours")
    res = convert(src, out=d / "Tiny.gguf", out_type="F32", mmproj_type="F32")
    theirs = tmp_path_factory.mktemp("vision-theirs")
    model = theirs / "Tiny-F32.gguf"
    model.symlink_to(res.output)  # as the HF cache lays out a snapshot: links to shared blobs
    mmproj = strip(res.mmproj, theirs / "mmproj-Tiny-F16.gguf", tensors=("v.token_embd.img_break",))
    return src, model, mmproj


def test_a_projector_without_the_img_break_row_is_repaired_from_the_model(vision_pair, tmp_path, repair_cache):
    src, model, mmproj = vision_pair
    before = sha(mmproj)
    img = tmp_path / "img.png"
    rgb = np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img)
    with pytest.raises(ModelLoadError, match="img_break"):
        Engine(model, EngineOptions(ctx_size=512, repair=False))
    with pytest.warns(UserWarning, match=r"lacks the \[IMG_BREAK\] row"):
        e = Engine(model, EngineOptions(ctx_size=512))
    with e:
        assert e.supports_images and e.mmproj == mmproj and len(e.repairs) == 1
        embd = e.image_embeddings(img)
        img_break = e.tokenize("[IMG_BREAK]")[0]
    # The [IMG_BREAK] rows are the checkpoint's own embedding row (an independent reference).
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(load_file(f))
    name = next(k for k in weights if k.endswith("embed_tokens.weight"))
    want = weights[name][img_break].astype(np.float32)
    rows = [i for i in range(len(embd)) if np.array_equal(embd[i], want)]
    assert rows, "no [IMG_BREAK] row in the image's embeddings"
    assert sha(mmproj) == before  # the downloaded projector is not edited
    copies = list(repair_cache.rglob("*.gguf"))
    assert len(copies) == 1
    stamp = copies[0].stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Engine(model, EngineOptions(ctx_size=512)) as again:
            assert np.array_equal(again.image_embeddings(img), embd)
    assert copies[0].stat().st_mtime_ns == stamp  # made once, then reused


def test_list_says_which_files_need_a_repair(third_party, vision_pair, tmp_path):
    import subprocess

    from helpers import BIN

    models = tmp_path / "models"
    models.mkdir()
    (models / "Third-F32.gguf").symlink_to(third_party[1])
    env = {**os.environ, "MS4LOCAL_MODELS": str(models), "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(BIN / "ms4local"), "list", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["repair"] == ["temperature keys"]
    d = tmp_path / "vision"
    d.mkdir()
    (d / "Vis-F32.gguf").symlink_to(vision_pair[1])
    (d / "mmproj-Vis-F16.gguf").symlink_to(vision_pair[2])
    env["MS4LOCAL_MODELS"] = str(d)
    out = subprocess.run([str(BIN / "ms4local"), "list", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    (entry,) = json.loads(out.stdout)
    assert entry["repair"] == ["[IMG_BREAK] row"]
