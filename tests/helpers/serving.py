"""The `ms4local serve` harness the server tests share: a real `ms4local serve` subprocess on a
free loopback port, plain-HTTP helpers and OpenAI's error shape."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import openai

from . import BIN

KEY = "sk-test-0123456789"
STARTUP_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `ms4local serve` subprocess on a free loopback port."""

    def __init__(self, model, *args: str, key: str | None = KEY, env=None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        cmd = [str(BIN / "ms4local"), "serve", str(model), "--port", str(self.port), "-t", "2", *args]
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or dict(os.environ, NO_COLOR="1", COLUMNS="200"))
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
            try:
                status, _, _ = self.get("/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not become ready")
            time.sleep(0.1)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "none", max_retries=0, timeout=60, **kw)

    def request(self, method: str, path: str, body=None, *, key: str | None = "default", raw: bytes | None = None,
                headers=None, timeout: float = 60):
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        key = self.key if key == "default" else key
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, hdrs, text = resp.status, dict(resp.headers), resp.read().decode()
        except urllib.error.HTTPError as e:
            status, hdrs, text = e.code, dict(e.headers), e.read().decode()
        try:
            return status, hdrs, json.loads(text)
        except json.JSONDecodeError:
            return status, hdrs, text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def running(model, *args: str, **kw):
    server = Server(model, *args, **kw)
    try:
        yield server
    finally:
        code = server.terminate()
        assert code == 0, server.proc.stdout.read()


def assert_error(status, body, want_status: int, *, code: str | None = None, contains: str = "") -> None:
    """OpenAI's error shape, with the status and (optionally) code and message text asked for."""
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def stream(server: Server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Open a streamed chat completion and return the live connection and response."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def metric(server: Server, name: str) -> float:
    _, _, text = server.get("/metrics")
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))
