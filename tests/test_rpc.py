"""llama.cpp's RPC backend: `ms4local rpc-server`, `--rpc` and the faults llama.cpp would abort on.

Everything runs on loopback ports picked free by the tests. The endpoint checks (parsing, the
Python probe against small fake servers, unreachable endpoints on the CLI) need no RPC build and
always run; what needs a real rpc-server is skipped, with the reason, on a llama-cpp-python built
without -DGGML_RPC=on. Runs that could meet llama.cpp's abort happen in subprocesses, never in
pytest's own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import BIN, ROOT
from ms4local import EngineOptions
from ms4local.cli import rpc_server as rpc_cli
from ms4local.child import last_words
from ms4local.cli.main import app
from ms4local.engine import rpc as engine_rpc
from ms4local.errors import OptionsError, RpcError
from ms4local.rpc import PROTOCOL, Endpoint, parse_endpoints, probe

RPC_LIB = engine_rpc.library_file()
needs_rpc = pytest.mark.skipif(RPC_LIB is None, reason="this venv's llama-cpp-python has no libggml-rpc (built "
                                                       "without -DGGML_RPC=on; `make install` rebuilds it)")
MS4LOCAL = str(BIN / "ms4local")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- endpoints, no RPC build needed
def test_parse_endpoints_reads_llamas_forms():
    assert parse_endpoints(["127.0.0.1:50052,host-b:50053", "10.0.0.2:1"]) == [
        Endpoint("127.0.0.1", 50052), Endpoint("host-b", 50053), Endpoint("10.0.0.2", 1)]


@pytest.mark.parametrize("value, says", [
    ("127.0.0.1", "HOST:PORT"), (":50052", "HOST:PORT"), ("h:port", "within 1-65535"), ("h:0", "within 1-65535"),
    ("h:70000", "within 1-65535"), ("::1:50052", "IPv4 only"), ("[::1]:50052", "IPv4 only"),
    ("a:1,,b:2", "empty entry"), ("a:1,a:1", "twice"), (",".join(f"h:{p}" for p in range(1, 18)), "at most 16"),
])
def test_malformed_endpoints_are_options_errors(value, says):
    with pytest.raises(OptionsError, match=says):
        parse_endpoints([value])


def test_engine_options_check_rpc_and_tensor_split():
    EngineOptions(rpc=["127.0.0.1:50052"], tensor_split=[3, 1]).check()
    EngineOptions(rpc=["127.0.0.1:50052"], fit=True, vram=2**30).check()  # --fit plans across the hosts
    with pytest.raises(OptionsError, match="--fit chooses -ngl"):
        EngineOptions(rpc=["127.0.0.1:50052"], fit=True, tensor_split=[1, 1]).check()
    with pytest.raises(OptionsError, match="at least one above 0"):
        EngineOptions(tensor_split=[0, 0]).check()
    with pytest.raises(OptionsError, match="at most 16"):
        EngineOptions(tensor_split=[1.0] * 17).check()
    assert EngineOptions(tensor_split=[1.0]).manual_placement


class FakeServer:
    """A TCP server on a free loopback port that answers each connection with `reply(conn)`."""

    def __init__(self, reply) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.reply(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def hello_reply(version):
    def reply(conn):
        conn.recv(1 + 8 + 24)
        conn.sendall(struct.pack("<Q", 28) + bytes(version) + b"\0" + bytes(24))
        time.sleep(0.2)
    return reply


@pytest.mark.parametrize("reply, says", [
    (hello_reply((6, 0, 0)), "speaks RPC protocol 6.0.0, this llama.cpp 7.0.0"),
    (hello_reply((PROTOCOL[0], PROTOCOL[1] + 1, 0)), "speaks RPC protocol 7.1.0"),
    (lambda conn: conn.close(), "closed the connection during the handshake"),
    (lambda conn: time.sleep(1.5), "accepted the connection but sent no handshake within 0.5 s"),
    (lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), "does not answer like llama.cpp's RPC server"),
])
def test_probe_names_the_endpoint_and_the_fault(reply, says):
    fake = FakeServer(reply)
    try:
        with pytest.raises(RpcError, match=says) as e:
            probe(f"127.0.0.1:{fake.port}", timeout=0.5)
        assert str(e.value).startswith(f"rpc-server 127.0.0.1:{fake.port}: ")
        assert e.value.endpoint == f"127.0.0.1:{fake.port}"
    finally:
        fake.close()


def test_probe_refused_and_unresolvable():
    port = free_port()
    with pytest.raises(RpcError, match=f"rpc-server 127.0.0.1:{port}: connection refused"):
        probe(f"127.0.0.1:{port}")
    with pytest.raises(RpcError, match="cannot resolve host 'no-such-host.invalid'"):
        probe("no-such-host.invalid:50052")


@pytest.mark.parametrize("command", ["chat", "info", "eval", "serve"])
def test_unreachable_endpoint_is_one_line_within_seconds(command, model, cli_env):
    """A closed port is refused by the probe, before llama.cpp (which would abort) sees it."""
    port = free_port()
    args = [MS4LOCAL, command, str(model), "--rpc", f"127.0.0.1:{port}"] + (["-p", "hi"] if command == "chat" else [])
    started = time.monotonic()
    r = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: rpc-server 127.0.0.1:{port}: connection refused (is `ms4local rpc-server --port {port}` running "
        "there, bound to an address this machine can reach?)"]
    assert time.monotonic() - started < 20  # the import of the CLI included; the probe itself is instant


def test_malformed_rpc_flag_is_a_usage_error(model, cli_env):
    r = subprocess.run([MS4LOCAL, "chat", str(model), "--rpc", "localhost", "-p", "hi"], env=cli_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --rpc wants HOST:PORT (e.g. 192.168.1.20:50052), got 'localhost'"


@pytest.mark.parametrize("target, cmake", [("install", "-DGGML_RPC=on"), ("install-cuda", "-DGGML_CUDA=on -DGGML_RPC=on"),
                                           ("install-metal", "-DGGML_METAL=on -DGGML_RPC=on")])
def test_make_builds_rpc_and_rebuilds_a_cached_wheel_without_it(tmp_path, target, cmake):
    """Every install target builds with GGML_RPC and then looks for libggml-rpc; when a cached wheel
    without it came back, it rebuilds from source without pip's cache, with the same flags."""
    venv = tmp_path / "venv"  # `make -n` on a venv that does not exist: the whole recipe is printed
    r = subprocess.run(["make", "-n", "-B", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'CMAKE_ARGS="{cmake}' in r.stdout
    assert "from ms4local.engine.rpc import library_file; sys.exit(library_file() is None)" in r.stdout
    pin = re.search(r'"(llama-cpp-python==[^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    rebuild = f'CMAKE_ARGS="{cmake}" {venv}/bin/python -m pip install --force-reinstall --no-cache-dir --no-binary ' \
              f"llama-cpp-python --no-deps '{pin}'"
    assert rebuild in r.stdout


def test_library_file_is_found_without_loading_llama_cpp():
    assert RPC_LIB is None or (RPC_LIB.parent.name == "lib" and RPC_LIB.name.startswith("libggml-rpc"))


def test_last_words_strip_the_source_location():
    assert last_words("noise\n/x/ggml-rpc.cpp:579: Remote RPC server crashed or returned malformed response\n") == \
        "Remote RPC server crashed or returned malformed response"


def test_rpc_server_warns_off_loopback_and_binds_loopback_by_default(monkeypatch):
    """CLI test: the library call is patched; what is checked is the warning and the arguments."""
    calls = []
    monkeypatch.setattr(rpc_cli, "check_address", lambda host, port: f"{host}:{port}")
    monkeypatch.setattr(rpc_cli.engine_rpc, "available", lambda: True)
    monkeypatch.setattr(rpc_cli, "pick_devices", lambda names: ([1], ["CPU"]))
    monkeypatch.setattr(rpc_cli, "serve_until_signal", lambda *a: calls.append(a))
    runner = CliRunner()
    r = runner.invoke(app, ["rpc-server"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 0 and "warning" not in r.output
    assert calls[-1][0] == "127.0.0.1:50052" and calls[-1][1:] == ([1], ["CPU"], max(1, (os.cpu_count() or 2) // 2), None)
    r = runner.invoke(app, ["rpc-server", "--host", "0.0.0.0", "--port", "50099", "-t", "2"],
                      env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 0
    assert "warning: rpc-server on 0.0.0.0: llama.cpp's RPC has no authentication and no encryption" in r.output
    assert calls[-1][0] == "0.0.0.0:50099" and calls[-1][3] == 2


def test_rpc_server_refuses_a_name_or_ipv6_host():
    r = CliRunner().invoke(app, ["rpc-server", "--host", "localhost"])
    assert r.exit_code == 2 and "--host must be an IPv4 address" in r.output


# ----------------------------------------------------------------------------- real rpc-servers
class RpcServer:
    """`ms4local rpc-server` on a free loopback port, as a subprocess; ready once it says it listens
    (which it says after its own probe of the port has answered)."""

    def __init__(self, tmp: Path, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = tmp / f"rpc-server-{self.port}.log"
        env = dict(os.environ, NO_COLOR="1", COLUMNS="200")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MS4LOCAL, "rpc-server", "--port", str(self.port), "-t", "1", *extra],
                                         stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 60
        while f"listening on {self.endpoint}" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"rpc-server did not start: {self.text()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def servers(tmp_path):
    """Two rpc-servers, stopped after the test."""
    started: list[RpcServer] = []
    try:
        started += [RpcServer(tmp_path), RpcServer(tmp_path)]
        yield started
    finally:
        for s in started:
            s.stop(signal.SIGKILL)


@needs_rpc
def test_rpc_server_stops_cleanly_on_sigterm_and_sigint(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        s = RpcServer(tmp_path)
        assert s.stop(sig) == 0
        log = s.text()
        assert f"ms4local rpc-server listening on {s.endpoint} (RPC protocol 7.0.0), sharing CPU with 1 CPU thread;" in log
        assert f"rpc-server on {s.endpoint} stopped ({signal.Signals(sig).name})" in log
        assert "Traceback" not in log
        with pytest.raises(RpcError, match="connection refused"):
            probe(s.endpoint)


@needs_rpc
def test_rpc_server_on_a_port_in_use_is_one_line(tmp_path, servers):
    r = subprocess.run([MS4LOCAL, "rpc-server", "--port", str(servers[0].port)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, NO_COLOR="1"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{servers[0].port}: ")
    probe(servers[0].endpoint)  # the first one is untouched


@needs_rpc
def test_rpc_server_cache_dir_and_unknown_device(tmp_path):
    r = subprocess.run([MS4LOCAL, "rpc-server", "--port", str(free_port()), "--device", "CUDA7"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--device CUDA7: no such device here; this build has CPU" in r.stderr
    s = RpcServer(tmp_path, None, "--cache", str(tmp_path / "cache"))
    try:
        assert (tmp_path / "cache").is_dir()
        assert f"tensor cache {tmp_path / 'cache'}" in s.text()
    finally:
        s.stop()


LOGITS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ms4local import Engine, EngineOptions
    from ms4local import engine as eng

    model, endpoints = sys.argv[1], sys.argv[2:]
    text = "Bonjour le monde, ceci est un essai de RPC."

    def run(**kw):
        mark = eng.log_mark()
        with Engine(model, EngineOptions(ctx_size=64, logits_all=True, **kw)) as e:
            ids = e.tokenize(text, add_special=True)
            return e.logits(ids), eng.log_text(mark)

    before, _ = run()
    remote, log = run(rpc=endpoints, n_gpu_layers=-1)
    first_only, log_split = run(rpc=endpoints, n_gpu_layers=-1, tensor_split=[1, 0])
    after, log_after = run()

    def scale(x):  # the largest difference, relative to the largest logit
        return float(np.max(np.abs(x - before)) / np.max(np.abs(before)))

    print(json.dumps({"scale": scale(remote), "scale_split": scale(first_only), "positions": len(before),
                      "same_after": bool((before == after).all()), "log": log, "log_split": log_split,
                      "log_after": log_after}))
""")


@needs_rpc
def test_logits_through_two_rpc_servers_equal_a_local_run(model, servers, tmp_path):
    """Every layer on the two servers (-ngl all): the logits at every position equal the local run's;
    llama.cpp's load log shows the weights in both servers' buffers (in the first one's only with
    -ts 1,0); a later engine without --rpc in the same process stays local."""
    script = tmp_path / "logits.py"
    script.write_text(LOGITS)
    r = subprocess.run([str(BIN / "python"), str(script), str(model)] + [s.endpoint for s in servers],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["positions"] > 5
    assert out["scale"] <= 1e-3 and out["scale_split"] <= 1e-3, out  # at every position
    assert out["same_after"]

    def buffers(log):
        return {line.split("model buffer size")[0].split(":", 1)[1].strip(): float(line.split("=")[1].split()[0])
                for line in log.splitlines() if "model buffer size" in line}

    # Each server holds its share of the blocks; only the input embeddings stay in this process.
    both = buffers(out["log"])
    assert all(both.get(f"RPC0[{s.endpoint}]", 0) > 0.1 for s in servers), both
    assert set(both) == {"CPU_Mapped"} | {f"RPC0[{s.endpoint}]" for s in servers}, both
    # -ts 1,0: every block on the first server, none on the second.
    assert set(buffers(out["log_split"])) == {"CPU_Mapped", f"RPC0[{servers[0].endpoint}]"}, out["log_split"]
    assert not any("RPC" in line for line in out["log_after"].splitlines() if "buffer size" in line)


def chat_args(model, servers, *extra):
    return [MS4LOCAL, "chat", str(model), "--rpc", ",".join(s.endpoint for s in servers), "-c", "4096",
            "--temp", "0", *extra]


@needs_rpc
def test_chat_through_rpc_answers_like_a_local_chat(model, servers, cli_env):
    args = ["-p", "Bonjour", "-n", "12", "--json"]
    remote = subprocess.run(chat_args(model, servers, *args), env=cli_env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr
    assert "go to RPC0 (127.0.0.1:" in remote.stderr  # the notice that says where the layers went
    local = subprocess.run([MS4LOCAL, "chat", str(model), "-c", "4096", "--temp", "0", *args], env=cli_env,
                           capture_output=True, text=True, timeout=300)
    assert json.loads(remote.stdout)["content"] == json.loads(local.stdout)["content"]
    assert json.loads(remote.stdout)["usage"]["completion_tokens"] > 0


@needs_rpc
def test_rpc_server_killed_mid_answer_ends_chat_with_one_line(model, servers, cli_env, tmp_path):
    """llama.cpp aborts its process on a lost server; the chat's engine runs in a child, so the
    user sees one line that names the server, not a C backtrace."""
    victim = servers[1]
    chat = subprocess.Popen(chat_args(model, servers, "-p", "Bonjour", "-n", "-1"), env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = chat.stdout.read(16)  # the answer is streaming
        assert first, chat.stderr.read().decode()
        victim.proc.kill()
        victim.proc.wait()
        killed = time.monotonic()
        _, err = chat.communicate(timeout=60)
    finally:
        if chat.poll() is None:
            chat.kill()
    assert time.monotonic() - killed < 15
    assert chat.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines[-1] == (f"error: lost rpc-server {victim.endpoint} (connection refused); llama.cpp stopped: Remote RPC "
                         "server crashed or returned malformed response. Start the rpc-server again and rerun")
    assert not any("ggml-rpc.cpp" in line or "GGML_ABORT" in line or "Traceback" in line for line in lines)


@needs_rpc
def test_info_and_doctor_show_the_servers(model, servers, cli_env):
    eps = ",".join(s.endpoint for s in servers)
    r = subprocess.run([MS4LOCAL, "info", str(model), "--rpc", eps, "--json"], env=cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["rpc_servers"]
    assert [s["endpoint"] for s in got] == [s.endpoint for s in servers]
    assert all(s["protocol"] == "7.0.0" and s["devices"][0]["total"] > 0 for s in got)
    r = subprocess.run([MS4LOCAL, "info", str(model), "--rpc", eps], env=cli_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "RPC1" in r.stdout and f"{servers[1].endpoint} #0" in r.stdout
    r = subprocess.run([MS4LOCAL, "doctor", "--json", "--rpc", servers[0].endpoint], env=cli_env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rpc"]["available"] and report["rpc"]["library"] == str(RPC_LIB)
    assert report["mistral4"] == {"ok": True, "detail": "a generated tiny mistral4 GGUF loads and runs with every layer "
                                                        f"on {servers[0].endpoint}"}
    assert any(d["backend"] == "RPC" and d["description"] == servers[0].endpoint for d in report["devices"])


def test_doctor_says_whether_rpc_is_built_in(cli_env):
    r = subprocess.run([MS4LOCAL, "doctor", "--json"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rpc = json.loads(r.stdout)["rpc"]
    assert rpc["available"] == (RPC_LIB is not None) and rpc["servers"] == []


@needs_rpc
def test_serve_survives_a_lost_rpc_server_and_loads_again(model, servers, tmp_path, endless):
    """`serve --rpc`: answers through the servers; a server killed mid-stream ends that stream with an
    error event, /health and new requests get 503 naming it, and once it is started again on the
    same port the model is loaded again without the user restarting anything."""
    import openai
    from helpers.serving import Server, user

    victim = servers[1]
    srv = Server(model, "--rpc", ",".join(s.endpoint for s in servers), "-c", "4096")
    try:
        client = srv.client()
        name = Path(model).name.removesuffix(".gguf")
        first = client.chat.completions.create(model=name, messages=user("Bonjour"), max_tokens=8, temperature=0)
        assert first.choices[0].message.content
        stream = client.chat.completions.create(model=name, messages=user("Raconte"), max_tokens=3000, stream=True,
                                                extra_body=endless)
        chunks = iter(stream)
        next(chunks), next(chunks)  # the answer is streaming
        victim.proc.kill()
        victim.proc.wait()
        with pytest.raises(openai.APIError, match=f"lost rpc-server {victim.endpoint}"):
            for _ in chunks:
                pass
        status, headers, body = srv.get("/health")
        assert status == 503 and body["status"] == "unavailable" and victim.endpoint in body["reason"]
        assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "5"
        with pytest.raises(openai.InternalServerError, match=f"lost rpc-server {victim.endpoint}"):
            client.chat.completions.create(model=name, messages=user("Bonjour"), max_tokens=8)
        servers[1] = RpcServer(tmp_path, victim.port)  # the same endpoint, back
        deadline = time.monotonic() + 120
        while srv.get("/health")[0] != 200:
            assert time.monotonic() < deadline, srv.get("/health")
            time.sleep(0.5)
        again = client.chat.completions.create(model=name, messages=user("Bonjour"), max_tokens=8, temperature=0)
        assert again.choices[0].message.content == first.choices[0].message.content
        assert srv.get("/health")[2]["status"] == "ok"
        assert srv.terminate() == 0
    finally:
        srv.kill()
    out = srv.proc.stdout.read()
    assert "ggml-rpc.cpp" not in out and "Traceback" not in out, out


def rss(pid: int) -> int:
    """Resident bytes of a process, from /proc (what the rpc-server really holds, not what the
    client says it sent)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@needs_rpc
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc")
def test_the_rpc_servers_hold_the_weights(model, servers):
    """With every block offloaded (-ngl all), each rpc-server's own resident memory grows by its share
    of the weights while `serve --rpc` holds the model; the two shares add up to about the file."""
    from helpers.serving import Server

    before = [rss(s.proc.pid) for s in servers]
    srv = Server(model, "--rpc", ",".join(s.endpoint for s in servers), "-ngl", "all", "-c", "512")
    try:
        grown = [rss(s.proc.pid) - b for s, b in zip(servers, before)]
    finally:
        srv.terminate()
    size = Path(model).stat().st_size
    assert all(g > 0.2 * size for g in grown), (grown, size)  # both servers hold a share
    assert 0.7 * size < sum(grown) < 1.6 * size, (grown, size)  # the weights, not a copy per server


@needs_rpc
def test_interactive_chat_through_rpc_stops_an_answer_on_ctrl_c(model, servers, cli_env, tmp_path):
    """In a terminal, Ctrl-C reaches the parent and the child (one process group): the parent lets
    the child take it, so one press stops the answer and the chat goes on, as without --rpc."""
    import pexpect

    env = dict(cli_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    chat = pexpect.spawn(MS4LOCAL, ["chat", str(model), "--rpc", ",".join(s.endpoint for s in servers), "-t", "1",
                                    "-n", "-1", "--temp", "0"], env=env, encoding="utf-8", timeout=60,
                         dimensions=(40, 200), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        chat.expect(">>> ")
        chat.sendline("Bonjour")
        chat.expect(r"\S")  # the answer has begun
        time.sleep(0.5)
        chat.sendintr()
        chat.expect(r"stopped · \d+ generated")
        chat.expect(">>> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0, chat.before


@needs_rpc
def test_eval_through_rpc_scores_as_a_local_eval(model, servers, cli_env):
    args = [str(model), "-c", "64", "--chunks", "2", "--json"]
    local = subprocess.run([MS4LOCAL, "eval", *args], env=cli_env, capture_output=True, text=True, timeout=300)
    remote = subprocess.run([MS4LOCAL, "eval", *args, "--rpc", ",".join(s.endpoint for s in servers)], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout)["perplexity"], json.loads(remote.stdout)["perplexity"]
    assert abs(a - b) <= 1e-4 * a, (a, b)


# ----------------------------------------------------------------------------- --fit across hosts
def fit_vram(model) -> tuple[int, dict]:
    """A --vram for the first server that holds the output layer, every block's dense part, its KV
    cache and the compute allowance of ms4local/placement.py (-c 256 -ub 16, flash attention auto:
    16 MiB + heads × 256 cells × 16 × 4 bytes, plus one expert stack) but no block's routed experts:
    these must go to the second server. Sizes from gguf-py's reader."""
    from gguf import GGUFReader

    r = GGUFReader(model)
    field = lambda key: int(r.fields[f"mistral4.{key}"].parts[-1][0])  # noqa: E731
    n, heads = field("block_count"), field("attention.head_count")
    row = field("attention.kv_lora_rank") + field("rope.dimension_count")
    expert = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.")
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    experts = sum(s for k, s in sizes.items() if expert.match(k))
    embd = sizes["token_embd.weight"]
    dense = sum(sizes.values()) - experts - embd
    biggest = max(s for k, s in sizes.items() if expert.match(k))
    need = dense + n * 256 * row * 2 + 16 * 2**20 + heads * 256 * 16 * 4 + biggest
    return 2**30 + need + experts // n // 2, {"dense": dense, "experts": experts, "embd": embd}


FIT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ms4local import Engine, EngineOptions
    from ms4local import engine as eng

    model, vram, endpoints = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    text = "Bonjour le monde, ceci est un essai de RPC."

    def run(**kw):
        mark = eng.log_mark()
        with Engine(model, EngineOptions(ctx_size=256, ubatch_size=16, logits_all=True, **kw)) as e:
            ids = e.tokenize(text, add_special=True)
            sp = e.placement.spread
            plan = sp and {t.device: sp.device_bytes(t.device) for t in sp.targets}
            return e.logits(ids), eng.log_text(mark), plan

    before, _, _ = run()
    remote, log, plan = run(rpc=endpoints, fit=True, vram=vram)
    print(json.dumps({"scale": float(np.max(np.abs(remote - before)) / np.max(np.abs(before))), "log": log,
                      "plan": plan}))
""")


def model_buffers(log: str) -> dict[str, float]:
    return {line.split("model buffer size")[0].split(":", 1)[1].strip(): float(line.split("=")[1].split()[0])
            for line in log.splitlines() if "model buffer size" in line}


@needs_rpc
def test_fit_across_two_rpc_servers_plans_what_llama_cpp_then_loads(model, servers, cli_env, tmp_path):
    """`info --rpc A,B --fit` prints a plan with tensors on both servers (every block's dense part
    on A, whose --vram leaves no room for experts; the routed experts on B); an engine with
    `--rpc --fit` loads exactly that (llama.cpp's own buffer sizes) and its logits equal a local run's."""
    vram, size = fit_vram(model)
    a, b = (f"RPC0[{s.endpoint}]" for s in servers)
    eps = ",".join(s.endpoint for s in servers)
    r = subprocess.run([MS4LOCAL, "info", str(model), "--rpc", eps, "--fit", "--vram", str(vram), "-c", "256", "-ub",
                        "16", "--json"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)["rpc_plan"]
    assert shown["main"] == a and shown["experts"] == {a: [], b: [0, 1]} and shown["cpu_experts"] == []
    assert shown["overrides"] == [r"\.ffn_(up|down|gate|gate_up)_exps=" + b]
    r = subprocess.run([MS4LOCAL, "info", str(model), "--rpc", eps, "--fit", "--vram", str(vram), "-c", "256", "-ub",
                        "16"], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("--fit placement across hosts"):]
    assert re.search(rf"{re.escape(servers[0].endpoint)} .*attention, norms, router", table)
    assert re.search(rf"{re.escape(servers[1].endpoint)} .*routed experts \(blocks 0–1\)", table)

    script = tmp_path / "fit.py"
    script.write_text(FIT)
    r = subprocess.run([str(BIN / "python"), str(script), str(model), str(vram)] + [s.endpoint for s in servers],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["scale"] <= 1e-3, out["scale"]
    loaded = model_buffers(out["log"])
    mib = 2**20
    assert set(loaded) == {"CPU_Mapped", a, b}, loaded
    assert abs(loaded[a] - size["dense"] / mib) < 0.01 and abs(loaded[b] - size["experts"] / mib) < 0.01, (loaded, size)
    assert abs(loaded["CPU_Mapped"] - size["embd"] / mib) < 0.01
    rows = {d: sum(x["nbytes"] for x in shown["rows"] if x["device"] == d) for d in (a, b)}
    assert out["plan"][a] == rows[a] and out["plan"][b] == rows[b]  # the plan info printed is the one applied


@needs_rpc
def test_chat_and_eval_with_fit_across_rpc_servers_answer_like_local_runs(model, servers, cli_env):
    vram, _ = fit_vram(model)
    args = ["-c", "256", "-ub", "16", "--temp", "0", "-p", "Bonjour", "-n", "12", "--json"]
    remote = subprocess.run([MS4LOCAL, "chat", str(model), "--rpc", ",".join(s.endpoint for s in servers), "--fit",
                             "--vram", str(vram), *args], env=cli_env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr
    assert "--fit placement across hosts" in remote.stderr and servers[1].endpoint in remote.stderr
    local = subprocess.run([MS4LOCAL, "chat", str(model), *args], env=cli_env, capture_output=True, text=True,
                           timeout=300)
    assert json.loads(remote.stdout)["content"] == json.loads(local.stdout)["content"]
    assert json.loads(remote.stdout)["usage"]["completion_tokens"] > 0
    # eval --rpc --fit scores the text as a local eval does
    args = [str(model), "-c", "64", "--chunks", "2", "--json"]
    local = subprocess.run([MS4LOCAL, "eval", *args], env=cli_env, capture_output=True, text=True, timeout=300)
    remote = subprocess.run([MS4LOCAL, "eval", *args, "--rpc", ",".join(s.endpoint for s in servers), "--fit",
                             "--vram", str(vram)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout)["perplexity"], json.loads(remote.stdout)["perplexity"]
    assert abs(a - b) <= 1e-4 * a, (a, b)


MOE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ms4local import Engine, EngineOptions
    from ms4local import engine as eng

    model, a, b = sys.argv[1:]
    text = "Bonjour le monde, ceci est un essai de RPC."

    def run(**kw):
        mark = eng.log_mark()
        with Engine(model, EngineOptions(ctx_size=256, logits_all=True, **kw)) as e:
            return e.logits(e.tokenize(text, add_special=True)), eng.log_text(mark)

    before, _ = run()
    out = {}
    for name, kw in {"cpu_moe": dict(cpu_moe=True), "n_cpu_moe": dict(n_cpu_moe=1),
                     "ot": dict(override_tensor=[r"blk\\.1\\.ffn_(up|down|gate|gate_up)_exps=RPC0[%s]" % b],
                                tensor_split=[1, 0])}.items():
        logits, log = run(rpc=[a, b], n_gpu_layers=99, **kw)
        out[name] = {"scale": float(np.max(np.abs(logits - before)) / np.max(np.abs(before))), "log": log}
    print(json.dumps(out))
""")


@needs_rpc
def test_cpu_moe_n_cpu_moe_and_ot_across_rpc_servers(model, servers, cli_env, tmp_path):
    """-ngl 99 --rpc A,B with --cpu-moe keeps every routed expert in this process's RAM (the servers
    hold only the dense part), --n-cpu-moe 1 those of block 0, and an -ot rule sends block 1's
    experts to B while -ts 1,0 gives A every block; each answers with the local run's logits."""
    from gguf import GGUFReader

    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(model).tensors}
    expert = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")
    exp = [sum(s for k, s in sizes.items() if (m := expert.match(k)) and int(m[1]) == i) for i in (0, 1)]
    embd = sizes["token_embd.weight"]
    dense = sum(sizes.values()) - sum(exp) - embd
    a, b = (f"RPC0[{s.endpoint}]" for s in servers)
    script = tmp_path / "moe.py"
    script.write_text(MOE)
    r = subprocess.run([str(BIN / "python"), str(script), str(model)] + [s.endpoint for s in servers],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    mib = 2**20

    def close(x, nbytes):
        return abs(x - nbytes / mib) < 0.01

    for name, got in out.items():
        assert got["scale"] <= 1e-3, (name, got["scale"])
    # What the servers hold (this process's mapped CPU buffer spans the file from its first to its
    # last CPU tensor, so it is no measure of what stayed here).
    cpu_moe = model_buffers(out["cpu_moe"]["log"])
    assert close(cpu_moe[a] + cpu_moe[b], dense), cpu_moe  # the dense part only: every expert stayed local
    n_cpu_moe = model_buffers(out["n_cpu_moe"]["log"])
    assert close(n_cpu_moe[a] + n_cpu_moe[b], dense + exp[1]), n_cpu_moe  # block 0's experts stayed local
    ot = model_buffers(out["ot"]["log"])
    assert close(ot[a], dense + exp[0]) and close(ot[b], exp[1]), ot
    # The same through the CLI: `chat -ngl 99 --rpc A,B --cpu-moe` answers like a local chat.
    args = ["-c", "256", "--temp", "0", "-p", "Bonjour", "-n", "8", "--json"]
    remote = subprocess.run([MS4LOCAL, "chat", str(model), "-ngl", "99", "--cpu-moe", "--rpc",
                             ",".join(s.endpoint for s in servers), *args], env=cli_env, capture_output=True,
                            text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([MS4LOCAL, "chat", str(model), *args], env=cli_env, capture_output=True, text=True,
                           timeout=300)
    assert json.loads(remote.stdout)["content"] == json.loads(local.stdout)["content"]


# ----------------------------------------------------------------------------- a host that vanishes
@pytest.mark.parametrize("command", ["chat", "serve"])
def test_an_endpoint_that_accepts_and_never_answers_is_one_line_within_seconds(command, model, cli_env):
    """Not a closed port: a listener that takes the connection and stays silent (a wedged or foreign
    service) would leave llama.cpp in recv for good; the probe's timeout names it."""
    fake = FakeServer(lambda conn: time.sleep(30))
    try:
        args = [MS4LOCAL, command, str(model), "--rpc", f"127.0.0.1:{fake.port}"]
        args += ["-p", "hi"] if command == "chat" else []
        started = time.monotonic()
        r = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=60)
    finally:
        fake.close()
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: rpc-server 127.0.0.1:{fake.port}: accepted the connection but sent no handshake within 3 s (an "
        "rpc-server serves one client at a time: is another one using it?)"]
    assert time.monotonic() - started < 20


class StallProxy:
    """A loopback TCP relay to an rpc-server that can play a host gone off the network: `vanish()`
    stops relaying (what the client sends is swallowed, nothing comes back, the connection stays
    open, as with dropped packets) and stops listening (a new connection is refused)."""

    def __init__(self, target_port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        self.target = target_port
        self.gone = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self.gone.is_set():
                    dst.sendall(data)
            if not self.gone.is_set():  # a closed side closes the other: the server takes its next client
                dst.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def vanish(self) -> None:
        self.gone.set()
        self.sock.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@needs_rpc
def test_a_host_that_vanishes_mid_answer_ends_chat_with_one_line(model, servers, cli_env):
    """The rpc-server's host stops answering mid-answer (no reset, no close): llama.cpp would wait in
    recv for as long as TCP holds on; the watchdog (MS4LOCAL_RPC_STALL seconds without progress, then
    a new connection that fails) ends the engine and chat names the host."""
    proxy = StallProxy(servers[1].port)
    env = dict(cli_env, MS4LOCAL_RPC_STALL="2")
    chat = subprocess.Popen([MS4LOCAL, "chat", str(model), "--rpc", f"{servers[0].endpoint},{proxy.endpoint}", "-c",
                             "4096", "--temp", "0", "-p", "Bonjour", "-n", "-1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert chat.stdout.read(16), chat.stderr.read().decode()  # the answer is streaming
        proxy.vanish()
        gone = time.monotonic()
        _, err = chat.communicate(timeout=60)
    finally:
        if chat.poll() is None:
            chat.kill()
        proxy.close()
    assert time.monotonic() - gone < 20
    assert chat.returncode == 1
    lines = err.decode().strip().splitlines()
    assert lines[-1] == (f"error: lost rpc-server {proxy.endpoint} (connection refused); llama.cpp stopped: no answer "
                         f"from rpc-server {proxy.endpoint} for 2 s, and a new connection is refused. Start the "
                         "rpc-server again and rerun"), lines
    assert not any("Traceback" in line for line in lines)


@needs_rpc
def test_a_host_that_vanishes_under_serve_is_a_503_naming_it(model, servers, endless):
    """The same under `serve --rpc`: the stream in flight ends with an error event, /health answers
    503 with the reason (the host, no answer), and the front stays up."""
    import openai
    from helpers.serving import Server, user

    proxy = StallProxy(servers[1].port)
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", MS4LOCAL_RPC_STALL="2")
    srv = Server(model, "--rpc", f"{servers[0].endpoint},{proxy.endpoint}", "-c", "4096", env=env)
    try:
        client = srv.client()
        name = Path(model).name.removesuffix(".gguf")
        stream = client.chat.completions.create(model=name, messages=user("Raconte"), max_tokens=3000, stream=True,
                                                extra_body=endless)
        chunks = iter(stream)
        next(chunks), next(chunks)  # the answer is streaming
        proxy.vanish()
        gone = time.monotonic()
        with pytest.raises(openai.APIError, match=f"lost rpc-server {proxy.endpoint}"):
            for _ in chunks:
                pass
        assert time.monotonic() - gone < 30
        status, _, body = srv.get("/health")
        assert status == 503 and body["status"] == "unavailable", body
        assert f"no answer from rpc-server {proxy.endpoint} for 2 s" in body["reason"], body
        assert srv.proc.poll() is None  # the front is up
        assert srv.terminate() == 0
    finally:
        srv.kill()
        proxy.close()
