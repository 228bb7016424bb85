"""Images in the runtime (issue #4): the engine feeds libmtmd's image embeddings into the same
context as the text, reuses them across turns, finds its projector, and refuses bad images with
one typed error while the engine goes on answering.

The tiny model reads images with a 3-layer Pixtral tower converted by our own converter; "encoded"
is counted by the engine (`images_encoded`), "evaluated" by llama.cpp's own counters (`perf`).
"""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
import zlib

import gguf
import numpy as np
import pytest
from PIL import Image

from helpers import BIN
from ms4local import Engine, EngineOptions, Sampling
from ms4local.engine import Delta, Done, find_mmproj
from ms4local.errors import ImageError, ModelLoadError, OptionsError
from ms4local.images import grid_size, load_image
from quantize import convert
from quantize.synth import TinySpec

VIS = TinySpec(vocab=2000, vision_layers=3)
WIDE = TinySpec(vocab=2000, vision_layers=3, hidden=96)  # another text width: its projector does not fit VIS
GREEDY = Sampling(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    """(model, its mmproj, the WIDE model's mmproj), the first two alone in their directory."""
    d = tmp_path_factory.mktemp("vision-model")
    res = convert(ckpt(VIS), out=d / "Tiny.gguf", out_type="F32", mmproj_type="F32")
    other = tmp_path_factory.mktemp("vision-wide")
    wide = convert(ckpt(WIDE), out=other / "Wide.gguf", out_type="F32", mmproj_type="F32")
    return res.output, res.mmproj, wide.mmproj


@pytest.fixture(scope="module")
def engine(files):
    with Engine(files[0], EngineOptions(ctx_size=1024, threads=2)) as e:
        yield e


def png(path, width, height, seed=0):
    rgb = np.random.default_rng([seed, width, height]).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def user(*images, text="What is in the picture?"):
    return {"role": "user", "content": [*({"type": "image", "image": str(i)} for i in images),
                                        {"type": "text", "text": text}]}


def answer(e, messages, sampling=GREEDY):
    """(text, Done, tokens llama.cpp evaluated) of one greedy turn."""
    before = e.perf()
    text, done = [], None
    for ev in e.chat(messages, sampling):
        if isinstance(ev, Delta):
            text.append(ev.text)
        elif isinstance(ev, Done):
            done = ev
    after = e.perf()
    return "".join(text), done, sum(after[k] - before[k] for k in after)


def image_runs(ids):
    """[(start, length)] of the runs of image pseudo-ids (negative) in a prompt."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] < 0:
            j = i
            while j < len(ids) and ids[j] < 0:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def img_break_row(mmproj):
    t = next(t for t in gguf.GGUFReader(mmproj).tensors if t.name == "v.token_embd.img_break")
    return np.asarray(t.data, dtype=np.float32).reshape(-1)


# ----------------------------------------------------------------------------- evaluation
def test_an_image_changes_the_logits(engine, tmp_path):
    img = png(tmp_path / "a.png", 112, 84)
    with_image = engine.prompt_tokens([user(img)])
    without = engine.prompt_tokens([user()])
    assert len(image_runs(with_image)) == 1 and not image_runs(without)
    a, b = engine.logits(with_image)[-1], engine.logits(without)[-1]
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert np.abs(a - b).max() > 1e-3
    other = engine.logits(engine.prompt_tokens([user(png(tmp_path / "b.png", 112, 84, seed=1))]))[-1]
    assert np.abs(a - other).max() > 1e-4  # the content matters, not only the token count


def test_two_images_in_one_message(engine, files, tmp_path):
    """4×3 merged patches → 12 + 2 breaks = 14 embeddings; 3×6 → 18 + 5 = 23; each then [IMG_END]."""
    first, second = png(tmp_path / "first.png", 112, 84), png(tmp_path / "second.png", 84, 168)
    ids = engine.prompt_tokens([user(first, second)])
    runs = image_runs(ids)
    assert [n for _, n in runs] == [14, 23]
    img_end = engine.tokenize("[IMG_END]")
    assert len(img_end) == 1
    assert [ids[s + n] for s, n in runs] == img_end * 2
    text_only = engine.prompt_tokens([user(text="What is in the picture?")])
    assert len(ids) == len(text_only) + (14 + 1) + (23 + 1)
    encoded = engine.images_encoded
    _, done, _ = answer(engine, [user(first, second)])
    assert engine.images_encoded == encoded + 2 and done.usage.prompt_tokens == len(ids)
    # [IMG_BREAK] rows are the projector's own row, exactly (libmtmd may leave NaN there).
    embd = engine.image_embeddings(second)
    assert embd.shape == (23, VIS.hidden) and np.isfinite(embd).all()
    breaks = [(r + 1) * 3 + r for r in range(5)]
    np.testing.assert_array_equal(embd[breaks], np.tile(img_break_row(files[1]), (5, 1)))
    patches = np.delete(embd, breaks, axis=0)
    assert not (patches == img_break_row(files[1])).all(axis=1).any()


def test_image_order_follows_the_template(engine, tmp_path):
    """Images in two user messages merged into one turn keep their order; text typed as "[IMG]" is
    text, not a place for an image."""
    a, b = png(tmp_path / "a.png", 56, 56), png(tmp_path / "b.png", 112, 56)
    ids = engine.prompt_tokens([user(a, text="one [IMG]"), user(b, text="two")])
    assert [n for _, n in image_runs(ids)] == [2 * 2 + 1, 4 * 2 + 1]


def test_image_in_turn_one_is_not_encoded_again(engine, tmp_path):
    img = png(tmp_path / "cat.png", 112, 84)
    engine.reset()
    history = [user(img, text="Describe it.")]
    p1 = engine.prompt_tokens(history)
    produced = engine.tokenize("A cat.")
    encoded = engine.images_encoded
    list(engine.generate(p1 + produced, Sampling(max_tokens=0)))  # the cache as after that answer
    assert engine.images_encoded == encoded + 1
    history += [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "What colour is it?"}]
    p2 = engine.prompt_tokens(history)
    assert p2[:len(p1) + len(produced)] == p1 + produced
    _, done, evaluated = answer(engine, history)
    new = len(p2) - len(p1) - len(produced)
    assert 0 < new < 20
    assert engine.images_encoded == encoded + 1  # not encoded again
    assert done.usage.cached_tokens == len(p1) + len(produced)
    assert done.timings.prompt_eval_tokens == new
    assert evaluated == new + done.usage.completion_tokens  # llama.cpp evaluated nothing else


def test_a_changed_image_is_evaluated_again_from_where_it_differs(engine, tmp_path):
    a, b = png(tmp_path / "a.png", 56, 56), png(tmp_path / "b.png", 56, 56, seed=3)
    engine.reset()
    answer(engine, [user(a)])
    encoded = engine.images_encoded
    _, done, _ = answer(engine, [user(b)])
    assert engine.images_encoded == encoded + 1
    assert done.usage.cached_tokens == image_runs(engine.prompt_tokens([user(b)]))[0][0]  # the text before it


def test_old_image_turns_are_dropped_when_the_context_is_full(files, tmp_path):
    img = png(tmp_path / "big.png", 224, 224)  # 8×8 + 7 = 71 embeddings
    long = "mot " * 60
    with Engine(files[0], EngineOptions(ctx_size=256, threads=2)) as e:
        history = [user(img, text="Describe it."), {"role": "assistant", "content": long},
                   {"role": "user", "content": long}, {"role": "assistant", "content": "Oui."},
                   user(img, text="And now?")]
        assert len(e.prompt_tokens(history)) > 256
        _, done, _ = answer(e, history)
        # The first turn, image and all, and the second: the kept prompt takes at most half the context.
        assert done.dropped_messages == 4 and done.usage.prompt_tokens <= 128
        assert e.images_encoded == 1


def test_image_max_tokens_caps_the_grid(files, tmp_path):
    img = png(tmp_path / "wide.png", 700, 350)  # 25×13 merged patches at full size
    assert grid_size(700, 350) == (25, 13)
    with Engine(files[0], EngineOptions(ctx_size=1024, threads=2, image_max_tokens=32)) as e:
        (_, n), = image_runs(e.prompt_tokens([user(img)]))
    p_x, p_y = grid_size(700, 350, max_tokens=32)
    assert (p_x, p_y) == (7, 4) and n == p_x * p_y + p_y - 1  # ≤ 32 patches, about 2:1 like the picture
    assert grid_size(20000, 20000, max_tokens=3025) == (55, 55)  # the 1540 px reference
    assert grid_size(20000, 20000) == (32, 32)  # llama.cpp's default 1024 merged tokens
    with pytest.raises(OptionsError, match="image-max-tokens"):
        EngineOptions(image_max_tokens=0).check()


# ----------------------------------------------------------------------------- inputs
def _frames_gif(path, first, second):
    frames = [Image.new("RGB", (56, 56), first), Image.new("RGB", (56, 56), second)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_formats_and_data_uris(engine, tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pic = Image.fromarray(rgb)
    pic.save(tmp_path / "p.png")
    want = engine.image_embeddings(tmp_path / "p.png")
    pic.save(tmp_path / "p.bmp")
    pic.save(tmp_path / "p.webp", lossless=True)
    for lossless in ("p.bmp", "p.webp"):
        np.testing.assert_array_equal(engine.image_embeddings(tmp_path / lossless), want)
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "p.png").read_bytes()).decode()
    np.testing.assert_array_equal(engine.image_embeddings(uri), want)
    np.testing.assert_array_equal(engine.image_embeddings(load_image(tmp_path / "p.bmp")), want)
    pic.save(tmp_path / "p.jpg", quality=90)
    jpeg = engine.image_embeddings(tmp_path / "p.jpg")
    assert jpeg.shape == want.shape and np.isfinite(jpeg).all()
    # GIF: the first frame is the picture.
    _frames_gif(tmp_path / "anim.gif", (255, 0, 0), (0, 0, 255))
    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / "blue.png")
    gif = engine.image_embeddings(tmp_path / "anim.gif")
    np.testing.assert_array_equal(gif, engine.image_embeddings(tmp_path / "red.png"))
    assert not np.array_equal(gif, engine.image_embeddings(tmp_path / "blue.png"))
    # The message part shapes: OpenAI's image_url (data: URI or path) and mistral-common's image.
    for part in ({"type": "image_url", "image_url": {"url": uri}}, {"type": "image_url", "image_url": str(tmp_path / "p.png")},
                 {"type": "image", "image": (tmp_path / "p.png").read_bytes()}):
        ids = engine.prompt_tokens([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}])
        assert [n for _, n in image_runs(ids)] == [3 * 2 + 1]


def _huge_png(path, side=20000):
    """A valid 1-bit PNG of side × side pixels, ~30 KB on disk, written without Pillow."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + side // 8)
    body = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _bad(kind, tmp_path):
    p = tmp_path / f"{kind}.png"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("this is not a picture\n")
    elif kind == "truncated":
        png(p, 112, 84)
        p.write_bytes(p.read_bytes()[:200])
    elif kind == "one-pixel":
        Image.new("RGB", (1, 1), (9, 9, 9)).save(p)
    elif kind == "huge":
        _huge_png(p)
    elif kind == "missing":
        pass
    elif kind == "directory":
        p.mkdir()
    elif kind == "not-a-directory":
        (tmp_path / "file.txt").write_text("x")
        p = tmp_path / "file.txt" / "x.png"
    elif kind == "unreadable":
        png(p, 56, 56)
        p.chmod(0)
    elif kind == "bad-base64":
        return "data:image/png;base64,@@@not base64@@@"
    elif kind == "remote":
        return "https://example.com/cat.png"
    return str(p)


BAD = {"empty": "is empty", "text": "not an image in a supported format", "truncated": "truncated or corrupt",
       "one-pixel": "1×1 pixels", "huge": "20000×20000 pixels, too large", "missing": "no image file at",
       "directory": "is a directory", "not-a-directory": "cannot read", "unreadable": "Permission denied",
       "bad-base64": "not valid base64", "remote": "not fetched"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_images_raise_one_typed_error_and_the_engine_goes_on(engine, tmp_path, kind):
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    source = _bad(kind, tmp_path)
    with pytest.raises(ImageError, match=BAD[kind]) as info:
        list(engine.chat([{"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "?"}]}],
                         GREEDY))
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match=BAD[kind]):
        load_image(source)
    _, done, _ = answer(engine, [{"role": "user", "content": "Still there?"}])
    assert done.usage.completion_tokens > 0


# ----------------------------------------------------------------------------- projector
def test_mismatching_projector_is_refused(files):
    model, _, wide = files
    with pytest.raises(ModelLoadError, match=r"projects images to 96 values .* embedding size of 64"):
        Engine(model, EngineOptions(ctx_size=256, mmproj=str(wide)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(model, EngineOptions(ctx_size=256, mmproj=str(model.parent / "nope.gguf")))
    with pytest.raises(ModelLoadError, match="not a vision projector"):
        Engine(model, EngineOptions(ctx_size=256, mmproj=str(model)))


def test_projector_is_found_beside_the_model(files, tmp_path):
    model, mmproj, wide = files
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(model, d / "Tiny.gguf")
    shutil.copy(wide, d / "mmproj-0-Wide-F32.gguf")  # sorts first, made for another model
    (d / "mmproj-00-broken.gguf").write_bytes(b"GGUF")
    assert find_mmproj(d / "Tiny.gguf") is None
    shutil.copy(mmproj, d / "mmproj-Tiny-F32.gguf")
    assert find_mmproj(d / "Tiny.gguf") == d / "mmproj-Tiny-F32.gguf"
    with Engine(d / "Tiny.gguf", EngineOptions(ctx_size=256)) as e:
        assert e.supports_images and e.mmproj == d / "mmproj-Tiny-F32.gguf"
    with Engine(d / "Tiny.gguf", EngineOptions(ctx_size=256, no_mmproj=True)) as e:
        assert not e.supports_images
        with pytest.raises(ImageError, match="no vision projector"):
            e.prompt_tokens([user(png(tmp_path / "x.png", 56, 56))])


# ----------------------------------------------------------------------------- CLI
def test_chat_one_shot_with_images(files, cli_env, tmp_path):
    model = files[0]
    img = png(tmp_path / "x.png", 112, 84)
    uri = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
    args = [str(BIN / "ms4local"), "chat", str(model), "--image", str(img), "--image", uri, "--prompt", "Describe it.",
            "-n", "4", "--temp", "0", "--json", "-c", "512"]
    p = subprocess.run(args, capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert '"prompt_tokens": ' in p.stdout
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args[args.index(str(img))] = str(bad)
    p = subprocess.run(args, capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [f"error: {bad} is not an image in a supported format (PNG, JPEG, WebP, GIF or BMP)"]
    p = subprocess.run(args[:3] + ["--no-mmproj", "--image", str(img), "--prompt", "x"], capture_output=True, text=True,
                       env=cli_env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == ["error: --image needs the vision projector; drop --no-mmproj"]


def test_chat_session_image_command_with_the_real_engine(engine, tmp_path):
    from ms4local.chat_session import ChatSession, Command

    engine.reset()
    s = ChatSession(engine, sampling=lambda effort: GREEDY)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a")
    with pytest.raises(ImageError, match="bad.png"):
        s.execute(Command("image", str(bad)))
    assert s.execute(Command("image", str(png(tmp_path / "cat.png", 112, 84)))).kind == "info"
    encoded = engine.images_encoded
    first = s.send("What is it?")
    list(first)
    assert first.committed and engine.images_encoded == encoded + 1
    second = s.send("And its colour?")
    list(second)
    assert engine.images_encoded == encoded + 1 and second.done.usage.cached_tokens > 14
