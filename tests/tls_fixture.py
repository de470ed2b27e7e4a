"""Real TLS parts for the serverNames tests: a self-signed certificate made with openssl, an
``openssl s_server`` on loopback, a recording TCP tap, and a Python TLS client driven through
memory BIOs so a test controls (and can re-frame) every byte it sends."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from needs import free_port, need_binary, serving

NAMES = ("api.example.com", "*.example.com", "**.deep.example.org", "localhost")


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def make_cert(tmp: Path) -> Cert:
    """A self-signed EC certificate for the test names (openssl req)."""
    need_binary("openssl")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    san = ",".join(f"DNS:{n.replace('**.', '*.')}" for n in NAMES)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=api.example.com",
         "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return Cert(cert, key)


@dataclass
class SServer:
    port: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def start_s_server(cert: Cert) -> Iterator[SServer]:
    """``openssl s_server -www`` (answers an HTTP GET with a status page), TLS 1.2 and 1.3."""
    need_binary("openssl")
    openssl = shutil.which("openssl")
    assert openssl is not None
    port = free_port()
    proc = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(cert.cert), "-key", str(cert.key),
         "-www", "-alpn", "h2,http/1.1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with serving(proc, port, "openssl s_server"):
        yield SServer(port, proc)


@dataclass
class Tap:
    """A TCP relay to ``target`` that records what each connection carried each way."""

    target: tuple[str, int]
    address: tuple[str, int] = ("", 0)
    conns: list[tuple[bytearray, bytearray]] = field(default_factory=list)  # (to server, to client)


@contextlib.asynccontextmanager
async def tap(target: tuple[str, int]) -> AsyncIterator[Tap]:
    t = Tap(target)
    tasks: set[asyncio.Task[None]] = set()

    async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, rec: bytearray) -> None:
        try:
            while data := await r.read(65536):
                rec += data
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        up, down = bytearray(), bytearray()
        t.conns.append((up, down))
        try:
            sr, sw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(pump(cr, sw, up), pump(sr, cw, down))
        finally:
            sw.close()
            cw.close()

    def start(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(handle(r, w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    t.address = server.sockets[0].getsockname()[:2]
    try:
        yield t
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()


def client_context(version: ssl.TLSVersion | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_hello(
    ctx: ssl.SSLContext, sni: str | None
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A TLS client on memory BIOs and the ClientHello bytes it wants to send first."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return obj, inc, out, out.read()


def reframe(records: bytes, size: int) -> bytes:
    """The same handshake bytes re-cut into handshake records of at most ``size`` bytes each."""
    out = bytearray()
    pos = 0
    while pos < len(records):
        version = records[pos + 1 : pos + 3]
        n = int.from_bytes(records[pos + 3 : pos + 5], "big")
        body = records[pos + 5 : pos + 5 + n]
        assert records[pos] == 22
        for i in range(0, len(body), size):
            frag = body[i : i + size]
            out += bytes([22]) + version + len(frag).to_bytes(2, "big") + frag
        pos += 5 + n
    return bytes(out)


async def finish_handshake(
    obj: ssl.SSLObject,
    inc: ssl.MemoryBIO,
    out: ssl.MemoryBIO,
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
) -> bytes:
    """Drive the memory-BIO client to the end of its handshake, send a GET, return the answer."""
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if data := out.read():
                w.write(data)
                await w.drain()
            got = await asyncio.wait_for(r.read(65536), 10)
            if not got:
                raise ConnectionError("closed during the handshake") from None
            inc.write(got)
    obj.write(b"GET / HTTP/1.0\r\n\r\n")
    w.write(out.read())
    await w.drain()
    answer = bytearray()
    while True:
        try:
            chunk = obj.read(65536)
            if not chunk:
                break
            answer += chunk
            continue
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if data := out.read():
            w.write(data)
            await w.drain()
        got = await asyncio.wait_for(r.read(65536), 10)
        if not got:
            break
        inc.write(got)
    if data := out.read():
        w.write(data)
        with contextlib.suppress(ConnectionError):
            await w.drain()
    return bytes(answer)


NGINX_TLS_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200 "sni=$ssl_server_name alpn=$ssl_alpn_protocol proto=$ssl_protocol\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def start_tls_nginx(tmp: Path, cert: Cert) -> Iterator[int]:
    """nginx (Debian's) serving HTTPS and HTTP/2 with the test certificate; yields its port. Its
    answer names the SNI, ALPN protocol and TLS version it negotiated."""
    need_binary("nginx")
    nginx = shutil.which("nginx")
    assert nginx is not None
    prefix = tmp / "nginx-tls"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_TLS_CONF.format(prefix=prefix, port=port, cert=cert.cert, key=cert.key))
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not start")
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
