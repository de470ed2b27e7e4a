"""The redis parser end to end: the in-process daemon in front of a real redis-server, redis-py.

redis-py runs with its pure-Python reply parser and with hiredis, over RESP2 and RESP3 (the
``client`` fixture is parametrised over the four). Every denied write is checked against the
server directly, not through the daemon. redis-server is started by
:func:`redis_fixture.start_redis`; it skips when missing, and fails when PROXYD_REQUIRE_BINARIES=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxyutil import addr, daemon
from redis_fixture import start_redis

redis = pytest.importorskip("redis")
import redis.asyncio as aredis  # noqa: E402
from redis.asyncio.connection import Connection  # noqa: E402
from redis.exceptions import NoPermissionError, ResponseError  # noqa: E402

from proxyd.server import Daemon  # noqa: E402

TIMEOUT = 10.0

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: app-redis
spec:
  endpointSelector:
    matchLabels: {app: redis}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: redis}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            l7proto: redis
            l7:
RULES
"""

RULES = """
              - command: "@read"
                keyPrefix: "app:"
              - command: set
                keyPrefix: "app:"
              - command: mset
                keyPrefix: "app:"
              - command: del
                keyPrefix: "app:"
              - command: "@pubsub"
                keyPrefix: "news."
              - command: unsubscribe
              - command: "client|tracking"
              - command: "client|id"
              - command: info
              - command: flushall
"""

CONFIG = """
listeners:
  - name: redis
    address: "127.0.0.1:0"
    l7proto: redis
    upstream: "127.0.0.1:{port}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: redis}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""


def policy(port: int, rules: str = RULES) -> str:
    return POLICY.replace("PORT", str(port)).replace("RULES\n", rules)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[int]:
    with start_redis() as port:
        yield port


@pytest.fixture
def rport(redis_server: int) -> Iterator[int]:
    """The server's port, emptied before each test."""
    r = redis.Redis(port=redis_server, socket_timeout=TIMEOUT)
    r.flushall()
    r.close()
    return redis_server


@contextlib.asynccontextmanager
async def redis_daemon(port: int, tmp_path: Path, rules: str = RULES) -> AsyncIterator[Daemon]:
    async with daemon(CONFIG.format(port=port), tmp_path, files={"policy.yaml": policy(port, rules)}) as d:
        yield d


def direct(port: int) -> Any:
    """redis-py straight to the server, bypassing the daemon: what the server really holds."""
    return redis.Redis(port=port, socket_timeout=TIMEOUT)


def log_entries(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "access.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


VARIANTS = [
    pytest.param((2, False), id="resp2-python"),
    pytest.param((2, True), id="resp2-hiredis"),
    pytest.param((3, False), id="resp3-python"),
    pytest.param((3, True), id="resp3-hiredis"),
]


def _client(d: Daemon, protocol: int, use_hiredis: bool, single: bool = False, **kw: Any) -> Any:
    host, port = addr(d, "redis")
    if use_hiredis:
        from redis._parsers import _AsyncHiredisParser

        parser: Any = _AsyncHiredisParser
    else:
        from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser

        parser = _AsyncRESP3Parser if protocol == 3 else _AsyncRESP2Parser
    pool = aredis.ConnectionPool(
        connection_class=Connection, host=host, port=port, protocol=protocol, parser_class=parser,
        socket_timeout=TIMEOUT, **kw,
    )  # fmt: skip
    return aredis.Redis(connection_pool=pool, single_connection_client=single)


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> tuple[int, bool]:
    if request.param[1]:
        pytest.importorskip("hiredis")
    return request.param  # type: ignore[no-any-return]


async def test_commands_keys_categories_pipeline_multi(
    rport: int, tmp_path: Path, variant: tuple[int, bool]
) -> None:
    protocol, use_hiredis = variant
    srv = direct(rport)
    async with redis_daemon(rport, tmp_path) as d:
        c = _client(d, protocol, use_hiredis)
        try:
            assert await c.ping()
            assert await c.set("app:a", "1")
            assert await c.get("app:a") == b"1"
            with pytest.raises(NoPermissionError, match="access denied"):
                await c.set("other:a", "1")
            assert srv.get("other:a") is None
            # @read covers every read command on app: keys, and only those keys
            assert await c.strlen("app:a") == 1
            assert await c.exists("app:a") == 1
            with pytest.raises(NoPermissionError):
                await c.get("other:a")
            with pytest.raises(NoPermissionError):
                await c.incr("app:a")  # a write outside the rules
            # a multi-key command with one key outside the rules is denied as a whole
            with pytest.raises(NoPermissionError):
                await c.mset({"app:m1": "x", "other:m2": "y"})
            assert srv.get("app:m1") is None and srv.get("other:m2") is None
            assert await c.mset({"app:m1": "x", "app:m2": "y"})
            assert await c.mget("app:m1", "app:m2") == [b"x", b"y"]
            with pytest.raises(NoPermissionError):
                await c.mget("app:m1", "other:m2")
            # a pipeline with a denial in the middle: each reply in its place
            pipe = c.pipeline(transaction=False)
            pipe.set("app:p1", "1").set("other:p2", "2").get("app:p1").get("other:p2").get("app:nope")
            res = await pipe.execute(raise_on_error=False)
            assert res[0] is True and res[2] == b"1" and res[4] is None
            assert isinstance(res[1], NoPermissionError) and isinstance(res[3], NoPermissionError)
            assert srv.get("other:p2") is None
            # MULTI/EXEC with a denied command: nothing of the transaction runs
            tx = c.pipeline(transaction=True)
            tx.set("app:t1", "1").set("other:t2", "2").set("app:t3", "3")
            with pytest.raises((NoPermissionError, ResponseError)) as ei:
                await tx.execute()
            assert "EXECABORT" in str(ei.value) or "access denied" in str(ei.value)
            assert srv.get("app:t1") is None and srv.get("app:t3") is None and srv.get("other:t2") is None
            # the connection still works, and an allowed transaction runs
            tx = c.pipeline(transaction=True)
            tx.set("app:t1", "1").get("app:t1")
            assert await tx.execute() == [True, b"1"]
            # keyless commands need a rule without key conditions
            assert "redis_version" in await c.info("server")
            with pytest.raises(NoPermissionError):
                await c.dbsize()
            # 16 MiB values both ways, passed through, never held
            big = b"v" * (16 << 20)
            assert await c.set("app:big", big)
            assert srv.strlen("app:big") == 16 << 20
            assert await c.get("app:big") == big
            with pytest.raises(NoPermissionError):
                await c.set("other:big", big)
            assert srv.exists("other:big") == 0
            assert await c.ping()
        finally:
            await c.aclose(close_connection_pool=True)
    entries = [e for e in log_entries(tmp_path) if e["event"] == "l7" and e["entry_type"] == "request"]
    denied = [e["fields"] for e in entries if e["verdict"] == "denied"]
    assert {"command": "set", "db": 0, "keys": ["other:a"]} in denied
    assert any(f.get("keys") == ["app:m1", "other:m2"] for f in denied)
    srv.close()


async def test_pubsub_and_client_tracking(rport: int, tmp_path: Path, variant: tuple[int, bool]) -> None:
    protocol, use_hiredis = variant
    srv = direct(rport)
    async with redis_daemon(rport, tmp_path) as d:
        c = _client(d, protocol, use_hiredis)
        try:
            p = c.pubsub()
            await p.subscribe("news.a", "news.b")
            for ch in (b"news.a", b"news.b"):
                m = await p.get_message(timeout=TIMEOUT)
                assert m is not None and m["type"] == "subscribe" and m["channel"] == ch
            assert await c.publish("news.a", "hello") == 1
            with pytest.raises(NoPermissionError):
                await c.publish("secret.x", "no")
            m = await p.get_message(timeout=TIMEOUT)
            assert m is not None and m["type"] == "message" and m["data"] == b"hello"
            # a denied channel: the subscribing connection gets NOPERM and stays in step
            await p.subscribe("secret.x")
            with pytest.raises(NoPermissionError):
                await p.get_message(timeout=TIMEOUT)
            assert srv.pubsub_numsub("secret.x") == [(b"secret.x", 0)]
            srv.publish("news.b", "again")
            m = await p.get_message(timeout=TIMEOUT)
            assert m is not None and m["type"] == "message" and m["data"] == b"again"
            await p.unsubscribe()
            await p.aclose()
            if protocol == 3:
                # CLIENT TRACKING: invalidation pushes interleave with replies on the same connection
                t = _client(d, 3, use_hiredis, single=True)
                try:
                    seen: list[Any] = []
                    await t.execute_command("CLIENT", "TRACKING", "ON")
                    t.connection._parser.set_invalidation_push_handler(seen.append)
                    await t.set("app:tr", "1")
                    assert await t.get("app:tr") == b"1"
                    srv.set("app:tr", "2")
                    await asyncio.sleep(0.2)  # let the invalidation push arrive first
                    assert await t.get("app:tr") == b"2"  # the push is read before the reply
                    with pytest.raises(NoPermissionError):
                        await t.get("other:tr")
                    assert await t.get("app:tr") == b"2"
                    assert seen and seen[0][0] in (b"invalidate", "invalidate")
                finally:
                    await t.aclose(close_connection_pool=True)
        finally:
            await c.aclose(close_connection_pool=True)
    srv.close()


async def test_auth_reload_and_protocol_error(tmp_path: Path) -> None:
    """AUTH against requirepass (the password never reaches the log), a policy reload applying to
    an open connection, and a malformed request answered as redis-server would, then closed."""
    password = "pa55-w0rd-secret"
    with start_redis(password=password) as port:
        async with redis_daemon(port, tmp_path) as d:
            c = _client(d, 3, False, single=True, password=password)
            try:
                assert await c.set("app:k", "1")
                with pytest.raises(NoPermissionError):
                    await c.set("new:k", "1")
                # reload: the open connection's next command sees the new policy
                (tmp_path / "policy.yaml").write_text(
                    policy(port, RULES + '              - keyPrefix: "new:"\n')
                )
                assert d.reload_policy("test")
                assert await c.set("new:k", "1")
                (tmp_path / "policy.yaml").write_text(policy(port))
                assert d.reload_policy("test")
                with pytest.raises(NoPermissionError):
                    await c.set("new:k", "2")
                assert await c.get("app:k") == b"1"
            finally:
                await c.aclose(close_connection_pool=True)
            # a bad bulk length: redis-server's own answer, in order, then the connection closes
            host, lport = addr(d, "redis")
            r, w = await asyncio.open_connection(host, lport)
            w.write(b"AUTH " + password.encode() + b"\r\nPING\r\n*1\r\n$-7\r\nPING\r\n")
            await w.drain()
            got = await asyncio.wait_for(r.read(), TIMEOUT)
            assert got == b"+OK\r\n+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"
            w.close()
        srv = redis.Redis(port=port, password=password, socket_timeout=TIMEOUT)
        assert srv.get("new:k") == b"1"
        srv.close()
    text = (tmp_path / "access.log").read_text()
    assert password not in text
    entries = [json.loads(line) for line in text.splitlines()]
    assert any(e.get("fields", {}).get("command") == "auth" for e in entries)
    closed = [e for e in entries if e["event"] == "connection" and e.get("verdict") == "error"]
    assert closed and "parser" in closed[-1]["reason"]
    assert any("invalid bulk length" in str(e.get("fields", {}).get("error")) for e in entries)
