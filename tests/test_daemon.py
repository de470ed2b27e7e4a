"""Daemon behaviour over loopback, in-process: admission, sandbox, failures, logs, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from pathlib import Path

import aiohttp
import pytest
from proxyutil import addr, daemon, echo, r2d2_server, tcp_server, wait_for


def read_log(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    p = tmp_path / "access.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def cfg(
    upstream: tuple[str, int] | str, *, l7proto: str | None = None, extra: str = "", limits: str = ""
) -> str:
    up = upstream if isinstance(upstream, str) else f"{upstream[0]}:{upstream[1]}"
    proto = f"\n    l7proto: {l7proto}" if l7proto else ""
    return f"""
listeners:
  - name: main
    address: "127.0.0.1:0"
    upstream: "{up}"{proto}
{extra}
access_log:
  path: access.log
admin:
  address: "127.0.0.1:0"
{limits}
"""


async def test_parser_exception_closes_only_its_connection(tmp_path: Path) -> None:
    """The sandbox: a raising parser ends its connection; others keep transferring byte-exact."""
    payload = os.urandom(256 * 1024)
    async with tcp_server(echo) as up, daemon(cfg(up, l7proto="test.lineparser"), tmp_path) as d:
        good_r, good_w = await asyncio.open_connection(*addr(d, "main"))
        bad_r, bad_w = await asyncio.open_connection(*addr(d, "main"))
        lines = b"".join(b"%d %s\n" % (i, payload[i * 64 : i * 64 + 32].hex().encode()) for i in range(2000))
        good_w.write(lines[: len(lines) // 2])
        await good_w.drain()
        bad_w.write(b"ok\nBOOM\n")
        await bad_w.drain()
        # The connection closes at BOOM; "ok" was forwarded, its echo may not make it back.
        assert b"ok\n".startswith(await asyncio.wait_for(bad_r.read(), 5))
        good_w.write(lines[len(lines) // 2 :])
        good_w.write_eof()
        got = await asyncio.wait_for(good_r.read(), 10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(lines).digest()
        good_w.close()
        bad_w.close()
        await wait_for(lambda: not d.active_connections())
        m = d.metrics.render().decode()
        assert 'proxyd_parser_errors_total{l7proto="test.lineparser"} 1.0' in m
    log = read_log(tmp_path)
    errors = [e for e in log if e["event"] == "l7" and e["verdict"] == "error"]
    assert len(errors) == 1
    assert errors[0]["fields"]["error_kind"] == "exception"
    assert "RuntimeError: test parser exploded" in errors[0]["fields"]["error"]
    conns = [e for e in log if e["event"] == "connection"]
    assert sorted(c["verdict"] for c in conns) == ["error", "forwarded"]


async def test_factory_exception_closes_connection(tmp_path: Path) -> None:
    extra = ""
    text = cfg(("127.0.0.1", 1), l7proto="test.lineparser").replace(
        "l7proto: test.lineparser", "l7proto: test.lineparser\n    parser_config: {boom_on_create: true}"
    )
    async with daemon(text + extra, tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await wait_for(lambda: not d.active_connections())
    (err,) = [e for e in read_log(tmp_path) if e["event"] == "l7"]
    assert err["verdict"] == "error" and "factory exploded" in err["fields"]["error"]


async def test_parser_error_op_closes_with_logged_reason(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.append(await r.read())

    async with tcp_server(sink) as up, daemon(cfg(up, l7proto="test.lineparser"), tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        conns = d.listeners["main"].conns
        await wait_for(lambda: all(c.upstream is not None for c in conns) and bool(conns))
        w.write(b"fine\nERROR here\nnever\n")
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await wait_for(lambda: not d.active_connections() and bool(received))
    assert received == [b"fine\n"]
    conn = [e for e in read_log(tmp_path) if e["event"] == "connection"][0]
    assert conn["verdict"] == "error" and "parser_error" in conn["reason"]


async def test_upstream_refused_is_logged_and_counted(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()  # bound, not listening: connect is refused
        async with daemon(cfg(dead), tmp_path) as d:
            r, w = await asyncio.open_connection(*addr(d, "main"))
            w.write(b"hello")
            with pytest.raises(ConnectionResetError):  # a reset, never a clean EOF
                await asyncio.wait_for(r.read(), 5)
            w.close()
            m = d.metrics.render().decode()
            assert 'proxyd_upstream_connect_failures_total{listener="main"} 1.0' in m
    conn = [e for e in read_log(tmp_path) if e["event"] == "connection"][0]
    assert conn["verdict"] == "error" and "upstream connect failed" in conn["reason"]


async def test_upstream_connect_timeout(tmp_path: Path) -> None:
    # A listener with a full accept queue: further SYNs are dropped, so connect hangs.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        fillers = []
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(s.getsockname())
            fillers.append(f)
        try:
            text = cfg(s.getsockname(), limits="limits:\n  connect_timeout: 300ms")
            async with daemon(text, tmp_path) as d:
                r, w = await asyncio.open_connection(*addr(d, "main"))
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(r.read(), 5)
                w.close()
        finally:
            for f in fillers:
                f.close()
    conn = [e for e in read_log(tmp_path) if e["event"] == "connection"][0]
    assert conn["reason"] == "upstream connect failed: timeout"


async def test_a_client_gone_while_the_upstream_connect_hangs_gives_its_descriptors_back(
    tmp_path: Path,
) -> None:
    """The client resets while the upstream connect is still pending (uvloop's own connect: a
    fixed upstream): connect_timeout still ends that connect, and both descriptors are uncounted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        fillers = []
        for _ in range(4):  # a full accept queue: further SYNs are dropped, so connect hangs
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(s.getsockname())
            fillers.append(f)
        try:
            text = cfg(s.getsockname(), limits="limits:\n  connect_timeout: 300ms")
            async with daemon(text, tmp_path) as d:
                for _ in range(3):
                    _, w = await asyncio.open_connection(*addr(d, "main"))
                    w.write(b"hello")
                    await asyncio.sleep(0.05)  # accepted, its upstream connect started
                    # A reset: the connection ends now, while its connect is still pending.
                    linger_rst = struct.pack("ii", 1, 0)
                    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_rst)
                    w.transport.abort()
                await wait_for(lambda: not d.active_connections(), timeout=10)
                await wait_for(lambda: d.fds.data == 0, timeout=10)  # after connect_timeout
        finally:
            for f in fillers:
                f.close()
    conns = [e for e in read_log(tmp_path) if e["event"] == "connection"]
    assert [e["reason"] for e in conns] == ["client reset the connection"] * 3


async def test_not_redirected_is_refused(tmp_path: Path) -> None:
    text = cfg("x:1").replace('upstream: "x:1"', "upstream: original-destination")
    async with daemon(text, tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        m = d.metrics.render().decode()
        assert 'proxyd_connection_denials_total{listener="main"} 1.0' in m
    conn = [e for e in read_log(tmp_path) if e["event"] == "connection"][0]
    assert conn["verdict"] == "denied" and conn["reason"].startswith("not redirected")


async def test_max_connections(tmp_path: Path) -> None:
    text_limits = "limits:\n  max_connections: 2"
    async with tcp_server(echo) as up, daemon(cfg(up, limits=text_limits), tmp_path) as d:
        conns = [await asyncio.open_connection(*addr(d, "main")) for _ in range(2)]
        for r, w in conns:
            w.write(b"x")
            assert await asyncio.wait_for(r.read(1), 5) == b"x"
        r3, w3 = await asyncio.open_connection(*addr(d, "main"))
        assert await asyncio.wait_for(r3.read(), 5) == b""
        w3.close()
        for _, w in conns:
            w.close()
    reasons = [e.get("reason", "") for e in read_log(tmp_path) if e["event"] == "connection"]
    assert any("max_connections" in r for r in reasons)


async def test_access_log_and_metrics(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up, daemon(cfg(up, l7proto="r2d2"), tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"READ /a\r\nHALT\r\n")
        got = b""
        while got.count(b"\n") < 2:
            got += await asyncio.wait_for(r.read(100), 5)
        assert got == b"OK READ /a\r\nOK HALT\r\n"
        w.close()
        await wait_for(lambda: not d.active_connections())
        host, port = d.admin_address()  # type: ignore[misc]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{port}/metrics") as resp:
                metrics = await resp.text()
            async with http.get(f"http://{host}:{port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://{host}:{port}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"http://{host}:{port}/v1/listeners") as resp:
                listeners = (await resp.json())["listeners"]
        assert listeners[0]["name"] == "main" and listeners[0]["l7proto"] == "r2d2"
        assert 'proxyd_connections_total{listener="main"} 1.0' in metrics
        assert 'proxyd_connections_active{listener="main"} 0.0' in metrics
        assert 'proxyd_l7_requests_total{l7proto="r2d2",verdict="forwarded"} 2.0' in metrics
        assert 'proxyd_bytes_total{direction="in",listener="main"} 15.0' in metrics
        assert 'proxyd_bytes_total{direction="out",listener="main"} 21.0' in metrics
    log = read_log(tmp_path)
    l7 = [e for e in log if e["event"] == "l7"]
    assert [e["fields"] for e in l7] == [{"cmd": "READ", "file": "/a"}, {"cmd": "HALT", "file": ""}]
    for e in l7:
        assert e["entry_type"] == "request" and e["verdict"] == "forwarded"
        assert e["l7proto"] == "r2d2" and e["direction"] == "ingress" and e["listener"] == "main"
        assert e["timestamp"].endswith("Z") and e["src"].startswith("127.0.0.1:")
    (conn,) = [e for e in log if e["event"] == "connection"]
    assert conn["bytes_in"] == 15 and conn["bytes_out"] == 21 and conn["verdict"] == "forwarded"


async def test_wire_values_are_escaped(tmp_path: Path) -> None:
    async with tcp_server(r2d2_server) as up, daemon(cfg(up, l7proto="r2d2"), tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b'READ /"\x1b[31m\xff\x00\r\n')
        await asyncio.wait_for(r.readline(), 5)
        w.close()
        await wait_for(lambda: not d.active_connections())
    raw = (tmp_path / "access.log").read_bytes()
    assert b"\x1b" not in raw and b"\x00" not in raw
    l7 = [e for e in read_log(tmp_path) if e["event"] == "l7"]
    assert l7[0]["fields"]["file"] == '/"\x1b[31m\xff\x00'


async def test_incomplete_frame_at_eof_is_not_forwarded(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.append(await r.read())

    async with tcp_server(sink) as up, daemon(cfg(up, l7proto="r2d2"), tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"READ /a\r\nREAD /partial")
        w.write_eof()
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await wait_for(lambda: not d.active_connections())
    assert received == [b"READ /a\r\n"]
    (conn,) = [e for e in read_log(tmp_path) if e["event"] == "connection"]
    assert conn["unforwarded_bytes"] == {"client": 13, "server": 0}
    assert "incomplete frame" in conn["reason"]


async def test_slow_reader_bounds_memory(tmp_path: Path) -> None:
    """Flow control: a fast client pushing to a slow server never grows proxyd's buffers."""
    total = 1 << 30  # 1 GiB, as the issue asks
    seen = 0
    done = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal seen
        while chunk := await r.read(16384):
            seen += len(chunk)
            if seen < 8 << 20:
                await asyncio.sleep(0.001)  # slow at first, then drain fast
        done.set()

    async with tcp_server(slow) as up, daemon(cfg(up, l7proto="test.passer"), tmp_path) as d:
        _, w = await asyncio.open_connection(*addr(d, "main"))
        block = os.urandom(1 << 20)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                for c in d.listeners["main"].conns:
                    size = c.upstream.get_write_buffer_size() if c.upstream else 0
                    size += sum(c.engine.buffered(x) for x in (False, True)) if c.engine else 0
                    peak = max(peak, size)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        for _ in range(total // len(block)):
            w.write(block)
            await w.drain()
        w.write_eof()
        await asyncio.wait_for(done.wait(), 60)
        watcher.cancel()
        w.close()
    assert seen == total
    # High-water mark plus at most a couple of read chunks in flight.
    assert peak < 2 << 20, peak


async def test_slow_client_bounds_memory(tmp_path: Path) -> None:
    """Flow control the other way: a server pushing to a client that reads slowly."""
    total = 256 << 20
    block = os.urandom(1 << 20)

    async def fast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(total // len(block)):
            w.write(block)
            await w.drain()
        w.write_eof()

    async with tcp_server(fast) as up, daemon(cfg(up, l7proto="test.passer"), tmp_path) as d:
        r, w = await asyncio.open_connection(*addr(d, "main"))
        peak = 0
        seen = 0
        while chunk := await asyncio.wait_for(r.read(65536), 10):
            seen += len(chunk)
            if seen < 8 << 20:
                await asyncio.sleep(0.001)  # slow at first
            for c in d.listeners["main"].conns:
                size = c.client.get_write_buffer_size() if c.client else 0
                size += sum(c.engine.buffered(x) for x in (False, True)) if c.engine else 0
                peak = max(peak, size)
        w.close()
    assert seen == total
    assert peak < 2 << 20, peak


async def test_every_counted_descriptor_is_uncounted_when_its_socket_closes(tmp_path: Path) -> None:
    """Accepting pauses on the data path's own count of its sockets (fdbudget.py): a socket
    counted and never uncounted would, one by one, stop the daemon accepting for good."""

    def rst(w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.transport.abort()

    async with tcp_server(echo) as up, daemon(cfg(up, limits="limits:\n  max_connections: 3"), tmp_path) as d:
        assert d.fds.data == 0 and d.fds.high > d.fds.in_use()
        # A whole exchange, a client reset, a client gone at once, and a refusal at accept.
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        rst(w)
        _, w = await asyncio.open_connection(*addr(d, "main"))
        w.close()
        held = [await asyncio.open_connection(*addr(d, "main")) for _ in range(5)]
        await wait_for(lambda: d.active_connections() == 3)  # two refused over max_connections
        for _, w in held:
            w.close()
        await wait_for(lambda: not d.active_connections() and d.fds.data == 0)
    (tmp_path / "refused").mkdir()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        async with daemon(cfg(closed.getsockname()), tmp_path / "refused") as d:
            for _ in range(3):
                r, w = await asyncio.open_connection(*addr(d, "main"))
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(r.read(), 5)
                w.close()
            await wait_for(lambda: not d.active_connections() and d.fds.data == 0)


async def test_a_miscount_of_descriptors_cannot_keep_accepting_paused(tmp_path: Path) -> None:
    async with tcp_server(echo) as up, daemon(cfg(up), tmp_path) as d:
        d.fds.data += d.fds.high  # as if sockets had been counted and never uncounted
        d.fds_check()
        await wait_for(lambda: d.accept_mode == "paused" and d.listeners["main"].paused)
        assert 'proxyd_accept_pauses_total{listener="main"} 1.0' in d.metrics.render().decode()
        # While paused, the descriptors really open are listed: the count comes back down.
        await wait_for(lambda: not d.listeners["main"].paused, timeout=10)
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        w.close()


async def test_near_the_descriptor_limit_accepting_goes_one_by_one_then_pauses_and_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The marks of fdbudget.py, set just above what this process has open: the fast path,
    then one connection at a time, then a pause (a client waits in the listen queue, and is
    served when another leaves), then back to the fast path once all have left."""
    import proxyd.server as server_mod
    from proxyd.fdbudget import FdBudget

    monkeypatch.setattr(server_mod, "FD_RECOUNT_INTERVAL", 0.5)
    modes: list[str] = []
    real = server_mod.ListenerRuntime.set_accepting

    def spy(lr: server_mod.ListenerRuntime, mode: str) -> None:
        modes.append(mode)
        real(lr, mode)

    monkeypatch.setattr(server_mod.ListenerRuntime, "set_accepting", spy)
    async with tcp_server(echo) as up, daemon(cfg(up), tmp_path) as d:
        fds = d.fds
        n = fds.in_use()
        # The ceiling 80 descriptors up; one at a time from 22 below it (bursts of 11 and their
        # upstream sockets). In this process each connection takes four: its client and the
        # echo server's end are counted once their numbers show (FdBudget.seen).
        limit = next(lim for lim in range(n, n + 10000) if lim - FdBudget(lim, 0, []).other == n + 80)
        fds.configure(limit, fds.base, [10])
        d.fds_check()
        assert d.accept_mode == "fast"
        conns = []
        for i in range(60):
            r, w = await asyncio.open_connection(*addr(d, "main"))
            conns.append((r, w))
            w.write(b"%d\n" % i)
            try:
                assert await asyncio.wait_for(r.readline(), 1) == b"%d\n" % i
            except TimeoutError:
                break  # waiting in the listen queue: accepting is paused
        assert modes[:2] == ["careful", "paused"], modes
        assert d.listeners["main"].paused
        r, _ = conns[-1]
        for _, w in conns[:-1]:
            w.close()
        assert await asyncio.wait_for(r.readline(), 5) == b"%d\n" % (len(conns) - 1)
        conns[-1][1].close()
        await wait_for(lambda: d.accept_mode == "fast" and d.fds.data == 0, timeout=10)
        assert modes[-1] == "fast"
        assert 'proxyd_accept_pauses_total{listener="main"} 0.0' not in d.metrics.render().decode()
        r, w = await asyncio.open_connection(*addr(d, "main"))
        w.write(b"again\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"again\n"
        w.close()
