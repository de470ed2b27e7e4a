"""A stand-in Kubernetes API server for the tests (no real one can run on these machines).

It serves what proxyd reads, the way the real one does: ``list`` answers carry the
``resourceVersion`` of the store, ``watch=true`` streams JSON lines of events after the given
``resourceVersion`` (``BOOKMARK`` events included), a version older than the compaction point
gets a ``410 Gone`` ERROR event, ``timeoutSeconds`` ends a stream cleanly. Tests drive it:
:meth:`put` / :meth:`delete` objects, :meth:`compact`, :meth:`drop_streams`, take it ``down``
(503 for everything), or make a resource ``missing`` (404, as for CRDs not installed). The
real client library talks to it over HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

from aiohttp import web

#: plural -> (apiVersion, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "pods": ("v1", "Pod", True),
    "namespaces": ("v1", "Namespace", False),
    "nodes": ("v1", "Node", False),
    "endpoints": ("v1", "Endpoints", True),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", True),
    "services": ("v1", "Service", True),
    "ciliumnetworkpolicies": ("cilium.io/v2", "CiliumNetworkPolicy", True),
    "ciliumclusterwidenetworkpolicies": ("cilium.io/v2", "CiliumClusterwideNetworkPolicy", False),
}


class FakeApiServer:
    def __init__(self) -> None:
        self.rv = 100
        self.store: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in RESOURCES}
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {p: [] for p in RESOURCES}
        self.compacted = 0
        self.down = False
        self.missing: set[str] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.token: str | None = None  # when set, requests need `Authorization: Bearer <token>`
        self._changed = asyncio.Condition()
        self._streams: set[web.StreamResponse] = set()
        self._drop = 0
        self._uids = itertools.count(1)
        self.runner: web.AppRunner | None = None
        self.url = ""

    # --- driving ---------------------------------------------------------------------------

    async def start(self, ssl_context: Any = None) -> None:
        """Serve on loopback: http, or https with ``ssl_context`` (which may require client certs)."""
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.drop_streams()
        if self.runner is not None:
            await self.runner.cleanup()

    def kubeconfig(self, path: Path, token: str = "t0ken", cluster: dict[str, Any] | None = None,
                   user: dict[str, Any] | None = None) -> Path:  # fmt: skip
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url, **(cluster or {})}}],
            "users": [{"name": "test", "user": {"token": token, **(user or {})}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))  # fmt: skip
        return path

    async def put(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update an object (its resourceVersion and uid are filled in)."""
        obj = json.loads(json.dumps(obj))
        md = obj.setdefault("metadata", {})
        key = (md.get("namespace", ""), md["name"])
        old = self.store[plural].get(key)
        md.setdefault("uid", old["metadata"]["uid"] if old else f"uid-{next(self._uids)}")
        self.rv += 1
        md["resourceVersion"] = str(self.rv)
        api_version, kind, _ = RESOURCES[plural]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        self.store[plural][key] = obj
        await self._event(plural, "MODIFIED" if old else "ADDED", obj)
        return obj

    async def delete(self, plural: str, name: str, namespace: str = "") -> None:
        obj = self.store[plural].pop((namespace, name))
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        await self._event(plural, "DELETED", obj)

    async def bookmark(self, plural: str) -> None:
        api_version, kind, _ = RESOURCES[plural]
        obj = {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(self.rv)}}
        await self._event(plural, "BOOKMARK", obj)

    def compact(self) -> None:
        """Forget history: a watch from any version seen so far gets 410 Gone."""
        self.compacted = self.rv + 1
        for h in self.history.values():
            h.clear()

    async def drop_streams(self) -> None:
        """End every open watch stream abruptly (as a restarting API server or LB does)."""
        self._drop += 1
        for resp in list(self._streams):
            transport = resp._req.transport if resp._req is not None else None  # type: ignore[attr-defined]
            if transport is not None:
                transport.abort()
        async with self._changed:
            self._changed.notify_all()

    async def _event(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        self.history[plural].append((self.rv, kind, obj))
        async with self._changed:
            self._changed.notify_all()

    # --- serving ---------------------------------------------------------------------------

    def _route(self, path: str) -> tuple[str, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            rest = parts[3:]
        else:
            return None
        if len(rest) == 3 and rest[0] == "namespaces":
            return rest[2], rest[1]
        if len(rest) == 1:
            return rest[0], None
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.path, query))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.down:
            return web.json_response(_status(503, "ServiceUnavailable", "down"), status=503)
        route = self._route(request.path)
        if route is None or route[0] not in RESOURCES or route[0] in self.missing:
            return web.json_response(_status(404, "NotFound", "the server could not find the resource"),
                                     status=404)  # fmt: skip
        plural, namespace = route
        want = self._filter(namespace, query.get("fieldSelector"))
        if query.get("watch") == "true":
            return await self._watch(request, plural, want, query)
        api_version, kind, _ = RESOURCES[plural]
        items = [o for o in self.store[plural].values() if want(o)]
        return web.json_response({
            "kind": f"{kind}List", "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self.rv)}, "items": items,
        })  # fmt: skip

    @staticmethod
    def _filter(namespace: str | None, fields: str | None) -> Any:
        name = None
        if fields and fields.startswith("metadata.name="):
            name = fields.split("=", 1)[1]

        def want(obj: dict[str, Any]) -> bool:
            md = obj["metadata"]
            if namespace is not None and md.get("namespace") != namespace:
                return False
            return name is None or md["name"] == name

        return want

    async def _watch(
        self, request: web.Request, plural: str, want: Any, query: dict[str, str]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        since = int(query.get("resourceVersion") or self.rv)
        if since < self.compacted:
            gone = _status(410, "Expired", f"too old resource version: {since}")
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return resp
        timeout = float(query.get("timeoutSeconds") or 3600)
        deadline = asyncio.get_running_loop().time() + timeout
        drop = self._drop
        self._streams.add(resp)
        try:
            while self._drop == drop:
                pending = [e for e in self.history[plural] if e[0] > since]
                for rv, kind, obj in pending:
                    since = max(since, rv)
                    if kind == "BOOKMARK" or want(obj):
                        await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._streams.discard(resp)
        return resp


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def pod(name: str, ip: str | None, *, ns: str = "default", labels: dict[str, str] | None = None,
        sa: str = "default", uid: str | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    md: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {}}
    if uid:
        md["uid"] = uid
    status: dict[str, Any] = {"phase": "Running"}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    spec = {"serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}], **extra}
    return {"metadata": md, "spec": spec, "status": status}
