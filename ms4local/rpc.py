"""llama.cpp RPC endpoints, checked in Python before llama.cpp connects to them.

llama.cpp's RPC client aborts the whole process (`GGML_ABORT`) on an endpoint that does not
parse, a host it cannot resolve, a refused connection or a failed handshake. So every endpoint
is parsed here with the client's own rules and then probed by speaking the first commands of its
wire protocol (ggml-rpc.cpp, protocol 7.0.0 in llama-cpp-python 0.3.36):

    request : cmd (u8) | size (u64) | payload        response: size (u64) | payload
    HELLO (14)             24 bytes of transport caps  → major, minor, patch, pad (u8 each) + 24 caps
    DEVICE_COUNT (15)      nothing                     → u32 devices
    GET_DEVICE_MEMORY (11) u32 device                  → u64 free, u64 total

The probe accepts what the client accepts (same major version, minor not newer), reports the
server's devices and their memory, and closes; each fault is an `RpcError` that names the endpoint.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import OptionsError, RpcError

# ggml-rpc.h of the llama.cpp that llama-cpp-python 0.3.36 vendors (pinned in pyproject.toml).
PROTOCOL = (7, 0, 0)
MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS
DEFAULT_PORT = 50052
PROBE_TIMEOUT = 3.0  # seconds for the connect and for each answer

_HELLO, _DEVICE_COUNT, _GET_DEVICE_MEMORY = 14, 15, 11
_CAPS = 24  # RPC_CONN_CAPS_SIZE: zero caps ask for plain TCP


@dataclass(frozen=True)
class Endpoint:
    """One `HOST:PORT` as llama.cpp's client reads it (split at the first colon)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


@dataclass(frozen=True)
class RemoteDevice:
    index: int
    free: int  # bytes
    total: int  # bytes


@dataclass(frozen=True)
class RemoteServer:
    """What a probe learnt from a running rpc-server."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    devices: tuple[RemoteDevice, ...]

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def to_json(self) -> dict[str, object]:
        return {"endpoint": str(self.endpoint), "protocol": ".".join(map(str, self.version)),
                "devices": [{"index": d.index, "free": d.free, "total": d.total} for d in self.devices]}


def is_loopback(host: str) -> bool:
    """Whether `host` keeps traffic on this machine: 127.0.0.0/8, ::1 (bracketed or not) and
    `localhost`; a host name may resolve to anything. For rpc-servers and `serve` alike."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_endpoint(text: str) -> Endpoint:
    """`HOST:PORT` → Endpoint; OptionsError for what llama.cpp would abort on or misread.

    llama.cpp splits at the first colon and resolves the host with gethostbyname (IPv4 only),
    so an IPv6 address cannot be reached through it and is refused here with that reason.
    """
    value = text.strip()
    if value.count(":") > 1 or value.startswith("["):
        raise OptionsError(f"--rpc {text!r}: llama.cpp's RPC client speaks IPv4 only; give an IPv4 address or a host name")
    host, sep, port = value.partition(":")
    if not sep or not host or not port:
        raise OptionsError(f"--rpc wants HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT}), got {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionsError(f"--rpc {text!r}: the port must be a number within 1-65535")
    return Endpoint(host, int(port))


def parse_endpoints(values: Iterable[str]) -> list[Endpoint]:
    """Endpoints from `--rpc` values, each of which may be a comma-separated list (llama.cpp's form)."""
    out: list[Endpoint] = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                raise OptionsError(f"--rpc {value!r} has an empty entry; give HOST:PORT[,HOST:PORT…]")
            ep = parse_endpoint(item)
            if ep in out:
                raise OptionsError(f"--rpc names {ep} twice; each rpc-server is one set of devices")
            out.append(ep)
    if len(out) > MAX_SERVERS:
        raise OptionsError(f"--rpc names {len(out)} servers; llama.cpp takes at most {MAX_SERVERS}")
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("closed")
        data += chunk
    return bytes(data)


def _command(sock: socket.socket, cmd: int, payload: bytes, answer: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != answer:
        raise ValueError(f"answered {size} bytes where {answer} were due")
    return _recv_exact(sock, answer)


def _fault(ep: Endpoint, reason: str, advice: str = "") -> RpcError:
    return RpcError(f"rpc-server {ep}: {reason}" + (f" ({advice})" if advice else ""), endpoint=str(ep), reason=reason)


def probe(endpoint: Endpoint | str, timeout: float = PROBE_TIMEOUT) -> RemoteServer:
    """Connect, shake hands and list the devices of one rpc-server; RpcError naming it otherwise."""
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    ours = ".".join(map(str, PROTOCOL))
    try:
        # AF_INET as llama.cpp's gethostbyname: a name that resolves only to IPv6 fails here too.
        addr = socket.getaddrinfo(ep.host, ep.port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, UnicodeError) as e:
        raise _fault(ep, f"cannot resolve host {ep.host!r}", getattr(e, "strerror", None) or str(e)) from None
    step = "connect"
    try:
        with socket.create_connection(addr, timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            step = "handshake"
            hello = _command(sock, _HELLO, bytes(_CAPS), 4 + _CAPS)
            version = (hello[0], hello[1], hello[2])
            if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
                raise _fault(ep, f"speaks RPC protocol {'.'.join(map(str, version))}, this llama.cpp {ours}",
                             "run the same ms4local/llama.cpp version on both hosts")
            step = "device list"
            (count,) = struct.unpack("<I", _command(sock, _DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                free, total = struct.unpack("<QQ", _command(sock, _GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
                devices.append(RemoteDevice(i, free, total))
    except RpcError:
        raise
    except ConnectionRefusedError:
        raise _fault(ep, "connection refused", f"is `ms4local rpc-server --port {ep.port}` running there, bound to an "
                                               "address this machine can reach?") from None
    except socket.timeout:
        if step == "connect":
            raise _fault(ep, f"no answer within {timeout:g} s", "a firewall, or a host that is down?") from None
        raise _fault(ep, f"accepted the connection but sent no {step} within {timeout:g} s",
                     "an rpc-server serves one client at a time: is another one using it?") from None
    except ConnectionResetError:
        raise _fault(ep, f"closed the connection during the {step}",
                     f"an rpc-server of another llama.cpp version? this one speaks protocol {ours}") from None
    except (ValueError, struct.error) as e:
        raise _fault(ep, f"does not answer like llama.cpp's RPC server ({step}: {e})") from None
    except OSError as e:
        raise _fault(ep, e.strerror or str(e)) from None
    if not devices:
        raise _fault(ep, "shares no device")
    return RemoteServer(ep, version, tuple(devices))


def preflight(endpoints: Iterable[Endpoint | str], timeout: float = PROBE_TIMEOUT) -> list[RemoteServer]:
    """Probe every endpoint in turn (each answers or raises RpcError naming it)."""
    return [probe(ep, timeout) for ep in endpoints]
