"""With an allow-all policy, HTTP through proxyd is what it is without proxyd (issue 17).

Each test runs the same bytes directly against the server and through proxyd's http parser with
``rules.http: [{}]``, and compares what came back (nginx's ``Date`` header aside, which ticks).
The server side is checked with a recording server: the bytes it received through proxyd are the
bytes the client sent. The property at the end generates valid HTTP/1.1 traffic nginx accepts
(methods, normal paths, headers, Content-Length and chunked bodies, pipelined on one keep-alive
connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from http_servers import Nginx, start_nginx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from needs import need_binary
from proxyutil import addr, daemon, tcp_server

from proxyd.server import Daemon

TIMEOUT = 10.0
SLOW = 60.0  # one read of a big pipelined exchange on a loaded machine (a bound, not a timing)

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: all
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: web}
      toPorts:
        - ports: [{port: "NGINX", protocol: TCP}, {port: "RAW", protocol: TCP}]
          rules:
            http: [{}]
"""

CONFIG = """
listeners:
  - name: nginx
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{nginx}"
  - name: raw
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{raw}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: web}}
policy:
  paths: [policy.yaml]
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with start_nginx(tmp_path_factory.mktemp("nginx")) as n:
        yield n


class Recorder:
    """A raw server that records what it reads and answers each connection with ``answer``."""

    def __init__(self, answer: bytes = b"") -> None:
        self.answer = answer
        self.got: list[bytes] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.answer:
            w.write(self.answer)
            await w.drain()
            w.close()
            return
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await r.read(65536):
                data += chunk
        self.got.append(data)
        w.close()


@contextlib.asynccontextmanager
async def proxy(nginx: Nginx, tmp_path: Path, recorder: Recorder) -> AsyncIterator[tuple[Daemon, int]]:
    async with tcp_server(recorder.handle) as (_, raw_port):
        files = {"policy.yaml": POLICY.replace("NGINX", str(nginx.port)).replace("RAW", str(raw_port))}
        async with daemon(CONFIG.format(nginx=nginx.port, raw=raw_port), tmp_path, files=files) as d:
            yield d, raw_port


def exchange(port: int, data: bytes, *, until: int = 0) -> bytes:
    """Blocking: send ``data`` (then shut the write side), read to EOF (or ``until`` bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionError, TimeoutError):
            while chunk := s.recv(1 << 20):
                out += chunk
                if until and len(out) >= until:
                    break
        return out


async def aexchange(port: int, data: bytes) -> bytes:
    """Send and read concurrently (a client that reads while it pipelines)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        w.write(data)
        await w.drain()
        w.write_eof()

    sender = asyncio.create_task(send())
    out = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(r.read(1 << 20), SLOW):
            out += chunk
    await sender
    w.close()
    return bytes(out)


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def undated(raw: bytes) -> bytes:
    return _DATE.sub(b"\r\nDate: -", raw)


# --- issue 17's fault class, against nginx ---------------------------------------------------------

GET = b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
LAST = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_thirty_thousand_pipelined_requests_all_answered(nginx: Nginx, tmp_path: Path) -> None:
    # 1024 outstanding requests used to close the connection and lose the answers owed
    wire = GET * 30000 + LAST
    direct = await aexchange(nginx.port, wire)
    async with proxy(nginx, tmp_path, Recorder()) as (d, _):
        through = await aexchange(addr(d, "nginx")[1], wire)
    assert direct.count(b"HTTP/1.1 200 OK") == 30001
    assert undated(through) == undated(direct)


async def test_malformed_chunk_behind_pipelined_requests_loses_no_answer(
    nginx: Nginx, tmp_path: Path
) -> None:
    bad = b"PUT /dav/t.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    wire = GET + GET + bad
    direct = await aexchange(nginx.port, wire)
    async with proxy(nginx, tmp_path, Recorder()) as (d, _):
        through = await aexchange(addr(d, "nginx")[1], wire)
    # nginx answers both GETs, then refuses the chunk itself; proxyd never forwards that line
    # (two parsers reading it differently is how smuggling starts), so its connection ends after
    # the two answers it owes, not before them
    owed = undated(direct)[: undated(direct).index(b"HTTP/1.1 400")]
    assert owed.count(b"HTTP/1.1 200 OK") == 2
    assert undated(through) == owed


async def test_an_answer_with_no_request_pending_reaches_the_client(nginx: Nginx, tmp_path: Path) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
    async with proxy(nginx, tmp_path, Recorder(busy)) as (d, raw_port):
        direct = await asyncio.to_thread(exchange, raw_port, b"")
        through = await asyncio.to_thread(exchange, addr(d, "raw")[1], b"")
    assert direct == through == busy


async def test_header_blocks_nginx_accepts_pass_and_those_it_refuses_get_its_answer(
    nginx: Nginx, tmp_path: Path
) -> None:
    # nginx's defaults: large_client_header_buffers 4 8k (a line over 8 KiB is refused, about
    # 32 KiB in all); proxyd's max_header_bytes default (64 KiB) is above them, so nginx decides
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 7000) for i in range(4))
    cases = [
        b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n",
        b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\nConnection: close\r\n\r\n",
        b"GET /public/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    async with proxy(nginx, tmp_path, Recorder()) as (d, _):
        for wire in cases:
            direct = await aexchange(nginx.port, wire)
            through = await aexchange(addr(d, "nginx")[1], wire)
            assert undated(through) == undated(direct), direct[:40]
    assert b"200 OK" in undated(await aexchange(nginx.port, cases[0]))
    assert re.match(rb"HTTP/1.1 (400|414) ", await aexchange(nginx.port, cases[2]))


async def test_long_chunk_extensions_nginx_accepts_pass(nginx: Nginx, tmp_path: Path) -> None:
    # nginx bounds neither chunk extensions nor trailers; proxyd's bound is max_header_bytes
    # (a fixed 4 KiB chunk line closed these connections)
    def put(name: bytes) -> bytes:
        return (
            b"PUT /dav/" + name + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n3;e=" + b"v" * 30000 + b"\r\nabc\r\n0;f=" + b"w" * 30000
            + b"\r\nX-T: " + b"t" * 30000 + b"\r\n\r\n"
        )  # fmt: skip

    direct = await aexchange(nginx.port, put(b"ext-direct.txt"))
    async with proxy(nginx, tmp_path, Recorder()) as (d, _):
        through = await aexchange(addr(d, "nginx")[1], put(b"ext-proxy.txt"))
    assert direct[:22] == through[:22] == b"HTTP/1.1 201 Created\r\n"
    assert (nginx.prefix / "www" / "dav" / "ext-proxy.txt").read_bytes() == b"abc"


async def test_a_response_head_over_max_header_bytes_reaches_curl(nginx: Nginx, tmp_path: Path) -> None:
    # ~120 KiB of response head (curl takes it): it used to close the connection after nginx ran
    # the request; now it streams past the 64 KiB limit
    need_binary("curl")

    def curl(port: int) -> bytes:
        return subprocess.run(
            ["curl", "-sS", "-i", "--max-time", "20", f"http://127.0.0.1:{port}/bighead"],
            capture_output=True, check=True, timeout=30,
        ).stdout  # fmt: skip

    direct = await asyncio.to_thread(curl, nginx.port)
    assert len(direct) > 120000 and direct.endswith(b"\r\n\r\nbig\n")
    async with proxy(nginx, tmp_path, Recorder()) as (d, _):
        through = await asyncio.to_thread(curl, addr(d, "nginx")[1])
    assert undated(through) == undated(direct)


# --- the transparency property ------------------------------------------------------------------

PATHS = ["/public/a.txt", "/echo", "/empty", "/api/x", "/api/x?q=1&r=/a", "/secret.txt", "/nope", "/public/"]
TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!#$%&'*+^`|", min_size=1, max_size=12
)
VALUE = st.text("".join(chr(c) for c in range(0x21, 0x7F)) + " \t", max_size=40).map(str.strip)
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "trailer"}


@st.composite
def request(draw: st.DrawFn, last: bool) -> bytes:
    method = draw(st.sampled_from(["GET", "GET", "HEAD", "POST", "OPTIONS", "DELETE"]))
    path, host = draw(st.sampled_from(PATHS)), draw(st.sampled_from(["x", "x:80", "a.b"]))
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    for name, value in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=4)):
        if name.lower() not in RESERVED:
            head += f"{name}: {value}\r\n"
    body = b""
    kind = draw(
        st.sampled_from(["none", "cl", "chunked"]) if method in ("POST", "DELETE") else st.just("none")
    )
    if kind == "cl":
        body = draw(st.binary(max_size=64))
        head += f"Content-Length: {len(body)}\r\n"
    elif kind == "chunked":
        head += "Transfer-Encoding: chunked\r\n"
        for data in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3)):
            ext = draw(st.sampled_from(["", ";e=1"]))
            body += b"%x%s\r\n%s\r\n" % (len(data), ext.encode(), data)
        body += b"0\r\n" + draw(st.sampled_from([b"", b"T: 1\r\n"])) + b"\r\n"
    if last:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + body


TRAFFIC = st.lists(request(last=False), max_size=5).flatmap(
    lambda reqs: request(last=True).map(lambda end: b"".join(reqs) + end)
)


async def test_transparent_for_valid_traffic_nginx_accepts(nginx: Nginx, tmp_path: Path) -> None:
    recorder = Recorder()
    async with proxy(nginx, tmp_path, recorder) as (d, _):
        through_nginx = addr(d, "nginx")[1]
        through_raw = addr(d, "raw")[1]

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(wire=TRAFFIC)
        def prop(wire: bytes) -> None:
            # client side: nginx's answers, direct and through proxyd
            direct = exchange(nginx.port, wire)
            assert direct.count(b"HTTP/1.1 ") >= 1
            assert undated(exchange(through_nginx, wire)) == undated(direct)
            # server side: what a server receives through proxyd is what the client sent
            before = len(recorder.got)
            exchange(through_raw, wire)
            for _ in range(500):  # the recorder runs on the daemon's loop: poll, bounded
                if len(recorder.got) > before:
                    break
                time.sleep(0.01)
            assert recorder.got[before] == wire

        await asyncio.to_thread(prop)
