"""The native connection life cycle (proxyd/nativerelay.py, relay.c) held to relay.py's ``Connection``.

On the compiled data path a listener accepts with its own loop and relays an admitted
connection between the two descriptors in C, unless ``PROXYD_NATIVE_RELAY=0`` (read when a
listener starts serving) keeps uvloop's transports. Both must keep every promise of relay.py's
module docstring, so each scenario (``SCENARIOS``) runs on both (``path``: ``native``,
``transports``), on an L4 listener and on a parsed one (the line parser; memcache and redis
against the real servers where a real protocol matters), and asserts what relay.py does: what
the client and the upstream server saw (bytes, EOF or reset), the access log's lines, the
listener's counters, the descriptor budget back at zero and no socket left open.
:func:`test_paths_agree` then runs a scenario on both paths in one test and compares all it
returns as a whole (log lines without conn_id, timestamp, duration_ms and port numbers, keys in
order), so a field or counter no assertion names still has to match.

Memory bounds are read off the kernel: once a transfer has stalled, ``/proc/net/tcp``'s queues
along the chain say how many of the bytes the server sent sit in sockets, and the rest is what
proxyd holds itself.

Under ``PROXYD_PURE=1`` (CI's second pass) there is no compiled relay: both parametrisations
run relay.py, which :func:`test_which_relay_serves` checks.

Clients and upstream servers are plain non-blocking sockets on the event loop, so a test can
send a reset (``SO_LINGER`` 0), half-close, and tell an EOF from a reset on the other end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from memcached_fixture import start_memcached
from prometheus_client.parser import text_string_to_metric_families
from proxyutil import addr, daemon, wait_for, write_atomic
from redis_fixture import start_redis
from tls_fixture import client_context, client_hello

from proxyd.native import IMPLEMENTATION
from proxyd.nativerelay import NativeConnection
from proxyd.relay import HIGH_WATER
from proxyd.server import Daemon

PATHS = ("native", "transports")
#: Listener kinds: their l7proto. ``byname`` is L4 with its upstream given by name (``localhost``),
#: which the native path hands to relay.py's Connection.
PROTOS = {"tcp": None, "byname": None, "lines": "test.lineparser", "memcache": "memcache", "redis": "redis"}
TIMEOUT = 10.0
BUFFER_BYTES = 1 << 20  # limits.buffer_bytes' default
_PORT = re.compile(r"(?<=:)\d+\b|(?<=port )\d+\b")
_RST = struct.pack("ii", 1, 0)

Seen = dict[str, Any]
Handler = Callable[[socket.socket], Coroutine[Any, Any, None]]
Servers = Callable[[str], int]  # "memcached" or "redis": its port, started on first use
Scenario = Callable[[Path, str, Servers], Awaitable[Seen]]


def sockets_open() -> int:
    """This process's open sockets (the daemon's and the test's alike)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return n


async def run(scenario: str, tmp: Path, listener: str, servers: Servers) -> Seen:
    """One scenario, bounded; every socket it opened (proxyd's included) is closed after."""
    if listener in ("memcache", "redis"):
        servers({"memcache": "memcached", "redis": "redis"}[listener])  # started before the count
    before = sockets_open()
    seen = await asyncio.wait_for(SCENARIOS[scenario][0](tmp, listener, servers), 30)
    await wait_for(lambda: sockets_open() <= before, TIMEOUT)
    return seen


def use_path(mp: pytest.MonkeyPatch, path: str) -> None:
    if path == "transports":
        mp.setenv("PROXYD_NATIVE_RELAY", "0")
    else:
        mp.delenv("PROXYD_NATIVE_RELAY", raising=False)


# ---------------------------------------------------------------------------------------------
# the daemon, its log and its counters


def config(
    listener: str,
    up: tuple[str, int] | str,
    more: str = "",
    top: str = "",
    requests: str = "denied",
    limits: str = "  connect_timeout: 3s\n",
) -> str:
    """One listener named after its kind (``PROTOS``); ``more``: lines of the listener's,
    ``top``: sections after ``limits`` (identities, policy), ``limits``: its lines."""
    upstream = up if isinstance(up, str) else f"{up[0]}:{up[1]}"
    if listener == "byname":
        upstream = upstream.replace("127.0.0.1:", "localhost:")
    proto = f"\n    l7proto: {PROTOS[listener]}" if PROTOS[listener] else ""
    return f"""
listeners:
  - name: {listener}
    address: "127.0.0.1:0"
    upstream: "{upstream}"{proto}
{more}access_log:
  path: access.log
  requests: {requests}
limits:
{limits}{top}"""


def _unport(value: Any) -> Any:
    """Without (ephemeral) port numbers: ``127.0.0.1:P``, ``port P/TCP``."""
    return _PORT.sub("P", value) if isinstance(value, str) else value


def log_lines(tmp: Path, name: str = "access.log") -> list[dict[str, Any]]:
    """The access log, each line's keys in order, without what differs run to run."""
    out = []
    for text in (tmp / name).read_text().splitlines():
        line = json.loads(text)
        for key in ("conn_id", "timestamp", "duration_ms"):
            line.pop(key, None)
        out.append({k: _unport(v) for k, v in line.items()})
    return out


def conn_line(listener: str, src: str = "127.0.0.1", **kv: Any) -> dict[str, Any]:
    """The ``connection`` line relay.py writes, in its key order."""
    return {
        "listener": listener,
        "src": f"{src}:P",
        "dst": "localhost:P" if listener == "byname" else "127.0.0.1:P",
        "upstream": "localhost:P" if listener == "byname" else "127.0.0.1:P",
        **kv,
        "event": "connection",
    }


def counters(d: Daemon, listener: str) -> dict[str, float]:
    """The listener's samples in ``/metrics`` (by listener, or by its l7proto), no ``_created``."""
    out: dict[str, float] = {}
    proto = PROTOS[listener]
    for family in text_string_to_metric_families(d.metrics.render().decode()):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = dict(s.labels)
            if labels.pop("listener", None) != listener and (
                proto is None or labels.pop("l7proto", None) != proto
            ):
                continue
            out[s.name + json.dumps(labels, sort_keys=True)] = s.value
    return out


def counter(m: dict[str, float], name: str, **labels: str) -> float:
    return m[name + json.dumps(labels, sort_keys=True)]


async def settle(d: Daemon, listener: str, connections: int) -> dict[str, float]:
    """Every connection ended: the counters, checked for the ones every scenario shares, and
    the descriptor budget back at zero."""
    # The path the parametrisation asked for (the native one needs the compiled module).
    native = IMPLEMENTATION == "native" and os.environ.get("PROXYD_NATIVE_RELAY") != "0"
    assert d.listeners[listener].native == native
    await wait_for(lambda: not d.active_connections(), TIMEOUT)
    # Each connection's two descriptors were given back to the budget (fdbudget.py).
    await wait_for(lambda: d.fds.data == 0, TIMEOUT)
    m = counters(d, listener)
    assert counter(m, "proxyd_connections_total") == connections
    assert counter(m, "proxyd_connections_active") == 0
    return m


# ---------------------------------------------------------------------------------------------
# sockets


async def connect(d: Daemon, listener: str, src: str = "127.0.0.1", rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((src, 0))
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, addr(d, listener)), TIMEOUT)
    return s


async def send(s: socket.socket, data: bytes, step: int = 0) -> None:
    loop = asyncio.get_running_loop()
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        await asyncio.wait_for(loop.sock_sendall(s, data[i : i + step]), TIMEOUT)


async def recv_exactly(s: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, n - len(got)), TIMEOUT)
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def ending(s: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: ``eof`` or ``reset``."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 1 << 16), TIMEOUT)
        except ConnectionResetError:
            return bytes(got), "reset"
        if not chunk:
            return bytes(got), "eof"
        got += chunk


def rst(s: socket.socket) -> None:
    """Close so the peer gets a reset."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    s.close()


class Upstream:
    """A listening socket whose connections are handed to ``handler``, one task each.

    Its listen queue holds every connection a scenario opens at once: the native path connects
    forty upstreams within a millisecond, and connections past a full queue are reset by the
    kernel (the same happens with plain clients and no proxyd in between).
    """

    def __init__(self, handler: Handler | None, backlog: int = 128) -> None:
        self.handler = handler
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.lsock.setblocking(False)
        self.address: tuple[str, int] = self.lsock.getsockname()
        self.tasks: list[asyncio.Task[None]] = []
        self.accepted: list[socket.socket] = []

    async def accept(self) -> socket.socket:
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(self.lsock), TIMEOUT)
        conn.setblocking(False)
        self.accepted.append(conn)
        return conn

    async def _serve(self) -> None:
        assert self.handler is not None
        while True:
            conn = await asyncio.get_running_loop().sock_accept(self.lsock)
            conn[0].setblocking(False)
            self.accepted.append(conn[0])
            self.tasks.append(asyncio.create_task(self.handler(conn[0])))

    async def done(self) -> None:
        """Every handler returned (bounded)."""
        await wait_for(lambda: bool(self.tasks) and all(t.done() for t in self.tasks), TIMEOUT)
        for t in self.tasks:
            t.result()


@contextlib.asynccontextmanager
async def upstream(
    handler: Handler | None = None,
) -> AsyncIterator[Upstream]:
    up = Upstream(handler)
    server = asyncio.create_task(up._serve()) if handler is not None else None
    try:
        yield up
    finally:
        for t in [*up.tasks, *([server] if server else [])]:
            t.cancel()
        for t in [*up.tasks, *([server] if server else [])]:
            with contextlib.suppress(BaseException):
                await t
        for c in up.accepted:
            c.close()
        up.lsock.close()


def payload(listener: str, size: int) -> bytes:
    """Random bytes; on a line-parsed listener, 8 KiB lines of hex (no DROP, ERROR, ... prefix)."""
    if PROTOS[listener] is None:
        return os.urandom(size)
    text = os.urandom(size // 2).hex().encode()
    return b"".join(text[i : i + 8191] + b"\n" for i in range(0, size, 8192))


# ---------------------------------------------------------------------------------------------
# scenarios: each asserts relay.py's behaviour and returns what both paths must agree on


async def large_transfer(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """Byte-exact both ways at once, odd write sizes on both ends, EOF both ways."""
    to_server, to_client = payload(listener, 8 << 20), payload(listener, 6 << 20)
    got: dict[str, Any] = {}

    async def serve(u: socket.socket) -> None:
        async def answer() -> None:
            await send(u, to_client, 77_777)
            u.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(answer())
        got["server"], got["server_end"] = await ending(u)
        await asyncio.wait_for(sender, TIMEOUT)

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)

        async def request() -> None:
            await send(c, to_server, 100_003)
            c.shutdown(socket.SHUT_WR)

        sender = asyncio.create_task(request())
        got["client"], got["client_end"] = await ending(c)
        await asyncio.wait_for(sender, TIMEOUT)
        c.close()
        await up.done()
        m = await settle(d, listener, 1)
    assert got["server"] == to_server and got["client"] == to_client
    assert (got["server_end"], got["client_end"]) == ("eof", "eof")
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, bytes_in=len(to_server), bytes_out=len(to_client), verdict="forwarded")
    ]
    assert counter(m, "proxyd_bytes_total", direction="in") == len(to_server)
    assert counter(m, "proxyd_bytes_total", direction="out") == len(to_client)
    return {"ends": (got["server_end"], got["client_end"]), "log": log, "metrics": m}


async def half_close_client_first(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The client's EOF reaches the server, whose answer (1 MiB, after that EOF) still flows."""
    answer = payload(listener, 1 << 20)
    seen: Seen = {}

    async def serve(u: socket.socket) -> None:
        seen["server"] = await ending(u)  # until the client's EOF arrives through the proxy
        await send(u, answer, 65_537)
        u.shutdown(socket.SHUT_WR)

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"hello\n")
        c.shutdown(socket.SHUT_WR)
        got = await ending(c)
        c.close()
        await up.done()
        m = await settle(d, listener, 1)
    assert seen["server"] == (b"hello\n", "eof")
    assert got == (answer, "eof")
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=6, bytes_out=len(answer), verdict="forwarded")]
    return {"server": seen["server"], "client_end": got[1], "log": log, "metrics": m}


async def half_close_server_first(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The server's EOF reaches the client, which then still sends 1 MiB to the server."""
    request = payload(listener, 1 << 20)
    seen: Seen = {}

    async def serve(u: socket.socket) -> None:
        await send(u, b"banner\n")
        u.shutdown(socket.SHUT_WR)
        seen["server"] = await ending(u)

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        got = await ending(c)
        await send(c, request, 65_537)
        c.shutdown(socket.SHUT_WR)
        await up.done()
        c.close()
        m = await settle(d, listener, 1)
    assert got == (b"banner\n", "eof")
    assert seen["server"] == (request, "eof")
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=len(request), bytes_out=7, verdict="forwarded")]
    return {"server_end": seen["server"][1], "client": got, "log": log, "metrics": m}


async def connect_waits(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """What the client sent and its EOF, read while the upstream connect waits (its SYN dropped:
    the upstream's accept queue is full), reach the upstream once it answers the retried SYN."""
    async with upstream(None) as up:
        up.lsock.listen(0)
        fillers = []
        try:
            for _ in range(4):  # fill the accept queue: the next SYN is dropped, retried after ~1 s
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(up.address)
                fillers.append(f)
            await asyncio.sleep(0.2)
            filler_ends = {f.getsockname() for f in fillers}
            async with daemon(config(listener, up.address), tmp) as d:
                c = await connect(d, listener)
                await send(c, b"hello\n")
                c.shutdown(socket.SHUT_WR)
                await asyncio.sleep(0.3)  # proxyd has read both while its connect waits
                while True:  # empty the queue: the proxyd's retried SYN then gets in
                    u = await up.accept()
                    if u.getpeername() not in filler_ends:
                        break
                    u.close()
                server = await ending(u)
                await send(u, b"got " + server[0])
                u.close()
                got = await ending(c)
                c.close()
                m = await settle(d, listener, 1)
        finally:
            for f in fillers:
                f.close()
    assert server == (b"hello\n", "eof")
    assert got == (b"got hello\n", "eof")
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=6, bytes_out=10, verdict="forwarded")]
    return {"server": server, "client": got, "log": log, "metrics": m}


async def upstream_refuses(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A refused upstream connect is passed on as a reset, never a clean EOF."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: a SYN to it is answered RST
    try:
        async with daemon(config(listener, dead.getsockname()), tmp) as d:
            c = await connect(d, listener)
            got = await ending(c)
            c.close()
            m = await settle(d, listener, 1)
    finally:
        dead.close()
    assert got == (b"", "reset")
    assert counter(m, "proxyd_upstream_connect_failures_total") == 1
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener,
            bytes_in=0,
            bytes_out=0,
            verdict="error",
            reason="upstream connect failed: Connection refused",
        )
    ]
    return {"client": got, "log": log, "metrics": m}


async def upstream_resets(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The upstream resets mid-stream: the client gets a reset, after the bytes before it."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"hello\n")
        u = await up.accept()
        assert await recv_exactly(u, 6) == b"hello\n"
        await send(u, b"partial\n")
        assert await recv_exactly(c, 8) == b"partial\n"
        rst(u)
        got = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got == (b"", "reset")
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, bytes_in=6, bytes_out=8, verdict="error", reason="upstream reset the connection")
    ]
    return {"client": got, "log": log, "metrics": m}


async def client_resets(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The client resets mid-stream: the upstream gets a reset."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"hello\n")
        u = await up.accept()
        assert await recv_exactly(u, 6) == b"hello\n"
        await send(u, b"partial\n")
        assert await recv_exactly(c, 8) == b"partial\n"
        rst(c)
        got = await ending(u)
        m = await settle(d, listener, 1)
    assert got == (b"", "reset")
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, bytes_in=6, bytes_out=8, verdict="error", reason="client reset the connection")
    ]
    return {"server": got, "log": log, "metrics": m}


def _tcp_queues() -> dict[tuple[tuple[str, int], tuple[str, int]], tuple[int, int]]:
    """(local, remote) -> (tx_queue, rx_queue) of every IPv4 TCP socket (/proc/net/tcp).

    On loopback a byte leaves the sender's tx_queue once it sits in the receiver's rx_queue,
    so along a chain of sockets the two count every byte the kernel holds exactly once.
    """

    def ep(text: str) -> tuple[str, int]:
        host, port = text.split(":")
        return socket.inet_ntoa(struct.pack("<I", int(host, 16))), int(port, 16)

    out = {}
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        tx, rx = f[4].split(":")
        out[ep(f[1]), ep(f[2])] = (int(tx, 16), int(rx, 16))
    return out


async def slow_reader(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A client that does not read while the server sends 50 MiB: the proxy stops reading the
    upstream, so what it holds itself stays about the high-water mark plus buffer_bytes; every
    byte arrives, in order, once the client reads."""
    data = payload(listener, 50 << 20)
    sent = [0]

    async def serve(u: socket.socket) -> None:
        u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        loop = asyncio.get_running_loop()
        for i in range(0, len(data), 100_003):
            await loop.sock_sendall(u, data[i : i + 100_003])
            sent[0] = min(i + 100_003, len(data))
        u.shutdown(socket.SHUT_WR)
        await ending(u)

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener, rcvbuf=64 << 10)
        # Stalled: nothing moved for half a second (bounded: the server would finish otherwise).
        marks: list[int] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + TIMEOUT
        while len(marks) < 6 or len(set(marks[-6:])) > 1:
            assert loop.time() < end and sent[0] < len(data), f"never stalled ({sent[0]} bytes sent)"
            await asyncio.sleep(0.1)
            marks.append(sent[0])
        assert len(d.listeners[listener].conns) == 1
        [u] = up.accepted
        q = _tcp_queues()
        in_kernel = (
            q[u.getsockname(), u.getpeername()][0]
            + q[u.getpeername(), u.getsockname()][1]
            + q[c.getpeername(), c.getsockname()][0]
            + q[c.getsockname(), c.getpeername()][1]
        )
        # The last sock_sendall may be part way through: up to one write not yet counted in sent.
        held = sent[0] - in_kernel
        assert -100_003 <= held <= HIGH_WATER + BUFFER_BYTES + (256 << 10), (sent[0], in_kernel)
        got = await ending(c)
        c.shutdown(socket.SHUT_WR)
        await up.done()
        c.close()
        m = await settle(d, listener, 1)
    assert got[1] == "eof" and len(got[0]) == len(data) and got[0] == data
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=0, bytes_out=len(data), verdict="forwarded")]
    return {"client_end": got[1], "log": log, "metrics": m}


async def idle_timeout(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """No byte either way for idle_timeout: both sides closed, logged and counted as ``idle``."""
    async with upstream(None) as up, daemon(config(listener, up.address, "    idle_timeout: 1s\n"), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"hi\n")
        u = await up.accept()
        assert await recv_exactly(u, 3) == b"hi\n"
        await send(u, b"ho\n")
        assert await recv_exactly(c, 3) == b"ho\n"
        live = counters(d, listener)  # a scrape counts the open connection's bytes too
        client, server = await asyncio.gather(ending(c), ending(u))
        c.close()
        m = await settle(d, listener, 1)
    assert counter(m, "proxyd_connection_timeouts_total", reason="idle") == 1
    assert counter(live, "proxyd_connections_active") == 1
    assert (
        counter(live, "proxyd_bytes_total", direction="in")
        == counter(live, "proxyd_bytes_total", direction="out")
        == 3
    )
    assert client[0] == server[0] == b""
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener,
            bytes_in=3,
            bytes_out=3,
            verdict="error",
            reason="idle timeout: no byte either way for 1s",
        )
    ]
    return {"client": client, "server": server, "log": log, "metrics": (live, m)}


async def request_timeout(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A partial request that waits request_timeout for more bytes: closed, logged, counted."""
    async with (
        upstream(None) as up,
        daemon(config(listener, up.address, "    request_timeout: 1s\n"), tmp) as d,
    ):
        c = await connect(d, listener)
        await send(c, b"ok\npartial")
        u = await up.accept()
        assert await recv_exactly(u, 3) == b"ok\n"
        client, server = await asyncio.gather(ending(c), ending(u))
        c.close()
        m = await settle(d, listener, 1)
    assert counter(m, "proxyd_connection_timeouts_total", reason="request") == 1
    assert client[0] == server[0] == b""
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener,
            bytes_in=10,
            bytes_out=0,
            verdict="error",
            reason="request timeout: a partial request waited 1s for more bytes",
        )
    ]
    return {"client": client, "server": server, "log": log, "metrics": m}


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: native-relay}
spec:
  endpointSelector: {matchLabels: {app: svc}}
  ingress:
    - fromEndpoints: [{matchLabels: {role: client}}]
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: PROTO
            l7: [RULE]
"""
IDENTITIES = """identities:
  - cidr: 127.0.0.1/32
    labels: {app: svc}
  - cidr: 127.0.0.2/32
    labels: {role: client}
policy:
  paths: [policy.yaml]
"""


async def denied_request(tmp: Path, listener: str, servers: Servers) -> Seen:
    """A request the policy denies is answered with the protocol's own error, in its place; the
    connection goes on (memcache against a real memcached; the line parser against an echo)."""
    seen: Seen = {}
    if listener == "memcache":
        port = servers("memcached")
        rule = "{command: get}"
        request = b"set k 0 0 5\r\nhello\r\nget k\r\n"
        expect = b"CLIENT_ERROR access denied\r\nEND\r\n"
    else:
        rule = '{prefix: "ok"}'
        request = b"ok 1\nbad 2\nok 3\n"
        expect = b"ok 1\nDENIED\nok 3\n"

    async def echo(u: socket.socket) -> None:
        seen["server"] = got = await ending(u)
        await send(u, got[0])
        u.shutdown(socket.SHUT_WR)

    async with contextlib.AsyncExitStack() as stack:
        if listener != "memcache":
            port = (await stack.enter_async_context(upstream(echo))).address[1]
        policy = (
            POLICY.replace("PORT", str(port)).replace("PROTO", str(PROTOS[listener])).replace("RULE", rule)
        )
        text = config(listener, ("127.0.0.1", port), top=IDENTITIES)
        d = await stack.enter_async_context(daemon(text, tmp, files={"policy.yaml": policy}))
        c = await connect(d, listener, src="127.0.0.2")
        await send(c, request)
        c.shutdown(socket.SHUT_WR)
        got = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    if listener == "memcache":
        assert got == (expect, "eof")
    else:  # the DENIED answer is proxyd's own, so it may overtake the echo of "ok 1"
        assert sorted(got[0].splitlines()) == sorted(expect.splitlines()) and got[1] == "eof"
        assert seen["server"] == (b"ok 1\nok 3\n", "eof")
    assert counter(m, "proxyd_l7_requests_total", verdict="denied") == 1
    log = log_lines(tmp)
    assert [line["event"] for line in log] == ["l7", "connection"]
    assert log[-1] == conn_line(
        listener, "127.0.0.2", bytes_in=len(request), bytes_out=len(expect), verdict="forwarded"
    )
    assert log[0]["verdict"] == "denied"
    return {
        "client": got if listener == "memcache" else sorted(got[0].splitlines()),
        "log": log,
        "metrics": m,
    }


async def partial_request_at_eof(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The client's EOF behind an incomplete line: the line is dropped and counted in the log's
    ``unforwarded_bytes``; the EOF and the server's answer still go through."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"ok\npartial")
        c.shutdown(socket.SHUT_WR)
        u = await up.accept()
        server = await ending(u)
        await send(u, b"bye\n")
        u.shutdown(socket.SHUT_WR)
        client = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert server == (b"ok\n", "eof")
    assert client == (b"bye\n", "eof")
    log = log_lines(tmp)
    expect = conn_line(listener, bytes_in=10, bytes_out=4, verdict="forwarded")
    expect.pop("event")
    expect["unforwarded_bytes"] = {"client": 7, "server": 0}
    expect["reason"] = "incomplete frame discarded at end of stream"
    assert log == [{**expect, "event": "connection"}]
    return {"client": client, "server": server, "log": log, "metrics": m}


async def parser_error(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A protocol error closes the connection (both ends see an EOF), logged and counted."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"ok\nERROR\n")
        u = await up.accept()
        server, client = await asyncio.gather(ending(u), ending(c))
        c.close()
        m = await settle(d, listener, 1)
    assert server == (b"ok\n", "eof")
    assert client == (b"", "eof")
    assert counter(m, "proxyd_parser_errors_total") == 1
    log = log_lines(tmp)
    assert [(line["event"], line["verdict"]) for line in log] == [("l7", "error"), ("connection", "error")]
    assert log[1]["reason"] == "parser_error: parser error 1"
    assert (log[1]["bytes_in"], log[1]["bytes_out"]) == (9, 0)
    return {"client": client, "server": server, "log": log, "metrics": m}


async def parser_ops(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The parser's DROP, INJECT and REPLY both ways: a reply proxyd writes itself reaches the
    client at once, the dropped line never reaches the server, the injected copy does."""

    async def answer(u: socket.socket) -> None:
        got = b""
        while got.count(b"\n") < 2:
            got += await recv_exactly(u, 1)
        await send(u, b"".join(b"OK " + line + b"\n" for line in got.splitlines()))
        assert await ending(u) == (b"", "eof")
        u.shutdown(socket.SHUT_WR)

    async with upstream(answer) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"a\nREPLY direct\nDROP me\nINJECT x\n")
        got = b""
        while got.count(b"\n") < 3:
            got += await recv_exactly(c, 1)
        c.shutdown(socket.SHUT_WR)
        end = await ending(c)
        c.close()
        await up.done()
        m = await settle(d, listener, 1)
    assert sorted(got.splitlines()) == sorted([b"direct", b"OK a", b"OK INJECT x"])
    assert end == (b"", "eof")
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=32, bytes_out=len(got), verdict="forwarded")]
    return {"client": sorted(got.splitlines()), "log": log, "metrics": m}


async def denied_at_accept(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A client the policy does not let in (L3/L4) is closed at accept with a FIN, logged
    ``denied`` without an upstream; the next, allowed one is relayed."""

    async def echo(u: socket.socket) -> None:
        got = await ending(u)
        await send(u, got[0])
        u.shutdown(socket.SHUT_WR)

    async with upstream(echo) as up:
        policy = POLICY.replace("PORT", str(up.address[1])).split("          rules:")[0]
        text = config(listener, up.address, top=IDENTITIES)
        async with daemon(text, tmp, files={"policy.yaml": policy}) as d:
            c = await connect(d, listener, src="127.0.0.9")
            refused = await ending(c)
            c.close()
            c = await connect(d, listener, src="127.0.0.2")
            await send(c, b"hi\n")
            c.shutdown(socket.SHUT_WR)
            allowed = await ending(c)
            c.close()
            m = await settle(d, listener, 2)
    assert refused == (b"", "eof")
    assert allowed == (b"hi\n", "eof")
    assert counter(m, "proxyd_connection_denials_total") == 1
    log = log_lines(tmp)
    assert [(line["event"], line["verdict"], line["upstream"]) for line in log] == [
        ("connection", "denied", None),
        ("connection", "forwarded", "127.0.0.1:P"),
    ]
    return {"client": (refused, allowed), "log": log, "metrics": m}


async def redis_hold(tmp: Path, listener: str, servers: Servers) -> Seen:
    """Pipelined requests past the parser's budget for pending entries (``max_pending_bytes``
    1024: a few denials between reads): the engine's hold stops reading the client until the
    server's replies drain the queue, and every reply and denial arrives, in order."""
    port = servers("redis")
    n = 2000
    get = b"*2\r\n$3\r\nGET\r\n$9\r\nnr:absent\r\n"
    put = b"*3\r\n$3\r\nSET\r\n$9\r\nnr:absent\r\n$1\r\nv\r\n"
    request = (get + put) * n
    expect = (b"$-1\r\n-NOPERM access denied\r\n") * n
    policy = POLICY.replace("PORT", str(port)).replace("PROTO", "redis").replace("RULE", "{command: get}")
    more = "    parser_config: {max_pending_bytes: 1024}\n"
    text = config(listener, ("127.0.0.1", port), more, IDENTITIES, requests="none")
    async with daemon(text, tmp, files={"policy.yaml": policy}) as d:
        c = await connect(d, listener, src="127.0.0.2")
        sender = asyncio.create_task(send(c, request, 4099))
        got = await recv_exactly(c, len(expect))
        await asyncio.wait_for(sender, TIMEOUT)
        c.shutdown(socket.SHUT_WR)
        end = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got == expect
    assert end == (b"", "eof")
    assert counter(m, "proxyd_l7_requests_total", verdict="denied") == n
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, "127.0.0.2", bytes_in=len(request), bytes_out=len(expect), verdict="forwarded")
    ]
    return {"end": end, "log": log, "metrics": m}


async def unread_denials(tmp: Path, listener: str, servers: Servers) -> Seen:
    """A client that sends denied requests and does not read: once about the high-water mark
    plus ``buffer_bytes`` of proxyd's own answers wait for it, proxyd stops reading its requests
    (so it holds no more than that), and every answer arrives once it reads."""
    port = servers("memcached")
    n = 600_000
    request = b"incr k 1\r\n" * n
    answer = b"CLIENT_ERROR access denied\r\n"
    policy = POLICY.replace("PORT", str(port)).replace("PROTO", "memcache").replace("RULE", "{command: get}")
    text = config(listener, ("127.0.0.1", port), top=IDENTITIES, requests="none")
    loop = asyncio.get_running_loop()
    sent = [0]
    async with daemon(text, tmp, files={"policy.yaml": policy}) as d:
        c = await connect(d, listener, src="127.0.0.2", rcvbuf=64 << 10)

        async def push() -> None:
            for i in range(0, len(request), 10_000):
                await loop.sock_sendall(c, request[i : i + 10_000])
                sent[0] = min(i + 10_000, len(request))

        sender = asyncio.create_task(push())
        me, proxy = c.getsockname(), c.getpeername()

        def state() -> tuple[int, tuple[int, int], tuple[int, int]]:
            q = _tcp_queues()
            return sent[0], q[me, proxy], q[proxy, me]

        # Stalled: nothing moved for half a second (the sender may be done or blocked).
        marks = [state()]
        end = loop.time() + TIMEOUT
        while len(marks) < 6 or len(set(marks[-6:])) > 1:
            assert loop.time() < end, f"never stalled: {marks[-1]}"
            await asyncio.sleep(0.1)
            marks.append(state())
        done, (c_tx, c_rx), (p_tx, p_rx) = marks[-1]
        read = done - c_tx - p_rx  # requests proxyd read
        held = read // len(b"incr k 1\r\n") * len(answer) - p_tx - c_rx
        assert read < len(request), "proxyd read every request although its answers were not read"
        # The cap, plus the answers to one read's worth of requests (256 KiB) and as much again.
        cap = HIGH_WATER + BUFFER_BYTES + (256 << 10) * len(answer) // 10 + (256 << 10)
        assert held <= cap, (done, c_tx, c_rx, p_tx, p_rx)
        got = await recv_exactly(c, n * len(answer))
        await asyncio.wait_for(sender, TIMEOUT)
        c.shutdown(socket.SHUT_WR)
        end_ = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got == answer * n
    assert end_ == (b"", "eof")
    assert counter(m, "proxyd_l7_requests_total", verdict="denied") == n
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener, "127.0.0.2", bytes_in=len(request), bytes_out=n * len(answer), verdict="forwarded"
        )
    ]
    return {"end": end_, "log": log, "metrics": m}


async def connect_timeout(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """An upstream that never answers the SYN (its accept queue full): after connect_timeout
    the client gets a reset, as for a refused connect."""
    async with upstream(None) as up:
        up.lsock.listen(0)
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(up.address)
                fillers.append(f)
            await asyncio.sleep(0.2)
            text = config(listener, up.address, limits="  connect_timeout: 1s\n")
            async with daemon(text, tmp) as d:
                c = await connect(d, listener)
                await send(c, b"hello\n")
                got = await ending(c)
                c.close()
                m = await settle(d, listener, 1)
        finally:
            for f in fillers:
                f.close()
    assert got == (b"", "reset")
    assert counter(m, "proxyd_upstream_connect_failures_total") == 1
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener, bytes_in=6, bytes_out=0, verdict="error", reason="upstream connect failed: timeout"
        )
    ]
    return {"client": got, "log": log, "metrics": m}


async def drain_at_stop(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """Stopping: a connection that ends while the daemon drains ends as usual; one still open
    when drain_timeout passes is cut (both ends see it closed) and logged so."""
    async with upstream(None) as up:
        text = config(listener, up.address, limits="  drain_timeout: 1s\n")
        async with daemon(text, tmp) as d:
            idle = await connect(d, listener)
            await send(idle, b"idle\n")
            u_idle = await up.accept()
            assert await recv_exactly(u_idle, 5) == b"idle\n"
            busy = await connect(d, listener)
            await send(busy, b"busy\n")
            u_busy = await up.accept()
            assert await recv_exactly(u_busy, 5) == b"busy\n"
            stopping = asyncio.create_task(d.stop())
            await wait_for(lambda: d.stopping, TIMEOUT)
            busy.shutdown(socket.SHUT_WR)
            assert await ending(u_busy) == (b"", "eof")
            await send(u_busy, b"done\n")
            u_busy.shutdown(socket.SHUT_WR)
            finished = await ending(busy)
            cut = await asyncio.gather(ending(idle), ending(u_idle))
            await asyncio.wait_for(stopping, TIMEOUT)
            for s in (idle, busy):
                s.close()
            m = await settle(d, listener, 2)
    assert finished == (b"done\n", "eof")
    assert list(cut) == [(b"", "eof"), (b"", "eof")]
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, bytes_in=5, bytes_out=5, verdict="forwarded"),
        conn_line(listener, bytes_in=5, bytes_out=0, verdict="error", reason="drain timeout at shutdown"),
    ]
    return {"client": (finished, cut), "log": log, "metrics": m}


async def memcache_values(tmp: Path, listener: str, servers: Servers) -> Seen:
    """Large values through the memcache parser, pipelined: stored and read back byte-exact."""
    port = servers("memcached")
    values = [os.urandom(700_001) for _ in range(4)]
    request = b"".join(b"set nr:k%d 0 0 %d\r\n%s\r\n" % (i, len(v), v) for i, v in enumerate(values))
    request += b"get " + b" ".join(b"nr:k%d" % i for i in range(len(values))) + b"\r\n"
    expect = b"STORED\r\n" * len(values)
    expect += b"".join(b"VALUE nr:k%d 0 %d\r\n%s\r\n" % (i, len(v), v) for i, v in enumerate(values))
    expect += b"END\r\n"
    policy = POLICY.replace("PORT", str(port)).replace("PROTO", "memcache").replace("RULE", "{}")
    text = config(listener, ("127.0.0.1", port), top=IDENTITIES, requests="none")
    async with daemon(text, tmp, files={"policy.yaml": policy}) as d:
        c = await connect(d, listener, src="127.0.0.2")
        sender = asyncio.create_task(send(c, request, 65_521))
        got = await recv_exactly(c, len(expect))
        await asyncio.wait_for(sender, TIMEOUT)
        c.shutdown(socket.SHUT_WR)
        end = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got == expect
    assert end == (b"", "eof")
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, "127.0.0.2", bytes_in=len(request), bytes_out=len(expect), verdict="forwarded")
    ]
    return {"end": end, "log": log, "metrics": m}


async def partial_reply_at_eof(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The server's EOF behind an incomplete line: dropped, counted as the server's
    ``unforwarded_bytes``; the EOF still reaches the client."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        u = await up.accept()
        await send(u, b"hi\npartial")
        u.shutdown(socket.SHUT_WR)
        client = await ending(c)
        c.shutdown(socket.SHUT_WR)
        server = await ending(u)
        c.close()
        m = await settle(d, listener, 1)
    assert client == (b"hi\n", "eof")
    assert server == (b"", "eof")
    log = log_lines(tmp)
    expect = conn_line(listener, bytes_in=0, bytes_out=3, verdict="forwarded")
    expect.pop("event")
    expect["unforwarded_bytes"] = {"client": 0, "server": 7}
    expect["reason"] = "incomplete frame discarded at end of stream"
    assert log == [{**expect, "event": "connection"}]
    return {"client": client, "server": server, "log": log, "metrics": m}


async def client_resets_while_connecting(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The client resets while the upstream connect waits: the connect is given up, the
    connection logged as reset by the client."""
    async with upstream(None) as up:
        up.lsock.listen(0)
        fillers = []
        try:
            for _ in range(4):  # the accept queue full: proxyd's SYN is dropped
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(up.address)
                fillers.append(f)
            await asyncio.sleep(0.2)
            async with daemon(config(listener, up.address), tmp) as d:
                c = await connect(d, listener)
                await send(c, b"hello\n")
                await asyncio.sleep(0.3)  # proxyd has read it while its connect waits
                rst(c)
                m = await settle(d, listener, 1)
        finally:
            for f in fillers:
                f.close()
    log = log_lines(tmp)
    assert log == [
        conn_line(listener, bytes_in=6, bytes_out=0, verdict="error", reason="client reset the connection")
    ]
    assert counter(m, "proxyd_upstream_connect_failures_total") == 0
    return {"log": log, "metrics": m}


async def many_connections(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """Forty connections at once, each its own size, echoed and half-closed: each byte-exact,
    one line each."""

    async def echo(u: socket.socket) -> None:
        got = await ending(u)
        await send(u, got[0], 4093)
        u.shutdown(socket.SHUT_WR)

    sizes = [i * 3001 + 1 for i in range(40)]

    async def one(d: Daemon, size: int) -> tuple[bytes, str]:
        data = payload(listener, size) if listener == "tcp" else b"x" * (size - 1) + b"\n"
        c = await connect(d, listener)
        await send(c, data, 1031)
        c.shutdown(socket.SHUT_WR)
        got = await ending(c)
        c.close()
        assert got == (data, "eof")
        return got

    async with upstream(echo) as up, daemon(config(listener, up.address), tmp) as d:
        await asyncio.gather(*(one(d, n) for n in sizes))
        await up.done()
        m = await settle(d, listener, len(sizes))
    log = sorted(log_lines(tmp), key=lambda line: int(line["bytes_in"]))
    assert log == [conn_line(listener, bytes_in=n, bytes_out=n, verdict="forwarded") for n in sizes]
    return {"log": log, "metrics": m}


async def max_connections(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """Past ``limits.max_connections`` a connection is closed at accept, logged ``denied``;
    once one ends, the next is let in again."""

    async def echo(u: socket.socket) -> None:
        got = await ending(u)
        await send(u, got[0])
        u.shutdown(socket.SHUT_WR)

    async with upstream(echo) as up:
        text = config(listener, up.address, limits="  connect_timeout: 3s\n  max_connections: 2\n")
        async with daemon(text, tmp) as d:
            first, second = await connect(d, listener), await connect(d, listener)
            await wait_for(lambda: len(d.listeners[listener].conns) == 2, TIMEOUT)
            third = await connect(d, listener)
            refused = await ending(third)
            third.close()
            answers = []
            for c, line in ((first, b"one\n"), (second, b"two\n")):
                await send(c, line)
                c.shutdown(socket.SHUT_WR)
                answers.append(await ending(c))
                c.close()
            await wait_for(lambda: not d.active_connections(), TIMEOUT)
            fourth = await connect(d, listener)
            await send(fourth, b"four\n")
            fourth.shutdown(socket.SHUT_WR)
            answers.append(await ending(fourth))
            fourth.close()
            m = await settle(d, listener, 4)
    assert refused == (b"", "eof")
    assert answers == [(b"one\n", "eof"), (b"two\n", "eof"), (b"four\n", "eof")]
    assert counter(m, "proxyd_connection_denials_total") == 1
    log = log_lines(tmp)
    assert log == [
        {
            **conn_line(
                listener, bytes_in=0, bytes_out=0, verdict="denied", reason="max_connections (2) reached"
            ),
            "upstream": None,
        },
        conn_line(listener, bytes_in=4, bytes_out=4, verdict="forwarded"),
        conn_line(listener, bytes_in=4, bytes_out=4, verdict="forwarded"),
        conn_line(listener, bytes_in=5, bytes_out=5, verdict="forwarded"),
    ]
    return {"log": log, "metrics": m}


TLS_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: native-relay-tls}
spec:
  endpointSelector: {matchLabels: {app: svc}}
  ingress:
    - toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          serverNames: [api.example.com]
"""


async def tls_hello(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A ``serverNames`` rule: the ClientHello is read before connecting (relay.py's Connection
    on both paths); an allowed one reaches the upstream byte-exact with what follows it, a
    refused one gets the access_denied alert and never reaches it."""

    async def echo(u: socket.socket) -> None:
        got = await ending(u)
        await send(u, got[0])
        u.shutdown(socket.SHUT_WR)

    async with upstream(echo) as up:
        top = IDENTITIES.replace("  - cidr: 127.0.0.2/32\n    labels: {role: client}\n", "")
        text = config(listener, up.address, top=top)
        async with daemon(
            text, tmp, files={"policy.yaml": TLS_POLICY.replace("PORT", str(up.address[1]))}
        ) as d:
            _, _, _, hello = client_hello(client_context(), "api.example.com")
            c = await connect(d, listener)
            await send(c, hello + b"after the hello", 7)
            c.shutdown(socket.SHUT_WR)
            allowed = await ending(c)
            c.close()
            _, _, _, hello_no = client_hello(client_context(), "nope.example.org")
            c = await connect(d, listener)
            await send(c, hello_no)
            refused = await ending(c)
            c.close()
            await up.done()
            m = await settle(d, listener, 2)
    assert allowed == (hello + b"after the hello", "eof")
    assert refused == (b"\x15" + hello_no[1:3] + b"\x00\x02\x02\x31", "eof")
    assert len(up.tasks) == 1  # the refused one never reached the upstream
    assert counter(m, "proxyd_tls_denials_total", reason="sni_not_allowed") == 1
    log = log_lines(tmp)
    assert [(line["verdict"], line["sni"], line["bytes_in"], line["bytes_out"]) for line in log] == [
        ("forwarded", "api.example.com", len(hello) + 15, len(hello) + 15),
        ("denied", "nope.example.org", len(hello_no), 7),
    ]
    return {"client": (allowed[1], refused), "log": log, "metrics": m}


async def parser_exception(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The sandbox: a parser that raises ends its connection only, logged as an exception; a
    factory that raises ends the connection before any upstream connect."""
    async with upstream(None) as up:
        async with daemon(config(listener, up.address), tmp) as d:
            c = await connect(d, listener)
            await send(c, b"ok\nBOOM\n")
            u = await up.accept()
            raised = await asyncio.gather(ending(u), ending(c))
            c.close()
            m = await settle(d, listener, 1)
        boom = config(listener, up.address, more="    parser_config: {boom_on_create: true}\n")
        (tmp / "access.log").rename(tmp / "first.log")
        async with daemon(boom, tmp) as d:
            c = await connect(d, listener)
            created = await ending(c)
            c.close()
            m2 = await settle(d, listener, 1)
            assert len(up.accepted) == 1  # no upstream connect for the second
    assert list(raised) == [(b"ok\n", "eof"), (b"", "eof")]
    assert created == (b"", "eof")
    assert counter(m, "proxyd_parser_errors_total") == counter(m2, "proxyd_parser_errors_total") == 1
    log = log_lines(tmp, "first.log") + log_lines(tmp)
    assert [(line["event"], line["verdict"]) for line in log] == [
        ("l7", "error"),
        ("connection", "error"),
    ] * 2
    assert log[1]["reason"] == "exception: RuntimeError: test parser exploded on request"
    assert log[3]["reason"] == "exception: RuntimeError: test factory exploded on create"
    assert (log[1]["bytes_in"], log[3]["bytes_in"]) == (8, 0)
    return {"client": (raised, created), "log": log, "metrics": (m, m2)}


async def upstream_unreachable(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A connect that fails at once (a multicast address: no route for a stream) is passed on as
    a reset too, with the system's reason."""
    async with daemon(config(listener, ("224.0.0.1", 80)), tmp) as d:
        c = await connect(d, listener)
        got = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got == (b"", "reset")
    assert counter(m, "proxyd_upstream_connect_failures_total") == 1
    log = log_lines(tmp)
    expect = conn_line(listener, bytes_in=0, bytes_out=0, verdict="error",
                       reason="upstream connect failed: Network is unreachable")  # fmt: skip
    assert log == [{**expect, "dst": "224.0.0.1:P", "upstream": "224.0.0.1:P"}]
    return {"client": got, "log": log, "metrics": m}


async def error_while_client_slow(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A parser error while much waits for a slow client: what was forwarded before the error
    is still flushed to the client before the close (the end does not drop the write buffer),
    and the socket still flushing stays counted in the descriptor budget until it is closed."""
    data = payload(listener, 4 << 20)

    async def serve(u: socket.socket) -> None:
        await send(u, data + b"ERROR\n", 100_003)
        await ending(u)

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener, rcvbuf=64 << 10)
        await wait_for(lambda: bool(up.tasks) and up.tasks[0].done(), TIMEOUT)  # all sent, nothing read
        lr = d.listeners[listener]
        await wait_for(lambda: not lr.conns, TIMEOUT)  # ended, its client side still flushing
        assert d.fds.data == 1  # that socket is given back to the descriptor budget once closed
        got = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert got[1] == "eof" and len(got[0]) == len(data) and got[0] == data
    assert counter(m, "proxyd_parser_errors_total") == 1
    log = log_lines(tmp)
    assert [(line["event"], line["verdict"]) for line in log] == [("l7", "error"), ("connection", "error")]
    assert (log[1]["bytes_out"], log[1]["reason"]) == (len(data), "parser_error: parser error 1")
    return {"client": got[1], "log": log, "metrics": m}


async def reset_while_stalled(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A client that stopped reading (the upstream paused, proxyd's buffer full) resets: the
    upstream, blocked sending, gets the reset."""
    chunk = payload(listener, 1 << 20)
    seen: Seen = {}

    async def serve(u: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(50):
                await loop.sock_sendall(u, chunk)
            seen["server"] = "sent all"
        except ConnectionResetError:
            seen["server"] = "reset"
        except BrokenPipeError:
            seen["server"] = "broken pipe"

    async with upstream(serve) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener, rcvbuf=64 << 10)
        lr = d.listeners[listener]
        await wait_for(lambda: len(lr.conns) == 1, TIMEOUT)
        [conn] = lr.conns
        await wait_for(lambda: conn.bytes_out > HIGH_WATER, TIMEOUT)
        await asyncio.sleep(0.3)  # stalled: the client's and proxyd's buffers are full
        rst(c)
        await up.done()
        m = await settle(d, listener, 1)
    assert seen["server"] == "reset"
    log = log_lines(tmp)
    [line] = log
    assert 0 < line.pop("bytes_out") < 50 * len(chunk)
    assert line == conn_line(listener, bytes_in=0, verdict="error", reason="client reset the connection")
    m = {k: v for k, v in m.items() if not k.startswith("proxyd_bytes_total")}
    return {"server": seen["server"], "log": log, "metrics": m}


async def server_gone_client_sends(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """The server answers and closes its socket whole; the client, after that EOF, still sends
    (the server's kernel answers it with a reset), then ends."""
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        c = await connect(d, listener)
        await send(c, b"hi\n")
        u = await up.accept()
        assert await recv_exactly(u, 3) == b"hi\n"
        await send(u, b"bye\n")
        u.close()
        first = await ending(c)
        await send(c, b"more\n")
        await asyncio.sleep(0.3)  # forwarded, and the server's kernel has answered it
        c.shutdown(socket.SHUT_WR)
        after = await ending(c)
        c.close()
        m = await settle(d, listener, 1)
    assert first == (b"bye\n", "eof")
    assert after == (b"", "eof")
    log = log_lines(tmp)
    # relay.py reads neither side after its EOF, so the server's reset goes unseen: both EOFs
    # passed on, the connection ends forwarded.
    assert log == [conn_line(listener, bytes_in=8, bytes_out=4, verdict="forwarded")]
    return {"client": (first, after), "log": log, "metrics": m}


async def idle_while_connecting(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """idle_timeout shorter than connect_timeout, the upstream's SYN dropped: the idle timeout
    ends the connection while it connects, and the connect is given up."""
    async with upstream(None) as up:
        up.lsock.listen(0)
        fillers = []
        try:
            for _ in range(4):  # the accept queue full: proxyd's SYN is dropped
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(up.address)
                fillers.append(f)
            await asyncio.sleep(0.2)
            text = config(listener, up.address, "    idle_timeout: 1s\n", limits="  connect_timeout: 3s\n")
            async with daemon(text, tmp) as d:
                c = await connect(d, listener)
                await send(c, b"hello\n")
                got = await ending(c)
                c.close()
                m = await settle(d, listener, 1)
        finally:
            for f in fillers:
                f.close()
    assert got == (b"", "eof")
    assert counter(m, "proxyd_connection_timeouts_total", reason="idle") == 1
    log = log_lines(tmp)
    assert log == [
        conn_line(
            listener,
            bytes_in=6,
            bytes_out=0,
            verdict="error",
            reason="idle timeout: no byte either way for 1s",
        )
    ]
    return {"client": got, "log": log, "metrics": m}


async def listener_removed(tmp: Path, listener: str, _servers: Servers) -> Seen:
    """A reload that removes the listener: it stops accepting at once (its port refuses), and
    its open connection goes on until it ends by itself, logged and counted as usual."""
    loop = asyncio.get_running_loop()
    async with upstream(None) as up, daemon(config(listener, up.address), tmp) as d:
        old = addr(d, listener)
        c = await connect(d, listener)
        await send(c, b"before\n")
        u = await up.accept()
        assert await recv_exactly(u, 7) == b"before\n"
        write_atomic(tmp / "proxyd.yaml", config("tcp", up.address).replace("name: tcp", "name: other"))
        assert await asyncio.wait_for(d.reload(), TIMEOUT)
        assert listener not in d.listeners
        late = socket.socket()
        late.setblocking(False)
        try:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(loop.sock_connect(late, old), TIMEOUT)
        finally:
            late.close()
        await send(c, b"after\n")
        assert await recv_exactly(u, 6) == b"after\n"
        await send(u, b"ok\n")
        u.shutdown(socket.SHUT_WR)
        c.shutdown(socket.SHUT_WR)
        ends = await asyncio.gather(ending(c), ending(u))
        c.close()
        await wait_for(lambda: not d.active_connections(), TIMEOUT)
        await wait_for(lambda: d.fds.data == 0, TIMEOUT)
        m = counters(d, listener)
    assert list(ends) == [(b"ok\n", "eof"), (b"", "eof")]
    assert counter(m, "proxyd_connections_total") == 1
    assert counter(m, "proxyd_connections_active") == 0
    log = log_lines(tmp)
    assert log == [conn_line(listener, bytes_in=13, bytes_out=3, verdict="forwarded")]
    return {"ends": ends, "log": log, "metrics": m}


SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "large_transfer": (large_transfer, ("tcp", "lines", "byname")),
    "half_close_client_first": (half_close_client_first, ("tcp", "lines", "byname")),
    "half_close_server_first": (half_close_server_first, ("tcp", "lines", "byname")),
    "connect_waits": (connect_waits, ("tcp", "lines")),
    "upstream_refuses": (upstream_refuses, ("tcp", "lines", "byname")),
    "upstream_resets": (upstream_resets, ("tcp", "lines", "byname")),
    "client_resets": (client_resets, ("tcp", "lines", "byname")),
    "slow_reader": (slow_reader, ("tcp", "lines", "byname")),
    "idle_timeout": (idle_timeout, ("tcp", "lines", "byname")),
    "request_timeout": (request_timeout, ("lines",)),
    "denied_request": (denied_request, ("lines", "memcache")),
    "partial_request_at_eof": (partial_request_at_eof, ("lines",)),
    "parser_error": (parser_error, ("lines",)),
    "parser_ops": (parser_ops, ("lines",)),
    "denied_at_accept": (denied_at_accept, ("tcp", "lines")),
    "redis_hold": (redis_hold, ("redis",)),
    "unread_denials": (unread_denials, ("memcache",)),
    "connect_timeout": (connect_timeout, ("tcp", "lines")),
    "drain_at_stop": (drain_at_stop, ("tcp", "lines")),
    "memcache_values": (memcache_values, ("memcache",)),
    "partial_reply_at_eof": (partial_reply_at_eof, ("lines",)),
    "client_resets_while_connecting": (client_resets_while_connecting, ("tcp", "lines")),
    "many_connections": (many_connections, ("tcp", "lines")),
    "max_connections": (max_connections, ("tcp", "lines")),
    "tls_hello": (tls_hello, ("tcp",)),
    "parser_exception": (parser_exception, ("lines",)),
    "upstream_unreachable": (upstream_unreachable, ("tcp", "lines")),
    "error_while_client_slow": (error_while_client_slow, ("lines",)),
    "reset_while_stalled": (reset_while_stalled, ("tcp", "lines")),
    "server_gone_client_sends": (server_gone_client_sends, ("tcp", "lines")),
    "idle_while_connecting": (idle_while_connecting, ("tcp", "lines")),
    "listener_removed": (listener_removed, ("tcp", "lines")),
}
CASES = [(name, listener) for name, (_, listeners) in SCENARIOS.items() for listener in listeners]


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """memcached's and redis-server's ports, each started on first use (two scenarios need them)."""
    starters = {"memcached": start_memcached, "redis": start_redis}
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}

        def get(name: str) -> int:
            if name not in ports:
                ports[name] = stack.enter_context(starters[name]())
            return ports[name]

        yield get


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("scenario", "listener"), CASES)
async def test_scenario(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    servers: Servers,
    scenario: str,
    listener: str,
    path: str,
) -> None:
    use_path(monkeypatch, path)
    await run(scenario, tmp_path, listener, servers)


@pytest.mark.parametrize(("scenario", "listener"), CASES)
async def test_paths_agree(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    servers: Servers,
    scenario: str,
    listener: str,
) -> None:
    """Both paths, one after the other: the same ends, log lines (keys in the same order) and counters."""
    seen = {}
    for path in PATHS:
        with monkeypatch.context() as mp:
            use_path(mp, path)
            (tmp_path / path).mkdir()
            got = await run(scenario, tmp_path / path, listener, servers)
            got["log_keys"] = [list(line) for line in got["log"]]
            seen[path] = got
    assert seen["native"] == seen["transports"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("listener", ["tcp", "lines"])
async def test_which_relay_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, listener: str
) -> None:
    """relay.py's Connection serves the transports path, the pure path (PROXYD_PURE=1: no compiled
    relay, whatever PROXYD_NATIVE_RELAY says) and, on the native path, an upstream given by name;
    the compiled relay serves the rest. Each relays a line and its answer either way."""
    use_path(monkeypatch, path)

    async def echo(u: socket.socket) -> None:
        got = await ending(u)
        await send(u, got[0])
        u.close()

    async with upstream(echo) as up:
        for host in ("127.0.0.1", "localhost"):
            sub = tmp_path / host
            sub.mkdir()
            async with daemon(config(listener, f"{host}:{up.address[1]}"), sub) as d:
                c = await connect(d, listener)
                await send(c, b"ping\n")
                await wait_for(lambda: len(d.listeners[listener].conns) == 1, TIMEOUT)
                [conn] = d.listeners[listener].conns
                native = IMPLEMENTATION == "native" and path == "native"
                assert d.listeners[listener].native == native
                assert isinstance(conn, NativeConnection) == (native and host == "127.0.0.1"), (path, host)
                c.shutdown(socket.SHUT_WR)
                assert await ending(c) == (b"ping\n", "eof")
                c.close()
                await settle(d, listener, 1)
