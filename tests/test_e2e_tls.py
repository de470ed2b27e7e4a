"""``toPorts[].serverNames`` through the daemon, with real TLS clients and servers.

The upstream is ``openssl s_server -www`` with a self-signed certificate made by openssl; the
clients are Python's ``ssl``, ``openssl s_client`` and curl. A recording tap between proxyd
and the server shows which connections reached it and exactly what they carried: a refused
client never reaches the server, and an allowed one's bytes arrive byte-exact, however its
ClientHello was segmented or framed.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need_binary
from proxyutil import addr, daemon, wait_for
from tls_fixture import (
    Cert,
    SServer,
    client_context,
    client_hello,
    finish_handshake,
    make_cert,
    reframe,
    start_s_server,
    start_tls_nginx,
    tap,
)

from proxyd.server import Daemon

CONFIG = """
listeners:
  - name: tls
    address: "127.0.0.1:0"
    upstream: "127.0.0.1:{port}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: tls}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
limits:
  request_timeout: 1s
{extra}
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: tls-sni
spec:
  endpointSelector:
    matchLabels:
      app: tls
  ingress:
  - toPorts:
    - ports:
      - port: "PORT"
        protocol: TCP
      serverNames:
      - api.example.com
      - "*.one.example.net"
      - "**.deep.example.org"
"""
ALLOWED = [
    "api.example.com",
    "API.Example.COM.",
    "x.one.example.net",
    "a.deep.example.org",
    "a.b.c.deep.example.org",
]
REFUSED = ["other.example.com", "one.example.net", "a.b.one.example.net", "deep.example.org", "example.com"]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def server(cert: Cert) -> Iterator[SServer]:
    with start_s_server(cert) as s:
        yield s


def log(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]


def conn_lines(tmp_path: Path) -> list[dict]:  # type: ignore[type-arg]
    """Connection lines in accept order (they are written as connections end)."""
    return sorted(
        (x for x in log(tmp_path) if x["event"] == "connection"),
        key=lambda x: (x["conn_id"], x["verdict"] != "audit"),
    )


async def settle(d: Daemon, tmp_path: Path) -> None:
    await wait_for(lambda: not d.active_connections())
    d.access_log.flush()


async def python_client(where: tuple[str, int], sni: str | None, version: str) -> bytes:
    """GET / over TLS: the answer, or raises ssl.SSLError."""
    ctx = client_context(VERSIONS[version], alpn=["h2", "http/1.1"])
    r, w = await asyncio.wait_for(asyncio.open_connection(*where, ssl=ctx, server_hostname=sni or ""), 10)
    try:
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        await w.drain()
        return await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_python_ssl_allowed_and_refused_names(tmp_path: Path, server: SServer, version: str) -> None:
    async with tap(("127.0.0.1", server.port)) as t:
        cfg = CONFIG.format(port=t.address[1], extra="")
        policy = POLICY.replace("PORT", str(t.address[1]))
        async with daemon(cfg, tmp_path, files={"policy.yaml": policy}) as d:
            for name in ALLOWED:
                answer = await python_client(addr(d, "tls"), name, version)
                assert answer.startswith(b"HTTP/1.0 200 ok"), (name, answer[:80])
            for name in [*REFUSED, None]:
                with pytest.raises(ssl.SSLError) as exc:
                    await python_client(addr(d, "tls"), name, version)
                assert "ACCESS_DENIED" in str(exc.value), (name, exc.value)
            await settle(d, tmp_path)
            metrics = d.metrics.render().decode()
        # Only the allowed clients ever reached the server.
        assert len(t.conns) == len(ALLOWED)
    lines = conn_lines(tmp_path)
    assert len(lines) == len(ALLOWED) + len(REFUSED) + 1
    allowed, refused = lines[: len(ALLOWED)], lines[len(ALLOWED) :]
    for line, name in zip(allowed, ALLOWED, strict=True):
        assert line["verdict"] == "forwarded" and line["sni"] == name and line["alpn"] == ["h2", "http/1.1"]
    for line, name in zip(refused, [*REFUSED, None], strict=True):
        assert (
            line["verdict"] == "denied"
            and line["sni"] == name
            and line["upstream"] == f"127.0.0.1:{t.address[1]}"
        )
        assert line["reason"].startswith("tls: SNI" if name else "tls: ClientHello without SNI")
        assert line["bytes_out"] == 7  # the alert, nothing else
    assert 'proxyd_tls_denials_total{listener="tls",reason="sni_not_allowed"} 5.0' in metrics
    assert 'proxyd_tls_denials_total{listener="tls",reason="no_sni"} 1.0' in metrics


async def run_tool(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    need_binary(argv[0])
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_openssl_s_client(tmp_path: Path, server: SServer, version: str) -> None:
    cfg = CONFIG.format(port=server.port, extra="")
    policy = POLICY.replace("PORT", str(server.port))
    async with daemon(cfg, tmp_path, files={"policy.yaml": policy}) as d:
        host, port = addr(d, "tls")
        base = [
            "openssl",
            "s_client",
            "-connect",
            f"{host}:{port}",
            f"-tls{version.replace('.', '_')}",
            "-brief",
        ]
        rc, out = await run_tool(*base, "-servername", "x.one.example.net", stdin=b"GET / HTTP/1.0\r\n\r\n")
        assert rc == 0 and "CONNECTION ESTABLISHED" in out and f"TLSv{version}" in out, out
        rc, out = await run_tool(*base, "-servername", "evil.example.net")
        assert rc != 0 and "tlsv1 alert access denied" in out, out
        rc, out = await run_tool(*base, "-noservername")
        assert rc != 0 and "tlsv1 alert access denied" in out, out
        await settle(d, tmp_path)
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"]) for x in lines] == [
        ("forwarded", "x.one.example.net"),
        ("denied", "evil.example.net"),
        ("denied", None),
    ]


async def test_curl(tmp_path: Path, server: SServer) -> None:
    cfg = CONFIG.format(port=server.port, extra="")
    policy = POLICY.replace("PORT", str(server.port))
    async with daemon(cfg, tmp_path, files={"policy.yaml": policy}) as d:
        host, port = addr(d, "tls")
        curl = ["curl", "-sS", "-k", "--max-time", "10", "--http1.1"]
        rc, out = await run_tool(
            *curl, "--resolve", f"api.example.com:{port}:{host}", f"https://api.example.com:{port}/"
        )
        assert rc == 0 and "s_server" in out, out
        rc, out = await run_tool(
            *curl, "--resolve", f"www.example.com:{port}:{host}", f"https://www.example.com:{port}/"
        )
        assert rc == 35 and "alert access denied" in out, out
        await settle(d, tmp_path)
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"], x["alpn"]) for x in lines] == [
        ("forwarded", "api.example.com", ["http/1.1"]),
        ("denied", "www.example.com", ["http/1.1"]),
    ]


@pytest.mark.parametrize("http", ["--http2", "--http1.1"])
async def test_curl_to_nginx(tmp_path: Path, cert: Cert, http: str) -> None:
    """nginx answers with the SNI, ALPN and version it negotiated through proxyd."""
    with start_tls_nginx(tmp_path, cert) as port:
        cfg = CONFIG.format(port=port, extra="")
        async with daemon(cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(port))}) as d:
            host, lport = addr(d, "tls")
            curl = ["curl", "-sS", "-k", "--max-time", "10", http]
            for name in ("api.example.com", "a.b.deep.example.org"):
                url = f"https://{name}:{lport}/"
                rc, out = await run_tool(*curl, "--resolve", f"{name}:{lport}:{host}", url)
                alpn = "h2" if http == "--http2" else "http/1.1"
                assert rc == 0 and out == f"sni={name} alpn={alpn} proto=TLSv1.3\n", out
            rc, out = await run_tool(
                *curl, "--tlsv1.2", "--tls-max", "1.2", "--resolve", f"api.example.com:{lport}:{host}",
                f"https://api.example.com:{lport}/",
            )  # fmt: skip
            assert rc == 0 and "proto=TLSv1.2" in out, out
            rc, out = await run_tool(*curl, "--resolve", f"deep.example.org:{lport}:{host}",
                                     f"https://deep.example.org:{lport}/")  # fmt: skip
            assert rc == 35 and "alert access denied" in out, out
            await settle(d, tmp_path)
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"]) for x in lines] == [
        ("forwarded", "api.example.com"),
        ("forwarded", "a.b.deep.example.org"),
        ("forwarded", "api.example.com"),
        ("denied", "deep.example.org"),
    ]


async def bio_session(
    where: tuple[str, int],
    sni: str,
    *,
    version: str = "1.3",
    record: int = 0,
    segment: int = 0,
    alpn: list[str] | None = None,
) -> tuple[bytes, bytes]:
    """A full TLS session through ``where`` whose ClientHello is re-framed into records of at
    most ``record`` bytes and sent in ``segment``-byte writes; returns (hello sent, answer)."""
    obj, inc, out, hello = client_hello(client_context(VERSIONS[version], alpn=alpn), sni)
    if record:
        hello = reframe(hello, record)
    r, w = await asyncio.open_connection(*where)
    try:
        step = segment or len(hello)
        for i in range(0, len(hello), step):
            w.write(hello[i : i + step])
            await w.drain()
        answer = await finish_handshake(obj, inc, out, r, w)
    finally:
        w.close()
    return hello, answer


@pytest.mark.parametrize(
    ("record", "segment", "alpn"),
    [
        (0, 0, None),  # as the client framed it, one write
        (0, 1, None),  # 1-byte segments
        (7, 3, None),  # across many small records
        (1, 0, None),  # one handshake byte per record
        (0, 0, [*(f"proto-{i:04d}-" + "x" * 40 for i in range(350)), "http/1.1"]),  # ~17 KiB: two records
    ],
)
async def test_handshake_byte_exact(tmp_path: Path, server: SServer, record: int, segment: int,
                                    alpn: list[str] | None) -> None:  # fmt: skip
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="")
        policy = POLICY.replace("PORT", str(up.address[1]))
        async with daemon(cfg, tmp_path, files={"policy.yaml": policy}) as d, tap(addr(d, "tls")) as down:
            hello, answer = await bio_session(down.address, "api.example.com", record=record, segment=segment,
                                              alpn=alpn)  # fmt: skip
            assert answer.startswith(b"HTTP/1.0 200 ok")
            await settle(d, tmp_path)
            await wait_for(lambda: len(up.conns) == 1 and len(down.conns) == 1)
    if alpn:
        assert len(hello) > 16384 + 5
    # What the server received is exactly what the client sent, both ways.
    assert bytes(up.conns[0][0]).startswith(hello)
    assert up.conns[0][0] == down.conns[0][0]
    assert up.conns[0][1] == down.conns[0][1]
    line = conn_lines(tmp_path)[0]
    assert line["verdict"] == "forwarded" and line["sni"] == "api.example.com"
    assert line["bytes_in"] == len(down.conns[0][0])


async def test_refused_hello_split_into_single_bytes_gets_the_alert(tmp_path: Path, server: SServer) -> None:
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="")
        async with daemon(
            cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(up.address[1]))}
        ) as d:
            for version in ("1.2", "1.3"):
                _, _, _, hello = client_hello(client_context(VERSIONS[version]), "nope.example.org")
                hello = reframe(hello, 5)
                r, w = await asyncio.open_connection(*addr(d, "tls"))
                for i in range(len(hello)):
                    w.write(hello[i : i + 1])
                    await w.drain()
                got = await asyncio.wait_for(r.read(), 10)
                w.close()
                # A fatal access_denied alert in the client's own record version, then the close.
                assert got == b"\x15" + hello[1:3] + b"\x00\x02\x02\x31"
            await settle(d, tmp_path)
        assert up.conns == []


async def test_plain_text_and_sslv2_are_closed_without_an_answer(tmp_path: Path, server: SServer) -> None:
    sslv2_hello = bytes.fromhex(
        "802e0103010015000000100100800300800700c006004000400200800000041234567890abcdef"
    )
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="")
        async with daemon(
            cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(up.address[1]))}
        ) as d:
            for first in (b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", sslv2_hello):
                r, w = await asyncio.open_connection(*addr(d, "tls"))
                w.write(first)
                await w.drain()
                assert await asyncio.wait_for(r.read(), 10) == b""
                w.close()
            await settle(d, tmp_path)
            metrics = d.metrics.render().decode()
        assert up.conns == []
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"], x["bytes_out"]) for x in lines] == [
        ("denied", None, 0),
        ("denied", None, 0),
    ]
    assert all(x["reason"].startswith("tls: not TLS") for x in lines)
    assert 'proxyd_tls_denials_total{listener="tls",reason="not_tls"} 2.0' in metrics


async def test_an_l4_rule_beside_server_names_still_admits_plain_text(tmp_path: Path) -> None:
    """serverNames only ever grants: another rule for the port lets any client in, with or
    without TLS, and the connection line still names the SNI of TLS clients."""
    got: list[bytes] = []

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(65536)
        got.append(data)
        w.write(data)
        await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = (
        POLICY.replace("PORT", str(port))
        + f"""\
  - toPorts:
    - ports:
      - port: "{port}"
"""
    )
    try:
        async with daemon(CONFIG.format(port=port, extra=""), tmp_path, files={"policy.yaml": policy}) as d:
            r, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(b"hello plain\n")
            assert await asyncio.wait_for(r.read(), 10) == b"hello plain\n"
            w.close()
            _, _, _, hello = client_hello(client_context(), "elsewhere.example.com")
            r, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(hello)
            assert await asyncio.wait_for(r.read(), 10) == hello  # echoed: it reached the server
            w.close()
            await settle(d, tmp_path)
    finally:
        server.close()
    assert got == [b"hello plain\n", hello]
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"]) for x in lines] == [
        ("forwarded", None),
        ("forwarded", "elsewhere.example.com"),
    ]


async def test_silent_client_is_decided_at_the_request_timeout(tmp_path: Path, server: SServer) -> None:
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="")
        async with daemon(
            cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(up.address[1]))}
        ) as d:
            r, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(b"\x16\x03\x01\x00")  # the start of a record header, then nothing
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            await settle(d, tmp_path)
            metrics = d.metrics.render().decode()
        assert up.conns == []
    (line,) = conn_lines(tmp_path)
    assert line["verdict"] == "denied" and "within request_timeout" in line["reason"]
    assert 'proxyd_tls_denials_total{listener="tls",reason="timeout"} 1.0' in metrics


async def test_audit_mode_lets_a_refused_name_through_and_logs_it(tmp_path: Path, server: SServer) -> None:
    cfg = CONFIG.format(port=server.port, extra="").replace(
        "  paths: [policy.yaml]", "  paths: [policy.yaml]\n  mode: audit"
    )
    async with daemon(cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(server.port))}) as d:
        answer = await python_client(addr(d, "tls"), "refused.example.com", "1.3")
        assert answer.startswith(b"HTTP/1.0 200 ok")
        await settle(d, tmp_path)
    lines = conn_lines(tmp_path)
    assert [(x["verdict"], x["sni"]) for x in lines] == [
        ("audit", "refused.example.com"),
        ("forwarded", "refused.example.com"),
    ]


async def test_bytes_after_an_allowed_hello_arrive_byte_exact(tmp_path: Path) -> None:
    """Whatever follows the ClientHello in the same writes (4 MiB here, sent before the upstream
    is even connected) reaches the server in order and complete."""
    got = bytearray()
    done = asyncio.Event()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            got.extend(data)
        done.set()
        w.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, _, _, hello = client_hello(client_context(), "x.one.example.net")
    payload = hello + bytes(range(256)) * (4 * 4096)
    try:
        cfg = CONFIG.format(port=port, extra="")
        async with daemon(cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(port))}) as d:
            _, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(payload)
            await w.drain()
            w.write_eof()
            await asyncio.wait_for(done.wait(), 20)
            w.close()
            await settle(d, tmp_path)
    finally:
        server.close()
    assert got == payload
    (line,) = conn_lines(tmp_path)
    assert (
        line["verdict"] == "forwarded"
        and line["sni"] == "x.one.example.net"
        and line["bytes_in"] == len(payload)
    )


async def test_a_hello_over_buffer_bytes_is_refused(tmp_path: Path, server: SServer) -> None:
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="  buffer_bytes: 8192")
        async with daemon(
            cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(up.address[1]))}
        ) as d:
            protos = [f"proto-{i:04d}-" + "x" * 40 for i in range(350)]
            _, _, _, hello = client_hello(client_context(alpn=protos), "api.example.com")
            r, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(hello)
            await w.drain()
            assert await asyncio.wait_for(r.read(), 10) == b"\x15" + hello[1:3] + b"\x00\x02\x02\x31"
            w.close()
            await settle(d, tmp_path)
        assert up.conns == []
    (line,) = conn_lines(tmp_path)
    assert line["verdict"] == "denied" and line["sni"] is None
    assert (
        line["reason"].startswith("tls: malformed ClientHello: ClientHello of ")
        and "limit (8192" in line["reason"]
    )


def ech_hello(outer: bytes) -> bytes:
    """A ClientHello in the shape ECH clients send: the outer (public) name in server_name, the
    real one sealed in an encrypted_client_hello extension (0xfe0d) proxyd cannot read."""
    sni = b"\x00" + len(outer).to_bytes(2, "big") + outer
    exts = (
        b"\x00\x00" + (len(sni) + 2).to_bytes(2, "big") + len(sni).to_bytes(2, "big") + sni
        + b"\xfe\x0d\x00\x40" + bytes(range(64))
        + b"\x00\x2b\x00\x03\x02\x03\x04"
    )  # fmt: skip
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(exts).to_bytes(2, "big") + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


async def test_ech_outer_name_decides(tmp_path: Path) -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(65536))
        await w.drain()
        w.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = CONFIG.format(port=port, extra="")
        async with daemon(cfg, tmp_path, files={"policy.yaml": POLICY.replace("PORT", str(port))}) as d:
            got = []
            for outer in (b"api.example.com", b"public.ech.example"):
                hello = ech_hello(outer)
                r, w = await asyncio.open_connection(*addr(d, "tls"))
                w.write(hello)
                got.append(await asyncio.wait_for(r.read(), 10))
                w.close()
            await settle(d, tmp_path)
    finally:
        server.close()
    assert got == [ech_hello(b"api.example.com"), b"\x15\x03\x01\x00\x02\x02\x31"]
    assert [(x["verdict"], x["sni"]) for x in conn_lines(tmp_path)] == [
        ("forwarded", "api.example.com"),
        ("denied", "public.ech.example"),
    ]


async def test_the_policy_in_force_when_the_hello_completes_decides(tmp_path: Path, server: SServer) -> None:
    async with tap(("127.0.0.1", server.port)) as up:
        cfg = CONFIG.format(port=up.address[1], extra="")
        policy = POLICY.replace("PORT", str(up.address[1]))
        async with daemon(cfg, tmp_path, files={"policy.yaml": policy}) as d:
            _, _, _, hello = client_hello(client_context(), "api.example.com")
            r, w = await asyncio.open_connection(*addr(d, "tls"))
            w.write(hello[:40])
            await w.drain()
            await wait_for(lambda: sum(len(c.reader.data) for c in _gates(d)) == 40)
            (tmp_path / "policy.yaml").write_text(policy.replace("- api.example.com", "- api2.example.com"))
            assert d.reload_policy("test")
            w.write(hello[40:])
            assert await asyncio.wait_for(r.read(), 10) == b"\x15" + hello[1:3] + b"\x00\x02\x02\x31"
            w.close()
            await settle(d, tmp_path)
        assert up.conns == []


def _gates(d: Daemon) -> list:  # type: ignore[type-arg]
    return [c._gate for lr in d.listeners.values() for c in lr.conns if c._gate is not None]
