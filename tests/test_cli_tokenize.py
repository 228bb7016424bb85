"""`ms4local tokenize`, run as a user runs it: TEXT mode, --messages mode, one-line errors.

The ids of --messages mode are checked against mistral-common in test_template_parity.py; here
the CLI must print what the library's `Engine.prompt_tokens` evaluates, and fail cleanly.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import BIN

from ms4local import Engine, EngineOptions
from quantize.synth import TinySpec

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "21 C"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def run(args, env):
    return subprocess.run([str(BIN / "ms4local"), "tokenize", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def one_line_error(p, code):
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model(ckpt, gguf_file):
    return gguf_file(ckpt(), "F16")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "messages.json").write_text(json.dumps(MESSAGES))
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "request.json").write_text(json.dumps({"model": "x", "messages": MESSAGES, "tools": TOOLS}))
    return tmp_path


def test_messages_json_is_what_the_engine_evaluates(model, files, cli_env):
    p = run([model, "--messages", files / "messages.json", "--tools", files / "tools.json",
             "--reasoning-effort", "high", "--json"], cli_env)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    with Engine(model, EngineOptions(vocab_only=True)) as e:
        assert data["ids"] == e.prompt_tokens(MESSAGES, reasoning_effort="high", tools=TOOLS)
        assert data["prompt"] == e.render(MESSAGES, reasoning_effort="high", tools=TOOLS)
    assert data["pieces"][:2] == ["<s>", "[SYSTEM_PROMPT]"]
    assert '{"reasoning_effort": "high"}' in data["prompt"] and '[ARGS]{"city": "Paris"}' in data["prompt"]


def test_request_object_file_gives_the_same_ids(model, files, cli_env):
    a = run([model, "--messages", files / "messages.json", "--tools", files / "tools.json", "--json"], cli_env)
    b = run([model, "--messages", files / "request.json", "--json"], cli_env)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["ids"] == json.loads(b.stdout)["ids"]
    assert "[AVAILABLE_TOOLS]" in json.loads(b.stdout)["prompt"]


def test_messages_plain_output_lists_pieces(model, files, cli_env):
    p = run([model, "--messages", files / "messages.json"], cli_env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["1", "->", "'<s>'"] and any("'[TOOL_RESULTS]'" in line for line in lines)


def test_text_mode_still_works(model, cli_env):
    p = run([model, "[INST]Hi[/INST]"], cli_env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["1", "->", "'<s>'"] and lines[1].split() == ["3", "->", "'[INST]'"]
    assert lines[-1].split() == ["4", "->", "'[/INST]'"]


@pytest.mark.parametrize("content, message", [
    ('[{"role": "user", "content": "hi"', "is not valid JSON"),
    ('{"role": "user"}', "must hold a list of messages"),
    ('["hi"]', "message 1 must be an object whose role is one of system, developer, user, assistant, tool"),
    ('[{"role": "user", "content": 5}]', "message 1: content must be text, a list of parts or null, got a number"),
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": [{"a": ' + "[" * 100 + "]" * 100 + "}]}",
     "is nested too deeply"),
    ('[{"role": "user", "content": "\\ud800"}]', "holds text that is not valid Unicode (a lone surrogate '\\ud800')"),
    ('[{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]',
     "tool call 1's arguments must be JSON text or an object, got a number"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}', "must be a list of tool definitions"),
    ('[{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "a", "content": "r"}]', 'role "tool" cannot follow role "user"'),
])
def test_bad_conversation_file_is_one_line(model, tmp_path, cli_env, content, message):
    (tmp_path / "m.json").write_text(content)
    assert message in one_line_error(run([model, "--messages", tmp_path / "m.json"], cli_env), 1)


def test_text_that_is_not_utf8_is_one_line_naming_it(model, cli_env):
    p = subprocess.run([str(BIN / "ms4local"), "tokenize", str(model), b"caf\xe9"], capture_output=True, text=True,
                       env=cli_env, timeout=300)
    assert one_line_error(p, 2) == "error: TEXT is not valid UTF-8 text (byte 0xe9 at character 4); pass text in UTF-8"


def test_a_directory_is_named_as_one(model, cli_env, tmp_path):
    (tmp_path / "model.gguf").symlink_to(model)
    err = one_line_error(run([tmp_path, "hi"], cli_env), 1)
    assert err == f"error: {tmp_path} is a directory, not a model; give one of its GGUF files: model.gguf"


def test_missing_or_bad_tools_file_is_one_line(model, files, tmp_path, cli_env):
    assert "cannot read" in one_line_error(run([model, "--messages", tmp_path / "nope.json"], cli_env), 1)
    (tmp_path / "t.json").write_text("[{,}]")
    err = one_line_error(run([model, "--messages", files / "messages.json", "--tools", tmp_path / "t.json"], cli_env), 1)
    assert "tools file" in err and "not valid JSON" in err


@pytest.mark.parametrize("args", [
    [],                                             # neither TEXT nor --messages
    ["text", "--messages", "m.json"],               # both
    ["text", "--tools", "t.json"],                  # tools without a conversation
    ["text", "--reasoning-effort", "high"],         # effort without a conversation
    ["--messages", "m.json", "--reasoning-effort", "medium"],
])
def test_usage_errors_exit_2(model, cli_env, tmp_path, args):
    one_line_error(run([model, *args], cli_env), 2)


@pytest.mark.parametrize("word", ["a" * 30_000, "ab" * 15_000, "é" * 40_000], ids=["a30k", "ab15k", "e40k"])
def test_crash_length_word_as_argument(model, cli_env, word):
    p = run([model, word, "--json"], cli_env)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    data = json.loads(p.stdout)
    assert data["ids"][0] == 1 and "".join(data["pieces"][1:]) == word


def test_one_megabyte_word_from_a_file(model, cli_env, tmp_path):
    (tmp_path / "w.txt").write_text("a" * 1_000_000)
    p = run([model, "--file", tmp_path / "w.txt", "--json", "--no-bos"], cli_env)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert "".join(json.loads(p.stdout)["pieces"]) == "a" * 1_000_000


def test_compare_llama_shows_the_combining_mark_difference(model, ckpt, gguf_file, cli_env):
    full = gguf_file(ckpt(TinySpec(), tokenizer="tekken"), "F16")  # the real tekken vocabulary
    p = run([full, "नमस्ते दुनिया", "--compare-llama", "--json"], cli_env)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["llama"]["differences"] and not data["llama"]["cut"]
    assert data["ids"] != data["llama"]["ids"]
    p = run([model, "plain English words", "--compare-llama"], cli_env)
    assert p.returncode == 0 and "llama.cpp's tokenizer gives the same" in p.stdout, p.stdout + p.stderr
    p = run([model, "x " + "z" * 30_000, "--compare-llama"], cli_env)  # llama.cpp gets it in parts, and says so
    assert p.returncode == 0 and "long enough to crash llama.cpp" in " ".join(p.stderr.split()), p.stderr


def test_lone_surrogate_in_a_file_is_one_line(model, cli_env, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    assert "cannot read" in one_line_error(run([model, "--file", tmp_path / "bad.txt"], cli_env), 1)


def test_chat_prompt_with_a_crash_length_word(model, cli_env):
    p = subprocess.run([str(BIN / "ms4local"), "chat", str(model), "-c", "512", "-n", "2", "--prompt", "a" * 30_000],
                       capture_output=True, text=True, env=cli_env, timeout=300)
    assert p.returncode in (0, 1), (p.returncode, p.stderr[-2000:])  # never 139 (segfault)
    if p.returncode == 1:
        one_line_error(p, 1)
