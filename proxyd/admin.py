"""The admin HTTP API on the admin address, served by aiohttp on the daemon's own loop.

``/metrics`` (Prometheus text), ``/healthz`` (the process answers), ``/readyz`` (every listener
is bound and the daemon is not draining), ``/v1/listeners``, and the policy endpoints
``GET/POST/PUT /v1/policy`` and ``DELETE /v1/policy/NAME``; docs/admin-api.md is the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxyd.errors import PolicyError

if TYPE_CHECKING:
    from proxyd.server import Daemon

MAX_BODY = 8 << 20


class AdminServer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/listeners", self.listeners)
        app.router.add_get("/v1/policy", self.get_policy)
        app.router.add_post("/v1/policy", self.post_policy)
        app.router.add_put("/v1/policy", self.put_policy)
        app.router.add_delete("/v1/policy/{name}", self.delete_policy)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.site: web.TCPSite | None = None

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await self.site.start()

    def address(self) -> tuple[str, int]:
        server = self.runner.server
        assert self.site is not None and self.site._server is not None and server is not None
        sock = self.site._server.sockets[0]  # type: ignore[attr-defined]
        host, port = sock.getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.daemon.metrics.render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        d = self.daemon
        ready = d.ready and not d.stopping and all(lr.server is not None for lr in d.listeners.values())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def listeners(self, request: web.Request) -> web.Response:
        out: list[dict[str, Any]] = []
        for name, lr in sorted(self.daemon.listeners.items()):
            c = lr.config
            out.append(
                {
                    "name": name,
                    "address": c.address,
                    "bound": "{}:{}".format(*lr.bound_address()) if lr.server else None,
                    "l7proto": c.l7proto,
                    "upstream": "original-destination" if c.upstream is None else "{}:{}".format(*c.upstream),
                    "direction": c.direction,
                    "policy_mode": lr.mode,
                    "active_connections": len(lr.conns),
                }
            )
        return web.json_response({"listeners": out})

    async def get_policy(self, request: web.Request) -> web.Response:
        store = self.daemon.policy
        return web.json_response({"revision": store.revision, "documents": store.documents()})

    async def _import(self, request: web.Request, replace_all: bool) -> web.Response:
        text = await request.text()
        try:
            revision = self.daemon.policy.import_documents(text, "admin-api", replace_all=replace_all)
        except PolicyError as exc:
            self.daemon.metrics.policy_reloads_total.labels("failure").inc()
            return web.json_response({"errors": exc.problems}, status=400)
        self.daemon.policy_changed(revision)
        return web.json_response({"revision": revision})

    async def post_policy(self, request: web.Request) -> web.Response:
        return await self._import(request, replace_all=False)

    async def put_policy(self, request: web.Request) -> web.Response:
        return await self._import(request, replace_all=True)

    async def delete_policy(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            revision = self.daemon.policy.delete_imported(name)
        except KeyError:
            source = next((d["source"] for d in self.daemon.policy.documents() if d["name"] == name), None)
            why = f"no imported policy named {name!r}"
            if source:
                why = (f"policy {name!r} comes from the file {source} (policy.paths), not from an import: "
                       "edit or remove the file to change it")  # fmt: skip
            return web.json_response({"errors": [why]}, status=404)
        except PolicyError as exc:
            return web.json_response({"errors": exc.problems}, status=400)
        self.daemon.policy_changed(revision)
        return web.json_response({"revision": revision})
