"""Placement options on the real llama.cpp: tensor overrides, GPU flags, KV cache types, doctor.

Overrides are checked by llama.cpp's own log ("tensor X (… MiB type) buffer type overridden to
BUFT"), against the tensor names gguf-py reads from the file. This build is CPU-only, so the
GPU flags are checked for their notice; the planner itself is in test_placement.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import typer
from gguf import GGUFReader
from typer.testing import CliRunner

from helpers import BIN, ROOT
from ms4local import Engine, EngineOptions, Sampling
from ms4local import engine as eng
from ms4local.engine import core
from ms4local.engine.devices import override_array
from ms4local.cli import options as o
from ms4local.cli.errors import handle_errors
from ms4local.errors import ContextError, OptionsError
from ms4local.placement import kv_cache_bytes

OVERRIDDEN = re.compile(r"tensor (\S+) \(\d+ MiB \w+\) buffer type overridden to (\S+)")
EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")


def load(path, **kw):
    """An engine and the {tensor: buffer type} overrides llama.cpp logged while loading it."""
    mark = eng.log_mark()
    e = Engine(path, EngineOptions(ctx_size=64, **kw))
    log = eng.log_text(mark)
    return e, dict(OVERRIDDEN.findall(log)), log


def names(path):
    return [t.name for t in GGUFReader(path).tensors]


@pytest.fixture(scope="module")
def deep(ckpt, gguf_file):
    """12 blocks, so that a rule for block 1 is seen not to touch blocks 10 and 11."""
    return gguf_file(ckpt(layers=12), "F16")


def test_cpu_moe_overrides_exactly_the_routed_experts(deep):
    e, over, _ = load(deep, cpu_moe=True)
    e.close()
    experts = {n for n in names(deep) if EXPERT.match(n)}
    assert len(experts) == 24 and set(over) == experts
    assert set(over.values()) == {"CPU"}
    assert not any("_shexp" in n for n in over)


def test_n_cpu_moe_keeps_only_the_first_blocks(deep):
    e, over, _ = load(deep, n_cpu_moe=2)
    e.close()
    assert set(over) == {n for n in names(deep) if (m := EXPERT.match(n)) and int(m[1]) < 2}
    assert any(n.startswith("blk.1.") for n in over) and not any(n.startswith("blk.1") and n[5] != "." for n in over)


def test_override_tensor_rules(deep):
    rules = [r"blk\.1\.attn_.*=CPU", r"^output\.weight=cpu"]  # regex_search: unanchored would hit attn_output
    e, over, _ = load(deep, override_tensor=rules)
    e.close()
    assert set(over) == {n for n in names(deep) if n.startswith("blk.1.attn_")} | {"output.weight"}


def test_cpu_override_is_llamas_own_cpu_buffer_type(ckpt, gguf_file):
    """llama.cpp recognises `=CPU` by comparing the pointer with its ggml_backend_cpu_buffer_type()
    and then picks the best CPU buffer (CPU_REPACK for Q4_0 on x86/ARM). A pointer from a second
    copy of libggml-base would be taken literally and logged as plain "CPU"."""
    path = gguf_file(ckpt(), "Q4_0")
    plain, _, log = load(path)
    plain.close()
    repack = "CPU_REPACK model buffer size" in log  # this CPU repacks Q4_0 weights by default
    e, over, _ = load(path, cpu_moe=True)
    e.close()
    assert over and set(over.values()) == {"CPU_REPACK" if repack else "CPU"}
    maps = Path("/proc/self/maps")
    if maps.exists():  # one libggml-base mapped, the one libllama was linked against
        assert len(set(re.findall(r"\S*libggml-base\S*", maps.read_text()))) == 1


def test_gpu_flags_without_a_gpu_are_a_notice_not_silence(ckpt, gguf_file):
    path = gguf_file(ckpt(), "Q8_0")
    assert not eng.gpu_devices()  # this machine's build; the assertions below are for CPU-only
    prompt = list(range(100, 116))
    with Engine(path, EngineOptions(ctx_size=64)) as plain:
        want = plain.logits(prompt)
    e, over, _ = load(path, n_gpu_layers=99, override_tensor=[r"attn_q_a\.=CUDA0"])
    with e:
        assert len(e.notices) == 2 and all("\n" not in n for n in e.notices)
        assert "no GPU backend" in e.notices[0] and "-ngl" in e.notices[0]
        assert "CUDA0" in e.notices[1] and "ignored" in e.notices[1]
        assert not over
        assert (e.logits(prompt) == want).all()  # nothing changed but the notice
    e, _, _ = load(path, fit=True, vram=24 * 2**30)
    with e:
        assert e.placement.plan is not None and not e.placement.applied
        assert any("not applied" in n for n in e.notices)


def test_bad_override_rules_are_typed_errors():
    for rule, match in (("no-equals-sign", "REGEX=BUFFER_TYPE"), ("(=CPU", "not a valid regex"), ("=CPU", "REGEX=")):
        with pytest.raises(OptionsError, match=match):
            EngineOptions(override_tensor=[rule]).check()
    with pytest.raises(OptionsError, match="no buffer type 'NOPE'.*CPU"):
        override_array(["x=NOPE"])
    with pytest.raises(OptionsError, match="--no-fit"):
        EngineOptions(fit=True, cpu_moe=True).check()


# ----------------------------------------------------------------------------- KV cache types
@pytest.fixture(scope="module")
def mla96(ckpt, gguf_file):
    """K rows of 96 (kv_lora 64 + rope 32) and V rows of 64: whole q8_0/q4_0 blocks."""
    return gguf_file(ckpt(kv_lora=64, rope=32), "F32")


def _llama_accepts(path, type_k, type_v, fa, monkeypatch) -> tuple[bool, str]:
    """What llama.cpp itself says, with ms4local's check taken out of the way."""
    with monkeypatch.context() as m:
        m.setattr(core, "check_cache_types", lambda *a: None)
        try:
            with Engine(path, EngineOptions(ctx_size=64, type_k=type_k, type_v=type_v, flash_attn=fa)) as e:
                list(e.generate(e.tokenize("Bonjour"), Sampling(max_tokens=1, seed=0)))
            return True, ""
        except ContextError as err:
            return False, str(err)


@pytest.mark.parametrize("fa", ["off", "on", "auto"])
def test_cache_type_rules_match_llama_cpp(mla96, fa, monkeypatch):
    info = eng.read_model(mla96)
    for type_k in ("f16", "q8_0", "q4_0"):
        for type_v in ("f16", "q8_0", "q4_0"):
            ok, reason = _llama_accepts(mla96, type_k, type_v, fa, monkeypatch)
            try:
                eng.check_cache_types(info, type_k, type_v, fa)
                ours = True
            except OptionsError:
                ours = False
            assert ours == ok, (type_k, type_v, fa, reason)
            if not ok:
                assert "llama_init_from_model" not in reason and reason  # llama.cpp's reason, prefix stripped


def test_cache_type_errors_come_before_the_load(ckpt, gguf_file, mla96):
    for path, kw, match in (
        (mla96, dict(type_k="q8_0", type_v="f16"), "MLA.*same type"),
        (mla96, dict(type_k="q8_0", type_v="q8_0", flash_attn="off"), "flash attention"),
        (gguf_file(ckpt(), "F32"), dict(type_k="q8_0", type_v="q8_0"), "blocks of 32.*48"),
    ):
        mark = eng.log_mark()
        with pytest.raises(OptionsError, match=match) as err:
            Engine(path, EngineOptions(ctx_size=64, **kw))
        assert "\n" not in str(err.value)
        assert "load_tensors" not in eng.log_text(mark)  # no weights were loaded
    # ... and a quantized cache that can work does.
    with Engine(mla96, EngineOptions(ctx_size=64, type_k="q8_0", type_v="q8_0")) as e:
        assert e.n_ctx >= 64


@pytest.mark.parametrize("cache, n_ctx", [("f16", 64), ("f16", 3000), ("q8_0", 4097)])
def test_kv_cache_size_matches_llama_cpp(mla96, cache, n_ctx):
    mark = eng.log_mark()
    Engine(mla96, EngineOptions(ctx_size=n_ctx, type_k=cache, type_v=cache)).close()
    log = eng.log_text(mark)
    info = eng.read_model(mla96)
    m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB .*K \(\w+\): +([\d.]+) MiB, V \(\w+\): +([\d.]+) MiB", log)
    assert m, log[-2000:]
    expect = kv_cache_bytes(info, n_ctx, cache, cache)
    assert float(m[1]) == pytest.approx(expect / 2**20, abs=0.006)
    assert float(m[3]) == 0.0  # MLA: V lives inside the K rows


# ----------------------------------------------------------------------------- CLI options
def _app():
    app = typer.Typer()
    seen = {}

    @app.command()
    @handle_errors
    def run(ctx_size: o.CtxSize = 4096, threads: o.Threads = None, batch_size: o.BatchSize = 512,
            ubatch_size: o.UbatchSize = 512, flash_attn: o.FlashAttn = "auto", cache_type_k: o.CacheTypeK = "f16",
            cache_type_v: o.CacheTypeV = "f16", n_gpu_layers: o.NGpuLayers = None, cpu_moe: o.CpuMoe = False,
            n_cpu_moe: o.NCpuMoe = 0, override_tensor: o.OverrideTensor = None, fit: o.Fit = None,
            vram: o.Vram = None, max_tokens: o.MaxTokens = 16) -> None:
        seen["opts"] = o.engine_options(
            ctx_size=ctx_size, threads=threads, batch_size=batch_size, ubatch_size=ubatch_size, flash_attn=flash_attn,
            cache_type_k=cache_type_k, cache_type_v=cache_type_v, n_gpu_layers=n_gpu_layers, cpu_moe=cpu_moe,
            n_cpu_moe=n_cpu_moe, override_tensor=override_tensor, fit=fit, vram=vram)

    @app.command()
    def other() -> None:
        pass

    return app, seen


def test_engine_flags_parse_with_llama_cpp_names():
    app, seen = _app()
    r = CliRunner().invoke(app, ["run", "-c", "8192", "-t", "3", "-b", "1024", "-ub", "256", "-fa", "on",
                                 "-ctk", "q8_0", "-ctv", "q8_0", "-ngl", "all", "-n", "5", "--n-cpu-moe", "4",
                                 "-ot", r"blk\.0\.=CPU", "-ot", "output=CUDA0", "--no-fit", "--vram", "24GiB"])
    assert r.exit_code == 0, r.output
    assert seen["opts"] == EngineOptions(ctx_size=8192, threads=3, batch_size=1024, ubatch_size=256, flash_attn="on",
                                         type_k="q8_0", type_v="q8_0", n_gpu_layers=-1, n_cpu_moe=4,
                                         override_tensor=[r"blk\.0\.=CPU", "output=CUDA0"], fit=False, vram=24 * 2**30)
    r = CliRunner().invoke(app, ["run"])
    assert seen["opts"] == EngineOptions() and seen["opts"].ctx_size == 4096
    r = CliRunner().invoke(app, ["run", "-ngl", "12", "--fit", "--cpu-moe"])
    assert r.exit_code == 2  # a usage error, as click exits for a bad flag


@pytest.mark.parametrize("args, message", [
    (["-ngl", "lots"], "-ngl/--n-gpu-layers must be a number of layers or 'all'"),
    (["-fa", "maybe"], "-fa/--flash-attn must be on, off or auto"),
    (["-ctk", "q9_0"], "-ctk/--cache-type-k must be one of"),
    (["--vram", "24XB"], "cannot read size '24XB'"),
    (["-ot", "CPU"], "REGEX=BUFFER_TYPE"),
    (["--fit", "--n-cpu-moe", "3"], "--no-fit"),
    (["-c", "0"], "-c/--ctx-size must be at least 1"),
])
def test_bad_engine_flags_are_one_line(args, message):
    app, _ = _app()
    r = CliRunner().invoke(app, ["run", *args])
    assert r.exit_code == 2
    err = r.stderr
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_resolve_placement_tells_the_user(ckpt, gguf_file, capsys):
    path = str(gguf_file(ckpt(), "Q8_0"))
    p = o.resolve_placement(path, o.engine_options(fit=True, vram="8G"))
    err = capsys.readouterr().err
    assert "note: this llama.cpp build has no GPU backend" in err
    assert "--fit placement for GPU" in err and "routed experts" in err and "not applied" in err
    with Engine(path, EngineOptions(fit=True, vram=8 * 10**9), placement=p) as e:
        assert e.placement is p


# ----------------------------------------------------------------------------- doctor, make
def test_doctor_reports_backends_devices_and_mistral4(cli_env):
    p = subprocess.run([str(BIN / "ms4local"), "doctor", "--json"], capture_output=True, text=True, env=cli_env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"name": "CPU", "devices": 1} in r["backends"]
    assert r["devices"][0]["name"] == "CPU" and r["devices"][0]["total"] > 0
    assert r["gpu_offload"] == any(d["kind"] in ("GPU", "iGPU") for d in r["devices"])
    assert r["mistral4"]["ok"] is True and "mistral4" in r["mistral4"]["detail"]
    pin = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert r["llama_cpp_python"] == pin and r["system_info"].startswith("CPU :")
    assert 0 < r["ram"]["available"] <= r["ram"]["total"]
    text = subprocess.run([str(BIN / "ms4local"), "doctor"], capture_output=True, text=True, env=cli_env, timeout=300)
    assert text.returncode == 0 and "mistral4" in text.stdout and "yes" in text.stdout


def test_make_gpu_targets_rebuild_the_pinned_llama_cpp_python():
    pin = re.search(r'"(llama-cpp-python==[^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    cuda = subprocess.run(["make", "-n", "install-cuda", "CUDA_ARCH=86;89"], cwd=ROOT, capture_output=True, text=True)
    assert cuda.returncode == 0, cuda.stderr
    # Every build keeps llama.cpp's RPC backend (tests/test_rpc.py checks the RPC side of the Makefile).
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=86;89"' in cuda.stdout
    assert f"pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python --no-deps '{pin}'" in cuda.stdout
    plain = subprocess.run(["make", "-n", "install-cuda"], cwd=ROOT, capture_output=True, text=True)
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on"' in plain.stdout and "ARCHITECTURES" not in plain.stdout
    metal = subprocess.run(["make", "-n", "install-metal"], cwd=ROOT, capture_output=True, text=True)
    assert 'CMAKE_ARGS="-DGGML_METAL=on -DGGML_RPC=on"' in metal.stdout and pin in metal.stdout
