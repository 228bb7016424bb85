"""The interactive `ms4local chat`, driven through a pseudo-terminal as a user drives it.

The model is a tiny random-weight GGUF: answers are gibberish, so the checks compare what the
terminal showed with what the chat saved (/save), never with expected words. `-t 1` keeps the
runs steady when other tests share the CPU.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess

import pexpect
import pytest
from rich.console import Console

from helpers import BIN
from ms4local.ui import ChatView

PROMPT = ">>> "
STATS = r"prompt (\d+) tok \((\d+) cached\) · (\d+) generated · TTFT \d+ ms · [\d.]+ tok/s · (stop|length)"


@pytest.fixture(scope="module")
def model(ckpt, gguf_file):
    return gguf_file(ckpt(), "Q8_0")


@pytest.fixture
def env(cli_env, tmp_path):
    return dict(cli_env, XDG_CACHE_HOME=str(tmp_path / "cache"))


def spawn(model, env, *args, timeout=30):
    # As a shell starts a foreground job: SIGINT at its default. Run in the background of a
    # non-interactive shell, pytest inherits SIGINT ignored, and so would the chat; Python then
    # never raises KeyboardInterrupt at the prompt (answers are stopped by the chat's own handler).
    child = pexpect.spawn(str(BIN / "ms4local"), ["chat", str(model), "-t", "1", "--seed", "1", *map(str, args)],
                          env=env, encoding="utf-8", timeout=timeout, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(PROMPT)
    return child


def send(child, line):
    """Type a line and wait for the next prompt; return what the terminal showed in between."""
    child.sendline(line)
    child.expect(PROMPT)
    return child.before.replace("\r\n", "\n")


def leave_with(child, key):
    child.send(key)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.signalstatus


def test_message_streams_answer_with_stats_and_reuses_cache(model, env, tmp_path):
    child = spawn(model, env, "-n", "8")
    shown = send(child, "Hello there")
    first = re.search(STATS, shown)
    assert first, shown
    send(child, f"/save {tmp_path / 'c.json'}")
    answer = json.loads((tmp_path / "c.json").read_text())["messages"][-1]
    assert answer["role"] == "assistant" and answer["content"].strip()
    # Streamed as plain text on a dumb terminal: exactly the saved answer, before the stats line.
    assert answer["content"].strip() in shown[:first.start()]
    second = re.search(STATS, send(child, "And again"))
    assert second and int(second.group(2)) > 0  # the first turn stayed in the KV cache
    assert leave_with(child, "\x04") == (0, None)  # Ctrl-D
    assert "Hello there" in (tmp_path / "cache" / "ms4local" / "chat_history").read_text()


def test_think_changes_rendered_prompt(model, env):
    child = spawn(model, env, "-n", "4")
    assert re.search(STATS, send(child, "Hi"))
    shown = send(child, "/prompt")
    assert re.search(r"--- last prompt: \d+ tokens ---\n<s>\[MODEL_SETTINGS\]\{\"reasoning_effort\": \"none\"\}"
                     r"\[/MODEL_SETTINGS\]\[INST\]Hi\[/INST\]\n--- end ---", shown), shown
    assert "reasoning effort: high (temperature 0.7)" in send(child, "/think")
    assert re.search(STATS, send(child, "Hi again"))
    shown = send(child, "/prompt")
    assert '[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS][INST]Hi[/INST]' in shown
    assert shown.rstrip().endswith("[INST]Hi again[/INST]\n--- end ---")
    assert "reasoning effort: none" in send(child, "/think none")
    assert leave_with(child, "\x04") == (0, None)


def test_ctrl_c_stops_a_long_answer_and_the_chat_goes_on(model, env, tmp_path):
    child = spawn(model, env, "-n", "100000", "-c", "32768")
    stopped = []
    for message in ("Tell me everything", "Once more"):
        child.sendline(message)
        child.expect_exact(message)
        child.expect(r".{40}")  # the answer is streaming
        child.sendintr()
        child.expect(r"stopped · (\d+) generated( · [\d.]+ tok/s)? · partial answer kept", timeout=10)
        stopped.append(int(child.match.group(1)))
        child.expect(PROMPT)
    send(child, f"/save {tmp_path / 'c.json'}")
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    for m, n in zip(messages[1::2], stopped):
        assert m["interrupted"] is True and m["content"] and 0 < n < 32768
    assert leave_with(child, "\x03") == (0, None)  # Ctrl-C at the prompt leaves cleanly


def test_save_reset_load_round_trip_and_bad_file(model, env, tmp_path):
    child = spawn(model, env, "-n", "4", "--system", "Be brief.", "--reasoning-effort", "high")
    assert re.search(STATS, send(child, "Hello"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert f"saved 3 messages to {a}" in send(child, f"/save {a}")
    assert "conversation cleared (system prompt kept)" in send(child, "/reset")
    assert "0 turns" in send(child, "/stats")
    assert "reasoning effort: none" in send(child, "/think")
    assert f"loaded 3 messages from {a} (reasoning effort high)" in send(child, f"/load {a}")
    shown = send(child, "/prompt")
    assert "conversation so far (nothing sent yet)" in shown and "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]" in shown
    send(child, f"/save {b}")
    assert json.loads(b.read_text()) == json.loads(a.read_text())

    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    shown = send(child, f"/load {bad}")
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the conversation file {bad} is not valid JSON: Expecting property name enclosed in double quotes "
                      "(line 1, column 2)"], shown
    assert "Traceback" not in shown
    assert "1 turn ·" in send(child, "/stats")  # the loaded conversation is still there
    assert "unknown command /nope" in send(child, "/nope")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_live_markdown_view_on_a_real_terminal(model, env):
    child = spawn(model, dict(env, TERM="xterm-256color"), "-n", "16", "--hide-thinking")
    assert re.search(STATS, send(child, "Hello"))
    assert re.search(STATS, send(child, "Again"))
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_json_and_flags(model, cli_env):
    def run(*args):
        return subprocess.run([str(BIN / "ms4local"), "chat", str(model), *args], capture_output=True, text=True,
                              env=cli_env, timeout=120)

    p = run("-p", "Hi", "-n", "4", "--seed", "3", "--json")
    data = json.loads(p.stdout)
    assert p.returncode == 0 and data["tool_calls"] == [] and data["usage"]["completion_tokens"] <= 4
    assert set(data) >= {"reasoning", "content", "tool_calls", "usage", "timings", "finish_reason"}
    p = run("--json")
    assert p.returncode == 2 and p.stderr.strip() == "error: --json needs --prompt (the interactive chat has no JSON output)"


# ----------------------------------------------------------------------------------- the view alone
def _console(interactive):
    return Console(file=io.StringIO(), width=60, height=20, force_terminal=interactive,
                   force_interactive=interactive, color_system=None, legacy_windows=False)


@pytest.mark.parametrize("interactive", [True, False])
@pytest.mark.parametrize("hide", [False, True])
def test_chat_view_reasoning_above_answer(interactive, hide):
    console = _console(interactive)
    with ChatView(console, hide_thinking=hide) as view:
        for text, reasoning in [("Adding ", True), ("two and two.", True), ("It is **4**", False), (" <b>.", False)]:
            view.add(text, reasoning)
    shown = console.file.getvalue()
    final = shown[shown.rfind("thought for") if hide else shown.rfind("thinking"):]
    if hide:
        assert "Adding two" not in shown and re.match(r"thought for 2 tokens \(\d+\.\d s\)", final)
    else:
        assert "Adding two and two." in final
    answer = final.index("It is 4 <b>." if interactive else "It is **4** <b>.")  # markdown only when live
    assert answer > 0  # the answer comes after the reasoning


# ----------------------------------------------------------------------------------- hostile input (#18)
def _chat(model, env, *args):
    return subprocess.run([str(BIN / "ms4local"), "chat", str(model), *args], capture_output=True, env=env, timeout=120)


def _one_line_error(p, code):
    err = p.stderr.decode("utf-8", "replace")
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert p.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, err)
    assert "Traceback" not in err
    return lines[0]


def test_arguments_that_are_not_utf8_are_one_line_naming_the_option(model, cli_env):
    assert _one_line_error(_chat(model, cli_env, "-p", b"caf\xe9"), 2) == \
        "error: --prompt is not valid UTF-8 text (byte 0xe9 at character 4); pass text in UTF-8"
    assert _one_line_error(_chat(model, cli_env, "-p", "Hi", "--system", b"\xff"), 2).startswith(
        "error: --system is not valid UTF-8 text (byte 0xff at character 1)")


def test_ctx_size_is_checked_against_the_model_before_loading(model, cli_env):
    err = _one_line_error(_chat(model, cli_env, "-p", "Hi", "-c", "4000000000"), 2)
    assert re.fullmatch(r"error: -c 4000000000 needs a 715\.3 GiB KV cache \(-ctk f16\), more than the [\d.]+ GiB "
                        r"of free RAM and GPU memory; try -c \d+", err), err
    p = _chat(model, cli_env, "-p", "Hi", "-n", "2", "-c", "65536", "--json")
    assert p.returncode == 0, p.stderr
    assert "note: -c 65536 is above the 32768 tokens model-Q8_0.gguf was trained for" in p.stderr.decode()


def test_max_tokens_minus_one_runs_until_the_context_is_full(model, cli_env):
    p = _chat(model, cli_env, "-p", "Hi", "-n", "-1", "-c", "256", "--seed", "2", "--temp", "1.5", "--json")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    used = data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    assert data["usage"]["completion_tokens"] > 1 and used <= 256
    assert data["finish_reason"] == "stop" or used == 256, data  # "length" only once the context is full
    assert "-n/--max-tokens must be a number of tokens or -1" in _one_line_error(_chat(model, cli_env, "-p", "Hi", "-n", "-2"), 2)


def test_a_directory_is_named_as_one_with_its_gguf_files(model, cli_env, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").symlink_to(model)
    (tmp_path / "m" / "mmproj-model.gguf").symlink_to(model)
    assert _one_line_error(_chat(tmp_path / "m", cli_env, "-p", "Hi"), 1) == \
        f"error: {tmp_path / 'm'} is a directory, not a model; give one of its GGUF files: model.gguf"
    (tmp_path / "empty").mkdir()
    assert "is a directory with no .gguf file in it" in _one_line_error(_chat(tmp_path / "empty", cli_env, "-p", "Hi"), 1)


def test_save_refuses_the_model_and_existing_files(model, env, tmp_path):
    import shutil

    loaded = tmp_path / "model.gguf"
    shutil.copy(model, loaded)
    size = loaded.stat().st_size
    child = pexpect.spawn(str(BIN / "ms4local"), ["chat", str(loaded), "-t", "1", "-n", "4"], env=env,
                          encoding="utf-8", timeout=30, dimensions=(40, 200),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect(PROMPT)
    assert re.search(STATS, send(child, "Hello"))
    for arg in (str(loaded), f"--force {loaded}"):
        shown = send(child, f"/save {arg}")
        assert f"error: {loaded} is the model this chat runs on; choose another name" in shown, shown
    assert loaded.stat().st_size == size
    notes = tmp_path / "my notes.txt"
    notes.write_text("keep\n")
    assert "exists and is not a conversation saved by /save" in send(child, f'/save "{notes}"')
    assert notes.read_text() == "keep\n"
    assert f"saved 2 messages to {notes}" in send(child, f"/save --force '{notes}'")
    assert "/save [--force] FILE" in send(child, "/help")
    assert leave_with(child, "\x04") == (0, None)


def test_full_context_drops_the_oldest_turns_with_a_notice_and_reuses_the_cache(model, env):
    child = spawn(model, env, "-n", "8", "-c", "256", "--system", "Be brief.", "--temp", "0")
    stats = []
    for i in range(12):
        shown = send(child, f"Question {i}: " + "word " * 12)
        m = re.search(STATS, shown)
        assert m, shown
        stats.append((int(m.group(1)), int(m.group(2)), "the context is full" in shown))
        context = re.search(r"context (\d+)/(\d+) tokens", send(child, "/stats"))
        assert context and int(context.group(1)) <= int(context.group(2)) == 256
    cuts = [i for i, (_, _, full) in enumerate(stats) if full]
    assert cuts and cuts[0] + 1 < len(stats), stats
    # After a cut the next turn starts as the cut one did: the whole prompt of the cut turn comes
    # from the cache (a random model's answer may not tokenize back to the ids it generated, so
    # the answer itself may be evaluated again, as it is on any turn).
    cut_prompt = stats[cuts[0]][0]
    prompt, cached, full = stats[cuts[0] + 1]
    assert not full and cached >= cut_prompt and cut_prompt <= 128, stats
    shown = send(child, "/prompt")
    assert "[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]" in shown and "Question 0:" not in shown
    assert leave_with(child, "\x04") == (0, None)
