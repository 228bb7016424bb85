"""`ms4local serve` with crash-length words (issue: one 30 KB word killed llama.cpp's tokenizer).

Each request gets a result or a clean 400 "…tokens too many", and the server answers the next
client. The server helpers are tests/helpers/serving.py's; the model is conftest's.
"""

from __future__ import annotations

import base64
import random

import pytest

from helpers.serving import assert_error, running, user

WORDS = {"a30k": "a" * 30_000, "ab15k": "ab" * 15_000, "e40k": "é" * 40_000, "a1M": "a" * 1_000_000,
         "base64_1M": base64.b64encode(random.Random(0).randbytes(750_000)).decode()}


@pytest.fixture(scope="module")
def server(model):
    with running(model, "-c", "2048", "--max-body-size", "8M") as s:
        yield s


@pytest.mark.parametrize("name", list(WORDS))
def test_crash_length_word_is_a_clean_400_and_the_server_lives(server, name):
    word = WORDS[name]
    status, _, err = server.post("/v1/chat/completions", {"messages": user(word), "max_tokens": 4}, timeout=120)
    assert_error(status, err, 400, code="context_length_exceeded", contains="tokens too many")
    status, _, err = server.post("/v1/completions", {"prompt": word, "max_tokens": 4}, timeout=120)
    assert_error(status, err, 400, code="context_length_exceeded", contains="tokens too many")
    out = server.client().chat.completions.create(model="model-F32", messages=user("Hello"), max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_long_word_that_fits_gets_an_answer(server):
    out = server.client().chat.completions.create(model="model-F32", messages=user("a" * 1500), max_tokens=4)
    assert out.usage.prompt_tokens > 500 and out.choices[0].finish_reason in ("stop", "length")


def test_lone_surrogate_is_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "x \\ud800 y"}]}'
    status, _, err = server.post("/v1/chat/completions", raw=raw)
    assert_error(status, err, 400, contains="surrogate")
    status, _, err = server.post("/v1/completions", raw=b'{"prompt": "\\udfff"}')
    assert_error(status, err, 400, contains="surrogate")
