"""ms4local's own chat template in llama.cpp's llama-server: loads, and gives mistral-common's ids.

    make compat        (or: .venv/bin/python bench/compat.py --help)

A GGUF that ms4local writes from a checkpoint without a chat template embeds ms4local's Mistral
Small 4 template (quantize/templates/mistral4.jinja). People share such files and run them with
llama.cpp's own server (default `--jinja`, llama.cpp's C++ Jinja engine, not jinja2), so the
template must load there and render every conversation exactly as mistral-common encodes it.

This script
  1. builds `llama-server` once from the llama.cpp that the installed llama-cpp-python vendors
     (bench/llamacpp_build.py; cached, reused);
  2. generates a tiny Mistral-Small-4-shaped checkpoint with the real tekken vocabulary and no
     chat template, and converts it (the converter embeds ms4local's template);
  3. starts llama-server on it (127.0.0.1, a free port) and checks that it loaded that template;
  4. for each conversation (system prompt, multi-turn, reasoning effort none and high, tools,
     tool calls and results) asks `/apply-template` for the prompt and `/tokenize` (special tokens
     parsed, BOS added as the server does for a chat request) for its ids, and compares them with
     mistral-common's `encode_chat_completion` of the same request and with ms4local's own
     (jinja2) rendering.
Writes bench/results/compat.md. Exit 1 on any mismatch, or when llama-server refuses the file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from llamacpp_build import BuildError, build, build_root, build_seconds, llama_cpp_python_version  # noqa: E402

from ms4local import Engine, EngineOptions  # noqa: E402
from quantize import convert  # noqa: E402
from quantize.synth import FULL_VOCAB, TinySpec, make_checkpoint, v15_tekken  # noqa: E402
from quantize.vocab import default_chat_template  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


def call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def msg(role: str, content, **extra) -> dict:
    return {"role": role, "content": content, **extra}


# name -> (what it covers, request: messages, optional tools, optional reasoning_effort)
CONVERSATIONS: dict[str, tuple[str, dict]] = {
    "user_only": ("one user message, no effort given", {"messages": [msg("user", "Hello, who are you?")]}),
    "system_prompt": ("system prompt", {"messages": [msg("system", "You are terse."), msg("user", "Hi")]}),
    "multi_turn": ("system + 3 user / 2 assistant turns", {"messages": [
        msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Hello! How can I help?"),
        msg("user", "Tell me a joke."), msg("assistant", "Why did the GPU cross the road?"), msg("user", "Why?")]}),
    "effort_none": ("reasoning_effort none", {"reasoning_effort": "none", "messages": [msg("user", "What is 2+2?")]}),
    "effort_high": ("reasoning_effort high", {"reasoning_effort": "high", "messages": [msg("user", "What is 2+2?")]}),
    "effort_high_history": ("effort high, earlier reasoning_content in the history", {"reasoning_effort": "high", "messages": [
        msg("user", "What is 2+2?"), msg("assistant", "4", reasoning_content="Two plus two is four."), msg("user", "And 3+3?")]}),
    "tools_offered": ("tools, no call yet", {"tools": [WEATHER, CLOCK], "messages": [
        msg("system", "Use tools when useful."), msg("user", "Weather in Paris?")]}),
    "tool_call_and_result": ("tool call, its result, effort high", {"tools": [WEATHER, CLOCK], "reasoning_effort": "high", "messages": [
        msg("system", "Use tools when useful."), msg("user", "Weather in Paris?"),
        msg("assistant", None, tool_calls=[call("call00001", "get_weather", '{"city":"Paris","unit":"c"}')]),
        msg("tool", '{"temp": 21, "sky": "clear"}', tool_call_id="call00001")]}),
    "two_calls_then_answer": ("two parallel calls, results, answer, next turn", {"tools": [WEATHER, CLOCK], "messages": [
        msg("user", "Weather and time in Oslo?"),
        msg("assistant", "Checking.", tool_calls=[call("aaaaaaaaa", "get_weather", '{"city": "Oslo"}'),
                                                  call("bbbbbbbbb", "get_time", '{"tz": "Europe/Oslo"}')]),
        msg("tool", "-3 C", tool_call_id="aaaaaaaaa"), msg("tool", "14:05", tool_call_id="bbbbbbbbb"),
        msg("assistant", "It is -3 C at 14:05."), msg("user", "Thanks")]}),
    "results_out_of_call_order": ("results in another order than the calls", {"tools": [WEATHER, CLOCK], "messages": [
        msg("user", "Both?"), msg("assistant", None, tool_calls=[call("aaaaaaaaa", "get_weather", '{"city": "Oslo"}'),
                                                                 call("bbbbbbbbb", "get_time", "{}")]),
        msg("tool", "14:05", tool_call_id="bbbbbbbbb"), msg("tool", "-3 C", tool_call_id="aaaaaaaaa")]}),
    "arguments_numbers_nested": ("call arguments with floats, nesting, escapes (re-serialised)", {"tools": [WEATHER], "messages": [
        msg("user", "x"), msg("assistant", None, tool_calls=[call("ccccccccc", "get_weather",
            '{"city":"Oslo \\"sentrum\\"\\n","a":1.0,"b":1e3,"c":0.25,"g":-2.5e-05,"h":1e20,"i":48.8566,"d":[1,true,null,{"e":[]}],"f":{}}')]),
        msg("tool", "ok", tool_call_id="ccccccccc")]}),
    "everything": ("system, tools, reasoning history, call, result, answer, effort high", {
        "tools": [WEATHER, CLOCK], "reasoning_effort": "high", "messages": [
            msg("system", "You are a weather bot."), msg("user", "Paris?"),
            msg("assistant", None, reasoning_content="Need the weather tool.",
                tool_calls=[call("call00001", "get_weather", '{"city": "Paris"}')]),
            msg("tool", '{"temp": 21}', tool_call_id="call00001"),
            msg("assistant", "21 C and clear.", reasoning_content="Report it."), msg("user", "And the time there?")]}),
}


# Where llama-server itself differs from mistral-common, whatever the template: reported in their
# own table, not failures (ms4local's own engine matches mistral-common on each).
LLAMACPP_OWN = {
    "float_with_7_decimals": ("llama.cpp parses text arguments into numbers before the template sees them, and its Jinja writes "
                              "at most 6 decimals", {"tools": [WEATHER], "messages": [
        msg("user", "x"), msg("assistant", None, tool_calls=[call("ccccccccc", "get_weather", '{"lat": 59.91273456}')]),
        msg("tool", "ok", tool_call_id="ccccccccc")]}),
    "arguments_not_json": ("llama.cpp refuses arguments that are not JSON; mistral-common writes them as a JSON string",
                           {"tools": [WEATHER], "messages": [
        msg("user", "x"), msg("assistant", None, tool_calls=[call("ccccccccc", "get_weather", "Paris please")]),
        msg("tool", "ok", tool_call_id="ccccccccc")]}),
    "control_text_in_message": ("the prompt is tokenized with special tokens parsed everywhere, so text a user "
                                "types as [INST] becomes the control token", {"messages": [msg("user", "Say [INST] literally.")]}),
}

# What llama-server must read in the template (common/jinja/caps.cpp probes it at load). Without
# these it changes the requests: no parallel tool calls = one call per turn in its tool-call
# grammar; no object arguments = text arguments reach the template unparsed (not re-serialised
# as mistral-common does); no system role = system prompts merged into the first user message.
REQUIRED_CAPS = ("tools", "tool_calls", "parallel_tool_calls", "object_arguments", "system_role", "reasoning_effort")


class CompatError(RuntimeError):
    """llama-server did not start on the file, or did not load ms4local's template."""


def reference_tokenizer(tmp: Path):
    """mistral-common's v15 tokenizer over the same tekken vocabulary as the generated model."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = tmp / "tekken.json"
    path.write_text(json.dumps(v15_tekken(FULL_VOCAB)))
    return MistralTokenizer.from_file(path)


def reference_ids(tok, case: dict) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    extra = {"reasoning_effort": case["reasoning_effort"]} if "reasoning_effort" in case else {}
    request = ChatCompletionRequest.from_openai(copy.deepcopy(case["messages"]), tools=copy.deepcopy(case.get("tools")), **extra)
    return tok.encode_chat_completion(request).tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            text = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise CompatError(f"{url} answered HTTP {e.code}: {text[:300]}") from None


class LlamaServer:
    """llama-server on 127.0.0.1 at a free port, for the time of a `with` block."""

    def __init__(self, binary: Path, model: Path, log: Path, startup_s: float = 300):
        self.binary, self.model, self.log, self.startup_s = binary, model, log, startup_s
        self.url = f"http://127.0.0.1:{free_port()}"

    def __enter__(self) -> "LlamaServer":
        port = self.url.rsplit(":", 1)[1]
        cmd = [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", port,
               "-c", "2048", "-np", "1", "-t", "1", "--no-warmup"]
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close()
                raise CompatError(f"llama-server exited ({self.proc.returncode}) while loading the model:\n" + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.__exit__()
        raise CompatError(f"llama-server did not come up in {self.startup_s:.0f} s:\n" + self.log_tail())

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def props(self) -> dict:
        with urllib.request.urlopen(self.url + "/props", timeout=30) as r:
            return json.loads(r.read())

    def prompt_ids(self, case: dict) -> tuple[str, list[int]]:
        """What llama-server evaluates for this chat request: its template's prompt, tokenized as a
        chat request's prompt is (special tokens parsed, BOS added per the vocabulary)."""
        body = {"messages": case["messages"]}
        if case.get("tools"):
            body["tools"] = case["tools"]
        if "reasoning_effort" in case:
            body["reasoning_effort"] = case["reasoning_effort"]
        prompt = post(self.url + "/apply-template", body)["prompt"]
        ids = post(self.url + "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
        return prompt, ids


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tiny_model(workdir: Path) -> Path:
    """A tiny checkpoint without a chat template (TinySpec's default), converted: the GGUF carries
    ms4local's own template."""
    src = make_checkpoint(workdir / "Tiny-Mistral4", TinySpec())
    if (src / "chat_template.jinja").exists() or "chat_template" in json.loads((src / "tokenizer_config.json").read_text()):
        raise CompatError("the generated checkpoint has a chat template; the check needs one without")
    gguf = workdir / "Tiny-Mistral4-F16.gguf"
    convert(src, out=gguf, out_type="F16", force=True)
    return gguf


def compare(server: LlamaServer, engine: Engine, tok, log=print) -> tuple[list[tuple], list[str]]:
    """One table row per conversation, and a detail block per mismatch."""
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    rows, details = [], []
    for name, (what, case) in CONVERSATIONS.items():
        expect = reference_ids(tok, case)
        ours = engine.prompt_tokens(case["messages"], reasoning_effort=case.get("reasoning_effort"), tools=case.get("tools"))
        try:
            prompt, theirs = server.prompt_ids(case)
            err = None
        except CompatError as e:
            prompt, theirs, err = "", [], str(e)
        d_server, d_ours = first_difference(theirs, expect), first_difference(ours, expect)
        verdict = lambda d: "yes" if d is None else f"**no** (first difference at token {d})"  # noqa: E731
        rows.append((name, what, len(expect), f"**no**: {err}" if err else verdict(d_server), verdict(d_ours)))
        log(f"{name}: llama-server {'ok' if d_server is None else 'MISMATCH'}, ms4local {'ok' if d_ours is None else 'MISMATCH'}")
        if err or d_server is not None or d_ours is not None:
            keep = SpecialTokenPolicy.KEEP
            details += ["", f"### `{name}`", "", "```", f"error: {err}" if err else f"llama-server prompt: {prompt!r}",
                        f"mistral-common: {tok.decode(expect, special_token_policy=keep)!r}",
                        f"expected ids:     {expect}", f"llama-server ids: {theirs}", f"ms4local ids:     {ours}", "```"]
    return rows, details


def llamacpp_own(server: LlamaServer, engine: Engine, tok) -> list[tuple[str, str, str, str]]:
    """LLAMACPP_OWN through both engines: (name, why, llama-server verdict, ms4local verdict)."""
    out = []
    for name, (why, case) in LLAMACPP_OWN.items():
        expect = reference_ids(tok, case)
        ours = engine.prompt_tokens(case["messages"], reasoning_effort=case.get("reasoning_effort"), tools=case.get("tools"))
        try:
            theirs = server.prompt_ids(case)[1]
            verdict = "yes" if theirs == expect else f"no (first difference at token {first_difference(theirs, expect)})"
        except CompatError as e:
            verdict = "no: HTTP" + str(e).split("HTTP", 1)[-1].split(" [json", 1)[0].rstrip(": ").replace("|", "/")
        out.append((name, why, verdict, "yes" if ours == expect else "**no**"))
    return out


def run(out: Path, workdir: Path, log=print) -> bool:
    """Everything above; True when every conversation matches. Writes `out` whatever happens."""
    ver = llama_cpp_python_version()
    lines = [
        "# ms4local's chat template in llama.cpp's llama-server (`make compat`)",
        "",
        f"llama-server built from the llama.cpp that llama-cpp-python {ver} vendors (CPU; cached in "
        f"`~/.cache/ms4local/{build_root(ver).name}/`). A tiny generated checkpoint with the real tekken vocabulary "
        "and **no** chat template is converted by ms4local, so the GGUF carries ms4local's own template "
        "(quantize/templates/mistral4.jinja). Each conversation goes through llama-server's `/apply-template` "
        "(the OpenAI request as a client sends it: string tool-call arguments, `tools`, `reasoning_effort`) and "
        "`/tokenize` (special tokens parsed, BOS as for a chat request), and its ids are compared with "
        "mistral-common's `encode_chat_completion` and with ms4local's own rendering (jinja2).",
        "",
    ]

    def finish(ok: bool, *more: str) -> bool:
        lines.extend(more)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        log(f"wrote {out}")
        return ok

    try:
        bindir = build(["llama-server"], ver, log=log)
    except BuildError as e:
        finish(False, "**FAILED: llama-server could not be built.**", "", "```", str(e), "```")
        raise
    secs = build_seconds("llama-server", ver)
    lines += [f"Machine: {platform.machine()}, {os.cpu_count()} cores"
              + (f"; building llama-server took {secs / 60:.0f} min (once, then reused)." if secs else "."), ""]

    gguf = tiny_model(workdir)
    tok = reference_tokenizer(workdir)
    with Engine(gguf, EngineOptions(vocab_only=True)) as engine:
        if engine.chat_template != default_chat_template():
            return finish(False, "**FAILED: the converted GGUF does not carry ms4local's template.**")
        try:
            with LlamaServer(bindir / "llama-server", gguf, workdir / "llama-server.log") as server:
                props = server.props()
                # llama.cpp drops the template's trailing newline as it reads it
                if (props.get("chat_template") or "").rstrip() != default_chat_template().rstrip():
                    raise CompatError("llama-server does not use the GGUF's template (/props chat_template differs)")
                caps = props.get("chat_template_caps") or {}
                rows, details = compare(server, engine, tok, log)
                own = llamacpp_own(server, engine, tok)
        except CompatError as e:
            return finish(False, "**FAILED: llama-server refused the GGUF or its template.**", "", "```", str(e), "```")

    n_ok = sum(1 for r in rows if r[3] == "yes" and r[4] == "yes")
    lines += [f"**{n_ok} of {len(rows)} conversations: llama-server and ms4local both give mistral-common's ids.**", "",
              "| conversation | covers | tokens | llama-server = mistral-common | ms4local = mistral-common |",
              "| --- | --- | ---: | --- | --- |"]
    lines += [f"| `{n}` | {w} | {k} | {a} | {b} |" for n, w, k, a, b in rows]
    lacking = [c for c in REQUIRED_CAPS if not caps.get(f"supports_{c}")]
    lines += ["", "llama-server's reading of the template (`/props` `chat_template_caps`, "
              f"required: {', '.join(REQUIRED_CAPS)}): "
              + ", ".join(f"{k.removeprefix('supports_')} {'yes' if v else '**no**'}" for k, v in sorted(caps.items())) + "."]
    if lacking:
        lines += ["", f"**FAILED: llama-server reads the template as without {', '.join(lacking)}** (see REQUIRED_CAPS "
                  "in bench/compat.py for what that changes)."]
        log(f"llama-server reads the template as without {', '.join(lacking)}")
    lines += ["", "## Where llama-server differs from mistral-common whatever the template (not counted as failures)", "",
              "| conversation | llama-server = mistral-common | ms4local = mistral-common | why |", "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {a} | {b} | {w} |" for n, w, a, b in own]
    return finish(n_ok == len(rows) and not lacking, *details)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compat.md")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint, GGUF and server log here (default: a temp dir)")
    args = ap.parse_args()
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            ok = run(args.out, args.workdir, say)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                ok = run(args.out, Path(tmp), say)
    except (BuildError, CompatError) as e:
        say(f"error: {e}")
        raise SystemExit(1) from None
    if not ok:
        say(f"error: llama-server and mistral-common disagree (or it refused the file); see {args.out}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
