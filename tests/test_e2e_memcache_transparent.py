"""With an allow-all policy, proxyd's memcache parser changes nothing a real memcached does.

The in-process daemon listens with ``l7proto: memcache`` and the policy ``rules: {l7proto:
memcache}`` (parse, allow every request). Each test sends the same bytes to memcached directly
and through the daemon, on fresh connections after ``flush_all``, and the client must read
exactly what memcached answered directly, the close included: memcached's own answers to the
lines its test suite sends (a 200 KB multi-key ``get``, command lines it rejects with
``CLIENT_ERROR`` and resynchronises after, a binary key over 250 bytes, its ``ERROR Too many
open connections`` at the connection limit), and the replies owed before a close. A hypothesis
property then drives generated traffic (text, meta, binary, pipelined, with the bad lines
memcached answers with an error) through the daemon, with a recording relay between the daemon
and memcached: both byte streams must equal those of a plain relay.

The data path (native or ``PROXYD_PURE=1``) is the one the daemon was imported with; CI runs
this file on both. memcached: :func:`memcached_fixture.start_memcached`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memcached_fixture import start_memcached
from proxyutil import addr, daemon
from pymemcache.client.base import Client

from proxyd.config import parse_config
from proxyd.registry import Registry
from proxyd.server import Daemon

TIMEOUT = 10.0
_PKT = struct.Struct(">BBHBBHIIQ")

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-all-memcache
spec:
  endpointSelector:
    matchLabels: {app: memcached}
  ingress:
    - fromEntities: [all]
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules: {l7proto: memcache}
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
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""


@pytest.fixture(scope="module")
def memcached_server() -> Iterator[int]:
    with start_memcached() as port:
        yield port


def flush(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"flush_all\r\n")
        assert s.recv(64) == b"OK\r\n"


@contextlib.asynccontextmanager
async def allow_all(port: int, tmp_path: Path, upstream: int | None = None) -> AsyncIterator[Daemon]:
    text = CONFIG.format(port=upstream or port)
    files = {"policy.yaml": POLICY.replace("PORT", str(upstream or port))}
    async with daemon(text, tmp_path, files=files) as d:
        yield d


async def talk(at: tuple[str, int], payload: bytes, until: bytes | None) -> bytes:
    """Send ``payload`` in one write; read until the answer ends with ``until`` (or EOF)."""
    r, w = await asyncio.open_connection(*at)
    try:
        w.write(payload)
        await w.drain()
        out = bytearray()
        while until is None or not out.endswith(until):
            chunk = await asyncio.wait_for(r.read(65536), TIMEOUT)
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        w.close()


async def same_as_direct(port: int, d: Daemon, payload: bytes, until: bytes | None) -> bytes:
    """memcached's answer to ``payload``, checked to be what the client reads through proxyd."""
    flush(port)
    direct = await talk(("127.0.0.1", port), payload, until)
    flush(port)
    proxied = await talk(addr(d, "memcache"), payload, until)
    assert proxied == direct
    return direct


async def test_multiget_of_200_kb(memcached_server: int, tmp_path: Path) -> None:
    """Item 6: memcached's suite sends 187 KB gets; proxyd closed at 64 KiB."""
    keys = [b"key%06d" % i for i in range(20000)]
    payload = b"set key000007 0 0 2\r\nhi\r\nget " + b" ".join(keys) + b"\r\nmn\r\n"
    assert len(payload) > 200_000
    async with allow_all(memcached_server, tmp_path) as d:
        got = await same_as_direct(memcached_server, d, payload, b"MN\r\n")
        assert got == b"STORED\r\nVALUE key000007 0 2\r\nhi\r\nEND\r\nMN\r\n"
        # a real client, its keys in one get line
        client = Client(addr(d, "memcache"), connect_timeout=TIMEOUT, timeout=TIMEOUT)
        try:
            found = await asyncio.to_thread(client.get_many, [k.decode() for k in keys])
        finally:
            client.close()
        assert found == {"key000007": b"hi"}


BAD_LINES = (
    b"set k 0 blah 1\r\nX\r\n"  # CLIENT_ERROR; "X" is then an unknown command: ERROR
    b"cas bad blah 0 0 0\r\n\r\n"
    b"set k 0 0 -1\r\n"
    b"set k 0 0 4294967295\r\nabc\r\n"
    b"set k2 0 0 4294967296\r\n\r\n"  # the size is truncated to 32 bits: 0, STORED
    b"get k2\r\n"
    b"set k3 0 0 +2\r\nhi\r\nget k3\r\n"
    b"ms k4 -1\r\nms k4 x\r\nmg k4 T+5 v q\r\n"
    b"set k5 0 0 3 noreply\r\nabc\r\nset k5 0 0 -3 noreply\r\nget k5\r\n"
    b"mn\r\n"
)


async def test_bad_command_lines_answered_and_in_step(memcached_server: int, tmp_path: Path) -> None:
    """Item 7: memcached answers CLIENT_ERROR and reads on; proxyd closed silently."""
    async with allow_all(memcached_server, tmp_path) as d:
        got = await same_as_direct(memcached_server, d, BAD_LINES, b"MN\r\n")
    assert got.count(b"CLIENT_ERROR bad command line format\r\n") >= 5
    assert b"VALUE k2 0 0\r\n\r\nEND\r\n" in got
    assert b"VALUE k3 0 2\r\nhi\r\nEND\r\n" in got
    assert got.endswith(b"VALUE k5 0 3\r\nabc\r\nEND\r\nMN\r\n")


def breq(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    body = extras + key + value
    return _PKT.pack(0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


async def test_binary_key_over_250_answered_then_closed(memcached_server: int, tmp_path: Path) -> None:
    """Item 8: memcached answers status 0x0004, then closes; proxyd closed with nothing."""
    payload = breq(0x0A, opaque=1) + breq(0x00, b"k" * 251, opaque=2) + breq(0x0A, opaque=3)
    async with allow_all(memcached_server, tmp_path) as d:
        got = await same_as_direct(memcached_server, d, payload, None)
    assert got == _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 1, 0) + _PKT.pack(
        0x81, 0x00, 0, 0, 0, 4, 17, 2, 0
    ) + b"Invalid arguments"


async def test_close_delivers_owed_replies_first(memcached_server: int, tmp_path: Path) -> None:
    """Item 10: a line memcached closes on, pipelined behind requests it answers first."""
    text = b"set a 0 0 1\r\nx\r\nget a\r\nmg a v q\r\nmg nothere v q\r\nmn\r\nset " + b"x" * 3000
    binary = breq(0x0A, opaque=1) + breq(0x00, b"nothere", opaque=2) + b"\x90" + b"\0" * 40
    async with allow_all(memcached_server, tmp_path) as d:
        got = await same_as_direct(memcached_server, d, text, None)
        assert got == b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nVA 1\r\nx\r\nMN\r\n"
        got = await same_as_direct(memcached_server, d, binary, None)
        assert got == _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 1, 0) + _PKT.pack(
            0x81, 0x00, 0, 0, 0, 1, 9, 2, 0
        ) + b"Not found"
        # Behind a quiet request memcached may never answer, proxyd sends a barrier (version)
        # and closes after its answer. memcached itself loses replies it had not yet flushed
        # when it closes (here the mg hit); proxyd delivers them.
        quiet = text.replace(b"mn\r\n", b"")
        flush(memcached_server)
        direct = await talk(("127.0.0.1", memcached_server), quiet, None)
        flush(memcached_server)
        proxied = await talk(addr(d, "memcache"), quiet, None)
        assert proxied == b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\nVA 1\r\nx\r\n"
        assert proxied.startswith(direct)
    lines = (tmp_path / "access.log").read_text()
    assert "request line over 2048 bytes that is not a multi-key get" in lines
    assert "binary request magic 0x90" in lines


async def test_too_many_connections_line_is_forwarded(tmp_path: Path) -> None:
    """Item 9: at its connection limit memcached sends one line unasked and closes."""
    with start_memcached("-c", "16") as port:
        held: list[socket.socket] = []
        try:
            for _ in range(30):  # fill the server up: until it answers with the error line
                s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                held.append(s)
                s.sendall(b"version\r\n")
                if s.recv(64) == b"ERROR Too many open connections\r\n":
                    break
            else:
                pytest.fail("memcached -c 16 never reached its connection limit")
            async with allow_all(port, tmp_path) as d:
                for payload in (b"", b"version\r\n", breq(0x0A, opaque=1)):
                    got = await asyncio.to_thread(_read_to_close, addr(d, "memcache"), payload)
                    # memcached closes with the client's bytes unread, so direct too the line is
                    # sometimes followed by a reset rather than a FIN; the line itself must arrive.
                    assert got in (LINE, LINE + b"<reset>")
        finally:
            for s in held:
                s.close()


LINE = b"ERROR Too many open connections\r\n"


def _read_to_close(at: tuple[str, int], payload: bytes) -> bytes:
    """Read until the server closes, with a plain socket: asyncio's StreamReader raises a reset
    before handing over bytes it already received, which would hide the line behind the reset."""
    with socket.create_connection(at, timeout=TIMEOUT) as s:
        s.sendall(payload)
        out = bytearray()
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            out += b"<reset>"
        return bytes(out)


# --- the transparency property: generated traffic, proxyd against a plain relay --------------

KEYS = [b"a", b"b", b"c"]
VALUES = st.binary(max_size=12).map(lambda b: bytes(97 + x % 26 for x in b))


@st.composite
def text_request(draw: st.DrawFn) -> bytes:
    k = draw(st.sampled_from(KEYS))
    v = draw(VALUES)
    nr = b" noreply" if draw(st.integers(0, 4)) == 0 else b""
    q = b" q" if draw(st.booleans()) else b""
    choice = draw(st.integers(0, 17))
    cmd = draw(st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend"]))
    return [
        cmd + b" %s %d 0 %d%s\r\n%s\r\n" % (k, draw(st.integers(0, 9)), len(v), nr, v),
        b"get %s %s\r\n" % (k, draw(st.sampled_from(KEYS))),
        b"gat 100 %s\r\n" % k,
        b"delete %s%s\r\n" % (k, nr),
        b"incr %s 3%s\r\n" % (k, nr),
        b"touch %s 10%s\r\n" % (k, nr),
        b"mg %s v f t%s O%d\r\n" % (k, q, draw(st.integers(0, 99))),
        b"mg %s s v%s\r\n" % (k, q),
        b"ms %s %d T0%s\r\n%s\r\n" % (k, len(v), q, v),
        b"md %s%s\r\n" % (k, q),
        b"ma %s N0 J5 v%s\r\n" % (k, q),
        b"mn\r\n",
        b"version\r\n",
        b"bogus %s\r\n" % k,
        # lines memcached answers CLIENT_ERROR without reading their block
        draw(st.sampled_from([b"set %s 0 blah 1\r\n" % k, b"cas %s blah 0 0 0\r\n" % k,
                              b"set %s 0 0 -1\r\n" % k, b"set %s 0 0 4294967295\r\n" % k,
                              b"ms %s -1\r\n" % k])),
        b"set %s 0 0 +%d\r\n%s\r\n" % (k, len(v), v),
        b"get " + b" ".join(draw(st.sampled_from(KEYS)) for _ in range(draw(st.integers(1, 800)))) + b"\r\n",
        b"set %s 0 0 4294967296\r\n\r\n" % k,
    ][choice]  # fmt: skip


@st.composite
def binary_request(draw: st.DrawFn, i: int) -> bytes:
    k = draw(st.sampled_from(KEYS))
    v = draw(VALUES)
    op = draw(st.sampled_from([0x00, 0x09, 0x0C, 0x0D, 0x01, 0x11, 0x02, 0x04, 0x14, 0x05, 0x0A, 0x0B, 0x0E]))
    if op in (0x01, 0x11, 0x02):
        return breq(op, k, struct.pack(">II", 7, 0), v, i)
    if op == 0x05:
        return breq(op, k, struct.pack(">QQI", 2, 10, 0), b"", i)
    if op == 0x0E:
        return breq(op, k, b"", v, i)
    if op in (0x0A, 0x0B):
        return breq(op, b"", b"", b"", i)
    return breq(op, k, b"", b"", i)


TEXT_SENTINEL = (b"mn\r\n", b"MN\r\n")
BIN_SENTINEL = (breq(0x0A, opaque=0x5EA), _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0x5EA, 0))


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """The client's writes (pipelined, cut anywhere) and the reply that ends the conversation."""
    if draw(st.booleans()):
        reqs = draw(st.lists(text_request(), min_size=1, max_size=12))
        stream, until = b"".join(reqs) + TEXT_SENTINEL[0], TEXT_SENTINEL[1]
    else:
        n = draw(st.integers(1, 12))
        stream = b"".join(draw(binary_request(i)) for i in range(n)) + BIN_SENTINEL[0]
        until = BIN_SENTINEL[1]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return [p for p in parts if p], until


class Recorder:
    """A plain byte relay in front of memcached that records both directions per connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[bytearray, bytearray, asyncio.Event]] = []

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        rec = (bytearray(), bytearray(), asyncio.Event())
        self.conns.append(rec)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, buf: bytearray) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    buf += data
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()

        try:
            await asyncio.gather(pipe(cr, uw, rec[0]), pipe(ur, cw, rec[1]))
        finally:
            rec[2].set()
            uw.close()
            cw.close()


class Running:
    """The daemon and the recorder on an event loop of their own (hypothesis tests are sync)."""

    def __init__(self, memcached: int, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.recorder = Recorder(memcached)
        self.server = self.run(asyncio.start_server(self.recorder.handle, "127.0.0.1", 0))
        rport = self.server.sockets[0].getsockname()[1]
        (tmp_path / "policy.yaml").write_text(POLICY.replace("PORT", str(rport)))
        text = CONFIG.format(port=rport)
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(text)
        registry = Registry.load()
        self.daemon = Daemon(parse_config(text, cfg, registry), registry)
        self.run(self.daemon.start())
        self.at = addr(self.daemon, "memcache")

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT * 3)

    def close(self) -> None:
        self.run(self.daemon.stop())
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture(scope="module")
def running(memcached_server: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(memcached_server, tmp_path_factory.mktemp("transparent"))
    try:
        yield r
    finally:
        r.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(conversation=conversations())
def test_allow_all_equals_a_plain_relay(running: Running, conversation: tuple[list[bytes], bytes]) -> None:
    writes, until = conversation
    before = len(running.recorder.conns)
    received = bytearray()
    with socket.create_connection(running.at, timeout=TIMEOUT) as s:
        for part in writes:
            s.sendall(part)
        while not received.endswith(until):
            chunk = s.recv(65536)
            assert chunk, f"closed after {bytes(received[-200:])!r}"
            received += chunk
        # An earlier "mn" in the conversation can end a read with "MN" too: half-close and read
        # to the end, so every reply the server sent is counted (memcached answers all it read,
        # then closes; the FIN passes through proxyd and the relay).
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            received += chunk
    sent = b"".join(writes)
    # the relay saw the connection end: both of its directions are complete
    for _ in range(int(TIMEOUT / 0.01)):
        if len(running.recorder.conns) > before and running.recorder.conns[before][2].is_set():
            break
        threading.Event().wait(0.01)
    to_server, to_client, done = running.recorder.conns[before]
    assert done.is_set()
    assert bytes(to_server) == sent  # the server got the client's bytes, byte for byte
    assert bytes(to_client) == bytes(received)  # and the client the server's
