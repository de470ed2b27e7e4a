"""The CQL responder with the real cassandra-driver, directly and through a minimal in-test relay.

The relay here is a few lines of asyncio around :class:`proxyd.engine.Engine` (the daemon's relay
is tested elsewhere); it lets the real driver exercise the parser's v4/v5, lz4, deny and
Unprepared paths end to end before the daemon exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any

import pytest
from cassandra import Unauthorized
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement
from cql_responder import CqlResponder

from proxyd.context import ConnInfo, Context
from proxyd.engine import Engine
from proxyd.parser import Endpoint
from proxyd.parsers.cassandra import CassandraFactory
from proxyd.testing import LogEntry, _ListSink, _RulesPolicy

_PROFILES = {EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())}
CASES = [(4, False), (4, "lz4"), (4, "snappy"), (5, False), (5, "lz4")]


def _cluster(port: int, version: int, compression: Any) -> Cluster:
    return Cluster(
        ["127.0.0.1"],
        port=port,
        protocol_version=version,
        compression=compression,
        execution_profiles=_PROFILES,
        connect_timeout=5,
        control_connection_timeout=5,
    )


def _plain_session(port: int, version: int, compression: Any) -> list[Any]:
    cluster = _cluster(port, version, compression)
    try:
        session = cluster.connect()
        rows = list(session.execute("SELECT * FROM ks.users"))
        session.execute("USE ks")
        session.execute("INSERT INTO users (id, name) VALUES (3, 'carol')")
        prepared = session.prepare("SELECT * FROM users WHERE id = ?")
        rows += list(session.execute(prepared, [3]))
        batch = BatchStatement()
        batch.add("INSERT INTO users (id, name) VALUES (4, 'dave')")
        session.execute(batch)
        return [(r.id, r.name) for r in rows]
    finally:
        cluster.shutdown()


class LoopThread:
    """An asyncio loop in a thread for the servers, so the (blocking) driver runs in the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def responder(loop_thread: LoopThread) -> Iterator[CqlResponder]:
    r = CqlResponder()
    loop_thread.run(r.start())
    yield r
    loop_thread.run(r.stop())


@pytest.mark.parametrize(("version", "compression"), CASES)
def test_responder_with_driver(responder: CqlResponder, version: int, compression: Any) -> None:
    rows = _plain_session(responder.port, version, compression)
    assert rows == [(1, "alice"), (2, "bob"), (3, "carol")]
    assert "INSERT INTO users (id, name) VALUES (4, 'dave')" in responder.statements


def test_responder_protocol_negotiation(loop_thread: LoopThread) -> None:
    responder = CqlResponder(versions=(4,))
    loop_thread.run(responder.start())
    cluster = Cluster(["127.0.0.1"], port=responder.port, execution_profiles=_PROFILES)
    try:
        cluster.connect().execute("SELECT * FROM ks.users")
        assert cluster.protocol_version == 4
    finally:
        cluster.shutdown()
        loop_thread.run(responder.stop())


# --- through the parser ------------------------------------------------------------------------


class MiniRelay:
    """client -> Engine(cassandra parser) -> upstream, one Engine per connection."""

    def __init__(self, upstream: int, rules: Sequence[Mapping[str, str]], config: Mapping[str, Any]) -> None:
        self.upstream = upstream
        self.factory = CassandraFactory()
        self.policy = _RulesPolicy(self.factory, rules, "test")
        self.config = self.factory.validate_config(config)
        self.log: list[LogEntry] = []
        self.errors: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await self._server.wait_closed()

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)

        def send(reply: bool, data: bytes | bytearray) -> None:
            (cw if reply else uw).write(bytes(data))

        engine = Engine(None, send)
        info = ConnInfo(1, "test", "ingress", Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), "cassandra")
        ctx = Context(info, engine, self.policy, _ListSink(self.log))
        engine.parser = self.factory.create(ctx, self.config)

        async def pump(reader: asyncio.StreamReader, reply: bool) -> None:
            while data := await reader.read(65536):
                engine.feed(reply, data)
                if engine.error is not None:
                    self.errors.append(str(engine.error))
                    break
            cw.close()
            uw.close()

        tasks = [asyncio.ensure_future(pump(cr, False)), asyncio.ensure_future(pump(ur, True))]
        for t in tasks:
            self._tasks.add(t)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.gather(*tasks)
        for t in tasks:
            self._tasks.discard(t)


RULES = [
    {"query_action": "select"},
    {"query_action": "insert", "query_table": "^ks\\.users$"},
]


def _proxied_session(port: int, version: int, compression: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cluster = _cluster(port, version, compression)
    try:
        session = cluster.connect()
        out["rows"] = [(r.id, r.name) for r in session.execute("SELECT * FROM ks.users")]
        with pytest.raises(Unauthorized):
            session.execute("DELETE FROM ks.users WHERE id = 1")
        session.execute("USE ks")
        session.execute("INSERT INTO users (id, name) VALUES (5, 'eve')")  # resolves to ks.users
        with pytest.raises(Unauthorized):
            session.execute("INSERT INTO admins (id, name) VALUES (6, 'mallory')")
        delete = session.prepare("DELETE FROM users WHERE id = ?")  # PREPARE is learnt, not judged
        with pytest.raises(Unauthorized):
            session.execute(delete, [1])
        select = session.prepare("SELECT * FROM users WHERE id = ?")
        out["prepared"] = [(r.id, r.name) for r in session.execute(select, [5])]
        batch = BatchStatement()
        batch.add("INSERT INTO users (id, name) VALUES (7, 'ok')")
        batch.add("INSERT INTO admins (id, name) VALUES (8, 'bad')")
        with pytest.raises(Unauthorized):
            session.execute(batch)
        big = "x" * 300_000  # spans several v5 segments
        session.execute("INSERT INTO users (id, name) VALUES (9, %s)", [big])
        out["after"] = len(list(session.execute("SELECT * FROM users")))
        return out
    finally:
        cluster.shutdown()


@pytest.mark.parametrize(("version", "compression"), CASES)
def test_driver_through_parser(
    loop_thread: LoopThread, responder: CqlResponder, version: int, compression: Any
) -> None:
    relay = MiniRelay(responder.port, RULES, {})
    loop_thread.run(relay.start())
    try:
        out = _proxied_session(relay.port, version, compression)
    finally:
        loop_thread.run(relay.stop())
    assert relay.errors == []
    assert out["rows"] == [(1, "alice"), (2, "bob")]
    assert out["prepared"] == [(5, "eve")]
    assert out["after"] >= 3
    for denied in (
        "DELETE FROM ks.users WHERE id = 1",
        "INSERT INTO admins (id, name) VALUES (6, 'mallory')",
        "DELETE FROM users WHERE id = ?",
        "INSERT INTO users (id, name) VALUES (7, 'ok')",
    ):
        assert denied not in responder.statements
    assert "INSERT INTO users (id, name) VALUES (5, 'eve')" in responder.statements
    denied_tables = {e.fields.get("query_table") for e in relay.log if e.verdict == "denied"}
    assert {"ks.users", "ks.admins"} <= denied_tables


@pytest.mark.parametrize("version", [4, 5])
def test_driver_reply_larger_than_max_frame_bytes(responder: CqlResponder, loop_thread: LoopThread,
                                                   version: int) -> None:  # fmt: skip
    """``max_frame_bytes`` bounds requests only: a result frame past it reaches the driver.

    Replies pass without being buffered and the protocol's length is 32 bits; proxyd closed the
    connection on such a reply (a cap below the protocol's own, and the driver lost the result).
    """
    relay = MiniRelay(responder.port, [{}], {"max_frame_bytes": 65536})
    loop_thread.run(relay.start())
    cluster = _cluster(relay.port, version, False)
    try:
        session = cluster.connect()
        for i in range(10, 13):
            session.execute(f"INSERT INTO ks.users (id, name) VALUES ({i}, '{chr(97 + i) * 30000}')")
        rows = list(session.execute("SELECT * FROM ks.users"))
    finally:
        cluster.shutdown()
        loop_thread.run(relay.stop())
    assert relay.errors == []
    assert {r.id: len(r.name) for r in rows if r.id >= 10} == {10: 30000, 11: 30000, 12: 30000}


def test_malformed_request_closes_after_the_replies_owed(
    responder: CqlResponder, loop_thread: LoopThread
) -> None:
    """A malformed frame pipelined behind a query: the query's rows arrive, then the close."""
    import socket
    import struct

    from cql_responder import frame, query_body, startup_body

    relay = MiniRelay(responder.port, [{}], {})
    loop_thread.run(relay.start())
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(frame(4, 1, "STARTUP", startup_body()))
            assert s.recv(9)[4] == 0x02  # READY
            query = frame(4, 2, "QUERY", query_body("SELECT * FROM ks.users"))
            s.sendall(query + frame(4, 3, "RESULT", b""))  # a response opcode from the client
            got = b""
            while chunk := s.recv(65536):
                got += chunk
    finally:
        loop_thread.run(relay.stop())
    version, _, stream, opcode, length = struct.unpack_from(">BBhBI", got)
    assert (version, stream, opcode, len(got)) == (0x84, 2, 0x08, 9 + length)  # RESULT, then EOF
    assert b"alice" in got
    assert relay.errors and "parser error" in relay.errors[0]
    assert relay.log[-1].fields["error"] == "protocol error 1 in a request"
