"""End to end: the real cassandra-driver -> the in-process proxyd daemon (l7proto: cassandra) -> the
CQL responder (tests/cql_responder.py), with a CiliumNetworkPolicy file, the JSON access log and the
metrics.

The daemon and the responder run on a uvloop loop in a thread (:class:`LoopThread`); the blocking
driver runs in the test's thread. Both ends of the proxied connection are 127.0.0.1, so the local
(destination) and remote (client) endpoints share the labels of 127.0.0.0/8, and the policy's
``endpointSelector`` and ``fromEndpoints`` name the same labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cassandra import Unauthorized
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy
from cassandra.query import BatchStatement
from cql_responder import CqlResponder
from proxyutil import addr, daemon, write_atomic

from proxyd.server import Daemon

POLICY_NAME = "cassandra-users"

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector:
    matchLabels: {{app: cassandra}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{app: cassandra, role: client}}
      toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            l7proto: cassandra
            l7:
              - query_action: select
                query_table: "^system"           # the driver's control connection
              - query_action: select
                query_table: "^ks\\\\.users$"
              - query_action: insert
                query_table: "^ks\\\\.events$"
              - query_action: use
"""

CONFIG = """\
listeners:
  - name: cql
    address: "127.0.0.1:0"
    l7proto: cassandra
    upstream: "127.0.0.1:{port}"
identities:
  - cidr: 127.0.0.0/8
    labels: {{app: cassandra, role: client}}
policy:
  paths: [policy.yaml]
  mode: {mode}
access_log:
  path: access.log
limits:
  connect_timeout: 2s
  drain_timeout: 1s
"""

CASES = [
    pytest.param(4, None, id="v4"),
    pytest.param(4, "lz4", id="v4-lz4"),
    pytest.param(4, "snappy", id="v4-snappy"),
    pytest.param(5, None, id="v5"),
    pytest.param(5, "lz4", id="v5-lz4"),
]

_PROFILES = {
    EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=5)
}


class LoopThread:
    """A uvloop event loop in a thread, for the daemon and the responder."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Env:
    lt: LoopThread
    responder: CqlResponder
    daemon: Daemon
    port: int  # the proxy's port
    tmp_path: Path

    def log(self) -> list[dict[str, Any]]:
        self.lt.call(self.daemon.access_log.flush)  # the daemon flushes every 0.2 s by itself
        p = self.tmp_path / "access.log"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def metrics(self) -> str:
        return str(self.lt.call(lambda: self.daemon.metrics.render().decode()))

    def wait_idle(self, timeout: float = 5) -> None:
        """Until the daemon has logged the end of every connection (the driver has shut down)."""
        end = time.monotonic() + timeout
        while self.lt.call(self.daemon.active_connections):
            assert time.monotonic() < end, "connections still open"
            time.sleep(0.02)


@contextlib.contextmanager
def running(tmp_path: Path, mode: str = "enforce") -> Iterator[Env]:
    """The responder and a daemon in front of it, on a uvloop loop in a thread."""
    lt = LoopThread()
    responder = CqlResponder()
    try:
        lt.run(responder.start())
        files = {"policy.yaml": POLICY.format(name=POLICY_NAME, port=responder.port)}
        cm = daemon(CONFIG.format(port=responder.port, mode=mode), tmp_path, files=files)

        async def enter() -> Daemon:
            return await cm.__aenter__()

        d = lt.run(enter())
        try:
            host, port = addr(d, "cql")
            assert host == "127.0.0.1"
            yield Env(lt, responder, d, port, tmp_path)
        finally:
            lt.run(cm.__aexit__(None, None, None), 15)
            lt.run(responder.stop())
    finally:
        lt.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with running(tmp_path) as e:
        yield e


@contextlib.contextmanager
def session(port: int, version: int, compression: str | None) -> Iterator[Session]:
    cluster = Cluster(
        ["127.0.0.1"],
        port=port,
        protocol_version=version,
        compression=compression or False,
        execution_profiles=_PROFILES,
        connect_timeout=3,
        control_connection_timeout=3,
    )
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def rows(result: Any) -> list[tuple[int, str]]:
    return [(r.id, r.name) for r in result]


DENIED = [
    "INSERT INTO ks.users (id, name) VALUES (10, 'mallory')",
    "INSERT INTO ks.users (id, name) VALUES (?, ?)",
    "INSERT INTO ks.events (day, msg) VALUES (1, 'in a bad batch')",
    "INSERT INTO ks.users (id, name) VALUES (11, 'batched')",
    "INSERT INTO users (id, name) VALUES (12, 'unqualified')",
    "DELETE FROM ks.users WHERE id = 1",
]


@pytest.mark.parametrize(("version", "compression"), CASES)
def test_driver_through_daemon(env: Env, version: int, compression: str | None) -> None:
    with session(env.port, version, compression) as s:
        # Allowed select returns rows.
        assert rows(s.execute("SELECT * FROM ks.users")) == [(1, "alice"), (2, "bob")]

        # A denied insert raises Unauthorized; the session keeps working.
        with pytest.raises(Unauthorized):
            s.execute(DENIED[0])
        assert rows(s.execute("SELECT * FROM ks.users WHERE id = 2")) == [(2, "bob")]
        with pytest.raises(Unauthorized):
            s.execute(DENIED[5])

        # A prepared insert: PREPARE passes, EXECUTE is denied.
        ins = s.prepare(DENIED[1])
        with pytest.raises(Unauthorized):
            s.execute(ins, [13, "prepared"])
        sel = s.prepare("SELECT * FROM ks.users WHERE id = ?")
        assert rows(s.execute(sel, [1])) == [(1, "alice")]

        # A batch with one denied member is denied whole; an all-allowed batch passes.
        bad = BatchStatement()
        bad.add(DENIED[2])
        bad.add(DENIED[3])
        with pytest.raises(Unauthorized):
            s.execute(bad)
        good = BatchStatement()
        good.add("INSERT INTO ks.events (day, msg) VALUES (2, 'good batch')")
        good.add("INSERT INTO ks.events (day, msg) VALUES (3, 'good batch')")
        s.execute(good)

        # USE, then unqualified names resolve to ks.<table>.
        s.execute("USE ks")
        assert rows(s.execute("SELECT * FROM users")) == [(1, "alice"), (2, "bob")]
        with pytest.raises(Unauthorized):
            s.execute(DENIED[4])
        s.execute("INSERT INTO events (day, msg) VALUES (4, 'unqualified')")
        assert rows(s.execute(sel, [2])) == [(2, "bob")]

        # Statements larger than a v5 segment (and than the relay's reads), allowed and denied.
        big = "x" * 300_000
        s.execute("INSERT INTO ks.events (day, msg) VALUES (5, %s)", [big])
        with pytest.raises(Unauthorized):
            s.execute("INSERT INTO ks.users (id, name) VALUES (14, %s)", [big])
        assert rows(s.execute("SELECT * FROM ks.users")) == [(1, "alice"), (2, "bob")]

    st = env.responder.statements
    for q in DENIED:
        assert q not in st, q
    assert "INSERT INTO ks.events (day, msg) VALUES (2, 'good batch')" in st
    assert "INSERT INTO ks.events (day, msg) VALUES (3, 'good batch')" in st
    assert "INSERT INTO events (day, msg) VALUES (4, 'unqualified')" in st
    assert "SELECT * FROM users" in st
    assert any(q.startswith("INSERT INTO ks.events (day, msg) VALUES (5, 'xxx") for q in st)
    assert not [q for q in st if q.upper().startswith(("INSERT INTO KS.USERS", "INSERT INTO USERS"))]
    assert env.responder.users == {1: "alice", 2: "bob"}

    env.wait_idle()
    log = env.log()
    l7 = [e for e in log if e["event"] == "l7"]
    assert l7
    assert all(e["l7proto"] == "cassandra" and e["listener"] == "cql" for e in l7)
    denied = [e for e in l7 if e["verdict"] == "denied"]
    assert [
        (e["fields"]["opcode"], e["fields"]["query_action"], e["fields"]["query_table"]) for e in denied
    ] == [
        ("query", "insert", "ks.users"),
        ("query", "delete", "ks.users"),
        ("execute", "insert", "ks.users"),
        ("batch", "insert", "ks.events"),  # the batch's allowed member, denied with its batch
        ("batch", "insert", "ks.users"),
        ("query", "insert", "ks.users"),  # unqualified, after USE ks
        ("query", "insert", "ks.users"),  # 300 kB
    ]
    # (the policy of batch entries: see test_denied_batch_entries_name_the_policy)
    assert all(e["policy"] == POLICY_NAME for e in denied if e["fields"]["opcode"] != "batch")
    assert all(isinstance(e["fields"]["stream"], int) for e in denied)
    assert any(e["policy"] == POLICY_NAME for e in l7 if e["verdict"] == "forwarded")
    assert all(e["direction"] == "ingress" for e in l7)
    forwarded = {(e["fields"].get("query_action"), e["fields"].get("query_table")) for e in l7}
    assert ("select", "ks.users") in forwarded
    assert ("insert", "ks.events") in forwarded
    assert ("select", "system.local") in forwarded
    conns = [e for e in log if e["event"] == "connection"]
    assert conns
    assert all(c["verdict"] == "forwarded" for c in conns)

    m = env.metrics()
    assert 'proxyd_l7_requests_total{l7proto="cassandra",verdict="denied"} 7.0' in m
    n_forwarded = len([e for e in l7 if e["verdict"] == "forwarded"])
    assert f'proxyd_l7_requests_total{{l7proto="cassandra",verdict="forwarded"}} {float(n_forwarded)}' in m
    assert not re.search(r'proxyd_parser_errors_total\{l7proto="cassandra"\} [1-9]', m)


def _bad_batch() -> BatchStatement:
    bad = BatchStatement()
    bad.add("INSERT INTO ks.events (day, msg) VALUES (1, 'allowed member')")
    bad.add("INSERT INTO ks.users (id, name) VALUES (11, 'denied member')")
    return bad


def test_denied_batch_entries_name_the_policy(env: Env) -> None:
    """Every l7 line of a denied batch names the document that decided (docs/access-log-and-metrics.md).

    Failed when written: ``Parser._check`` (proxyd/parsers/cassandra/parser.py) stops evaluating at
    the first denied member, then logs every member; ``Context.log`` gives the last decision to the
    first line logged and resets it, so the first member's line carries the denying decision and
    the others ``policy: null``.
    """
    with session(env.port, 4, None) as s, pytest.raises(Unauthorized):
        s.execute(_bad_batch())
    env.wait_idle()
    batch = [e for e in env.log() if e["event"] == "l7" and e["fields"].get("opcode") == "batch"]
    assert [(e["verdict"], e["fields"]["query_table"]) for e in batch] == [
        ("denied", "ks.events"),
        ("denied", "ks.users"),
    ]
    assert [e["policy"] for e in batch] == [POLICY_NAME, POLICY_NAME]


EXTRA_RULE = """\
              - query_action: insert
                query_table: "^ks\\\\.users$"
"""


def test_policy_reload_applies_to_open_session(env: Env) -> None:
    with session(env.port, 5, "lz4") as s:
        ins = s.prepare("INSERT INTO ks.users (id, name) VALUES (?, ?)")
        with pytest.raises(Unauthorized):
            s.execute(ins, [30, "before"])
        with pytest.raises(Unauthorized):
            s.execute(_bad_batch())

        policy = POLICY.format(name=POLICY_NAME, port=env.responder.port) + EXTRA_RULE
        write_atomic(env.tmp_path / "policy.yaml", policy)
        assert env.lt.call(lambda: env.daemon.reload_policy("test"))

        # The same connections, the next requests: the statement prepared before is allowed now.
        s.execute(ins, [31, "after"])
        s.execute("INSERT INTO ks.users (id, name) VALUES (32, 'plain')")
        s.execute(_bad_batch())
        assert rows(s.execute("SELECT * FROM ks.users")) == [
            (1, "alice"),
            (2, "bob"),
            (11, "denied member"),
            (31, "after"),
            (32, "plain"),
        ]
        with pytest.raises(Unauthorized):
            s.execute("DELETE FROM ks.users WHERE id = 1")
    # The file watcher sees the same rename and reloads too (the same documents: nothing is
    # compiled again, but the reload is counted): at least the one asked for here.
    reloads = re.search(r'proxyd_policy_reloads_total\{result="success"\} ([0-9.]+)', env.metrics())
    assert reloads is not None and float(reloads.group(1)) >= 1


def test_audit_mode_forwards_and_logs(tmp_path: Path) -> None:
    with running(tmp_path, mode="audit") as env:
        with session(env.port, 4, "lz4") as s:
            s.execute("INSERT INTO ks.users (id, name) VALUES (40, 'audited')")
            s.execute("SELECT * FROM ks.users")
        assert "INSERT INTO ks.users (id, name) VALUES (40, 'audited')" in env.responder.statements
        env.wait_idle()
        l7 = [e for e in env.log() if e["event"] == "l7"]
        audit = [e for e in l7 if e["verdict"] == "audit"]
        assert [(e["fields"]["query_action"], e["fields"]["query_table"]) for e in audit] == [
            ("insert", "ks.users")
        ]
        assert audit[0]["policy"] == POLICY_NAME
        assert not [e for e in l7 if e["verdict"] == "denied"]
