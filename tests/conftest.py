"""Shared fixtures: tiny seeded checkpoints and their GGUF conversions, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SMALL
from quantize import convert
from quantize.synth import TinySpec, make_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """ckpt(**overrides) -> a checkpoint directory, generated once per distinct spec."""
    cache: dict[tuple, Path] = {}

    def make(base: TinySpec = SMALL, **overrides) -> Path:
        key = (base, tuple(sorted(overrides.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp("ckpt")
            cache[key] = make_checkpoint(d / "Tiny-Mistral4", base, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    """gguf_file(checkpoint_dir, type) -> converted GGUF path, converted once per pair."""
    cache: dict[tuple, Path] = {}

    def make(src: Path, out_type: str = "F32") -> Path:
        key = (str(src), out_type)
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"model-{out_type}.gguf"
            convert(src, out=out, out_type=out_type)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture
def cli_env(tmp_path):
    """Environment for CLI subprocesses: no colour, fixed width, a private models dir."""
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", TERM="dumb", MS4LOCAL_MODELS=str(tmp_path / "models"))
    env.pop("MS4LOCAL_DEBUG", None)
    return env


@pytest.fixture(scope="session")
def model(ckpt, gguf_file):
    """The tiny F32 GGUF that the server tests serve."""
    return gguf_file(ckpt(), "F32")


@pytest.fixture(scope="session")
def endless(model):
    """logit_bias that bans the end of text: a sampled answer of the random tiny model could
    otherwise end early and free its slot before a test is done with it."""
    from ms4local import Engine, EngineOptions

    with Engine(model, EngineOptions(vocab_only=True)) as e:
        return {"logit_bias": {str(e.eos_id): -100}}
