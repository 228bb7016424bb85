"""Hub names → files in the Hugging Face cache: the name rules, then `pull`, `resolve`, `list` and `rm`
against a loopback stand-in for the Hub (tests/helpers/hub_stub.py). Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.hub_stub import StubHub, loopback_only
from ms4local import hub
from ms4local.errors import (DiskSpaceError, HubAccessError, HubNameError, HubNetworkError, HubNotFoundError,
                             HubOfflineError)
from ms4local.hub import HubName, HubSettings, parse_name, select
from ms4local.engine import Engine, EngineOptions
from ms4local.hub.inventory import inventory
from quantize.synth import TinySpec

MiB = 2**20
REPO = "someone/Mistral-Small-4-119B-2603-GGUF"
MS4LOCAL = Path(sys.executable).parent / "ms4local"  # the venv's console script


def blob(n: int, seed: int) -> bytes:
    """n pseudo-random bytes (fast, reproducible): stand-in GGUF content where the bytes do not matter."""
    out, block = bytearray(), hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


# ------------------------------------------------------------------------------------------ names
def test_parse_name():
    assert parse_name("org/repo") == HubName("org/repo")
    assert parse_name("org/repo:Q4_K_M") == HubName("org/repo", "Q4_K_M")
    assert parse_name("unsloth/Mistral-Small-4-119B-2603-GGUF:UD-Q4_K_XL") == \
        HubName("unsloth/Mistral-Small-4-119B-2603-GGUF", "UD-Q4_K_XL")
    for path in ("model.gguf", "models/x.gguf", "/abs/path", "./a/b", "a/b/c", "a", "org/repo:", "ckpt/config.json"):
        assert parse_name(path) is None, path
    with pytest.raises(HubNameError, match="org/repo:QUANT"):
        hub.require_name("models/x.gguf")


def test_paths_are_not_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo").write_bytes(b"")
    assert hub.hub_name("org/repo") is None  # an existing file
    assert hub.hub_name("models/typo") is None  # its folder exists: a mistyped path, not a repo
    assert hub.hub_name("someone/Model-GGUF:Q4_K_M") == HubName("someone/Model-GGUF", "Q4_K_M")


FILES = ["README.md", "Mistral-Q4_K_M.gguf", "Mistral-q8_0.gguf", "Mistral-UD-Q4_K_XL.gguf",
         "BF16/Mistral-BF16-00001-of-00003.gguf", "BF16/Mistral-BF16-00002-of-00003.gguf",
         "BF16/Mistral-BF16-00003-of-00003.gguf", "mmproj-Q8_0.gguf", "mmproj-BF16.gguf", "mmproj-F32.gguf",
         "imatrix.gguf", "Mistral-Q4_K_M.imatrix.dat"]


def test_select_quant_rules():
    # Default Q4_K_M, the exact tag over UD-…; F16 absent → BF16 projector.
    s = select(FILES, HubName("o/r"))
    assert s.files == ("Mistral-Q4_K_M.gguf",) and s.mmproj == "mmproj-BF16.gguf" and s.name.quant == "Q4_K_M"
    assert s.paths == ("mmproj-BF16.gguf", "Mistral-Q4_K_M.gguf")  # projector first
    # Case-insensitive, in file names and folder names; a split set is all its parts.
    assert select(FILES, HubName("o/r", "Q8_0")).files == ("Mistral-q8_0.gguf",)
    assert select(FILES, HubName("o/r", "bf16")).files == tuple(f"BF16/Mistral-BF16-0000{i}-of-00003.gguf"
                                                               for i in (1, 2, 3))
    assert select(FILES, HubName("o/r", "ud-q4_k_xl")).files == ("Mistral-UD-Q4_K_XL.gguf",)
    assert select(FILES, HubName("o/r", "Q8_0"), mmproj=False).mmproj is None
    # A quant is a whole piece of the name: Q4_K does not match Q4_K_M.
    with pytest.raises(HubNotFoundError, match=r"no Q4_K GGUF; its quants: BF16, Q4_K_M, Q4_K_XL, Q8_0"):
        select(FILES, HubName("o/r", "Q4_K"))
    with pytest.raises(HubNotFoundError, match=r"no Q4_K_M GGUF \(the default\).*Q8_0 .*ms4local pull o/r:Q8_0"):
        select(["m-Q8_0.gguf", "mmproj-F16.gguf"], HubName("o/r"))


def test_select_projector_near_the_model():
    files = ["Q4_K_M/m-Q4_K_M.gguf", "Q4_K_M/mmproj-Q8_0.gguf", "Q8_0/mmproj-F16.gguf", "mmproj-F16.gguf"]
    assert select(files, HubName("o/r", "Q4_K_M")).mmproj == "Q4_K_M/mmproj-Q8_0.gguf"  # same folder wins
    assert select(files[:1] + files[2:], HubName("o/r", "Q4_K_M")).mmproj == "mmproj-F16.gguf"  # not Q8_0/


def test_select_checkpoint_skips_consolidated():
    files = ["config.json", "params.json", "consolidated.safetensors", "consolidated-00001-of-00002.safetensors",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tekken.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
             "processor_config.json", "README.md", "original/model.safetensors"]
    s = select(files, HubName("mistralai/Mistral-Small-4-119B-2603"))
    assert s.kind == "checkpoint" and s.mmproj is None
    assert s.files == ("config.json", "chat_template.jinja", "model.safetensors.index.json", "processor_config.json",
                       "tokenizer.json", "tokenizer_config.json",
                       "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    with pytest.raises(HubNotFoundError, match="safetensors checkpoint.*ms4local quantize mistralai/M.* --type Q4_K_M"):
        select(files, HubName("mistralai/M", "q4_k_m"))


# ------------------------------------------------------------------------------------------ the stub Hub
@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private HF cache, ms4local cache and models dir; no token, no xet, loopback only."""
    values = {"HF_HOME": tmp_path / "hf", "HF_HUB_CACHE": tmp_path / "hf" / "hub", "XDG_CACHE_HOME": tmp_path / "xdg",
              "MS4LOCAL_MODELS": tmp_path / "models", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_COLOR": "1", "COLUMNS": "200", "TERM": "dumb"}
    for k, v in values.items():
        monkeypatch.setenv(k, str(v))
    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "MS4LOCAL_DEBUG", "HF_HUB_ENABLE_HF_TRANSFER", "MS4LOCAL_CACHE"):
        monkeypatch.delenv(k, raising=False)
    loopback_only(monkeypatch)
    return tmp_path


@pytest.fixture
def stub(env):
    with StubHub() as s:
        yield s


def settings(stub: StubHub, env: Path, **kw) -> HubSettings:
    return HubSettings(endpoint=stub.url, cache_dir=env / "hf" / "hub", listings_dir=env / "xdg" / "ms4local" / "hub",
                       **kw)


def gguf_repo(stub: StubHub, repo: str = REPO, **kw):
    files = {"README.md": b"# card\n", "Mistral-Small-4-Q4_K_M.gguf": blob(300_000, 1),
             "Mistral-Small-4-Q8_0.gguf": blob(500_000, 2), "mmproj-F16.gguf": blob(40_000, 3),
             "mmproj-F32.gguf": blob(80_000, 4),
             **{f"Q6_K/Mistral-Small-4-Q6_K-0000{i}-of-00003.gguf": blob(100_000 + i, 10 + i) for i in (1, 2, 3)}}
    return stub.add(repo, files, **kw)


def test_pull_single_file_with_projector(stub, env):
    repo = gguf_repo(stub)
    plans, seen = [], []
    r = hub.pull(HubName(REPO), hub=settings(stub, env), on_plan=plans.append,
                 progress=lambda done, total, f: seen.append((done, total)))
    assert r.model.name == "Mistral-Small-4-Q4_K_M.gguf" and r.mmproj.name == "mmproj-F16.gguf"
    assert r.model.read_bytes() == repo.files["Mistral-Small-4-Q4_K_M.gguf"]
    assert r.mmproj.read_bytes() == repo.files["mmproj-F16.gguf"]
    assert str(r.model).startswith(str(env / "hf" / "hub" / "models--someone--Mistral-Small-4-119B-2603-GGUF"))
    # The plan came first, with sizes; the progress ended at the total; only the asked files were requested.
    (plan,) = plans
    assert [f.path for f in plan.files] == ["mmproj-F16.gguf", "Mistral-Small-4-Q4_K_M.gguf"]
    assert plan.total == plan.to_fetch == 340_000 and seen[-1] == (340_000, 340_000)
    assert stub.gets() == ["mmproj-F16.gguf", "Mistral-Small-4-Q4_K_M.gguf"]
    assert set(stub.file_requests()) == {"mmproj-F16.gguf", "Mistral-Small-4-Q4_K_M.gguf"}


def test_pull_split_set_in_folder_case_insensitive(stub, env):
    repo = gguf_repo(stub)
    r = hub.pull(HubName(REPO, "q6_k"), mmproj=False, hub=settings(stub, env))
    parts = [f"Q6_K/Mistral-Small-4-Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert stub.gets() == parts and r.mmproj is None
    assert [p.name for p in r.files] == [p.rsplit("/", 1)[1] for p in parts]
    assert all(p.read_bytes() == repo.files[q] for p, q in zip(r.files, parts))
    assert r.model == r.files[0] and r.model.parent.name == "Q6_K"


def test_missing_quant_lists_the_repo_quants(stub, env):
    gguf_repo(stub)
    with pytest.raises(HubNotFoundError, match=r"has no Q5_K_M GGUF; its quants: Q4_K_M, Q6_K, Q8_0"):
        hub.pull(HubName(REPO, "Q5_K_M"), hub=settings(stub, env))
    assert stub.file_requests() == []


def test_dropped_connection_resumes_byte_identical(stub, env):
    # huggingface_hub writes in 10 MiB chunks: cut after 11 MiB so that a resume from 10 MiB shows.
    data = blob(12 * MiB, 7)
    stub.add(REPO, {"Mistral-Small-4-Q4_K_M.gguf": data})
    stub.drop_after("Mistral-Small-4-Q4_K_M.gguf", 11 * MiB)
    r = hub.pull(HubName(REPO), hub=settings(stub, env))
    assert r.model.read_bytes() == data
    assert stub.ranges() == [("Mistral-Small-4-Q4_K_M.gguf", f"bytes={10 * MiB}-")]
    assert not list((env / "hf" / "hub").rglob("*.incomplete"))


def test_lost_connection_that_never_comes_back(stub, env, monkeypatch):
    stub.add(REPO, {"Mistral-Small-4-Q4_K_M.gguf": blob(12 * MiB, 8)})
    stub.drop_after("Mistral-Small-4-Q4_K_M.gguf", 1 * MiB, times=99)
    monkeypatch.setattr(hub.remote, "RETRY_WAITS", (0.0, 0.0))
    with pytest.raises(HubNetworkError, match="kept failing.*run the same command again to resume"):
        hub.pull(HubName(REPO), hub=settings(stub, env))
    # Nothing under a final name: only huggingface_hub's .incomplete blob, kept for the resume.
    cache = env / "hf" / "hub" / "models--someone--Mistral-Small-4-119B-2603-GGUF"
    assert not list((cache / "snapshots").rglob("*.gguf"))
    assert [p.name.endswith(".incomplete") for p in (cache / "blobs").iterdir()] == [True]


def test_too_little_disk_fails_before_a_byte(stub, env, monkeypatch):
    gguf_repo(stub)
    monkeypatch.setattr(hub.remote, "free_space", lambda path: 100_000)
    with pytest.raises(DiskSpaceError) as e:
        hub.pull(HubName(REPO), hub=settings(stub, env))
    assert str(e.value).startswith(f"{REPO}:Q4_K_M needs 332.0 KiB more in ")
    assert "which has 97.7 KiB free" in str(e.value) and "\n" not in str(e.value)
    assert stub.file_requests() == [] and not (env / "hf" / "hub" / "models--someone--Mistral-Small-4-119B-2603-GGUF"
                                                / "blobs").exists()


def test_access_errors(stub, env, monkeypatch):
    gguf_repo(stub, "org/gated", gated=True, tokens={"good"})
    gguf_repo(stub, "org/private", private=True, tokens={"good"})
    s = settings(stub, env)
    with pytest.raises(HubAccessError, match=r"org/gated is gated \(HTTP 401\).*HF_TOKEN"):
        hub.pull(HubName("org/gated"), hub=s)
    with pytest.raises(HubAccessError, match=r"org/gated is gated \(HTTP 403\)"):
        hub.pull(HubName("org/gated"), hub=settings(stub, env, token="bad"))
    with pytest.raises(HubAccessError, match=r"org/private was not found .*\(HTTP 401\).*private.*HF_TOKEN"):
        hub.pull(HubName("org/private"), hub=s)
    with pytest.raises(HubNotFoundError, match=r"no model repository org/nothing on http://127.0.0.1:\d+ \(HTTP 404\)"):
        hub.pull(HubName("org/nothing"), hub=s)
    monkeypatch.setenv("HF_TOKEN", "good")  # huggingface_hub's own token lookup
    assert hub.pull(HubName("org/gated"), mmproj=False, hub=s).model.name == "Mistral-Small-4-Q4_K_M.gguf"
    assert [e.authorized for e in stub.log][-1] is True


def test_no_network(env):
    with StubHub() as gone:
        url = gone.url  # a loopback port nobody listens on once the stub stops
    s = HubSettings(endpoint=url, cache_dir=env / "hf" / "hub")
    with pytest.raises(HubNetworkError, match=r"cannot reach http://127.0.0.1:\d+ \(Connection refused\)"):
        hub.pull(HubName(REPO), hub=s)


def test_cached_name_resolves_without_the_network(stub, env):
    gguf_repo(stub)
    s = settings(stub, env)
    pulled = hub.pull(HubName(REPO, "Q8_0"), hub=s)
    before = len(stub.log)
    assert hub.resolve(HubName(REPO, "q8_0"), hub=s) == pulled
    assert len(stub.log) == before  # not one request
    offline = settings(stub, env, offline=True)
    assert hub.resolve(HubName(REPO, "Q8_0"), hub=offline) == pulled
    assert hub.pull(HubName(REPO, "Q8_0"), hub=offline) == pulled
    assert len(stub.log) == before


def test_offline_error_for_a_missing_quant(stub, env):
    gguf_repo(stub)
    s = settings(stub, env)
    hub.pull(HubName(REPO, "Q8_0"), hub=s)
    before = len(stub.log)
    with pytest.raises(HubOfflineError) as e:
        hub.resolve(HubName(REPO, "Q4_K_M"), hub=settings(stub, env, offline=True))
    # The size is known from the listing seen when Q8_0 was pulled (the model and its F16 projector).
    assert str(e.value) == (f"{REPO}:Q4_K_M is not in the Hugging Face cache ({env / 'hf' / 'hub'}) and HF_HUB_OFFLINE=1 "
                            f"forbids downloading it; run `ms4local pull {REPO}:Q4_K_M` (332.0 KiB) with the network")
    with pytest.raises(HubOfflineError, match=r"^other/repo:Q4_K_M is not in .* `ms4local pull other/repo:Q4_K_M` with"):
        hub.resolve(HubName("other/repo", "Q4_K_M"), hub=settings(stub, env, offline=True))
    assert len(stub.log) == before


def test_checkpoint_pull_fetches_what_quantize_reads(stub, env):
    files = {"config.json": b"{}", "params.json": b"{ }", "tokenizer.json": b"{\"t\": 1}", "tekken.json": b"{\"t\": 2}",
             "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                        "b": "model-00002-of-00002.safetensors"}}).encode(),
             "model-00001-of-00002.safetensors": blob(1000, 1), "model-00002-of-00002.safetensors": blob(1000, 2),
             "consolidated.safetensors": blob(2000, 3), "README.md": b"x"}
    stub.add("mistralai/Mistral-Small-4-119B-2603", files)
    s = settings(stub, env)
    r = hub.pull(HubName("mistralai/Mistral-Small-4-119B-2603"), hub=s)
    assert r.kind == "checkpoint" and (r.model / "config.json").is_file()
    assert sorted(stub.gets()) == ["config.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert hub.resolve(HubName("mistralai/Mistral-Small-4-119B-2603"), hub=settings(stub, env, offline=True)) == r


def test_inventory_and_remove(stub, env):
    gguf_repo(stub)
    s = settings(stub, env)
    hub.pull(HubName(REPO, "Q8_0"), hub=s)
    hub.pull(HubName(REPO, "Q6_K"), hub=s)
    rows = {e.name: e for e in inventory(hub=s)}
    assert rows[f"{REPO}:Q8_0"].nbytes == 500_000 and rows[f"{REPO}:Q8_0"].projector == "mmproj-F16.gguf"
    assert rows[f"{REPO}:Q6_K"].parts == (3, 3) and rows[f"{REPO}:Q6_K"].complete
    assert hub.remove(HubName(REPO, "q6_k"), hub=s) == 300_006
    rows = {e.name: e for e in inventory(hub=s)}
    assert set(rows) == {f"{REPO}:Q8_0"}
    assert hub.resolve(HubName(REPO, "Q8_0"), hub=settings(stub, env, offline=True)).mmproj.is_file()
    with pytest.raises(HubNotFoundError, match="not in the Hugging Face cache"):
        hub.remove(HubName(REPO, "Q6_K"), hub=s)
    assert hub.remove(HubName(REPO), hub=s) == 540_000
    assert inventory(hub=s) == [] and not (env / "hf" / "hub" / "models--someone--Mistral-Small-4-119B-2603-GGUF").exists()


# ------------------------------------------------------------------------------------------ the commands
def cli(args, env, timeout=120):
    return subprocess.run([str(MS4LOCAL), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def hub_cli_env(stub):
    return dict(os.environ, HF_ENDPOINT=stub.url)


def test_cli_pull_list_rm(stub, env, hub_cli_env):
    gguf_repo(stub)
    p = cli(["pull", f"{REPO}:Q8_0"], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert "mmproj-F16.gguf" in p.stderr and "Mistral-Small-4-Q8_0.gguf" in p.stderr and "to download" in p.stderr
    requests = len(stub.log)
    again = cli(["pull", f"{REPO}:Q8_0"], hub_cli_env)
    assert again.returncode == 0 and "all in the cache" in again.stderr
    assert [e.path.split("/")[2] for e in stub.log[requests:]] == ["models", "models"]  # the listing, no file
    listed = json.loads(cli(["list", "--json"], hub_cli_env).stdout)
    assert [(e["name"], e["quant"], e["bytes"], e["projector"], e["complete"]) for e in listed] == \
        [(f"{REPO}:Q8_0", "Q8_0", 500_000, "mmproj-F16.gguf", True)]
    p = cli(["rm", f"{REPO}:Q8_0"], hub_cli_env)
    assert p.returncode == 0 and "freed" in p.stderr
    assert json.loads(cli(["list", "--json"], hub_cli_env).stdout) == []


def test_cli_errors_are_one_line(stub, env, hub_cli_env):
    gguf_repo(stub, "org/gated", gated=True)
    for args, code, text in ((["pull", "org/gated"], 1, "is gated (HTTP 401)"),
                             (["pull", "org/missing:Q4_K_M"], 1, "no model repository org/missing"),
                             (["pull", "org/gated/x"], 1, "is not a Hugging Face model name")):
        p = cli(args, hub_cli_env)
        assert p.returncode == code and text in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = cli(["pull", f"{REPO}:Q8_0"], dict(hub_cli_env, HF_HUB_OFFLINE="1"))
    assert p.returncode == 1 and p.stderr.strip().endswith(f"run `ms4local pull {REPO}:Q8_0` with the network")
    assert len(p.stderr.strip().splitlines()) == 1 and not any("/resolve/" in e.path for e in stub.log)


def test_interrupted_and_killed_pulls_resume(stub, env, hub_cli_env):
    data = blob(36 * MiB, 9)
    repo = stub.add(REPO, {"Mistral-Small-4-Q4_K_M.gguf": data})
    stub.trickle("Mistral-Small-4-Q4_K_M.gguf", 1 * MiB, 0.15)
    blobs = env / "hf" / "hub" / "models--someone--Mistral-Small-4-119B-2603-GGUF" / "blobs"
    part = blobs / f"{repo.etag('Mistral-Small-4-Q4_K_M.gguf')}.incomplete"

    def stop(sig: int, at_least: int) -> subprocess.Popen:
        """Start `pull`, send `sig` once the .incomplete blob holds `at_least` bytes."""
        # SIGINT at its default, as in a shell's foreground job (a background job inherits it ignored).
        proc = subprocess.Popen([str(MS4LOCAL), "pull", REPO], env=hub_cli_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while not (part.is_file() and part.stat().st_size >= at_least) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        # Nothing under its final name: the blob keeps its .incomplete name, the snapshot has no link.
        assert not list(blobs.parent.joinpath("snapshots").rglob("*.gguf"))
        assert at_least <= part.stat().st_size < len(data)
        return proc

    ctrl_c = stop(signal.SIGINT, 10 * MiB)  # Ctrl-C: one line saying how to resume, exit 130
    assert ctrl_c.returncode == 130 and f"run `ms4local pull {REPO}` to resume" in ctrl_c.stderr.read()
    stop(signal.SIGKILL, 20 * MiB)  # the second run resumed from the first one's bytes
    done = part.stat().st_size
    stub._trickle.clear()
    p = cli(["pull", REPO], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert "resume from" in p.stderr
    r = hub.resolve(HubName(REPO), hub=settings(stub, env, offline=True))
    assert r.model.read_bytes() == data
    assert [rng for _, rng in stub.ranges()] == [f"bytes={10 * MiB}-", f"bytes={done}-"]


def test_loopback_guard(env):
    with pytest.raises(OSError, match="loopback only"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)


# ------------------------------------------------------------------------------------------ names in every command
TINY_REPO = "someone/Tiny-Mistral-Small-4-GGUF"
VIS = TinySpec(vocab=2000, vision_layers=3)


def test_commands_take_hub_names(stub, env, hub_cli_env, ckpt, gguf_file):
    model = gguf_file(ckpt(), "Q8_0")
    stub.add(TINY_REPO, {"Tiny-Q8_0.gguf": model.read_bytes(), "Tiny-F16.gguf": b"not fetched"})
    p = cli(["info", f"{TINY_REPO}:Q8_0", "--json"], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["architecture"] and "Tiny-Q8_0.gguf" in p.stderr and "to download" in p.stderr
    assert stub.gets() == ["Tiny-Q8_0.gguf"]
    before = len(stub.log)
    offline = dict(hub_cli_env, HF_HUB_OFFLINE="1")
    p = cli(["tokenize", f"{TINY_REPO}:q8_0", "[INST]Bonjour[/INST]", "--json"], offline)
    assert p.returncode == 0, p.stderr
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        assert json.loads(p.stdout)["ids"] == e.tokenize("[INST]Bonjour[/INST]", add_special=True)
    p = cli(["chat", f"{TINY_REPO}:Q8_0", "-p", "Hi", "-n", "2", "--seed", "1", "--json"], offline)
    assert p.returncode == 0 and json.loads(p.stdout)["usage"]["completion_tokens"] <= 2, p.stderr
    p = cli(["eval", f"{TINY_REPO}:Q8_0", "-c", "128", "--chunks", "1", "--json"], offline)
    assert p.returncode == 0 and json.loads(p.stdout)["perplexity"] > 0, p.stderr
    assert len(stub.log) == before  # resolved from the cache: not one request
    # A quant the cache lacks, offline: one line that says what to run.
    p = cli(["chat", f"{TINY_REPO}:F16", "-p", "Hi"], offline)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert f"run `ms4local pull {TINY_REPO}:F16` (11 B) with the network" in p.stderr
    # `list` sees the cached quant and a conversion in models/ (arch mistral4 in its header).
    (env / "models").mkdir()
    (env / "models" / "Tiny-Q8_0.gguf").write_bytes(model.read_bytes())
    rows = json.loads(cli(["list", "--json"], offline).stdout)
    assert [(r["name"], r["where"], r["quant"]) for r in rows] == [
        (f"{TINY_REPO}:Q8_0", "hub cache", "Q8_0"), (str(env / "models" / "Tiny-Q8_0.gguf"), "models", "Q8_0")]


def test_projector_from_another_folder_reaches_the_engine(stub, env, hub_cli_env, ckpt, gguf_file, tmp_path):
    from PIL import Image

    model = gguf_file(ckpt(VIS), "Q8_0")
    (mmproj,) = model.parent.glob("mmproj-*.gguf")
    stub.add(TINY_REPO, {"Q8_0/Tiny-Q8_0.gguf": model.read_bytes(), "mmproj-Tiny-F16.gguf": mmproj.read_bytes()})
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    p = cli(["chat", f"{TINY_REPO}:Q8_0", "--image", tmp_path / "red.png", "-p", "What?", "-n", "1", "--json"],
            hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert stub.gets() == ["mmproj-Tiny-F16.gguf", "Q8_0/Tiny-Q8_0.gguf"]


def test_flags_are_checked_before_a_name_is_fetched(stub, env, hub_cli_env, ckpt, gguf_file):
    """A Hub name is resolved after every other flag was parsed: a bad flag costs no request, and
    --no-mmproj (or an --mmproj of one's own) means the repo's projector is never downloaded."""
    model = gguf_file(ckpt(VIS), "Q8_0")
    (mmproj,) = model.parent.glob("mmproj-*.gguf")
    stub.add(TINY_REPO, {"Tiny-Q8_0.gguf": model.read_bytes(), "mmproj-Tiny-F16.gguf": mmproj.read_bytes()})
    for bad in (["chat", f"{TINY_REPO}:Q8_0", "-p", "Hi", "--temp", "warm"],
                ["serve", f"{TINY_REPO}:Q8_0", "--port", "0x"],
                ["info", f"{TINY_REPO}:Q8_0", "--vram", "lots"],
                ["serve", f"{TINY_REPO}:Q8_0", "--max-body-size", "huge"],
                ["quantize", f"{TINY_REPO}:Q8_0", "--type", "Q9_9"]):
        p = cli(bad, hub_cli_env)
        assert p.returncode == 2 and p.stderr.strip(), (bad, p.stderr)
        assert stub.log == [], (bad, stub.log)
    p = cli(["chat", f"{TINY_REPO}:Q8_0", "--no-mmproj", "-p", "Hi", "-n", "1", "--json"], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert stub.gets() == ["Tiny-Q8_0.gguf"] and "mmproj-Tiny-F16.gguf" not in p.stderr
    p = cli(["chat", f"{TINY_REPO}:Q8_0", "--mmproj", mmproj, "-p", "Hi", "-n", "1", "--json"], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert stub.gets() == ["Tiny-Q8_0.gguf"]  # the cached quant, and the user's own projector


def test_quantize_takes_a_checkpoint_repo(stub, env, hub_cli_env, ckpt):
    src = ckpt()
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    files["consolidated.safetensors"] = b"the native-format copy: never fetched"
    stub.add("someone/Tiny-Small-4", files)
    p = cli(["chat", "someone/Tiny-Small-4", "-p", "Hi"], hub_cli_env)
    assert p.returncode == 1 and "is a safetensors checkpoint, not a GGUF" in p.stderr and stub.gets() == []
    p = cli(["quantize", "someone/Tiny-Small-4", "--type", "Q8_0", "--no-report"], hub_cli_env)
    assert p.returncode == 0, p.stderr
    assert (env / "models" / "Tiny-Small-4-Q8_0.gguf").is_file()
    assert "consolidated.safetensors" not in stub.gets() and "config.json" in stub.gets()
