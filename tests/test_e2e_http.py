"""The http parser end to end: the in-process daemon between real clients and real servers.

Servers: nginx (Debian's, one foreground process on a free loopback port with a generated config,
:mod:`http_servers`) and an aiohttp app (body hashes, headers, a WebSocket echo). Clients: curl
(keep-alive, a 64 MiB ``--data-binary @file`` checked by hash, a chunked upload, ``Expect:
100-continue``), httpx, requests and a ``websockets`` client through an upgrade, plus raw sockets
for pipelining and the smuggling suite. Denials are checked from both ends: the client gets the
403 and its body, and the server's own log shows it never saw the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import websockets.asyncio.client
from http_servers import Nginx, start_app, start_nginx
from needs import need_binary
from proxyutil import addr, daemon, wait_for

from proxyd.server import Daemon

DENIED_BODY = b"Access denied\r\n"
TIMEOUT = 10.0

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: web}
      toPorts:
        - ports: [{port: "NGINX", protocol: TCP}, {port: "APP", protocol: TCP}]
          rules:
            http:
              - method: "GET|HEAD"
                path: "/(public/.*|echo|empty)"
              - method: "POST|PUT"
                path: "/hash"
              - method: PUT
                path: "/dav/.*"
              - method: GET
                path: "/ws"
                headers: ["Upgrade: websocket"]
              - method: GET
                path: "/headers"
                headerMatches:
                  - {name: X-Audit, value: "on", mismatch: ADD}
"""

CONFIG = """
listeners:
  - name: nginx
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{nginx}"
  - name: app
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{app}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: web}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with start_nginx(tmp_path_factory.mktemp("nginx")) as n:
        yield n


@contextlib.asynccontextmanager
async def web(
    nginx: Nginx, tmp_path: Path, policy: str = POLICY
) -> AsyncIterator[tuple[Daemon, int, list[str]]]:
    async with start_app() as (app_port, app_seen):
        files = {"policy.yaml": policy.replace("NGINX", str(nginx.port)).replace("APP", str(app_port))}
        async with daemon(CONFIG.format(nginx=nginx.port, app=app_port), tmp_path, files=files) as d:
            yield d, app_port, app_seen


def url(d: Daemon, listener: str, path: str) -> str:
    host, port = addr(d, listener)
    return f"http://{host}:{port}{path}"


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    need_binary("curl")
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "30", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def exchange(d: Daemon, listener: str, data: bytes, until_close: bool = True) -> bytes:
    """Send raw bytes, read what comes back until the proxy closes (or a pause)."""
    r, w = await asyncio.open_connection(*addr(d, listener))
    w.write(data)
    await w.drain()
    out = b""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        while chunk := await asyncio.wait_for(r.read(65536), 2.0 if not until_close else TIMEOUT):
            out += chunk
    w.close()
    return out


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


async def seen_since(nginx: Nginx, before: int, n: int) -> list[str]:
    """nginx's log lines after the first ``before``, once there are ``n`` (it logs after it answers)."""
    await wait_for(lambda: len(nginx.seen()) >= before + n)
    return nginx.seen()[before:]


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


# --- curl ----------------------------------------------------------------------------------------


async def test_curl_keep_alive_with_a_denial_in_between(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, _):
        before = len(nginx.seen())
        rc, out, err = await curl(
            "-w", "|%{http_code} %{num_connects}\n",
            *(url(d, "nginx", p) for p in ("/public/a.txt", "/secret.txt", "/public/a.txt")),
        )  # fmt: skip
        assert rc == 0, err
        assert out == b"public a\n|200 1\nAccess denied\r\n|403 0\npublic a\n|200 0\n"  # one connection
        seen = await seen_since(nginx, before, 2)
        assert [s.split("|")[0] for s in seen] == ["GET /public/a.txt HTTP/1.1"] * 2  # never /secret.txt
        await wait_for(lambda: len(log_lines(tmp_path)) >= 5)
        reqs = [x for x in log_lines(tmp_path) if x.get("entry_type") == "request"]
        assert [(x["verdict"], x["fields"]["path"]) for x in reqs] == [
            ("forwarded", "/public/a.txt"), ("denied", "/secret.txt"), ("forwarded", "/public/a.txt"),
        ]  # fmt: skip
        assert reqs[0]["fields"]["method"] == "GET" and reqs[0]["fields"]["version"] == "HTTP/1.1"
        assert reqs[0]["fields"]["host"] == "{}:{}".format(*addr(d, "nginx"))
        resp = [x for x in log_lines(tmp_path) if x.get("entry_type") == "response"]
        assert [x["fields"]["status"] for x in resp] == [200, 200]


async def test_curl_64_mib_upload_chunked_and_expect_100_continue(nginx: Nginx, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    data = os.urandom(1 << 20) * 64
    big.write_bytes(data)
    want = f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()
    async with web(nginx, tmp_path) as (d, _, app_seen):
        # curl sends Expect: 100-continue on its own for a body this large
        rc, out, err = await curl("--data-binary", f"@{big}", url(d, "app", "/hash"))
        assert (rc, out) == (0, want), err
        rc, out, err = await curl(
            "-H", "Transfer-Encoding: chunked", "-T", str(big), "-X", "POST", url(d, "app", "/hash")
        )
        assert (rc, out) == (0, want), err
        rc, out, err = await curl(
            "-H", "Expect: 100-continue", "--data-binary", "small", url(d, "app", "/hash")
        )
        assert (rc, out) == (0, f"5 {hashlib.sha256(b'small').hexdigest()}".encode()), err
        # denied with Expect: 100-continue and a body: 403 instead of 100, and the app never saw it
        rc, out, err = await curl(
            "-H", "Expect: 100-continue", "--data-binary", f"@{big}", "-w", "|%{http_code}",
            url(d, "app", "/other"),
        )  # fmt: skip
        assert out == DENIED_BODY + b"|403", (rc, err)
        assert app_seen == ["POST /hash"] * 3
        # nginx stores a 64 MiB PUT itself: the bytes it wrote are the bytes sent
        rc, out, err = await curl("-T", str(big), "-w", "%{http_code}", url(d, "nginx", "/dav/up.bin"))
        assert (rc, out) == (0, b"201"), err
        assert hashlib.sha256((nginx.prefix / "www" / "dav" / "up.bin").read_bytes()).digest() == (
            hashlib.sha256(data).digest()
        )


# --- Python clients ----------------------------------------------------------------------------


async def test_httpx_header_rewrite_and_denial(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, app_seen):
        async with httpx.AsyncClient(timeout=TIMEOUT) as c:
            r = await c.get(url(d, "app", "/headers"))
            assert r.status_code == 200
            assert ["X-Audit", "on"] in r.json()  # ADD: the rule's spelling, last
            assert r.json()[-1] == ["X-Audit", "on"]
            r = await c.get(url(d, "app", "/headers"), headers={"X-Audit": "on"})
            assert [h for h in r.json() if h[0].lower() == "x-audit"] == [["X-Audit", "on"]]
            r = await c.delete(url(d, "app", "/headers"))
            assert (r.status_code, r.content, r.headers["content-type"]) == (403, DENIED_BODY, "text/plain")
            r = await c.get(url(d, "app", "/headers"))  # same client, connection kept
            assert r.status_code == 200
        assert app_seen == ["GET /headers"] * 3


async def test_requests_session_keeps_its_connection_across_a_denial(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, _):

        def go() -> list[tuple[int, bytes]]:
            with requests.Session() as s:
                return [
                    (r.status_code, r.content)
                    for r in (
                        s.get(url(d, "nginx", p), timeout=TIMEOUT) for p in ("/public/a.txt", "/x", "/echo")
                    )
                ]

        got = await asyncio.to_thread(go)
        assert got == [(200, b"public a\n"), (403, DENIED_BODY), (200, b"echo GET /echo\n")]
        await wait_for(lambda: len([x for x in log_lines(tmp_path) if x.get("entry_type") == "request"]) >= 3)
        conns = {x["conn_id"] for x in log_lines(tmp_path) if x.get("entry_type") == "request"}
        assert len(conns) == 1


async def test_websocket_through_an_upgrade(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, app_seen):
        async with websockets.asyncio.client.connect(url(d, "app", "/ws").replace("http", "ws", 1)) as ws:
            for i in range(3):
                await ws.send(f"hello {i}")
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"echo hello {i}"
            await ws.send(b"\x00\x01\r\n\r\nGET / HTTP/1.1\r\n")  # anything passes once upgraded
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"\x00\x01\r\n\r\nGET / HTTP/1.1\r\n"[::-1]
        assert app_seen == ["GET /ws"]
        # without the Upgrade header the rule does not match
        async with httpx.AsyncClient(timeout=TIMEOUT) as c:
            assert (await c.get(url(d, "app", "/ws"))).status_code == 403


# --- pipelining and response framing ----------------------------------------------------------


async def test_pipelined_head_204_and_denials_stay_in_step(nginx: Nginx, tmp_path: Path) -> None:
    h = b"Host: x\r\n\r\n"
    wire = (
        b"HEAD /public/big.bin HTTP/1.1\r\n" + h
        + b"GET /secret.txt HTTP/1.1\r\n" + h
        + b"GET /empty HTTP/1.1\r\n" + h
        + b"HEAD /secret.txt HTTP/1.1\r\n" + h
        + b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    async with web(nginx, tmp_path) as (d, _, _):
        before = len(nginx.seen())
        out = await exchange(d, "nginx", wire)
        assert statuses(out) == [200, 403, 204, 403, 200]
        assert out.endswith(b"\r\n\r\npublic a\n")
        assert out.count(DENIED_BODY) == 1  # the denied HEAD gets no body
        seen = [s.split("|")[0] for s in await seen_since(nginx, before, 3)]
        assert seen == ["HEAD /public/big.bin HTTP/1.1", "GET /empty HTTP/1.1", "GET /public/a.txt HTTP/1.1"]


async def test_nginx_sees_exactly_the_framed_bytes(nginx: Nginx, tmp_path: Path) -> None:
    put = (
        b"PUT /dav/c.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;e=1\r\nabcd\r\n0\r\nT: 1\r\n\r\n"
    )
    get = b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with web(nginx, tmp_path) as (d, _, _):
        before = len(nginx.seen())
        out = await exchange(d, "nginx", put + get)
        assert statuses(out) == [201, 200]
        seen = await seen_since(nginx, before, 2)
        assert [s.split("|")[:2] for s in seen] == [
            ["PUT /dav/c.txt HTTP/1.1", str(len(put))],  # head, chunks and trailer: every byte
            ["GET /public/a.txt HTTP/1.1", str(len(get))],
        ]
        assert (nginx.prefix / "www" / "dav" / "c.txt").read_bytes() == b"abcd"


# --- smuggling ----------------------------------------------------------------------------------

SMUGGLED = b"GET /public/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
_H = b"POST /echo HTTP/1.1\r\nHost: x\r\n"
SMUGGLING = [
    ("CL.TE", _H + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"),
    (
        "TE.CL",
        _H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    ),
    ("TE.TE: xchunked", _H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("TE.TE: space before colon", _H + b"Transfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc"),
    ("TE.TE: leading tab value", _H + b"Transfer-Encoding:\tchunked\r\nContent-Length: 3\r\n\r\nabc"),
    ("TE.TE: vertical tab", _H + b"Transfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n"),
    ("TE.TE: obs-fold", _H + b"Transfer-Encoding: gzip\r\n chunked\r\n\r\n0\r\n\r\n"),
    ("TE.TE: chunked twice", _H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("TE.TE: identity last", _H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    ("TE in HTTP/1.0", b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("double CL", _H + b"Content-Length: 0\r\nContent-Length: 44\r\n\r\n"),
    ("CL list", _H + b"Content-Length: 0, 44\r\n\r\n"),
    ("CL with a plus", _H + b"Content-Length: +44\r\n\r\n"),
    ("obs-fold", b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Content-Length: 44\r\n\r\n"),
    ("bare LF", b"GET /public/a.txt HTTP/1.1\nHost: x\nContent-Length: 44\n\n"),
    ("bare CR", b"GET /public/a.txt HTTP/1.1\r\nHost: x\rContent-Length: 44\r\n\r\n"),
    ("NUL in a header", b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("NUL in the target", b"GET /public/a\x00.txt HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("request line: tab", b"GET\t/public/a.txt HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("request line: two spaces", b"GET /public/a.txt  HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("request line: HTTP/0.9", b"GET /public/a.txt\r\n\r\n"),
    ("request line: absolute-form Host mismatch", b"GET http://evil/secret.txt HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("no Host", b"GET /public/a.txt HTTP/1.1\r\n\r\n"),
    ("two Hosts", b"GET /public/a.txt HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
]


async def test_smuggling_suite_never_reaches_nginx(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, _):
        for name, attack in SMUGGLING:
            before = len(nginx.seen())
            out = await exchange(d, "nginx", attack + SMUGGLED)
            assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (name, out[:80])
            assert b"connection: close" in out, name
            assert statuses(out) == [400], (name, out)  # closed: nothing after the 400
            assert nginx.seen()[before:] == [], name
        # a malformed chunk after an allowed head: the connection is cut, the smuggled request
        # behind it never forwarded (nginx saw only the head it was sent, and errors on it)
        before = len(nginx.seen())
        attack = (
            b"PUT /dav/s.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n"
        )
        await exchange(d, "nginx", attack + SMUGGLED)
        assert not any("SMUGGLED" in s for s in nginx.seen()[before:])
        # and a header block over the limit is 431
        out = await exchange(d, "nginx", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431 ")


async def test_not_http_closes_with_a_logged_reason(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, _):
        before = len(nginx.seen())
        assert (
            await exchange(d, "nginx", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40) == b""
        )
        assert await exchange(d, "nginx", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == b""
        assert nginx.seen()[before:] == []
        await wait_for(lambda: sum(1 for x in log_lines(tmp_path) if x.get("event") == "connection") >= 2)
        errors = [x["fields"]["error"] for x in log_lines(tmp_path) if "error" in x.get("fields", {})]
        assert any("TLS" in e for e in errors) and any("HTTP/2" in e for e in errors)


# --- policy reload -----------------------------------------------------------------------------


async def test_policy_reload_applies_to_open_keep_alive_connections(nginx: Nginx, tmp_path: Path) -> None:
    async with web(nginx, tmp_path) as (d, _, _):
        conns = [await asyncio.open_connection(*addr(d, "nginx")) for _ in range(3)]

        async def ask(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: bytes) -> int:
            w.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await asyncio.wait_for(r.readexactly(length), TIMEOUT)
            return int(head[9:12])

        assert [await ask(r, w, b"/public/a.txt") for r, w in conns] == [200] * 3
        assert [await ask(r, w, b"/secret.txt") for r, w in conns] == [403] * 3
        text = (tmp_path / "policy.yaml").read_text()
        (tmp_path / "policy.yaml").write_text(
            text.replace('path: "/(public/.*|echo|empty)"', 'path: "/secret.txt"')
        )
        assert d.reload_policy("test")
        assert [await ask(r, w, b"/public/a.txt") for r, w in conns] == [403] * 3
        assert [await ask(r, w, b"/secret.txt") for r, w in conns] == [200] * 3
        for _, w in conns:
            w.close()
