"""The redis parser is transparent to what a real redis-server 7 does (issue 17, items 1-5, 10).

With an allow-all policy (``rules: {l7proto: redis}``) the bytes a client receives through proxyd
must equal what it receives straight from the server, for the same requests on an emptied
server. Each case starts from its smallest reproduction: a reply nested thousands deep, CLIENT
REPLY OFF/SKIP followed by SUBSCRIBE, 150,000 pipelined requests written before one reply is
read, a real replica syncing through proxyd (SYNC/PSYNC keepalives, then the replication stream),
simple strings and errors longer than ``buffer_bytes``. A hypothesis property then generates
command sequences the server accepts (strings, lists, hashes, EVAL with nested tables, CLIENT
REPLY modes, Pub/Sub, MULTI/EXEC, the server's own errors) and compares both byte streams.

The daemon runs in its own thread and event loop for the module, so the clients here are plain
blocking sockets that may write everything before reading anything, as a pipelining client
does. Runs on both data paths (native engine, and ``PROXYD_PURE=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from needs import free_port, need_binary
from proxyutil import addr, daemon
from redis_fixture import start_redis

TIMEOUT = 30.0
QUIT = b"*1\r\n$4\r\nQUIT\r\n"

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: redis-allow-all
spec:
  endpointSelector:
    matchLabels: {app: redis}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: redis}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules: {l7proto: redis}
"""

CONFIG = """
listeners:
  - name: redis
    address: "127.0.0.1:0"
    l7proto: redis
    upstream: "127.0.0.1:{port}"
  - name: small
    address: "127.0.0.1:0"
    l7proto: redis
    upstream: "127.0.0.1:{port}"
    parser_config: {{max_pending_bytes: 1024}}
limits:
  buffer_bytes: 64KiB
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: redis}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""


class Proxy:
    """An in-process daemon on its own thread and loop, in front of one redis-server."""

    def __init__(self, upstream: int, workdir: Path) -> None:
        self.upstream = upstream
        self.workdir = workdir
        self.ports: dict[str, int] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        files = {"policy.yaml": POLICY.replace("PORT", str(self.upstream))}
        async with daemon(CONFIG.format(port=self.upstream), self.workdir, files=files) as d:
            self.ports = {name: addr(d, name)[1] for name in ("redis", "small")}
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> Proxy:
        self._thread.start()
        self._ready.wait(TIMEOUT)
        if self._error is not None or not self.ports:
            raise RuntimeError(f"daemon did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with start_redis() as port:
        yield port


@pytest.fixture(scope="module")
def proxy(server: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with Proxy(server, tmp_path_factory.mktemp("proxyd")) as p:
        yield p


def command(*args: bytes | str | int) -> bytes:
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def exchange(port: int, payload: bytes) -> bytes:
    """Write every request (ending with QUIT) before reading, then read to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def flush(port: int) -> None:
    assert exchange(port, command("FLUSHALL") + QUIT) == b"+OK\r\n+OK\r\n"


_CLIENT_ID = re.compile(rb"\$2\r\nid\r\n:[0-9]+\r\n")


def compare(server: int, port: int, payload: bytes, setup: Callable[[], None] | None = None) -> bytes:
    """The client's bytes through proxyd equal those straight from the server (the connection's
    client id in HELLO's answer aside: it is the only field that differs between connections)."""
    flush(server)
    if setup:
        setup()
    direct = _CLIENT_ID.sub(b"id", exchange(server, payload))
    flush(server)
    if setup:
        setup()
    through = _CLIENT_ID.sub(b"id", exchange(port, payload))
    assert len(through) == len(direct)
    assert through == direct
    return direct


# --- item 1: replies nested thousands deep -------------------------------------------------------


@pytest.mark.parametrize("depth", [65, 1000, 8100])
def test_deeply_nested_script_reply(server: int, proxy: Proxy, depth: int) -> None:
    script = f"local t = 1; for i=1,{depth} do t = {{t}} end; return t"
    got = compare(server, proxy.ports["redis"], command("EVAL", script, 0) + command("PING") + QUIT)
    assert got.startswith(b"*1\r\n" * 64)
    assert got.endswith(b"+PONG\r\n+OK\r\n")


# --- item 2: CLIENT REPLY OFF / SKIP and the subscribe confirmations they do not silence ----------


def test_client_reply_off_and_skip_then_subscribe(server: int, proxy: Proxy) -> None:
    payload = b"".join([
        command("CLIENT", "REPLY", "OFF"), command("SET", "k", "v"),
        command("SUBSCRIBE", "a", "b"), command("PSUBSCRIBE", "p*"), command("UNSUBSCRIBE"),
        command("PUNSUBSCRIBE"), command("CLIENT", "REPLY", "ON"), command("GET", "k"),
        command("CLIENT", "REPLY", "SKIP"), command("SUBSCRIBE", "c"), command("PING"),
        command("CLIENT", "REPLY", "SKIP"), command("UNSUBSCRIBE"), command("GET", "k"),
        command("CLIENT", "REPLY", "SKIP"), b"*0\r\n", command("GET", "k"),
        command("CLIENT", "REPLY", "SKIP"), command("RESET"), command("PING"),
        command("CLIENT", "REPLY", "OFF"), command("RESET"), command("HELLO", 3),
        command("CLIENT", "REPLY", "SKIP"), command("SSUBSCRIBE", "s"), command("SUNSUBSCRIBE"),
        QUIT,
    ])  # fmt: skip
    got = compare(server, proxy.ports["redis"], payload)
    assert b"subscribe" in got and b"$1\r\nv\r\n" in got


# --- item 3: many pipelined requests before the first reply is read ------------------------------


def test_150k_pipelined_requests_written_before_any_reply_is_read(server: int, proxy: Proxy) -> None:
    value = b"v" * 100

    def setup() -> None:
        assert exchange(server, command("SET", "k", value) + QUIT) == b"+OK\r\n+OK\r\n"

    payload = command("GET", "k") * 150_000 + command("INCR", "n") * 1000 + QUIT
    got = compare(server, proxy.ports["redis"], payload, setup)
    assert len(got) > 150_000 * 100  # more than every buffer on the way holds


def test_a_full_reply_queue_pauses_the_client_and_loses_nothing(server: int, proxy: Proxy) -> None:
    # max_pending_bytes 1024 on the "small" listener: 8 entries. HELLO's reply is read for the
    # protocol version and SUBSCRIBE counts its confirmations, so neither shares an entry: the
    # client is held and released thousands of times.
    one = command("HELLO", 2) + command("SET", "k", "v") + command("HELLO", 3) + command("GET", "k")
    one += command("SUBSCRIBE", "x") + command("UNSUBSCRIBE") + command("EVAL", "return {1,{2,{3}}}", 0)
    got = compare(server, proxy.ports["small"], one * 3000 + QUIT)
    assert got.count(b"unsubscribe") == 3000


# --- item 5: simple strings and errors longer than buffer_bytes (64 KiB here) --------------------


def test_simple_string_and_error_longer_than_the_buffer(server: int, proxy: Proxy) -> None:
    payload = (
        command("EVAL", "return redis.status_reply(string.rep('y', 300000))", 0)
        + command("EVAL", "return redis.error_reply('E ' .. string.rep('x', 300000))", 0)
        + command("EVAL", "return {redis.status_reply(string.rep('z', 100000)), 7}", 0)
        + command("PING")
        + QUIT
    )
    got = compare(server, proxy.ports["redis"], payload)
    assert got.endswith(b"+PONG\r\n+OK\r\n") and got.count(b"y") == 300000


# --- item 4: a real replica syncs through proxyd -------------------------------------------------


def _info(port: int) -> str:
    reply = exchange(port, command("INFO", "replication") + QUIT)
    return reply.decode("latin-1")


def _wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def replica_of(port: int) -> Iterator[int]:
    need_binary("redis-server")
    rport = free_port()
    with tempfile.TemporaryDirectory(prefix="proxyd-replica-") as d:
        args = ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", d, "--replicaof", "127.0.0.1", str(port)]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: _accepting(rport), "the replica to accept")
            yield rport
        finally:
            proc.kill()
            proc.communicate(timeout=5)


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_replica_syncs_through_proxyd(tmp_path: Path) -> None:
    # A diskless sync that waits 2 s for more replicas: redis-server sends "\n" keepalives to
    # the waiting replica (before +FULLRESYNC, and before the payload) meanwhile.
    with start_redis("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "2") as master:
        assert exchange(master, command("SET", "before", "1") + QUIT) == b"+OK\r\n+OK\r\n"
        with Proxy(master, tmp_path) as p, replica_of(p.ports["redis"]) as replica:
            _wait_for(lambda: "master_link_status:up" in _info(replica), "master_link_status:up")
            assert exchange(replica, command("GET", "before") + QUIT) == b"$1\r\n1\r\n+OK\r\n"
            assert exchange(master, command("SET", "after", "2") + QUIT) == b"+OK\r\n+OK\r\n"
            _wait_for(lambda: exchange(replica, command("GET", "after") + QUIT) == b"$1\r\n2\r\n+OK\r\n",
                      "the key written on the master")  # fmt: skip
            assert "master_link_status:up" in _info(replica)
            assert "connected_slaves:1" in _info(master)


# --- the transparency property -------------------------------------------------------------------

KEYS = ["k", "l", "h", "s", "n"]


def _args(draw: st.DrawFn) -> list[bytes]:
    key = draw(st.sampled_from(KEYS))
    val = draw(st.sampled_from(["1", "v", "", "x" * 70, "-3"]))
    return draw(st.sampled_from([
        ["SET", key, val], ["GET", key], ["INCR", key], ["APPEND", key, val], ["STRLEN", key],
        ["DEL", key, "k"], ["EXISTS", key], ["TYPE", key], ["GETRANGE", key, "0", "-1"],
        ["RPUSH", key, val, "b"], ["LPUSH", key, val], ["LRANGE", key, "0", "-1"], ["LPOP", key],
        ["HSET", key, "f", val, "g", "2"], ["HGETALL", key], ["HGET", key, "f"], ["HINCRBY", key, "g", "3"],
        ["SADD", key, val], ["SMEMBERS", key], ["ZADD", key, "1", val],
        ["ZRANGE", key, "0", "-1", "WITHSCORES"],
        ["EVAL", "return {1, {2, {3, {'a'}}}, redis.status_reply('ok')}", "0"],
        ["EVAL", "local t = 'x'; for i=1,200 do t = {t, i} end; return t", "0"],
        ["EVAL", "return redis.error_reply('MY error')", "0"], ["EVAL", "return 3.5", "0"],
        ["PING"], ["PING", val], ["ECHO", val], ["SELECT", "1"], ["SELECT", "0"], ["DBSIZE"],
        ["NOSUCHCOMMAND", key], ["GET"], ["SET", key], ["INCR", "h"], ["LPOP", "k", "x"],
        ["OBJECT", "ENCODING", key], ["PUBLISH", "ch", val], ["BLPOP", key, "0.01"],
        ["EVAL", "return redis.status_reply(string.rep('s', 70000))", "0"],
        ["SET", key, "b" * 70000], ["WATCH", key], ["UNWATCH"], ["RESET"],
    ]))  # fmt: skip


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A session the server accepts: plain commands, transactions, reply modes, Pub/Sub."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.integers(0, 9))
        if kind <= 4:
            out.append(command(*_args(draw)))
        elif kind == 5:
            body = [command(*_args(draw)) for _ in range(draw(st.integers(0, 3)))]
            end = draw(st.sampled_from(["EXEC", "EXEC", "DISCARD"]))
            out.append(command("MULTI") + b"".join(body) + command(end))
        elif kind == 6:
            mode = draw(st.sampled_from(["OFF", "SKIP", "ON"]))
            out.append(command("CLIENT", "REPLY", mode))
        elif kind == 7:
            chans = draw(st.lists(st.sampled_from(["ch", "a", "b"]), min_size=1, max_size=3))
            pats = draw(st.lists(st.sampled_from(["c*", "a?"]), max_size=2))
            out.append(command("SUBSCRIBE", *chans))
            if pats:
                out.append(command("PSUBSCRIBE", *pats))
            out.append(command("PING"))
            # Refused in RESP2 subscribe mode (only the subscribe family, PING, QUIT, RESET run
            # there), run in RESP3: either way proxyd must follow.
            for _ in range(draw(st.integers(0, 2))):
                out.append(draw(st.sampled_from([
                    command("SELECT", "1"), command("GET", "k"), command("MULTI") + command("DISCARD"),
                    command("CLIENT", "REPLY", "OFF"), command("CLIENT", "REPLY", "SKIP"),
                    command("CLIENT", "REPLY", "ON"), command("HELLO", "3"), command("HELLO", "2"),
                ])))  # fmt: skip
            out.append(command("PUBLISH", "ch", "m"))  # RESP3: a message to itself, then :n
            if draw(st.booleans()):
                out.append(command("UNSUBSCRIBE", chans[0]))
            out.append(command("UNSUBSCRIBE") + command("PUNSUBSCRIBE"))
        elif kind == 8:
            out.append(command("HELLO", draw(st.sampled_from([2, 3]))))
        else:
            out.append(draw(st.sampled_from([b"PING\r\n", b"*0\r\n", b"\r\n", b"GET k\r\n",
                                             b'SET k "a\\x41 b"\r\n', b"ECHO 'x y'\n"])))
    return b"".join(out) + command("CLIENT", "REPLY", "ON") + QUIT


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=sessions())
def test_allow_all_is_byte_for_byte_transparent(server: int, proxy: Proxy, payload: bytes) -> None:
    compare(server, proxy.ports["redis"], payload)
