"""The `ms4local` command, run as a user runs it (subprocess, real files)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import BIN
from ms4local import Engine, EngineOptions


def run(args, env, check=True):
    p = subprocess.run([str(BIN / "ms4local"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_quantize_dry_run_prints_plan(ckpt, cli_env, tmp_path):
    p = run(["quantize", ckpt(), "--type", "Q8_0", "--dry-run"], cli_env)
    assert "blk.0.attn_k_b.weight" in p.stdout and "Q8_0" in p.stdout and "bits per weight" in p.stdout
    assert not (tmp_path / "models").exists()


def test_quantize_writes_default_name(ckpt, cli_env, tmp_path):
    run(["quantize", ckpt(), "--type", "F16"], cli_env)
    assert (tmp_path / "models" / "Tiny-Mistral4-F16.gguf").is_file()
    again = run(["quantize", ckpt(), "--type", "F16"], cli_env, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_tokenize_json_matches_engine(ckpt, gguf_file, cli_env):
    model = gguf_file(ckpt(), "F16")
    p = run(["tokenize", model, "[INST]Bonjour le monde[/INST]", "--json"], cli_env)
    data = json.loads(p.stdout)
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        assert data["ids"] == e.tokenize("[INST]Bonjour le monde[/INST]", add_special=True)
    assert data["pieces"][1] == "[INST]"


def test_chat_one_shot_json_is_reproducible(ckpt, gguf_file, cli_env):
    model = gguf_file(ckpt(), "Q8_0")
    args = ["chat", model, "--prompt", "Hello", "--seed", "7", "-n", "8", "--temp", "0.8", "--json"]
    a, b = json.loads(run(args, cli_env).stdout), json.loads(run(args, cli_env).stdout)
    assert a["content"] == b["content"] and a["usage"]["completion_tokens"] <= 8
    # The prompt went through the embedded template: [MODEL_SETTINGS] and [INST] tokens are counted.
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        expect = len(e.tokenize('<s>[MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]Hello[/INST]'))
    assert a["usage"]["prompt_tokens"] == expect


def test_chat_streams_text(ckpt, gguf_file, cli_env):
    p = run(["chat", gguf_file(ckpt(), "Q8_0"), "-p", "Hi", "-n", "6", "--seed", "1"], cli_env)
    assert p.stdout.strip() and "generated" in p.stderr


def test_bad_model_file_is_one_line(cli_env, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    p = run(["chat", bad, "-p", "hi"], cli_env, check=False)
    assert p.returncode == 1 and "could not load" in p.stderr and "Traceback" not in p.stderr


def test_demo_runs_offline(cli_env, tmp_path):
    p = run(["demo", "--workdir", tmp_path / "demo"], cli_env)
    assert "RANDOM" in p.stderr and (tmp_path / "demo" / "Mistral-Small-4-Tiny-Random-Q8_0.gguf").is_file()
    assert p.stdout.strip()


@pytest.mark.parametrize("command", [["chat", "m.gguf"], ["serve", "m.gguf"], ["tokenize", "m.gguf", "hi"]],
                         ids=["chat", "serve", "tokenize"])
def test_reasoning_effort_is_checked_alike(command, cli_env):
    """One check, one message, exit 2 (a usage error), before any file is read."""
    p = run([*command, "--reasoning-effort", "medium"], cli_env, check=False)
    assert (p.returncode, p.stdout, p.stderr) == (2, "", "error: --reasoning-effort must be none or high, got 'medium'\n")
