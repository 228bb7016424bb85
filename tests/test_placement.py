"""The GGUF header reader and the --fit planner (pure Python; llama.cpp is not involved).

Expected plans are computed here from gguf-py's own reading of the file (GGUFReader), not from
ms4local.placement's reader or classification, so a wrong size or a misfiled tensor shows up.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from gguf import GGUFReader

from helpers.ggufs import write_real_sized_header
from ms4local.errors import ModelLoadError, PlacementError
from ms4local.gguf_model import read_model
from ms4local.placement import (EXPERTS_REGEX, GiB, MiB, Target, compute_allowance, expert_overrides, kv_cache_bytes,
                                order_targets, plan, plan_across)
from quantize import convert

EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")


def reference(path: Path) -> dict:
    """Sizes by category, from gguf-py's reader."""
    r = GGUFReader(path)
    n = int(r.fields["mistral4.block_count"].parts[-1][0])
    kv_lora = int(r.fields["mistral4.attention.kv_lora_rank"].parts[-1][0])
    rope = int(r.fields["mistral4.rope.dimension_count"].parts[-1][0])
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    experts = [[s for name, s in sizes.items() if (m := EXPERT.match(name)) and int(m[1]) == i] for i in range(n)]
    dense = [sum(s for name, s in sizes.items() if name.startswith(f"blk.{i}.") and not EXPERT.match(name))
             for i in range(n)]
    embd = sizes["token_embd.weight"]
    out = sum(s for name, s in sizes.items() if not name.startswith("blk.") and name != "token_embd.weight")
    return dict(n=n, row=kv_lora + rope, sizes=sizes, experts=[sum(e) for e in experts],
                biggest=[max(e) for e in experts], dense=dense, embd=embd, out=out)


def expected_n_cpu_moe(ref: dict, budget: int, n_ctx: int, reserve: int) -> int | None:
    """The fewest blocks whose experts must stay in RAM, with everything else on the GPU."""
    n, kv = ref["n"], n_ctx * ref["row"] * 2  # f16 cache: one latent K row per token and block
    for k in range(n + 1):
        copy = max(ref["biggest"][:k], default=0)  # a CPU expert stack is copied to the GPU for prompts
        need = ref["out"] + sum(ref["dense"]) + n * kv + reserve + copy + sum(ref["experts"][k:])
        if need <= budget:
            return k
    return None


@pytest.fixture(scope="module")
def tiny(ckpt, gguf_file):
    return gguf_file(ckpt(layers=4), "Q8_0")


@pytest.mark.parametrize("out_type", ["F32", "Q8_0"])
def test_header_matches_gguf_reader(ckpt, gguf_file, out_type):
    path = gguf_file(ckpt(), out_type)
    info = read_model(path)
    r = GGUFReader(path)
    assert [(t.name, t.type, t.shape, t.nbytes) for t in info.tensors] == \
        [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in r.tensors]
    assert info.arch == "mistral4" and info.n_layer == 2 and info.is_mla
    assert info.head_k == int(r.fields["mistral4.attention.key_length"].parts[-1][0])
    assert info.head_v == int(r.fields["mistral4.attention.value_length"].parts[-1][0])
    assert info.head_count_kv == 1


def test_header_reads_every_file_of_a_split_set(ckpt, tmp_path):
    whole = read_model(convert(ckpt(), out=tmp_path / "whole.gguf", out_type="F16").output)
    result = convert(ckpt(), out=tmp_path / "split.gguf", out_type="F16", split_max_tensors=8)
    assert len(result.files) > 2
    parts = read_model(result.files[0])
    assert sorted((t.name, t.nbytes) for t in parts.tensors) == sorted((t.name, t.nbytes) for t in whole.tensors)
    result.files[-1].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        read_model(result.files[0])


def test_header_errors_are_typed(tmp_path, gguf_file, ckpt):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_model(bad)
    data = Path(gguf_file(ckpt(), "F32")).read_bytes()
    for cut in (12, 300, 5000):  # inside the counts, the keys, the token array
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated"):
            read_model(bad)


@pytest.fixture(scope="module")
def real_sized(tmp_path_factory):
    return write_real_sized_header(
        tmp_path_factory.mktemp("real") / "Mistral-Small-4-119B-Q4_K_M.gguf",
        {"attention.kv_lora_rank": 256, "rope.dimension_count": 64, "attention.head_count": 32,
         "attention.head_count_kv": 1, "attention.key_length": 320, "attention.value_length": 256})[0]


@pytest.fixture(scope="module")
def real_ref(real_sized):
    return reference(real_sized)  # GGUFReader decodes the 131072 tokens: seconds, so once


def test_header_of_a_67_gb_file_is_read(real_sized, real_ref):
    """The data is a hole: the header is all there is to read (speed is `make bench`'s business)."""
    assert real_sized.stat().st_size > 60e9
    info = read_model(real_sized)
    assert info.n_layer == 36 and info.head_k == 320 and info.head_v == 256
    assert info.nbytes == sum(real_ref["sizes"].values())
    assert 60e9 < info.nbytes < 75e9  # the published Q4_K_M is 67.21 GB


def test_real_model_on_a_24_gib_gpu(real_sized, real_ref):
    ref = real_ref
    budget, n_ctx, reserve = 23 * GiB, 32768, 2 * GiB
    p = plan(read_model(real_sized), budget=budget, n_ctx=n_ctx, reserve=reserve, device="CUDA0")
    assert p.n_gpu_layers == 37 and p.n_cpu_moe == expected_n_cpu_moe(ref, budget, n_ctx, reserve)
    assert 20 <= p.n_cpu_moe <= 32  # ~1.9 GB of experts per block: a handful of blocks fit next to the rest
    assert p.kv_bytes == 32768 * 320 * 2 * 36
    assert p.fits and p.gpu_bytes <= budget
    assert p.cpu_bytes == ref["embd"] + sum(ref["experts"][:p.n_cpu_moe])
    # A bigger card holds more experts; a huge one holds all.
    assert plan(read_model(real_sized), budget=47 * GiB, n_ctx=n_ctx, reserve=reserve).n_cpu_moe < p.n_cpu_moe
    assert plan(read_model(real_sized), budget=80 * GiB, n_ctx=n_ctx, reserve=reserve).n_cpu_moe == 0


def test_plan_boundaries_on_a_tiny_model(tiny):
    ref = reference(tiny)
    info = read_model(tiny)
    n, n_ctx, reserve = ref["n"], 256, 1000
    kv = n_ctx * ref["row"] * 2

    def need(k):
        return ref["out"] + sum(ref["dense"]) + n * kv + reserve + max(ref["biggest"][:k], default=0) + sum(ref["experts"][k:])

    for k in range(n + 1):
        for budget in (need(k), need(k) - 1):
            p = plan(info, budget=budget, n_ctx=n_ctx, reserve=reserve)
            if budget < need(n):
                continue
            assert p.n_cpu_moe == expected_n_cpu_moe(ref, budget, n_ctx, reserve)
            assert p.n_gpu_layers == n + 1 and p.gpu_bytes == need(p.n_cpu_moe) and p.fits
        # The exact budget of k blocks' experts in RAM is the plan for k; one byte less needs more.
        assert plan(info, budget=need(k), n_ctx=n_ctx, reserve=reserve).n_cpu_moe <= k
        if k < n:
            assert plan(info, budget=need(k) - 1, n_ctx=n_ctx, reserve=reserve).n_cpu_moe > k


def test_plan_accounts_for_every_byte(tiny):
    ref = reference(tiny)
    info = read_model(tiny)
    for budget in (0, 10**4, 10**5, 10**6, 10**9):
        p = plan(info, budget=budget, n_ctx=128, reserve=5000)
        assert p.gpu_bytes + p.cpu_bytes == sum(ref["sizes"].values()) + kv_cache_bytes(info, 128) + p.compute_bytes
        assert p.fits
        assert any(r.what.startswith("token embeddings") and r.device == "CPU" for r in p.rows)


def test_plan_shrinks_layers_when_even_attention_does_not_fit(tiny):
    ref = reference(tiny)
    info = read_model(tiny)
    n, n_ctx, reserve = ref["n"], 256, 1000
    kv = n_ctx * ref["row"] * 2
    biggest = max(ref["biggest"])
    all_dense = ref["out"] + sum(ref["dense"]) + n * kv + reserve + biggest
    p = plan(info, budget=all_dense - 1, n_ctx=n_ctx, reserve=reserve)
    # llama.cpp offloads the output layer first, then blocks from the last one down.
    two_blocks = ref["out"] + ref["dense"][-1] + ref["dense"][-2] + 2 * kv + reserve + biggest
    assert (p.n_gpu_layers, p.n_cpu_moe) == (n, n)
    assert plan(info, budget=two_blocks, n_ctx=n_ctx, reserve=reserve).n_gpu_layers == 3
    assert plan(info, budget=two_blocks - 1, n_ctx=n_ctx, reserve=reserve).n_gpu_layers == 2
    nothing = plan(info, budget=0, n_ctx=n_ctx, reserve=reserve)
    assert nothing.n_gpu_layers == 0 and nothing.gpu_bytes == 0


def test_overrides_name_exactly_the_experts_left_in_ram(ckpt, gguf_file):
    path = gguf_file(ckpt(layers=12), "F16")
    names = [t.name for t in GGUFReader(path).tensors]
    for k in (1, 2, 11):
        (rule,) = expert_overrides(k, 12)
        pattern, buft = rule.rsplit("=", 1)
        hit = {name for name in names if re.search(pattern, name)}
        assert buft == "CPU"
        assert hit == {name for name in names if (m := EXPERT.match(name)) and int(m[1]) < k}
    assert expert_overrides(12, 12) == [EXPERTS_REGEX + "=CPU"] and expert_overrides(0, 12) == []
    shared = [name for name in names if "_shexp" in name]
    assert shared and not any(re.search(EXPERTS_REGEX, name) for name in shared)


def test_kv_cache_and_compute_estimates(tiny):
    info = read_model(tiny)
    row = reference(tiny)["row"]
    # llama.cpp allocates cells in multiples of 256: -c 1000 holds 1024 (test_offload checks its log).
    assert kv_cache_bytes(info, 1000) == kv_cache_bytes(info, 1024) == 1024 * row * 2 * info.n_layer
    assert kv_cache_bytes(info, 1025) == 1280 * row * 2 * info.n_layer
    assert kv_cache_bytes(info, 1024, "q8_0", "q8_0") == 1024 * (row // 32 * 34) * info.n_layer
    heads = 2
    assert compute_allowance(info, n_ctx=4096, n_ubatch=512, flash_attn="on") == 512 * MiB
    assert compute_allowance(info, n_ctx=4096, n_ubatch=512, flash_attn="off") == 512 * MiB + heads * 4096 * 512 * 4


# ----------------------------------------------------------------------------- across hosts (--rpc --fit)
def where(rules: list[str], names: list[str], main: str) -> dict[str, str]:
    """Each routed expert tensor's device as llama.cpp reads -ot rules (the first regex_search match
    wins; no match: its block's device, the main one here)."""
    out = {}
    for name in names:
        if not EXPERT.match(name):
            continue
        hit = next((rule.rsplit("=", 1)[1] for rule in rules if re.search(rule.rsplit("=", 1)[0], name)), None)
        out[name] = hit or main
    return out


def test_plan_across_hosts_spreads_experts_from_the_last_block_down(tiny):
    """Main: the dense part of every block and what experts it holds; then each other device takes
    whole blocks' experts from the highest block left; the rest stays in RAM."""
    ref = reference(tiny)
    info = read_model(tiny)
    n, n_ctx, reserve, ub = ref["n"], 256, 1000, 1
    kv = n_ctx * ref["row"] * 2
    names = list(ref["sizes"])
    dense_all = ref["out"] + sum(ref["dense"]) + n * kv + reserve
    side = ub * MiB  # each other device's compute allowance
    e = ref["experts"]
    assert all(e) and len(set(e)) == 1  # every block of the tiny model has the same expert stack
    # The main device holds the dense part and block 3's experts; RPC-A holds two blocks, RPC-B one.
    main = Target("CUDA0", "local", 10 * GiB, dense_all + max(ref["biggest"][:3]) + e[3])
    a = Target("RPC0[10.0.0.2:50052]", "10.0.0.2:50052", 5 * GiB, side + e[2] + e[1] + e[0] // 2)
    b = Target("RPC0[10.0.0.3:50052]", "10.0.0.3:50052", 5 * GiB, side + e[0])
    p = plan_across(info, [main, a, b], n_ctx=n_ctx, reserve=reserve, n_ubatch=ub, ram=GiB)
    assert p.n_gpu_layers == n + 1 and p.main.n_cpu_moe == 3
    assert p.experts == ((3,), (1, 2), (0,)) and p.cpu_experts == ()
    expect = {name: {3: "CUDA0", 2: a.device, 1: a.device, 0: b.device}[int(EXPERT.match(name)[1])]
              for name in names if EXPERT.match(name)}
    assert where(p.overrides, names, "CUDA0") == expect
    assert p.split(["RPC0[10.0.0.2:50052]", "RPC0[10.0.0.3:50052]", "CUDA0"]) == [0.0, 0.0, 1.0]
    assert p.device_bytes(a.device) == e[1] + e[2] + side and p.device_bytes(b.device) == e[0] + side
    assert p.cpu_bytes == ref["embd"]
    # One byte less on B: block 0's experts stay in RAM, named by block (block 3's stay on the main).
    p = plan_across(info, [main, a, replace(b, budget=b.budget - 1)], n_ctx=n_ctx, reserve=reserve, n_ubatch=ub)
    assert p.experts == ((3,), (1, 2), ()) and p.cpu_experts == (0,)
    expect = {**expect, **{name: "CPU" for name in expect if int(EXPERT.match(name)[1]) == 0}}
    assert where(p.overrides, names, "CUDA0") == expect
    assert p.cpu_bytes == ref["embd"] + e[0]
    assert sum(r.nbytes for r in p.rows) == sum(ref["sizes"].values()) + n * kv + reserve + max(ref["biggest"][:3]) + side


def test_plan_across_hosts_with_a_main_device_too_small_for_anything(tiny):
    """Nothing fits the main device: every block stays on the CPU (-ngl 0) and the experts still go
    to the device that has room; one general rule names them all."""
    ref = reference(tiny)
    info = read_model(tiny)
    names = list(ref["sizes"])
    other = Target("RPC0[127.0.0.1:2]", "127.0.0.1:2", GiB, GiB)
    p = plan_across(info, [Target("RPC0[127.0.0.1:1]", "127.0.0.1:1", 0, 0), other], n_ctx=256, reserve=1000,
                    n_ubatch=1)
    assert p.n_gpu_layers == 0 and p.experts[1] == tuple(range(ref["n"]))
    assert p.overrides == [EXPERTS_REGEX + "=" + other.device]
    assert set(where(p.overrides, names, "-").values()) == {other.device}


def test_plan_across_hosts_that_do_not_fit_is_one_line_with_the_sizes(tiny):
    ref = reference(tiny)
    info = read_model(tiny)
    main = Target("CUDA0", "local", 0, 0)
    with pytest.raises(PlacementError) as err:
        plan_across(info, [main], n_ctx=256, reserve=1000, ram=10_000)
    msg = str(err.value)
    assert "\n" not in msg
    total = sum(ref["sizes"].values()) + ref["n"] * 256 * ref["row"] * 2
    assert msg.startswith(f"{tiny.name} does not fit: {total / MiB:.1f} MiB to place, CUDA0 0.0 MiB of 0.0 MiB, "
                          f"and the {total / MiB:.1f} MiB left for the CPU exceed its 0.0 MiB of free RAM")
    plan_across(info, [main], n_ctx=256, reserve=1000, ram=total)  # exactly enough RAM: fits


def test_the_main_device_is_a_local_gpu_else_the_first_rpc_server():
    remote = [("RPC0[10.0.0.2:50052]", "10.0.0.2:50052", 8 * GiB), ("RPC0[10.0.0.3:50052]", "10.0.0.3:50052", 16 * GiB)]
    t = order_targets([("CUDA0", 4 * GiB), ("CUDA1", 2 * GiB)], remote, vram=6 * GiB, headroom=GiB)
    assert [(x.device, x.host) for x in t] == [("CUDA0", "local"), ("CUDA1", "local"),
                                               ("RPC0[10.0.0.2:50052]", "10.0.0.2:50052"),
                                               ("RPC0[10.0.0.3:50052]", "10.0.0.3:50052")]
    assert [x.budget for x in t] == [5 * GiB, 1 * GiB, 7 * GiB, 15 * GiB]  # --vram is the main device's only
    t = order_targets([], remote, headroom=GiB)
    assert t[0].device == "RPC0[10.0.0.2:50052]" and [x.budget for x in t] == [7 * GiB, 15 * GiB]
    assert order_targets([], [("RPC0[a:1]", "a:1", GiB // 2)], headroom=GiB)[0].budget == 0
