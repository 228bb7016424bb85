"""A loopback stand-in for the Hugging Face Hub, for the tests that pull (HF_ENDPOINT points at it).

It answers the routes huggingface_hub 0.2x/0.3x calls, the way the Hub answers them:
  GET  /api/models/{repo}[/revision/{rev}]          → {"id", "sha", "siblings": [{"rfilename"}], …}
  GET  /api/models/{repo}/tree/{rev}[/{path}]        → [{"type", "path", "size", "oid", "lfs"?}, …]
  HEAD /{repo}/resolve/{rev}/{path}                   → X-Repo-Commit, ETag (X-Linked-Etag / X-Linked-Size
                                                        for LFS files: the sha256 and size), Content-Length
  GET  /{repo}/resolve/{rev}/{path}                   → the bytes; `Range: bytes=N-` → 206 + Content-Range
Errors carry the Hub's X-Error-Code (RepoNotFound, GatedRepo, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its typed exceptions. Every request is logged; a file can be made to drop
its connection after N bytes, or to trickle slowly (to be killed in the middle). Binds 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")  # stored in LFS on the Hub: etag = sha256 of the content


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """A model repo: files by path; `gated` repos need a token in `tokens`, `private` ones too."""

    repo_id: str
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    private: bool = False
    tokens: set[str] = field(default_factory=set)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def tree(self) -> list[dict]:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})
        out: list[dict] = [{"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d} for d in dirs]
        for path, data in sorted(self.files.items()):
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    authorized: bool


class StubHub:
    """Start with `with StubHub() as hub:`; `hub.url` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self._drops: dict[str, list[int]] = {}  # path → byte counts after which to cut, one per GET
        self._trickle: dict[str, tuple[int, float]] = {}  # path → (chunk bytes, seconds between chunks)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ set-up
    def add(self, repo_id: str, files: dict[str, bytes], **kwargs) -> Repo:
        repo = Repo(repo_id, dict(files), **kwargs)
        self.repos[repo_id] = repo
        return repo

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """The next `times` GETs of `path` send `nbytes` of the body, then cut the connection."""
        self._drops[path] = [nbytes] * times

    def trickle(self, path: str, chunk: int, seconds: float) -> None:
        """Send `path` in `chunk`-byte pieces with a pause between them."""
        self._trickle[path] = (chunk, seconds)

    # ------------------------------------------------------------------ reading the log
    def gets(self) -> list[str]:
        """Files downloaded (GET on resolve), in order."""
        return [e.path.split("/resolve/", 1)[1].split("/", 1)[1] for e in self.log
                if e.method == "GET" and "/resolve/" in e.path]

    def file_requests(self) -> list[str]:
        """Files asked about in any way (HEAD or GET on resolve)."""
        return [e.path.split("/resolve/", 1)[1].split("/", 1)[1] for e in self.log if "/resolve/" in e.path]

    def ranges(self) -> list[tuple[str, str]]:
        return [(e.path.rsplit("/", 1)[-1], e.range) for e in self.log if e.method == "GET" and e.range]

    # ------------------------------------------------------------------ running
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StubHub:
        hub = self

        class Handler(_Handler):
            stub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    stub: StubHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # ------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        self._body = body  # no body after the headers of a HEAD answer, errors included
        path = unquote(urlsplit(self.path).path)
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        with self.stub._lock:
            self.stub.log.append(Logged(self.command, path, self.headers.get("Range"), bool(token)))
        if m := _TREE.match(path):
            repo = self._repo(m["repo"], token)
            if repo and self._revision(repo, m["rev"]):
                prefix = (m["path"] or "").strip("/")
                entries = [e for e in repo.tree() if not prefix or e["path"].startswith(prefix + "/")]
                self._json(200, entries)
        elif m := _API.match(path):
            repo = self._repo(m["repo"], token)
            if repo and self._revision(repo, m["rev"] or "main"):
                self._json(200, {"_id": "stub", "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                                 "private": repo.private, "gated": "manual" if repo.gated else False,
                                 "disabled": False, "downloads": 0, "likes": 0, "tags": ["gguf"],
                                 "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
        elif m := _RESOLVE.match(path):
            repo = self._repo(m["repo"], token)
            if repo and self._revision(repo, m["rev"]):
                self._file(repo, m["path"], body)
        else:
            self._error(404, None, "Not found")

    def _repo(self, repo_id: str, token: str) -> Repo | None:
        repo = self.stub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.private and token not in repo.tokens:
            # The Hub answers a private repo without a valid token as if it did not exist, with 401.
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        if repo.gated and token not in repo.tokens:
            if not token:
                self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", "Access to model is restricted and you are not in the "
                                              "authorized list.")
            return None
        return repo

    def _revision(self, repo: Repo, rev: str) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", "Invalid rev id", repo)
        return False

    def _file(self, repo: Repo, path: str, body: bool) -> None:
        if path not in repo.files:
            self._error(404, "EntryNotFound", "Entry not found", repo)
            return
        data = repo.files[path]
        etag = repo.etag(path)
        start = 0
        rng = self.headers.get("Range")
        if body and rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m[1])
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{etag}"')
        if repo.is_lfs(path):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        payload = data[start:]
        with self.stub._lock:
            drops = self.stub._drops.get(path)
            cut = drops.pop(0) if drops else None
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        chunk, pause = self.stub._trickle.get(path, (len(payload) or 1, 0.0))
        try:
            for i in range(0, len(payload), chunk):
                self.wfile.write(payload[i:i + chunk])
                self.wfile.flush()
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _json(self, status: int, obj: object) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self._body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, repo: Repo | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if repo is not None:
            self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self._body:
            self.wfile.write(data)


def loopback_only(monkeypatch) -> None:
    """Make any socket connection to an address other than 127.0.0.1 / ::1 fail in this process."""
    real = socket.socket.connect

    def connect(self, address):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test isolation: connection to {host} refused (loopback only)")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
