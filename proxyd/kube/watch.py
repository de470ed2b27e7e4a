"""List and watch the Kubernetes API (the I/O half of the cluster source; docs/kubernetes.md).

Theory of operation. One :class:`Reflector` per resource kind runs forever: list (every
object, and the list's ``resourceVersion``), hand the whole list to its ``replace`` callback
at once, then watch from that ``resourceVersion``, handing each event to ``apply``. The
client library resumes a watch the server ended cleanly from the last version it saw. A
``410 Gone`` (the version was compacted away) lists again and replaces the state atomically:
the new list is read whole before anything is swapped, so objects that vanished meanwhile are
removed and nothing is ever half-applied. Any other failure (API server down, a dropped
connection, a 5xx) keeps the last state in force and retries the watch from the last version,
backing off from 0.5 s doubling up to 30 s. A 404 on the list (Cilium's CRDs not installed) is
a warning, and the list is retried on the same backoff.

:class:`ClusterSource` owns the client and one reflector per kind; ``synced`` is set after
every reflector's first list was applied (the daemon binds its listeners then), and
``all_watching`` is what ``proxyd_kubernetes_synced`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from typing import Any, Final

from proxyd.config import KubernetesConfig

BACKOFF_START: Final = 0.5
BACKOFF_MAX: Final = 30.0
#: Ask the server to end each watch after this long (it is resumed from the last version):
#: a half-open connection the server forgot is noticed within this time.
WATCH_TIMEOUT_S: Final = 300

#: How the reflectors wait between attempts (a test records the backoff through it).
sleep = asyncio.sleep

Replace = Callable[[list[Any]], None]
Apply = Callable[[str, Any], None]
Log = Callable[..., None]


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an API error carries (a watch's ERROR event included), or None."""
    status = getattr(exc, "status", None)
    code = getattr(status, "code", None)
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


class Reflector:
    """List then watch one kind of object, forever; see the module docstring."""

    def __init__(
        self,
        client: Any,
        resource: Any,
        replace: Replace,
        apply: Apply,
        *,
        on_state: Callable[[], None],
        log_warning: Log,
        namespace: str | None = None,
        fields: dict[str, str] | None = None,
        name: str = "",
        optional: bool = False,
    ) -> None:
        self.client = client
        self.resource = resource
        self.replace = replace
        self.apply = apply
        self.namespace = namespace
        self.fields = fields
        self.name = name or resource.__name__
        #: A kind that may not be served (Cilium's CRDs): a 404 is an empty list, retried.
        self.optional = optional
        self.on_state = on_state
        self.log_warning = log_warning
        self.resource_version: str | None = None
        self.listed = False  # the first list was applied
        self.watching = False  # a list or watch succeeded since the last failure
        self.last_event = 0.0  # wall-clock time of the last list or event applied
        self.lists = 0  # lists applied (1 + relists), for tests and logs
        self.path: str | None = None  # the URL path it lists and watches (set by ClusterSource)
        self.progress = 0  # lists, answered watches and events so far (a success resets backoff)

    def _kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.namespace is not None:
            kw["namespace"] = self.namespace
        if self.fields:
            kw["fields"] = self.fields
        return kw

    async def run(self) -> None:
        backoff = BACKOFF_START
        while True:
            progress = self.progress
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.progress != progress:  # it worked for a while: start the backoff over
                    backoff = BACKOFF_START
                status = status_of(exc)
                self._set_watching(False)
                if status == 410:
                    self.resource_version = None  # relist now: the state is still in force
                    continue
                what = f"HTTP {status}" if status is not None else f"{type(exc).__name__}: {exc}"
                if status == 404 and self.optional:
                    self.log_warning("kubernetes: resource not served (CRD not installed?); "
                                     "none in force, retrying",
                                     resource=self.name, error=what, retry_s=round(backoff, 2))  # fmt: skip
                    self.replace([])
                    self.resource_version = None
                    self.listed = True
                    self._set_watching(True)  # what is in force (nothing) is what the API has
                else:
                    self.log_warning("kubernetes: list/watch failed; last state kept in force",
                                     resource=self.name, error=what, retry_s=round(backoff, 2))  # fmt: skip
                await sleep(backoff * random.uniform(0.8, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _list(self) -> None:
        it = self.client.list(self.resource, **self._kw())
        items = [obj async for obj in it]
        rv = it.resourceVersion
        self.replace(items)  # the whole new list at once: a relist swaps atomically
        self.resource_version = rv
        self.lists += 1
        self.progress += 1
        self.listed = True
        self.last_event = time.time()
        self._set_watching(True)

    async def _watch(self) -> None:
        stream = self.client.watch(
            self.resource, resource_version=self.resource_version, server_timeout=WATCH_TIMEOUT_S,
            **self._kw(),
        )  # fmt: skip
        async for event, obj in stream:
            rv = getattr(getattr(obj, "metadata", None), "resourceVersion", None)
            if event != "BOOKMARK":
                self.apply(event, obj)
            if rv:
                self.resource_version = rv
            self.progress += 1
            self.last_event = time.time()
            self._set_watching(True)

    def mark_up(self) -> None:
        if self.listed and self.resource_version is not None:
            self.progress += 1
            self._set_watching(True)

    def _set_watching(self, on: bool) -> None:
        if on != self.watching:
            self.watching = on
            self.on_state()


def _path_of(client: Any, r: Reflector) -> str | None:
    """The URL path lightkube lists ``r``'s resource at (None if that cannot be asked)."""
    try:
        br = client._client.prepare_request("list", res=r.resource, namespace=r.namespace, watch=True)
        url = str(br.url)
    except Exception:
        return None
    return url if url.startswith("/") else "/" + url


def make_client(kc: KubernetesConfig) -> Any:
    """A lightkube AsyncClient from the kubeconfig file, or in-cluster (service account)."""
    from lightkube import AsyncClient, KubeConfig

    if kc.kubeconfig is not None:
        config = KubeConfig.from_file(kc.kubeconfig)
    else:
        config = KubeConfig.from_service_account()
    return AsyncClient(config=config, trust_env=False)


def node_name(kc: KubernetesConfig) -> str | None:
    return kc.node_name or os.environ.get("NODE_NAME") or None


class ClusterSource:
    """The reflectors of one cluster, feeding callbacks the daemon gives (state, policies)."""

    def __init__(self, client: Any, log_warning: Log) -> None:
        self.client = client
        self.log_warning = log_warning
        self.reflectors: list[Reflector] = []
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_state: Callable[[], None] = lambda: None

    def add(self, resource: Any, replace: Replace, apply: Apply, **kw: Any) -> Reflector:
        r = Reflector(self.client, resource, replace, apply, on_state=self._state_changed,
                      log_warning=self.log_warning, **kw)  # fmt: skip
        self.reflectors.append(r)
        return r

    def _watch_answered(self, response: Any) -> None:
        """A watch request got its 200: that watch is up even before its first event."""
        request = response.request
        if response.status_code != 200 or request.url.params.get("watch") != "true":
            return
        for r in self.reflectors:
            if r.path == request.url.path:
                r.mark_up()

    def start(self) -> None:
        # lightkube hands the watch's events over, not the moment its request is answered;
        # an httpx response hook sees that, so proxyd_kubernetes_synced is 1 again as soon as
        # a watch is re-established after an outage, not at the next event.
        http = getattr(getattr(self.client, "_client", None), "_client", None)
        hooks = getattr(http, "event_hooks", None)
        if isinstance(hooks, dict):
            hooks.setdefault("response", []).append(self._on_response)
            http.event_hooks = hooks  # type: ignore[union-attr]
        for r in self.reflectors:
            r.path = _path_of(self.client, r)
        if not self.reflectors:  # identities: false and policies: false: nothing to wait for
            self.synced.set()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(r.run()) for r in self.reflectors]

    async def _on_response(self, response: Any) -> None:
        self._watch_answered(response)

    @property
    def all_watching(self) -> bool:
        return all(r.watching for r in self.reflectors)

    @property
    def last_event(self) -> float:
        return max((r.last_event for r in self.reflectors), default=0.0)

    def _state_changed(self) -> None:
        if not self.synced.is_set() and all(r.listed for r in self.reflectors):
            self.synced.set()
        self.on_state()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        aclose = getattr(self.client, "aclose", None)
        if aclose is not None:
            await aclose()
