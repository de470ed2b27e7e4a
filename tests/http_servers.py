"""Real HTTP servers for the http parser's end-to-end tests and benchmark: nginx and an aiohttp app.

nginx (the Debian package) runs in the foreground, one process, with its own prefix, temp
directories and a generated config on a free loopback port; its access log records every
request it saw (request line, length, and the headers the tests look for), so a test can tell
that a denied or smuggled request never reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import WSMsgType, web
from needs import free_port, need_binary, serving

NGINX_CONF = """
daemon off;
master_process {master};
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    log_format seen '$request|$request_length|$http_x_audit|$http_transfer_encoding|$content_length';
    access_log {access_log};
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        client_max_body_size 0;
        location /dav/ {{ dav_methods PUT; create_full_put_path on; }}
        location = /echo {{ return 200 "echo $request_method $request_uri\\n"; }}
        location = /empty {{ return 204; }}
        location /api/ {{ return 200 "api $uri\n"; }}
        location = /bighead {{ {bighead} return 200 "big\n"; }}
    }}
}}
"""


@dataclass
class Nginx:
    port: int
    prefix: Path

    @property
    def log(self) -> Path:
        return self.prefix / "access.log"

    def seen(self) -> list[str]:
        """Access-log lines so far (``request-line|length|x-audit|transfer-encoding|content-length``)."""
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []


@contextlib.contextmanager
def start_nginx(tmp: Path, *, workers: int = 1, access_log: bool = True) -> Iterator[Nginx]:
    need_binary("nginx")
    nginx = shutil.which("nginx")
    assert nginx is not None
    prefix = tmp / "nginx"
    (prefix / "www" / "public").mkdir(parents=True)
    (prefix / "www" / "public" / "a.txt").write_text("public a\n")
    (prefix / "www" / "secret.txt").write_text("secret\n")
    (prefix / "www" / "index.html").write_text("index\n")
    (prefix / "www" / "public" / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            prefix=prefix,
            port=port,
            master="on" if workers > 1 else "off",
            workers=workers,
            access_log=f"{prefix}/access.log seen" if access_log else "off",
            bighead=" ".join(f'add_header X-Big-{i} "{"v" * 3000}";' for i in range(40)),  # ~120 KiB
        )
    )
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def why() -> str:
        return proc.stderr.read().decode() if proc.stderr else ""

    with serving(proc, port, "nginx", why):
        yield Nginx(port, prefix)


# --- the aiohttp app ----------------------------------------------------------------------------


async def _hash(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        h.update(chunk)
        n += len(chunk)
    return web.Response(text=f"{n} {h.hexdigest()}")


async def _headers(request: web.Request) -> web.Response:
    return web.json_response([[k, v] for k, v in request.headers.items()])


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str("echo " + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data[::-1])
    return ws


def make_app(seen: list[str]) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        seen.append(f"{request.method} {request.path_qs}")
        return await handler(request)

    app = web.Application(middlewares=[record], client_max_size=1 << 30)
    app.router.add_post("/hash", _hash)
    app.router.add_put("/hash", _hash)
    app.router.add_post("/other", _hash)
    app.router.add_get("/headers", _headers)
    app.router.add_get("/ws", _ws)
    return app


@contextlib.asynccontextmanager
async def start_app() -> Iterator[tuple[int, list[str]]]:  # type: ignore[misc]
    seen: list[str] = []
    runner = web.AppRunner(make_app(seen), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield port, seen
    finally:
        await runner.cleanup()
