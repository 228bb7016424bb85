"""`ms4local info` (issue #7): the header summary, the histogram, the placement and the speed bound.

Expected numbers come from gguf-py's own reader (GGUFReader) and from the engine's `place`, not
from ms4local.info, so a misfiled tensor, a wrong size or a plan that differs from `chat --vram`
shows up.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import numpy as np
import pytest
from gguf import GGUFReader

from helpers import BIN
from helpers.ggufs import CORRUPT, corrupt_gguf, write_real_sized_header
from ms4local import EngineOptions
from ms4local.engine import place
from ms4local.info import inspect, template_features
from ms4local.gguf_model import read_model
from ms4local.placement import DEFAULT_HEADROOM, GiB, MiB, compute_allowance, kv_cache_bytes
from quantize import convert
from quantize.synth import TinySpec

# ne0 multiples of 256 (real K-quant types, not their fallbacks), a leading dense block, a vision
# tower (so an mmproj is written beside each file), the chat template.
SPEC = TinySpec(layers=3, hidden=256, heads=2, q_lora=256, kv_lora=256, nope=32, rope=32, v_dim=64, experts=8,
                top_k=2, moe_inter=256, inter=512, first_dense=1, vocab=2000, dtype="BF16", chat_template=True,
                vision_layers=1, seed=3)
TYPES = ["F32", "F16", "Q8_0", "Q4_K_M"]


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    src = ckpt(SPEC)
    out = {}
    for t in TYPES:
        d = tmp_path_factory.mktemp(f"info-{t}")
        out[t] = convert(src, out=d / f"Tiny-{t}.gguf", out_type=t).output
    return out


def reader_sizes(path) -> dict[str, tuple[str, int, int]]:
    """name → (ggml type, elements, bytes) as gguf-py reads them."""
    return {t.name: (t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("out_type", TYPES)
def test_histogram_adds_up_to_the_files_tensor_bytes(files, out_type):
    path = files[out_type]
    ref = reader_sizes(path)
    info = inspect(path)
    assert info.file_type == out_type
    assert info.tensor_bytes == sum(b for _, _, b in ref.values())
    assert info.params == sum(n for _, n, _ in ref.values())
    assert info.tensor_bytes < path.stat().st_size  # the rest is the header and alignment
    by_type: dict[str, list[int]] = {}
    for ttype, n, b in ref.values():
        acc = by_type.setdefault(ttype, [0, 0, 0])
        acc[0] += 1
        acc[1] += n
        acc[2] += b
    assert {k: [v.tensors, v.params, v.nbytes] for k, v in info.types.items()} == by_type
    # Classes by name, written out here: each tensor counted once, in the class a user expects.
    expect = {"routed experts": r"_exps\.", "shared experts": r"_shexp\.", "norms/router": r"(_norm|ffn_gate_inp)\.",
              "embeddings/output": r"^(token_embd|output)\.", "dense FFN": r"\.ffn_(gate|up|down)\."}
    attention = sum(b for name, (_, _, b) in ref.items() if ".attn_" in name and not name.endswith("_norm.weight"))
    for cls, pattern in expect.items():
        assert info.classes[cls].nbytes == sum(b for name, (_, _, b) in ref.items() if re.search(pattern, name)), cls
    assert info.classes["attention"].nbytes == attention
    assert sum(c.nbytes for c in info.classes.values()) == info.tensor_bytes
    for c in info.classes.values():
        assert sum(t.nbytes for t in c.types.values()) == c.nbytes
        assert c.bpw == pytest.approx(8 * c.nbytes / c.params)
    if out_type == "Q4_K_M":  # mixed: experts mostly 4-bit, norms stay F32
        assert {"Q4_K", "F32"} <= set(info.types)
        assert info.classes["routed experts"].bpw < 6 and info.classes["norms/router"].types.keys() == {"F32"}


def test_architecture_tokens_template_and_mmproj(files):
    info = inspect(files["Q8_0"])
    a = info.architecture
    assert (a["arch"], a["layers"], a["embedding_length"], a["vocab_size"]) == ("mistral4", 3, 256, 2000)
    assert a["experts"] == {"routed": 8, "active": 2, "shared": 1, "expert_ffn_length": 256, "leading_dense_blocks": 1,
                            "dense_ffn_length": 512, "gating": "softmax", "weights_norm": True}
    att = a["attention"]
    assert (att["q_lora_rank"], att["kv_lora_rank"], att["nope_dim"], att["rope_dim"], att["v_head_dim"]) == (256, 256, 32, 32, 64)
    assert att["cache_k_row"] == 256 + 32 and att["mla"] is True
    assert a["rope"]["scaling"] == "yarn" and a["rope"]["factor"] == 128.0 and a["rope"]["original_context_length"] == 8192
    assert a["context_length"] == SPEC.max_pos
    tok = info.tokenizer
    assert tok["ids"]["bos"] == {"id": 1, "text": "<s>"} and tok["ids"]["eos"] == {"id": 2, "text": "</s>"}
    assert tok["control_tokens"] == 1000
    assert {"[INST]": 3, "[THINK]": 34, "[/THINK]": 35, "[IMG]": 10}.items() <= tok["named_control_tokens"].items()
    assert info.template["reasoning_effort"] and info.template["tools"] and info.template["images"]
    # The projector converted beside it pairs by its projection width; one for another width does not.
    assert info.mmproj is not None and info.mmproj.path.name.startswith("mmproj-") and info.mmproj.projection_dim == 256
    assert info.quant_report is not None and "routed experts" in info.quant_report


def test_mmproj_of_another_width_is_not_paired(ckpt, files, tmp_path):
    other = convert(ckpt(TinySpec(vocab=2000, vision_layers=1)), out=tmp_path / "Other-F16.gguf", out_type="F16")
    assert other.mmproj is not None
    target = tmp_path / "Tiny-Q8_0.gguf"
    target.write_bytes(files["Q8_0"].read_bytes())
    other.output.unlink()
    assert inspect(target).mmproj is None  # the mmproj beside it is 64 wide, the model 256


def test_template_features_read_the_template_text():
    assert template_features(None) == {"present": False, "reasoning_effort": False, "tools": False, "images": False,
                                       "chars": 0}
    plain = "{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}"
    assert template_features(plain) | {"chars": 0} == {"present": True, "reasoning_effort": False, "tools": False,
                                                        "images": False, "chars": 0}
    tools = plain + "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    assert template_features(tools)["tools"] and not template_features(tools)["images"]


def budgets(path, n_ctx: int) -> list[int]:
    """--vram sizes from "nothing fits" to "everything fits", through each expert boundary."""
    m = read_model(path)
    base = DEFAULT_HEADROOM + compute_allowance(m, n_ctx=n_ctx)
    step = (m.nbytes + kv_cache_bytes(m, n_ctx)) // 40
    return [0, DEFAULT_HEADROOM // 2] + [base + k * step for k in range(0, 45)] + [4 * GiB]


@pytest.mark.parametrize("out_type", ["F16", "Q4_K_M"])
def test_placement_is_the_engines_fit_plan(files, out_type):
    path = files[out_type]
    n_ctx = 1024
    seen = set()
    for vram in budgets(path, n_ctx):
        info = inspect(path, vram=vram, n_ctx=n_ctx, cpu_bandwidth=50e9)
        ours = info.fit.plan
        if vram == 0:
            assert ours.n_gpu_layers == 0 and ours.gpu_bytes == 0
            continue
        engine = place(path, EngineOptions(fit=True, vram=vram, ctx_size=n_ctx)).plan
        assert engine is not None
        assert (ours.budget, ours.n_gpu_layers, ours.n_cpu_moe, ours.rows) == \
            (engine.budget, engine.n_gpu_layers, engine.n_cpu_moe, engine.rows), vram
        seen.add((ours.n_gpu_layers, ours.n_cpu_moe))
        gpu, cpu = {d.name: d for d in info.fit.devices}["GPU"], {d.name: d for d in info.fit.devices}["CPU"]
        assert gpu.total == ours.gpu_bytes  # weights + KV + compute, as planned
        assert gpu.weights + cpu.weights == info.tensor_bytes
        assert gpu.kv_cache + cpu.kv_cache == 3 * 1024 * (256 + 32) * 2  # f16 latent rows, every block
    assert len(seen) >= 4, seen  # from nothing on the GPU, through partial expert offload, to everything
    assert (4, 0) in seen and any(k == 3 for _, k in seen)


def test_decode_bound_counts_active_experts_only(files):
    path = files["Q8_0"]
    ref = reader_sizes(path)
    used, total = 2, 8
    per_token = 0
    for name, (_, n, b) in ref.items():
        if "_exps." in name:
            per_token += b * used // total
        elif name == "token_embd.weight":
            per_token += b // 2000
        else:
            per_token += b
    n_ctx, bw = 2048, 10e9
    info = inspect(path, vram=0, n_ctx=n_ctx, cpu_bandwidth=bw)
    (cpu,) = info.fit.devices
    assert cpu.name == "CPU" and cpu.read_per_token == per_token and cpu.bandwidth == bw
    kv = 3 * n_ctx * (256 + 32) * 2
    assert cpu.kv_read_full == kv
    assert info.fit.max_tokens_per_second(False) == pytest.approx(bw / per_token)
    assert info.fit.max_tokens_per_second(True) == pytest.approx(bw / (per_token + kv))
    # Split across devices the times add; without the GPU's bandwidth only the CPU's time counts.
    split = next(i for v in budgets(path, n_ctx)
                 if 0 < (i := inspect(path, vram=v, n_ctx=n_ctx, cpu_bandwidth=bw, gpu_bandwidth=100e9)).fit.plan.n_cpu_moe < 3
                 and i.fit.plan.n_gpu_layers == 4)
    devs = {d.name: d for d in split.fit.devices}
    assert devs["GPU"].read_per_token + devs["CPU"].read_per_token == per_token
    assert devs["GPU"].read_per_token > 0 and devs["CPU"].read_per_token > 0
    assert split.fit.max_tokens_per_second() == pytest.approx(
        1 / (devs["GPU"].read_per_token / 100e9 + devs["CPU"].read_per_token / bw))
    partial = inspect(path, vram=4 * GiB, n_ctx=n_ctx, cpu_bandwidth=bw)
    assert partial.fit.bound_is_partial


def test_cpu_bandwidth_is_measured_when_not_given(files):
    info = inspect(files["Q8_0"], ram=8 * GiB, n_ctx=512)
    (cpu,) = info.fit.devices
    assert cpu.bandwidth_source == "measured" and 0.3e9 < cpu.bandwidth < 2e12
    assert cpu.budget == 8 * GiB and cpu.fits


def run(*args, env):
    return subprocess.run([str(BIN / "ms4local"), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_json_is_valid_and_complete(files, cli_env):
    path = files["Q4_K_M"]
    p = run("info", str(path), "--json", "--vram", "1800M", "-c", "2048", "--bandwidth", "900",
            "--bandwidth", "CPU=40", env=cli_env)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = inspect(path, vram=1_800_000_000, n_ctx=2048, gpu_bandwidth=900e9, cpu_bandwidth=40e9).to_json()
    assert got == json.loads(json.dumps(want))
    assert set(got) == {"path", "files", "file_type", "params", "tensor_bytes", "bpw", "architecture", "tokenizer",
                        "template", "classes", "types", "mmproj", "quant_report", "fit", "repair"}
    assert got["fit"]["placement"]["n_gpu_layers"] == place(path, EngineOptions(fit=True, vram=1_800_000_000,
                                                                                ctx_size=2048)).plan.n_gpu_layers
    assert set(got["fit"]["devices"]) == {"GPU", "CPU"}
    assert got["fit"]["decode_tokens_per_second_max"]["empty_context"] > 0
    assert sum(c["bytes"] for c in got["classes"].values()) == got["tensor_bytes"]
    # Without placement flags there is no fit section and no bandwidth test.
    plain = json.loads(run("info", str(path), "--json", env=cli_env).stdout)
    assert plain["fit"] is None and plain["file_type"] == "Q4_K_M"


def test_cli_text_output_and_errors(files, cli_env, tmp_path):
    p = run("info", str(files["Q8_0"]), "--vram", "2G", "--bandwidth", "CPU=20", env=cli_env)
    assert p.returncode == 0, p.stderr
    for words in ("mistral4", "routed experts", "[THINK]", "reasoning_effort", "--fit placement", "decode speed ≤",
                  "mmproj-"):
        assert words in p.stdout, words
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    p = run("info", str(bad), env=cli_env)
    assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    p = run("info", str(files["Q8_0"]), "--bandwidth", "fast", env=cli_env)
    assert p.returncode == 2 and "--bandwidth" in p.stderr and "Traceback" not in p.stderr


def test_real_sized_header_is_fast_and_experts_dominate(tmp_path):
    """A Mistral Small 4 Q4_K_M header over a 67 GB hole: nothing but the header is read."""
    path, total = write_real_sized_header(
        tmp_path / "Mistral-Small-4-119B-Q4_K_M.gguf",
        {"attention.kv_lora_rank": 256, "rope.dimension_count": 64, "attention.head_count": 32,
         "attention.head_count_kv": 1, "expert_count": 128, "expert_used_count": 4, "expert_shared_count": 1},
        token_types=True)
    t0 = time.perf_counter()
    info = inspect(path, vram=24 * GiB, n_ctx=32768, gpu_bandwidth=936e9, cpu_bandwidth=60e9)
    seconds = time.perf_counter() - t0  # printed, not asserted: timings belong to benchmarks
    assert info.tensor_bytes == total and 60e9 < total < 75e9
    assert info.classes["routed experts"].nbytes / total > 0.9
    assert info.tokenizer["control_tokens"] == 1000
    gpu, cpu = info.fit.devices
    # 4 of 128 experts: a token reads a few GB, not 67.
    assert 2e9 < gpu.read_per_token + cpu.read_per_token < 6e9
    assert info.fit.plan.n_gpu_layers == 37 and 0 < info.fit.plan.n_cpu_moe < 36
    speed = info.fit.max_tokens_per_second()
    assert 10 < speed < 200
    print(f"real-sized Q4_K_M, 24 GiB GPU at 936 GB/s + RAM at 60 GB/s, -c 32768: -ngl {info.fit.plan.n_gpu_layers} "
          f"--n-cpu-moe {info.fit.plan.n_cpu_moe}; reads {gpu.read_per_token / MiB:.0f} MiB (GPU) + "
          f"{cpu.read_per_token / MiB:.0f} MiB (CPU) per token; ≤ {speed:.1f} tok/s; header read in {seconds:.2f} s")


def test_split_sets_are_described_whole(ckpt, files, tmp_path):
    res = convert(ckpt(SPEC), out=tmp_path / "S-Q8_0.gguf", out_type="Q8_0", split_max_tensors=12, mmproj=False)
    assert len(res.files) > 2
    info = inspect(res.files[0])
    assert [p for p, _ in info.files] == res.files
    assert all(n == p.stat().st_size for p, n in info.files)
    whole = inspect(files["Q8_0"])
    assert info.tensor_bytes == whole.tensor_bytes and info.to_json()["classes"] == whole.to_json()["classes"]
    assert info.quant_report is not None  # the sidecar of a split set sits beside its first file


def test_an_mmproj_is_not_a_model(files):
    from ms4local.errors import ModelLoadError

    mmproj = inspect(files["F16"]).mmproj.path
    with pytest.raises(ModelLoadError, match="vision projector"):
        inspect(mmproj)


def test_cli_maps_flags_onto_one_library_call(monkeypatch, files):
    """The command only parses: sizes, GB/s and the engine's n_ubatch = min(-ub, -b) reach `inspect`."""
    from typer.testing import CliRunner

    import ms4local.cli.info as cli_info
    from ms4local.cli.main import app

    calls = []
    monkeypatch.setattr(cli_info, "inspect", lambda path, **kw: calls.append((path, kw)) or inspect(path))
    r = CliRunner().invoke(app, ["info", str(files["Q8_0"]), "--vram", "24GiB", "--ram", "64G", "-c", "8192",
                                 "-ub", "1024", "-b", "256", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on",
                                 "--bandwidth", "GPU=936", "--bandwidth", "CPU=51.2"])
    assert r.exit_code == 0, r.output
    assert calls == [(str(files["Q8_0"]), dict(vram=24 * GiB, ram=64 * 10**9, n_ctx=8192, type_k="q8_0", type_v="q8_0",
                                                n_ubatch=256, flash_attn="on", gpu_bandwidth=936e9,
                                                cpu_bandwidth=51.2e9))]


# --- a truncated or corrupt file is an error, never a description (issue #18) -------------------------

@pytest.mark.parametrize("keep", [0.5, 0.99], ids=["half", "all-but-1%"])
def test_cli_truncated_file_says_truncated(files, cli_env, tmp_path, keep):
    data = files["Q8_0"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    p = run("info", str(cut), env=cli_env)
    assert p.returncode == 1 and p.stdout == "", (p.returncode, p.stdout[-500:])
    line = p.stderr.strip()
    assert line.startswith("error:") and "\n" not in line and "Traceback" not in p.stderr, p.stderr
    assert "cut.gguf" in line and "truncated" in line and "extends past the end" in line, line


def test_cli_corrupt_headers_fail_at_once(files, cli_env, tmp_path):
    """The header faults that send gguf-py into an IndexError or a minutes-long walk: one line, exit 1."""
    good = files["F16"].read_bytes()
    for kind in CORRUPT:
        bad = tmp_path / f"{kind}.gguf"
        bad.write_bytes(corrupt_gguf(kind, good))
        start = time.monotonic()
        p = run("info", str(bad), env=cli_env)
        assert time.monotonic() - start < 60, kind
        assert p.returncode == 1 and p.stderr.startswith("error:") and "Traceback" not in p.stderr, (kind, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, (kind, p.stderr)


@pytest.mark.parametrize("key, value", [("mistral4.block_count", "abc"), ("mistral4.attention.head_count", 2.5),
                                        ("general.file_type", "Q4"), ("tokenizer.chat_template", 7),
                                        ("mistral4.expert_gating_func", [1, 2])])
def test_cli_metadata_of_the_wrong_type(cli_env, tmp_path, key, value):
    """A count that is a string, a float or a list: one line and exit 1, not a ValueError from the planner."""
    from gguf import GGUFWriter

    path = tmp_path / "weird.gguf"
    w = GGUFWriter(str(path), "mistral4")
    {str: w.add_string, float: w.add_float32, int: w.add_uint32, list: w.add_array}[type(value)](key, value)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for extra in ([], ["--vram", "1G", "--bandwidth", "CPU=20"]):
        p = run("info", str(path), *extra, env=cli_env)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-1500:]
        assert p.stderr.startswith("error:") and key in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
