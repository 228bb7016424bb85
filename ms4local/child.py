"""A command run again in a child process, so that llama.cpp's abort on a lost rpc-server ends
the child and not the process the user talks to.

llama.cpp's RPC client aborts its process when a server goes away while in use
(`RPC_STATUS_ASSERT`: "Remote RPC server crashed or returned malformed response") and prints a C
backtrace. A command that loads a model through rpc-servers therefore runs again in a child: the
same function with the same arguments, handed over a pipe. The child shares the terminal (stdin,
stdout, and Python's stderr through a duplicate of fd 2) while its C-level stderr goes to a file,
with GGML_NO_BACKTRACE set. When the child dies of a signal, `death_message` reads llama.cpp's
last words from that file and probes the endpoints again to name the one that is gone.

A host that vanishes (off the network, packets dropped) is not a closed port: llama.cpp then waits
in recv for as long as TCP keeps the connection (many minutes). `Watchdog` watches the child's
threads for one that sits at the same place in the engine's code for `MS4LOCAL_RPC_STALL` seconds
(default 30), and then tries a new TCP connection to each rpc-server: a server busy with a long
batch still accepts one (its kernel does), a vanished host does not. Then the child ends itself
(SIGKILL, after a line for `last_words`), so `chat` prints one line naming the host and `serve`'s
front answers 503 with it until the host is back.

    python -m ms4local.child CALL_FD STDERR_FD     the child's entry point (started by `Child`)
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import RpcError
from .rpc import Endpoint, parse_endpoints, probe

CHILD_ENV = "MS4LOCAL_RPC_CHILD"  # set in the child: run the command itself, do not start another child
STALL_ENV = "MS4LOCAL_RPC_STALL"  # seconds without progress in the engine before the rpc-servers are checked
STALL_SECONDS = 30.0
RERUN = "Start the rpc-server again and rerun"


def in_child() -> bool:
    """True inside a child started by `Child` (the command runs here, not once more)."""
    return bool(os.environ.get(CHILD_ENV))


class Child:
    """`func(**kwargs)` run again in a child process, its C-level stderr kept in a file.

    `func` is found again in the child by module and name. `own_group` starts the child in a
    session of its own, so that the terminal's Ctrl-C reaches only the parent, which decides what
    to pass on (`serve`); an interactive `chat` stays in the terminal's foreground group, where it
    reads the keyboard.
    """

    def __init__(self, func: Callable[..., Any], kwargs: dict[str, Any], *, env: dict[str, str] | None = None,
                 own_group: bool = False) -> None:
        call = pickle.dumps((func.__module__, func.__name__, kwargs))
        read_fd, write_fd = os.pipe()
        term_fd = os.dup(2)
        self.c_stderr = tempfile.TemporaryFile(prefix="ms4local-engine-stderr-")
        full_env = dict(os.environ, **(env or {}), **{CHILD_ENV: "1", "GGML_NO_BACKTRACE": "1"})
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "ms4local.child", str(read_fd), str(term_fd)],
                                         stderr=self.c_stderr, pass_fds=(read_fd, term_fd), env=full_env,
                                         start_new_session=own_group)
        finally:
            os.close(read_fd)
            os.close(term_fd)
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(call)

    def wait(self) -> int:
        """Wait for the child, passing SIGTERM on, and SIGINT when the terminal did not send it to both."""
        tty = sys.stdin is not None and sys.stdin.isatty()

        def forward(signum: int, _frame: Any) -> None:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        # Ctrl-C at a terminal reaches the whole foreground group, the child included: it stops the
        # answer there, and the parent must not send a second one (two stop the chat).
        signal.signal(signal.SIGINT, signal.SIG_IGN if tty else forward)
        signal.signal(signal.SIGTERM, forward)
        try:
            return self.proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def words(self) -> str:
        """llama.cpp's last words on the child's C stderr ("" when it wrote none)."""
        self.c_stderr.seek(0)
        return last_words(self.c_stderr.read().decode("utf-8", "replace"))

    def death(self, code: int, endpoints: list[Endpoint], advice: str = RERUN) -> str:
        """One line for a child that ended with return code `code` < 0 (a signal)."""
        return death_message(-code, self.words(), endpoints, advice)

    def close(self) -> None:
        self.c_stderr.close()


def run(func: Callable[..., Any], kwargs: dict[str, Any], endpoints: list[Endpoint]) -> int:
    """`func(**kwargs)` in a child; its exit code, or RpcError with one line when it died of a signal."""
    child = Child(func, kwargs)
    try:
        code = child.wait()
        if code < 0:
            raise RpcError(child.death(code, endpoints))
        return code
    finally:
        child.close()


def last_words(text: str) -> str:
    """llama.cpp's abort message from the child's C stderr ("file.cpp:123: message" → message)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        if sep and ":" in head and head.rsplit(":", 1)[-1].isdigit():
            return rest.strip()
    return lines[-1] if lines else ""


def death_message(signum: int, words: str, endpoints: list[Endpoint], advice: str = RERUN) -> str:
    """One line for a child that died of `signum`: the lost rpc-server(s) if a probe finds them."""
    try:
        how = signal.Signals(signum).name
    except ValueError:
        how = f"signal {signum}"
    lost = []
    for ep in endpoints:
        try:
            probe(ep, timeout=2.0)
        except RpcError as e:
            lost.append(f"{ep} ({e.reason})")
    said = f": {words}" if words else f" ({how})"
    if lost:
        return f"lost rpc-server {', '.join(lost)}; llama.cpp stopped{said}. {advice}"
    servers = ", ".join(map(str, endpoints))
    return f"the engine stopped{said}; the rpc-servers ({servers}) answer now"


def reachable(ep: Endpoint, timeout: float = 3.0) -> str | None:
    """None when a new TCP connection to `ep` opens; else why not. Only the connection: a server
    busy with this process's own session accepts it but does not answer before that session ends."""
    try:
        addr = socket.getaddrinfo(ep.host, ep.port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        with socket.create_connection(addr, timeout=timeout):
            return None
    except socket.timeout:
        return f"a new connection gets no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "a new connection is refused"
    except OSError as e:
        return f"a new connection fails: {e.strerror or e}"


class Watchdog(threading.Thread):
    """Ends this (child) process when an engine call has not moved for `seconds` and an rpc-server
    no longer takes a connection (see the module's docstring)."""

    def __init__(self, endpoints: list[Endpoint], seconds: float) -> None:
        super().__init__(name="ms4local-rpc-watchdog", daemon=True)
        self.endpoints, self.seconds = endpoints, seconds

    def stuck(self, seen: dict[int, tuple[tuple[int, int], float]], now: float) -> bool:
        """Whether a thread has been at one place in the engine (a llama.cpp call) for `seconds`."""
        found = False
        frames = sys._current_frames()
        for tid in list(seen):
            if tid not in frames:
                del seen[tid]
        for tid, frame in frames.items():
            where = frame.f_code.co_filename.replace(os.sep, "/")
            if tid == self.ident or not ("/ms4local/engine/" in where or "/llama_cpp/" in where):
                seen.pop(tid, None)
                continue
            key = (id(frame), frame.f_lasti)
            if tid not in seen or seen[tid][0] != key:
                seen[tid] = (key, now)
            elif now - seen[tid][1] >= self.seconds:
                found = True
                seen[tid] = (key, now)  # checked: the next check after another `seconds`
        return found

    def run(self) -> None:
        seen: dict[int, tuple[tuple[int, int], float]] = {}
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            if not self.stuck(seen, time.monotonic()):
                continue
            for ep in self.endpoints:
                why = reachable(ep)
                if why is not None:
                    # fd 2 is the C stderr file that `Child.words` reads: one line in llama.cpp's form
                    os.write(2, f"\nms4local/child.py:0: no answer from rpc-server {ep} for {self.seconds:g} s, "
                                f"and {why}\n".encode())
                    os.kill(os.getpid(), signal.SIGKILL)


def stall_seconds() -> float:
    """The watchdog's patience: MS4LOCAL_RPC_STALL seconds (0 turns it off), default STALL_SECONDS."""
    try:
        return max(float(os.environ.get(STALL_ENV, STALL_SECONDS)), 0.0)
    except ValueError:
        return STALL_SECONDS


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGTERM to the child when the parent dies (e.g. by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _child_main(call_fd: int, term_fd: int) -> int:
    """The child: Python's stderr on the terminal again, then the command with the parent's arguments."""
    sys.stderr = open(term_fd, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")
    _die_with_parent()
    with open(call_fd, "rb") as f:
        module, name, kwargs = pickle.loads(f.read())
    func = getattr(importlib.import_module(module), name)
    endpoints = parse_endpoints(kwargs.get("rpc") or [])
    if endpoints and stall_seconds() > 0:
        Watchdog(endpoints, stall_seconds()).start()
    try:
        func(**kwargs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a command's typer.Exit (click's Exit) carries the exit code
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        return int(code)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or not in_child():
        sys.exit("ms4local.child is started by ms4local itself")
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))
