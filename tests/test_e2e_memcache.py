"""The memcache parser end to end: the in-process daemon in front of a real memcached, real clients.

The policy is the one from Cilium 1.3's announcement, completed: ``fleet-maintanence`` (sic, as
Cilium spelled it; source 127.0.0.2) may ``writeGroup`` and ``get`` under ``alliance/fleet/``,
``fleet-monitoring`` (127.0.0.3) may only ``get`` there, ``jedi`` (127.0.0.4) may do anything.
Clients bind those source addresses: pymemcache through a socket module whose sockets are bound
first, raw sockets with ``local_addr``, and pylibmc (binary protocol, libmemcached) through a tiny
byte relay that connects to the daemon from the identity's address, since libmemcached cannot
choose its source address. Every denied write is checked to leave the data unchanged by reading
memcached directly, not through the daemon.

memcached is started by :func:`memcached_fixture.start_memcached`; it and pylibmc skip when
missing, and fail when PROXYD_REQUIRE_BINARIES=1 (CI).

What real binary clients meet under this policy (as the parser documents it, so asserted here):
the binary ``NoOp`` and ``Quit`` are commands of their own (``noop``, ``quit``) in no group, so
fleet-maintanence's libmemcached multi-get (GetKQ... then NoOp) and its disconnect (Quit) are
denied; and libmemcached takes status 0x0008 (auth error) as a connection failure: it closes the
connection and marks the server failed for its retry_timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from memcached_fixture import start_memcached
from proxyutil import addr, daemon, wait_for
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

from proxyd.server import Daemon

T = TypeVar("T")

MAINT, MONITOR, JEDI = "127.0.0.2", "127.0.0.3", "127.0.0.4"
DENIED = b"CLIENT_ERROR access denied\r\n"
TIMEOUT = 5.0

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: secure-fleet
spec:
  description: "fleet-maintanence may read and write alliance/fleet keys, fleet-monitoring only read them"
  endpointSelector:
    matchLabels: {app: memcached}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: fleet-maintanence}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: memcache
            l7:
              - command: writeGroup
                keyPrefix: "alliance/fleet/"
              - command: get
                keyPrefix: "alliance/fleet/"
    - fromEndpoints:
        - matchLabels: {app: fleet-monitoring}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: memcache
            l7:
              - command: get
                keyPrefix: "alliance/fleet/"
    - fromEndpoints:
        - matchLabels: {app: jedi}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: memcache
            l7: [{}]
"""

# A second document, for the meta-command test: fleet-monitoring may also use ``mg`` there.
META_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: fleet-meta
spec:
  endpointSelector:
    matchLabels: {app: memcached}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: fleet-monitoring}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: memcache
            l7:
              - command: mg
                keyPrefix: "alliance/fleet/"
"""

CONFIG = """
listeners:
  - name: memcache
    address: "127.0.0.1:0"
    l7proto: memcache
    upstream: "127.0.0.1:{port}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: memcached}}
  - cidr: 127.0.0.2/32
    labels: {{app: fleet-maintanence}}
  - cidr: 127.0.0.3/32
    labels: {{app: fleet-monitoring}}
  - cidr: 127.0.0.4/32
    labels: {{app: jedi}}
policy:
  paths: [{paths}]
access_log:
  path: access.log
"""


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def memcached_server() -> Iterator[int]:
    with start_memcached() as port:
        yield port


@pytest.fixture
def mc_port(memcached_server: int) -> int:
    """The server's port, emptied before each test."""
    with socket.create_connection(("127.0.0.1", memcached_server), timeout=TIMEOUT) as s:
        s.sendall(b"flush_all\r\n")
        assert s.recv(64) == b"OK\r\n"
    return memcached_server


@contextlib.asynccontextmanager
async def fleet_daemon(port: int, tmp_path: Path, meta: bool = False) -> AsyncIterator[Daemon]:
    files = {"policy.yaml": POLICY.replace("PORT", str(port))}
    if meta:
        files["meta.yaml"] = META_POLICY.replace("PORT", str(port))
    text = CONFIG.format(port=port, paths=", ".join(files))
    async with daemon(text, tmp_path, files=files) as d:
        try:
            yield d
        finally:  # a failed test must not leave clients behind to hold up the daemon's stop
            while _opened:
                _opened.pop().close()


_opened: list[Any] = []  # clients of the running test (pymemcache, pylibmc, stream writers)


class BoundSocketModule:
    """A ``socket`` module stand-in for pymemcache whose sockets are bound to ``src`` first."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.connections = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        s = socket.socket(family, type, proto)
        s.bind((self.src, 0))
        self.connections += 1
        return s


def pmc(d: Daemon, src: str, noreply: bool = False) -> tuple[Client, BoundSocketModule]:
    mod = BoundSocketModule(src)
    client = Client(
        addr(d, "memcache"),
        socket_module=mod,
        connect_timeout=TIMEOUT,
        timeout=TIMEOUT,
        default_noreply=noreply,
    )
    _opened.append(client)
    return client, mod


def direct(port: int) -> Client:
    """pymemcache straight to memcached, bypassing the daemon: what the server really holds."""
    return Client(("127.0.0.1", port), connect_timeout=TIMEOUT, timeout=TIMEOUT, default_noreply=False)


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Blocking client calls run in a thread so the in-process daemon keeps serving."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), TIMEOUT * 2)


async def denied(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(MemcacheClientError, match="access denied"):
        await call(fn, *args, **kwargs)


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def raw(d: Daemon, src: str) -> Stream:
    r, w = await asyncio.open_connection(*addr(d, "memcache"), local_addr=(src, 0))
    _opened.append(w)
    return r, w


async def exchange(c: Stream, payload: bytes, expected: bytes) -> None:
    """Send ``payload`` in one write; the replies must be exactly ``expected``, and no more."""
    r, w = c
    w.write(payload)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(len(expected)), TIMEOUT) if expected else b""
    assert got == expected
    # Nothing extra follows: the next answer on the stream is the probe's.
    w.write(b"get alliance/fleet/__probe__\r\n")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(5), TIMEOUT) == b"END\r\n"


async def direct_exchange(port: int, payload: bytes, n: int) -> bytes:
    """The server's real answer to ``payload`` (``n`` bytes of it), on a direct connection."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        await w.drain()
        return await asyncio.wait_for(r.readexactly(n), TIMEOUT)
    finally:
        w.close()


def log_entries(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


def denials(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for e in log_entries(tmp_path) if e["event"] == "l7" and e["verdict"] == "denied"]


def metric(d: Daemon, verdict: str) -> float:
    prefix = f'proxyd_l7_requests_total{{l7proto="memcache",verdict="{verdict}"}} '
    for line in d.metrics.render().decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def require_module(name: str) -> Any:
    """Import a client library the test needs: skip without it, fail under PROXYD_REQUIRE_BINARIES=1."""
    try:
        return __import__(name)
    except ImportError as e:
        msg = f"{name} not importable: {e}"
        if os.environ.get("PROXYD_REQUIRE_BINARIES", "") not in ("", "0"):
            pytest.fail(msg + " (required: PROXYD_REQUIRE_BINARIES=1)")
        pytest.skip(msg)


# ---------------------------------------------------------------------------------------------
# text protocol with pymemcache


async def test_pymemcache_rights_by_identity(mc_port: int, tmp_path: Path) -> None:
    server = direct(mc_port)
    await call(server.set, "alliance/fleet/xwing", b"red-5")
    await call(server.set, "alliance/rebels/base", b"hoth")
    async with fleet_daemon(mc_port, tmp_path) as d:
        maint, maint_sock = pmc(d, MAINT)
        monitor, monitor_sock = pmc(d, MONITOR)
        jedi, _ = pmc(d, JEDI)

        # fleet-maintanence: writeGroup and get under alliance/fleet/.
        assert await call(maint.get, "alliance/fleet/xwing") == b"red-5"
        assert await call(maint.set, "alliance/fleet/awing", b"green-1") is True
        assert await call(maint.add, "alliance/fleet/bwing", b"blade") is True
        assert await call(maint.append, "alliance/fleet/bwing", b"-1") is True
        assert await call(maint.prepend, "alliance/fleet/bwing", b"b:") is True
        assert await call(maint.replace, "alliance/fleet/awing", b"green-2") is True
        value, cas = await call(maint.gets, "alliance/fleet/awing")
        assert value == b"green-2"
        assert await call(maint.cas, "alliance/fleet/awing", b"green-3", cas) is True
        assert await call(maint.set, "alliance/fleet/count", b"10") is True
        assert await call(maint.incr, "alliance/fleet/count", 5) == 15
        assert await call(maint.decr, "alliance/fleet/count", 3) == 12
        assert await call(maint.touch, "alliance/fleet/count", 600) is True
        assert await call(
            maint.get_many, ["alliance/fleet/awing", "alliance/fleet/bwing", "alliance/fleet/none"]
        ) == {
            "alliance/fleet/awing": b"green-3",
            "alliance/fleet/bwing": b"b:blade-1",
        }
        assert await call(maint.delete, "alliance/fleet/xwing") is True
        assert await call(server.get, "alliance/fleet/xwing") is None
        assert await call(server.get, "alliance/fleet/bwing") == b"b:blade-1"
        # ... and nothing else.
        await denied(maint.set, "alliance/rebels/base", b"dagobah")
        await denied(maint.get, "alliance/rebels/base")
        await denied(maint.delete, "alliance/rebels/base")
        await denied(maint.get_many, ["alliance/fleet/awing", "alliance/rebels/base"])
        await denied(maint.flush_all)
        await denied(maint.stats)
        await denied(maint.version)
        assert await call(maint.get, "alliance/fleet/awing") == b"green-3"
        assert await call(server.get, "alliance/rebels/base") == b"hoth"  # untouched, flush denied

        # fleet-monitoring: only get under alliance/fleet/.
        assert await call(monitor.get, "alliance/fleet/awing") == b"green-3"
        assert await call(monitor.gets_many, ["alliance/fleet/awing", "alliance/fleet/count"]) == {
            "alliance/fleet/awing": await call(server.gets, "alliance/fleet/awing"),
            "alliance/fleet/count": await call(server.gets, "alliance/fleet/count"),
        }
        await denied(monitor.set, "alliance/fleet/awing", b"tie-fighter")
        await denied(monitor.add, "alliance/fleet/ywing", b"gold")
        await denied(monitor.append, "alliance/fleet/awing", b"!")
        await denied(monitor.delete, "alliance/fleet/awing")
        await denied(monitor.incr, "alliance/fleet/count", 1)
        await denied(monitor.touch, "alliance/fleet/awing", 1)
        await denied(monitor.get, "alliance/rebels/base")
        await denied(monitor.get_many, ["alliance/fleet/awing", "alliance/rebels/base"])
        assert await call(monitor.get, "alliance/fleet/awing") == b"green-3"
        assert await call(
            server.get_many, ["alliance/fleet/awing", "alliance/fleet/ywing", "alliance/fleet/count"]
        ) == {
            "alliance/fleet/awing": b"green-3",
            "alliance/fleet/count": b"12",
        }

        # jedi: anything.
        assert await call(jedi.get, "alliance/rebels/base") == b"hoth"
        assert await call(jedi.set, "alliance/rebels/base", b"yavin-4") is True
        assert (await call(jedi.stats))[b"pid"] > 0
        assert (await call(jedi.version)).startswith(b"1.")
        assert await call(jedi.delete, "alliance/fleet/count") is True
        assert await call(server.get, "alliance/rebels/base") == b"yavin-4"
        assert await call(server.get, "alliance/fleet/count") is None

        # pymemcache drops its socket after any error; it reconnected from the same identity.
        assert maint_sock.connections > 1 and monitor_sock.connections > 1
        for c in (maint, monitor, jedi, server):
            c.close()
        await wait_for(lambda: not d.active_connections())
        n_denied = metric(d, "denied")

    got = denials(tmp_path)
    assert len(got) == n_denied == 15
    assert all(e["policy"] == "secure-fleet" and e["l7proto"] == "memcache" for e in got)
    seen = {(e["src"].rsplit(":", 1)[0], e["fields"]["command"], tuple(e["fields"]["keys"])) for e in got}
    assert (MAINT, "set", ("alliance/rebels/base",)) in seen
    assert (MAINT, "get", ("alliance/fleet/awing", "alliance/rebels/base")) in seen
    assert (MAINT, "flush_all", ()) in seen
    assert (MAINT, "stats", ()) in seen
    assert (MONITOR, "set", ("alliance/fleet/awing",)) in seen
    assert (MONITOR, "incr", ("alliance/fleet/count",)) in seen
    assert not any(src == JEDI for src, _, _ in seen)


async def test_noreply_denials_are_silent(mc_port: int, tmp_path: Path) -> None:
    """pymemcache's default ``noreply`` writes: a denied one gets no answer at all, the stream
    stays in step on the same connection, and the server never sees it."""
    server = direct(mc_port)
    async with fleet_daemon(mc_port, tmp_path) as d:
        monitor, monitor_sock = pmc(d, MONITOR, noreply=True)
        maint, maint_sock = pmc(d, MAINT, noreply=True)
        # One write of three noreply sets; the one outside the prefix is dropped silently.
        assert (
            await call(
                maint.set_many,
                {"alliance/fleet/a": b"1", "alliance/rebels/b": b"2", "alliance/fleet/c": b"3"},
            )
            == []
        )
        assert await call(maint.get_many, ["alliance/fleet/a", "alliance/fleet/c"]) == {
            "alliance/fleet/a": b"1",
            "alliance/fleet/c": b"3",
        }
        assert await call(monitor.set, "alliance/fleet/a", b"x") is True  # noreply: the client cannot tell
        assert await call(monitor.delete, "alliance/fleet/c") is True
        assert await call(monitor.get, "alliance/fleet/a") == b"1"
        assert await call(monitor.get, "alliance/fleet/c") == b"3"
        assert maint_sock.connections == monitor_sock.connections == 1  # never reconnected
        assert await call(server.get_many, ["alliance/fleet/a", "alliance/rebels/b", "alliance/fleet/c"]) == {
            "alliance/fleet/a": b"1",
            "alliance/fleet/c": b"3",
        }
        for c in (maint, monitor, server):
            c.close()
        await wait_for(lambda: not d.active_connections())
        assert metric(d, "denied") == 3
    cmds = sorted((e["fields"]["command"], e["fields"]["keys"][0]) for e in denials(tmp_path))
    assert cmds == [("delete", "alliance/fleet/c"), ("set", "alliance/fleet/a"), ("set", "alliance/rebels/b")]


# ---------------------------------------------------------------------------------------------
# raw text: pipelining, connection kept


async def test_pipelined_mix_replies_in_order(mc_port: int, tmp_path: Path) -> None:
    server = direct(mc_port)
    await call(server.set, "alliance/fleet/awing", b"green")
    await call(server.set, "alliance/rebels/base", b"hoth")
    async with fleet_daemon(mc_port, tmp_path) as d:
        maint = await raw(d, MAINT)
        monitor = await raw(d, MONITOR)
        # The denied set's data block ("get alliance/rebels/base" would be a valid command) is
        # dropped with it, not parsed as a request.
        block = b"get alliance/rebels/base"
        await exchange(
            maint,
            b"get alliance/fleet/awing\r\n"
            b"set alliance/rebels/base 0 0 %d\r\n%s\r\n"
            b"set alliance/fleet/bwing 0 0 5\r\nblade\r\n"
            b"delete alliance/rebels/base\r\n"
            b"get alliance/fleet/awing alliance/fleet/bwing\r\n"
            b"incr alliance/rebels/count 1\r\n"
            b"set alliance/rebels/base 1 0 1 noreply\r\nX\r\n"
            b"append alliance/fleet/awing 0 0 2\r\n-1\r\n"
            b"stats\r\n"
            b"get alliance/fleet/awing\r\n" % (len(block), block),
            b"VALUE alliance/fleet/awing 0 5\r\ngreen\r\nEND\r\n"
            + DENIED
            + b"STORED\r\n"
            + DENIED
            + b"VALUE alliance/fleet/awing 0 5\r\ngreen\r\nVALUE alliance/fleet/bwing 0 5\r\nblade\r\nEND\r\n"
            + DENIED
            + b"STORED\r\n"
            + DENIED
            + b"VALUE alliance/fleet/awing 0 7\r\ngreen-1\r\nEND\r\n",
        )
        # The same against monitoring: reads pass, every write is answered by a denial in place.
        await exchange(
            monitor,
            b"set alliance/fleet/awing 0 0 3\r\nnew\r\nget alliance/fleet/awing\r\n"
            b"touch alliance/fleet/awing 10\r\nget alliance/rebels/base\r\ngets alliance/fleet/none\r\n",
            DENIED + b"VALUE alliance/fleet/awing 0 7\r\ngreen-1\r\nEND\r\n" + DENIED + DENIED + b"END\r\n",
        )
        # Split across writes at awkward places: still one reply per request, in order.
        r, w = monitor
        for part in (b"get alliance/fl", b"eet/awing\r\nse", b"t alliance/fleet/awing 0 0 3\r\nn", b"ew\r\n"):
            w.write(part)
            await w.drain()
            await asyncio.sleep(0.01)
        want = b"VALUE alliance/fleet/awing 0 7\r\ngreen-1\r\nEND\r\n" + DENIED
        assert await asyncio.wait_for(r.readexactly(len(want)), TIMEOUT) == want
        assert await call(
            server.get_many, ["alliance/fleet/awing", "alliance/fleet/bwing", "alliance/rebels/base"]
        ) == {
            "alliance/fleet/awing": b"green-1",
            "alliance/fleet/bwing": b"blade",
            "alliance/rebels/base": b"hoth",
        }
        assert await call(server.get, "alliance/rebels/count") is None
        for _, w in (maint, monitor):
            w.close()
        server.close()
        await wait_for(lambda: not d.active_connections())
        assert metric(d, "denied") == 9
    assert len(denials(tmp_path)) == 9


# ---------------------------------------------------------------------------------------------
# meta commands


async def test_meta_commands(mc_port: int, tmp_path: Path) -> None:
    server = direct(mc_port)
    await call(server.set, "alliance/fleet/m1", b"v1")
    await call(server.set, "alliance/rebels/base", b"hoth")
    b64 = lambda k: base64.b64encode(k.encode())  # noqa: E731
    async with fleet_daemon(mc_port, tmp_path, meta=True) as d:
        jedi = await raw(d, JEDI)
        maint = await raw(d, MAINT)
        monitor = await raw(d, MONITOR)

        # jedi: every meta command goes through, answered by the server.
        await exchange(
            jedi,
            b"ms alliance/rebels/echo 3 T0\r\nice\r\nmg alliance/rebels/echo v O7\r\n"
            b"md alliance/rebels/base q\r\nmg alliance/rebels/base v q O8\r\nmn\r\n",
            b"HD\r\nVA 3 O7\r\nice\r\nMN\r\n",
        )
        assert await call(server.get, "alliance/rebels/base") is None  # md ran
        assert await call(server.get, "alliance/rebels/echo") == b"ice"

        # fleet-maintanence: meta commands are in no classic group, so all are denied, even under
        # its prefix; quiet mode does not hide the denial; ms's data block goes with it. mn (the
        # meta no-op) is protocol control and always passes.
        await exchange(
            maint,
            b"mg alliance/fleet/m1 v\r\nms alliance/fleet/m1 2\r\nxx\r\nmn\r\n"
            b"md alliance/fleet/m1 q\r\nmn\r\nget alliance/fleet/m1\r\n",
            DENIED * 2 + b"MN\r\n" + DENIED + b"MN\r\nVALUE alliance/fleet/m1 0 2\r\nv1\r\nEND\r\n",
        )
        assert await call(server.get, "alliance/fleet/m1") == b"v1"

        # fleet-monitoring, with the second document: mg under the prefix (base64 keys decoded
        # before matching), nothing else. Pipelined with quiet requests: barriers keep the order,
        # and the allowed replies are exactly what the server answers directly.
        request = (
            b"mg alliance/fleet/m1 v O1\r\n"
            b"mg " + b64("alliance/fleet/m1") + b" b v O2\r\n"
            b"mg alliance/fleet/missing v q O3\r\n"
            b"mg " + b64("alliance/rebels/echo") + b" b v q O4\r\n"
            b"mg alliance/fleet/m1 s v O5\r\n"
            b"ms alliance/fleet/m1 2 q O6\r\nxx\r\n"
            b"mn\r\n"
        )
        allowed = b"mg alliance/fleet/m1 v O1\r\nmg %s b v O2\r\nmg alliance/fleet/missing v q O3\r\n" % b64(
            "alliance/fleet/m1"
        )
        first = await direct_exchange(
            mc_port, allowed + b"mn\r\n", len(b"VA 2 O1\r\nv1\r\nVA 2 O2\r\nv1\r\nMN\r\n")
        )
        assert first == b"VA 2 O1\r\nv1\r\nVA 2 O2\r\nv1\r\nMN\r\n"
        fifth = await direct_exchange(
            mc_port, b"mg alliance/fleet/m1 s v O5\r\n", len(b"VA 2 s2 O5\r\nv1\r\n")
        )
        await exchange(monitor, request, first[: -len(b"MN\r\n")] + DENIED + fifth + DENIED + b"MN\r\n")
        assert await call(server.get, "alliance/fleet/m1") == b"v1"
        assert await call(server.get, "alliance/rebels/echo") == b"ice"

        for _, w in (jedi, maint, monitor):
            w.close()
        server.close()
        await wait_for(lambda: not d.active_connections())
        assert metric(d, "denied") == 5
    got = denials(tmp_path)
    assert {e["fields"]["command"] for e in got} == {"mg", "ms", "md"}  # mn always passes
    assert any(e["fields"]["keys"] == ["alliance/rebels/echo"] for e in got)  # logged decoded
    allowed_mg = [
        e
        for e in log_entries(tmp_path)
        if e["event"] == "l7"
        and e["entry_type"] == "request"
        and e["verdict"] == "forwarded"
        and e["src"].startswith(MONITOR + ":")
        and e["fields"].get("command") == "mg"
    ]
    assert allowed_mg and all(e["policy"] == "fleet-meta" for e in allowed_mg)


# ---------------------------------------------------------------------------------------------
# binary protocol, raw frames

_HDR = struct.Struct(">BBHBBHIIQ")
GET, SET, INCR, NOOP, GETK, GETKQ = 0x00, 0x01, 0x05, 0x0A, 0x0C, 0x0D
SETQ, DELETEQ = 0x11, 0x14


def breq(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    body = extras + key + value
    return _HDR.pack(0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


def bset(op: int, key: bytes, value: bytes, opaque: int) -> bytes:
    return breq(op, key, struct.pack(">II", 0, 0), value, opaque)


async def read_responses(r: asyncio.StreamReader, n: int) -> list[tuple[int, int, int, bytes, bytes]]:
    """``n`` responses as (opcode, status, opaque, key, value)."""
    out = []
    for _ in range(n):
        hdr = await asyncio.wait_for(r.readexactly(24), TIMEOUT)
        magic, op, klen, elen, _, status, blen, opaque, _ = _HDR.unpack(hdr)
        assert magic == 0x81
        body = await asyncio.wait_for(r.readexactly(blen), TIMEOUT)
        out.append((op, status, opaque, body[elen : elen + klen], body[elen + klen :]))
    return out


async def test_binary_frames(mc_port: int, tmp_path: Path) -> None:
    server = direct(mc_port)
    await call(server.set, "alliance/fleet/b1", b"one")
    await call(server.set, "alliance/rebels/base", b"hoth")
    async with fleet_daemon(mc_port, tmp_path) as d:
        r, w = await raw(d, MAINT)
        # Pipelined, quiet opcodes among them; one response per answered or denied request.
        w.write(
            bset(SET, b"alliance/fleet/b2", b"two", 1)
            + bset(SET, b"alliance/rebels/base", b"dagobah", 2)
            + breq(GETKQ, b"alliance/fleet/b1", opaque=3)
            + breq(GETKQ, b"alliance/rebels/base", opaque=4)
            + breq(GETKQ, b"alliance/fleet/none", opaque=5)
            + bset(SETQ, b"alliance/rebels/base", b"endor", 6)
            + breq(DELETEQ, b"alliance/rebels/base", opaque=7)
            + breq(INCR, b"alliance/rebels/n", struct.pack(">QQI", 1, 0, 0), opaque=8)
            + breq(GETK, b"alliance/fleet/b2", opaque=9)
            + breq(NOOP, opaque=10)
        )
        got = await read_responses(r, 8)
        ops = [(op, status, opaque) for op, status, opaque, _, _ in got]
        assert ops == [
            (SET, 0, 1),
            (SET, 8, 2),
            (GETKQ, 0, 3),
            (GETKQ, 8, 4),
            (SETQ, 8, 6),
            (DELETEQ, 8, 7),
            (INCR, 8, 8),
            (GETK, 0, 9),
        ]
        assert all(value == b"access denied" for _, status, _, _, value in got if status == 8)
        # NoOp is protocol control (libmemcached ends quiet multi-gets with it): always passes.
        assert (await read_responses(r, 1))[0] == (NOOP, 0, 10, b"", b"")
        # The allowed answers are byte for byte what the server gives directly.
        dr, dw = await asyncio.open_connection("127.0.0.1", mc_port)
        dw.write(breq(GETKQ, b"alliance/fleet/b1", opaque=3) + breq(GETK, b"alliance/fleet/b2", opaque=9))
        real = await read_responses(dr, 2)
        dw.close()
        assert [got[2], got[7]] == real
        assert real[0][3:] == (b"alliance/fleet/b1", b"one")
        # The connection stays usable after denials.
        w.write(breq(GET, b"alliance/fleet/b2", opaque=11))
        (op, status, opaque, _, value) = (await read_responses(r, 1))[0]
        assert (op, status, opaque, value) == (GET, 0, 11, b"two")
        w.close()
        assert await call(server.get, "alliance/rebels/base") == b"hoth"
        assert await call(server.get, "alliance/rebels/n") is None
        # jedi: the same quiet write and the NoOp pass; only the NoOp is answered.
        jr, jw = await raw(d, JEDI)
        jw.write(bset(SETQ, b"alliance/rebels/base", b"endor", 6) + breq(NOOP, opaque=10))
        assert (await read_responses(jr, 1))[0] == (NOOP, 0, 10, b"", b"")
        jw.close()
        assert await call(server.get, "alliance/rebels/base") == b"endor"
        server.close()
        await wait_for(lambda: not d.active_connections())
        assert metric(d, "denied") == 5
    got_log = denials(tmp_path)
    assert all(e["policy"] == "secure-fleet" for e in got_log)
    assert sorted((e["fields"]["opcode"], e["fields"]["key"]) for e in got_log) == [
        ("deleteq", "alliance/rebels/base"),
        ("getkq", "alliance/rebels/base"),
        ("increment", "alliance/rebels/n"),
        ("set", "alliance/rebels/base"),
        ("setq", "alliance/rebels/base"),
    ]


# ---------------------------------------------------------------------------------------------
# binary protocol with a real client: pylibmc (libmemcached), binary=True


@contextlib.asynccontextmanager
async def from_source(target: tuple[str, int], src: str) -> AsyncIterator[tuple[str, int]]:
    """A byte relay on 127.0.0.1 that connects on to ``target`` from ``src``: libmemcached cannot
    bind a source address, so pylibmc reaches the daemon through this, as the identity at ``src``."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*target, local_addr=(src, 0))
        both = [asyncio.create_task(pipe(cr, uw)), asyncio.create_task(pipe(ur, cw))]
        tasks.update(both)
        await asyncio.gather(*both, return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Disconnect:
    def __init__(self, client: Any) -> None:
        self.client = client

    def close(self) -> None:
        self.client.disconnect_all()


async def test_pylibmc_binary(mc_port: int, tmp_path: Path) -> None:
    pylibmc = require_module("pylibmc")
    server = direct(mc_port)
    await call(server.set, "alliance/fleet/xwing", b"red-5")
    await call(server.set, "alliance/rebels/base", b"hoth")
    async with fleet_daemon(mc_port, tmp_path) as d:
        target = addr(d, "memcache")
        async with (
            from_source(target, MAINT) as maint_at,
            from_source(target, MONITOR) as monitor_at,
            from_source(target, JEDI) as jedi_at,
        ):
            behaviors = {"tcp_nodelay": True, "connect_timeout": 5000, "receive_timeout": 5_000_000}

            def client(at: tuple[str, int]) -> Any:
                c = pylibmc.Client([f"{at[0]}:{at[1]}"], binary=True, behaviors=behaviors)
                _opened.append(_Disconnect(c))
                return c

            async def refused(at: tuple[str, int], op: str, *args: Any) -> str:
                """libmemcached takes status 0x0008 (auth error) as fatal for the connection: it
                closes it and marks the server failed for retry_timeout. So each denial runs on a
                throwaway client, and the long-lived clients go on."""
                with pytest.raises(pylibmc.Error) as e:
                    await call(getattr(client(at), op), *args)
                return str(e.value)

            maint, monitor, jedi = client(maint_at), client(monitor_at), client(jedi_at)
            assert await call(maint.get, "alliance/fleet/xwing") == b"red-5"
            assert await call(maint.set, "alliance/fleet/awing", b"green") is True
            assert await call(maint.add, "alliance/fleet/bwing", b"blade") is True
            assert await call(maint.set, "alliance/fleet/n", b"10") is True
            assert await call(maint.incr, "alliance/fleet/n", 5) == 15
            assert await call(maint.delete, "alliance/fleet/xwing") is True
            assert await call(maint.get, "alliance/fleet/xwing") is None
            # libmemcached ends a multi-get with a NoOp, which always passes (protocol control).
            assert await call(maint.get_multi, ["alliance/fleet/bwing", "alliance/fleet/n"]) == {
                "alliance/fleet/bwing": b"blade",
                "alliance/fleet/n": b"15",
            }
            assert "READ FAILURE" in await refused(maint_at, "set", "alliance/rebels/base", b"dagobah")
            assert "READ FAILURE" in await refused(maint_at, "delete", "alliance/rebels/base")
            # pylibmc's get reports a failed read as a miss.
            assert await call(client(maint_at).get, "alliance/rebels/base") is None
            assert await call(maint.get, "alliance/fleet/awing") == b"green"

            assert await call(monitor.get, "alliance/fleet/awing") == b"green"
            assert "READ FAILURE" in await refused(monitor_at, "set", "alliance/fleet/awing", b"tie")
            assert "READ FAILURE" in await refused(monitor_at, "delete", "alliance/fleet/bwing")
            await refused(monitor_at, "incr", "alliance/fleet/n")
            assert await call(monitor.get, "alliance/fleet/bwing") == b"blade"
            assert await call(
                jedi.get_multi, ["alliance/fleet/awing", "alliance/rebels/base", "alliance/x"]
            ) == {
                "alliance/fleet/awing": b"green",
                "alliance/rebels/base": b"hoth",
            }
            assert await call(jedi.set, "alliance/rebels/echo", b"ice") is True
            assert await call(jedi.delete, "alliance/rebels/echo") is True
            for c in (maint, monitor, jedi):
                c.disconnect_all()

        assert await call(
            server.get_many,
            ["alliance/fleet/awing", "alliance/fleet/bwing", "alliance/fleet/n", "alliance/rebels/base"],
        ) == {
            "alliance/fleet/awing": b"green",
            "alliance/fleet/bwing": b"blade",
            "alliance/fleet/n": b"15",
            "alliance/rebels/base": b"hoth",
        }
        server.close()
        await wait_for(lambda: not d.active_connections())
        n_denied = metric(d, "denied")
    got = denials(tmp_path)
    assert n_denied == len(got) == 6
    assert all(e["policy"] == "secure-fleet" for e in got)
    # disconnect_all()'s binary Quit is protocol control and always passes.
    assert sorted((e["src"].rsplit(":", 1)[0], e["fields"]["opcode"], e["fields"]["key"]) for e in got) == [
        (MAINT, "delete", "alliance/rebels/base"),
        (MAINT, "getk", "alliance/rebels/base"),
        (MAINT, "set", "alliance/rebels/base"),
        (MONITOR, "delete", "alliance/fleet/bwing"),
        (MONITOR, "increment", "alliance/fleet/n"),
        (MONITOR, "set", "alliance/fleet/awing"),
    ]
