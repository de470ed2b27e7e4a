"""The admin HTTP API on the admin address and socket, served by aiohttp on the daemon's loop.

``/metrics`` (Prometheus text), ``/healthz`` (the process answers), ``/readyz`` (every listener
is bound and the daemon is not draining), ``/v1/listeners``, and the policy endpoints
``GET/POST/PUT /v1/policy`` and ``DELETE /v1/policy/NAME``; docs/admin-api.md is the contract.

Access control (:func:`_guard`), checked before any handler runs:

- Reads (GET, HEAD) are open on both the TCP address and the unix socket.
- A change (POST, PUT, DELETE) is allowed over the unix socket ``admin.socket`` (mode 0600:
  the file's permissions are the access control), or over TCP with ``Authorization: Bearer``
  and the token of ``admin.token_file``. With neither configured, changes answer 403 saying
  how to enable them; a wrong or missing token answers 401.
- A change must not carry ``Origin`` (browsers send it on cross-site requests; no proxyd
  client does), and POST/PUT must be ``application/json`` or ``application/yaml`` (a form or
  ``text/plain`` body is what a cross-site "simple" request can send without a preflight).
- Bodies are capped at :data:`MAX_BODY`; policy text is parsed on a worker thread.

Connections are bounded (:class:`_Gate`, both sites): the admin API's share of the descriptor
reserve (fdbudget.py) is all it may hold, so a connection past it is answered 503 and closed at
once, and a connection with no request in progress is closed after ``admin.idle_timeout``
(aiohttp's keep-alive timer, which runs from the accept): idle scrapers or a port scan cannot
pin the descriptors policy reloads and log reopening need, nor keep ``/healthz`` unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from aiohttp import web

from proxyd.config import ADMIN_IDLE_TIMEOUT, Config, ListenerConfig
from proxyd.dataside import Log
from proxyd.errors import ConfigError, PolicyError
from proxyd.policy.store import Change, PolicyStore

MAX_BODY = 2 << 20
CHANGE_TYPES = ("application/json", "application/yaml", "application/x-yaml")
READ_METHODS = ("GET", "HEAD")
BACKLOG = 128  # the listen queue, as aiohttp's own sites have it

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: What a connection past the limit is told before it is closed.
TOO_MANY = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 28\r\n\r\ntoo many admin connections\r\n")  # fmt: skip


#: Who asked for a change, for the daemon's log: ``socket``, ``token`` (TCP with the bearer
#: token), or ``tcp without token`` / ``tcp with a wrong token`` for a refused one.
VIA = web.RequestKey("via", str)


def _refuse(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"errors": [message]}, status=status, headers=headers or None)


def _errors(response: web.Response) -> list[str]:
    body = response.body
    data = json.loads(bytes(body)) if isinstance(body, (bytes, bytearray)) else {}
    return list(data.get("errors", []))


def _query_address(query: Mapping[str, str], key: str, errors: list[str]) -> tuple[str, int] | None:
    """``src`` (IP, IP:PORT, [IPv6]:PORT) or ``dst`` (IP:PORT, or IP with ``port=``) of /v1/explain."""
    from proxyd.explainer import parse_dst, parse_src

    value = query.get(key, "")
    if not value:
        errors.append(f"{key}: required")
        return None
    try:
        if key == "src":
            return parse_src(value)
        if "port" in query:
            host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            value = f"[{host}]:{query['port']}" if ":" in host else f"{host}:{query['port']}"
        return parse_dst(value)
    except ValueError as exc:
        forms = "IP, IP:PORT or [IPv6]:PORT" if key == "src" else "IP:PORT, [IPv6]:PORT, or IP and port="
        errors.append(f"{key}: {exc} ({forms})")
        return None


def _peer(request: web.Request) -> dict[str, str]:
    """The client's address over TCP (the socket's peer has none worth logging)."""
    remote = request.remote
    return {"peer": remote} if remote and not _via_socket(request) else {}


def read_token(path: Path) -> bytes:
    """The bearer token in ``path``. Raises ConfigError naming admin.token_file."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:0: admin.token_file: cannot read the token: {exc}"]) from exc
    if not token:
        raise ConfigError([f"{path}:0: admin.token_file: the file is empty"])
    return token.encode()


def _why(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a stale socket of an earlier run


def _via_socket(request: web.Request) -> bool:
    transport = request.transport
    if transport is None:
        return False
    return isinstance(transport.get_extra_info("sockname"), str)


class Control(Protocol):
    """What the admin API asks of the control side (:class:`proxyd.server.Daemon`, and
    :class:`proxyd.workers.ControlDaemon` for ``workers: N``). Nothing else is read or changed:
    the API never walks the daemon's listeners or bumps its counters itself."""

    @property
    def config(self) -> Config: ...

    @property
    def log(self) -> Log: ...

    @property
    def policy(self) -> PolicyStore: ...

    def is_ready(self) -> bool:
        """``/readyz``: every listener bound, not draining."""
        ...

    async def render_metrics(self) -> bytes:
        """The ``/metrics`` body."""
        ...

    async def listener_rows(self) -> list[dict[str, Any]]:
        """``/v1/listeners``: one row per listener, in name order."""
        ...

    def live_listeners(self) -> list[ListenerConfig]:
        """The listeners in force, with the port the kernel picked where the config says 0."""
        ...

    def identity_view(self) -> Any:
        """The identities in force and where each address's labels came from."""
        ...

    async def change_policy(self, build: Callable[[], Change]) -> int:
        """Build a change off the event loop and put it in force (one at a time); its revision."""
        ...

    def policy_changed(self, revision: int) -> None:
        """A change through the API is in force: counted as a successful reload."""
        ...

    def policy_change_failed(self) -> None:
        """A change through the API was rejected: counted as a failed reload."""
        ...

    def admin_connection_refused(self, limit: int) -> None:
        """A connection was closed at accept, ``limit`` being open: counted, logged at a
        bounded rate."""
        ...


class _Counted(asyncio.Protocol):
    """A connection within the limit: aiohttp's handler, and its slot given back on close."""

    __slots__ = ("gate", "inner", "lost")

    def __init__(self, gate: _Gate, inner: asyncio.Protocol) -> None:
        self.gate = gate
        self.inner = inner
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.gate.open -= 1
        self.inner.connection_lost(exc)

    def __del__(self) -> None:
        # The loop asks for the protocol before it takes the socket (uvloop: before uv_accept);
        # should that fail, the protocol is dropped unconnected and never hears connection_lost.
        if not self.lost:
            self.gate.open -= 1


class _Refused(asyncio.Protocol):
    """A connection past the limit: told so and closed before it can hold its descriptor."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        stream.write(TOO_MANY)
        stream.close()


class _Gate:
    """The protocol factory both sites listen with: at most ``limit`` connections reach
    aiohttp's server (counted from the factory call, so a burst of accepts is bounded too)."""

    def __init__(self, daemon: Control, limit: int) -> None:
        self.daemon = daemon
        self.limit = limit
        self.open = 0
        self.server: Callable[[], asyncio.Protocol] | None = None  # aiohttp's, once set up

    def __call__(self) -> asyncio.Protocol:
        assert self.server is not None
        if self.open >= self.limit:
            self.daemon.admin_connection_refused(self.limit)
            return _Refused()
        self.open += 1
        return _Counted(self, self.server())


class _Site(web.BaseSite):
    """An aiohttp site listening through the gate: ``listen`` creates the server (TCP or unix)."""

    __slots__ = ("_listen", "_name")

    def __init__(self, runner: web.BaseRunner, name: str,
                 listen: Callable[[], Awaitable[asyncio.AbstractServer]]) -> None:  # fmt: skip
        super().__init__(runner)
        self._name = name
        self._listen = listen

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        self._server = await self._listen()


class AdminServer:
    def __init__(self, daemon: Control, max_connections: int) -> None:
        self.daemon = daemon
        cfg = daemon.config.admin
        self.socket_path: Path | None = cfg.socket if cfg is not None else None
        self.token: bytes | None = None
        if cfg is not None and cfg.token_file is not None:
            self.token = read_token(cfg.token_file)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/listeners", self.listeners)
        app.router.add_get("/v1/policy", self.get_policy)
        app.router.add_get("/v1/explain", self.explain)
        app.router.add_get("/v1/identities", self.get_identities)
        app.router.add_post("/v1/policy", self.post_policy)
        app.router.add_put("/v1/policy", self.put_policy)
        app.router.add_delete("/v1/policy/{name}", self.delete_policy)
        idle = cfg.idle_timeout if cfg is not None else ADMIN_IDLE_TIMEOUT
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=idle)
        self.gate = _Gate(daemon, max_connections)
        self.site: _Site | None = None
        self.unix_site: _Site | None = None

    async def start(self, host: str | None, port: int) -> None:
        await self.runner.setup()
        self.gate.server = self.runner.server
        loop = asyncio.get_running_loop()
        if host is not None:
            self.site = _Site(self.runner, f"http://{host}:{port}", lambda: loop.create_server(
                self.gate, host, port, backlog=BACKLOG, reuse_address=True))  # fmt: skip
            try:
                await self.site.start()
            except OSError as exc:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise OSError(exc.errno, f"admin.address: cannot bind {where}: {_why(exc)}") from exc
        if self.socket_path is not None:
            try:
                await self._start_socket(self.socket_path)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"admin.socket: cannot bind {self.socket_path}: {_why(exc)}"
                ) from exc

    async def _start_socket(self, path: Path) -> None:
        _prepare_socket_path(path)
        old = os.umask(0o177)  # created 0600: never briefly open to others
        try:
            loop = asyncio.get_running_loop()
            self.unix_site = _Site(
                self.runner,
                f"http://unix:{path}:",
                lambda: loop.create_unix_server(self.gate, str(path), backlog=BACKLOG),
            )
            await self.unix_site.start()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    @web.middleware
    async def _guard(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.method in READ_METHODS:
            return await handler(request)
        refused = self._refusal(request)
        if refused is not None:
            self._log_rejected(request, refused.status, _errors(refused))
            return refused
        return await handler(request)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answer refusing a change before any handler runs, or None; sets ``via``."""
        via_socket = _via_socket(request)
        request[VIA] = "socket" if via_socket else "tcp"
        if "Origin" in request.headers:
            return _refuse(403, "changes refused: the request has an Origin header (a browser's "
                           "cross-site request); proxyd clients never send one")  # fmt: skip
        if not via_socket:
            auth = request.headers.get("Authorization", "")
            if self.token is None:
                how = (f"use the unix socket {self.socket_path} (proxyd policy --config uses it)"
                       if self.socket_path is not None else
                       "set admin.socket (a unix socket for local changes) or admin.token_file "
                       "(a bearer token for changes over the TCP address) in the config")  # fmt: skip
                return _refuse(403, f"changes over the TCP admin address are disabled: {how}")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                request[VIA] = "tcp with a wrong token" if auth else "tcp without token"
                return _refuse(401, "changes need Authorization: Bearer <the token in admin.token_file> "
                               "(proxyd policy --token-file FILE)",
                               **{"WWW-Authenticate": "Bearer"})  # fmt: skip
            request[VIA] = "token"
        if request.method in ("POST", "PUT"):
            ctype = request.content_type
            if ctype not in CHANGE_TYPES:
                return _refuse(415, f"Content-Type must be application/json or application/yaml, "
                               f"not {ctype or 'missing'}")  # fmt: skip
        return None

    # --- the daemon's log: one line per change, accepted or not -------------------------------

    def _log_changed(self, request: web.Request, change: Change) -> None:
        self.daemon.log.info(
            "policy changed through the admin API",
            via=request.get(VIA, "?"),
            method=request.method,
            path=request.path,
            revision=change.policy.revision,
            added=list(change.added),
            replaced=list(change.replaced),
            deleted=list(change.deleted),
            **_peer(request),
        )

    def _log_rejected(self, request: web.Request, status: int, errors: list[str]) -> None:
        self.daemon.log.warning(
            "policy change through the admin API rejected",
            via=request.get(VIA, "?"),
            method=request.method,
            path=request.path,
            status=status,
            errors=errors,
            revision=self.daemon.policy.revision,
            **_peer(request),
        )

    def _rejected(self, request: web.Request, status: int, errors: list[str]) -> web.Response:
        self._log_rejected(request, status, errors)
        return web.json_response({"errors": errors}, status=status)

    def address(self) -> tuple[str, int]:
        server = self.runner.server
        assert self.site is not None and self.site._server is not None and server is not None
        sock = self.site._server.sockets[0]  # type: ignore[attr-defined]
        host, port = sock.getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.daemon.render_metrics()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.daemon.is_ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def listeners(self, request: web.Request) -> web.Response:
        return web.json_response({"listeners": await self.daemon.listener_rows()})

    async def get_policy(self, request: web.Request) -> web.Response:
        store = self.daemon.policy
        return web.json_response({"revision": store.revision, "documents": store.documents()})

    async def get_identities(self, request: web.Request) -> web.Response:
        """Every identity in force (``?ip=ADDR``: that address's), with where its labels came from."""
        view = self.daemon.identity_view()
        ip = request.query.get("ip")
        if ip is None:
            return web.json_response({"identities": view.entries()})
        try:
            labels = view.labels_for(ip)
        except ValueError:
            return web.json_response({"errors": [f"ip: {ip!r} is not an IP address"]}, status=400)
        return web.json_response({"ip": ip, "labels": dict(labels), "origin": view.origin_for(ip)})

    async def explain(self, request: web.Request) -> web.Response:
        """``proxyd explain`` against what is in force: live listeners, identities, and policy
        (files and imports) at the current revision."""
        from proxyd.explainer import ExplainRefused, explain_connection

        query, d = request.query, self.daemon
        errors: list[str] = []
        src = _query_address(query, "src", errors)
        dst = _query_address(query, "dst", errors)
        if errors or src is None or dst is None:
            return web.json_response({"errors": errors}, status=400)
        listeners = d.live_listeners()
        try:
            answer = explain_connection(listeners, d.policy, d.identity_view(), src, dst,
                                        listener=query.get("listener") or None, sni=query.get("sni"),
                                        default_mode=d.config.policy.mode)  # fmt: skip
        except ExplainRefused as exc:
            return web.json_response({"errors": [str(exc)]}, status=400)
        data = answer.as_json()
        data["config"] = str(d.config.source) if d.config.source is not None else None
        return web.json_response(data)

    async def _change(self, request: web.Request, build: Callable[[], Change]) -> tuple[int, Change]:
        """Run ``build`` through the daemon (one change at a time); returns the revision and the
        change it put in force."""
        built: list[Change] = []

        def keep() -> Change:
            change = build()
            built.append(change)
            return change

        revision = await self.daemon.change_policy(keep)
        return revision, built[0]

    async def _import(self, request: web.Request, replace_all: bool) -> web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._log_rejected(request, 413, [f"the body is over {MAX_BODY} bytes"])
            raise
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            why = f"admin-api:0: the body is not UTF-8 text (byte {exc.start})"
            return self._rejected(request, 400, [why])
        store = self.daemon.policy
        try:
            revision, change = await self._change(
                request, lambda: store.build_import(text, "admin-api", replace_all)
            )
        except PolicyError as exc:
            self.daemon.policy_change_failed()
            return self._rejected(request, 400, exc.problems)
        except OSError as exc:  # policy.state_dir not writable: nothing changed
            self.daemon.policy_change_failed()
            where = store.state_dir or "policy.state_dir"
            return self._rejected(request, 500, [f"{where}: cannot keep the imported policy: "
                                                 f"{exc.strerror or exc}"])  # fmt: skip
        self.daemon.policy_changed(revision)
        self._log_changed(request, change)
        return web.json_response({"revision": revision})

    async def post_policy(self, request: web.Request) -> web.Response:
        return await self._import(request, replace_all=False)

    async def put_policy(self, request: web.Request) -> web.Response:
        return await self._import(request, replace_all=True)

    async def delete_policy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        store = self.daemon.policy
        try:
            revision, change = await self._change(request, lambda: store.build_delete(name))
        except KeyError:
            source = next((d["source"] for d in self.daemon.policy.documents() if d["name"] == name), None)
            why = f"no imported policy named {name!r}"
            if source:
                why = (f"policy {name!r} comes from the file {source} (policy.paths), not from an import: "
                       "edit or remove the file to change it")  # fmt: skip
            return self._rejected(request, 404, [why])
        except PolicyError as exc:
            return self._rejected(request, 400, exc.problems)
        except OSError as exc:
            where = store.state_dir or "policy.state_dir"
            return self._rejected(request, 500, [f"{where}: cannot keep the imported policy: "
                                                 f"{exc.strerror or exc}"])  # fmt: skip
        self.daemon.policy_changed(revision)
        self._log_changed(request, change)
        return web.json_response({"revision": revision})
