"""The daemon (the control side, docs/architecture.md): its listeners, policy, reload, shutdown.

Stages, as in uvicorn's server: :meth:`Daemon.start` (load policy, bind every listener, start
the admin server, then report ready), :meth:`Daemon.serve` (signal handlers installed and
restored in one place; SIGHUP reloads, SIGUSR1 reopens the access log, SIGTERM/SIGINT stop) and
:meth:`Daemon.stop` (stop accepting, let open connections finish up to ``drain_timeout``, then
close the rest).

The listeners, their accept path and admission are in :mod:`proxyd.listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import itertools
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from proxyd import sdnotify
from proxyd.accesslog import AccessLog, LineWriter, make_logger
from proxyd.config import Config, Limits, ListenerConfig, load_config
from proxyd.errors import ConfigError, PolicyError
from proxyd.fdbudget import FDS_PER_CONNECTION, FdBudget, nofile_limit, open_descriptors
from proxyd.listener import CAREFUL, FAST, PAUSED, ListenerRuntime
from proxyd.metrics import Metrics
from proxyd.policy.identity import IdentityMap
from proxyd.policy.store import Change, PolicyStore
from proxyd.policywatch import PolicyWatcher, Rescan
from proxyd.registry import Registry

T = TypeVar("T")
LABELS_CACHE_SIZE = 65536
ACCESS_LOG_CHECK = 1.0  # seconds between looks at the access log's sink
ACCESS_LOG_REPORT_INTERVAL = 10.0  # at most one "access log cannot be written" line per this long
ACCEPT_PAUSE = 0.5  # seconds between checks while accepting is paused for file descriptors
FD_RECOUNT_INTERVAL = 5.0  # off the fast path, descriptors really open are listed this often
#: At most one "out of file descriptors" line, and one "admin API: too many connections" line,
#: per this many seconds.
FD_LOG_INTERVAL = 10.0
FD_BASE = 64  # about what is open before any connection: listeners, admin, logs, the event loop


class Daemon:
    """One proxyd process's worth of state; tests run several in one event loop."""

    #: Bind listeners with SO_REUSEPORT: set by the worker processes of ``workers: N``.
    reuse_port = False

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
        self.registry = registry or Registry.load()
        self.metrics = Metrics()
        self.access_log = AccessLog(config.access_log.path, config.access_log.requests, self.metrics)
        self.log = make_logger(LineWriter("stderr"))
        self.identities = IdentityMap.from_entries(config.identities)
        self._labels_cache: dict[str, Mapping[str, str]] = {}
        # Parsed partly in a forked child only in the daemon process (run_daemon), whose loop
        # serves nothing yet: not in a test process running daemons beside other work.
        self.policy = PolicyStore(self.registry, config.policy.paths, config.policy.state_dir,
                                  kubernetes=config.kubernetes is not None, split=_freeze[0])  # fmt: skip
        self.policy.endpoint_labels = self.identities.label_sets()
        self.last_change: Change | None = None
        self._watch_task: asyncio.Task[Any] | None = None
        self._watched: tuple[tuple[Path, bool], ...] = ()
        self.metrics.policy_revision.set(self.policy.revision)
        self.metrics.connections_max.set(config.limits.max_connections)
        self.listeners: dict[str, ListenerRuntime] = {}
        self.conn_ids = itertools.count(1)
        self.ready = False
        self.stopping = False
        self._admin: Any = None
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set when draining and the last connection has ended
        self._retired: set[ListenerRuntime] = set()  # removed on reload, connections still open
        #: Local -> remote address of upstream sockets while they connect: an accepted
        #: connection from one of them, whose original destination is that remote, is our own
        #: connection redirected back to us (the 4-tuple, not the port alone, identifies it).
        self.upstream_locals: dict[tuple[str, int], tuple[str, int]] = {}
        #: Whether a listener without a fixed upstream is (or is about to be) bound: only then
        #: do upstream connects register their local address in upstream_locals.
        self.transparent_listeners = _any_transparent(config)
        #: listener -> [bytes in, bytes out] of its ended connections (see metrics.py).
        self._closed_bytes: dict[str, list[int]] = {}
        self.metrics.bytes_source = self._bytes_totals
        self._tasks: set[asyncio.Task[Any]] = set()
        self._policy_lock = asyncio.Lock()
        #: Descriptors: the data path's count and the marks where accepting pauses and resumes
        #: (set at start, from RLIMIT_NOFILE and what is open then).
        self.fds = FdBudget(nofile_limit(), 0, [])
        self.accept_mode = FAST  # how every listener accepts (ListenerRuntime.set_accepting)
        self._fd_hard = False  # paused for EMFILE/ENFILE, not by the count: resume on a timer
        self._fd_check_soon = False
        self._fd_ticking = False  # _fd_tick is scheduled
        self._fd_recount_at = 0.0
        self._fd_log_at = -FD_LOG_INTERVAL
        self._fd_events = 0  # pauses and EMFILE events since the last log line
        self._admin_log_at = -FD_LOG_INTERVAL
        self._admin_refused = 0  # admin connections refused since the last log line
        #: The cluster source (docs/kubernetes.md), made at start: its client needs a loop.
        self.kube: Any = None

    # --- what the data side reads (proxyd.dataside.DataHost) ------------------------------

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def upstream_mark(self) -> int | None:
        return self.config.upstream_mark

    @property
    def policy_mode(self) -> str:
        return self.config.policy.mode

    # --- queries ---------------------------------------------------------------------------

    def active_connections(self) -> int:
        return sum(len(lr.conns) for lr in self.listeners.values()) + sum(
            len(lr.conns) for lr in self._retired
        )

    def admitted_connections(self) -> int:
        """Connections counted against ``limits.max_connections`` (a worker of ``workers: N``
        adds the other workers')."""
        return self.active_connections()

    def connection_ended(self) -> None:
        """A connection ended (a worker of ``workers: N`` publishes its count)."""

    def labels_for(self, ip: str) -> Mapping[str, str]:
        """Identity labels of an address, memoised: the same few peers connect again and again."""
        labels = self._labels_cache.get(ip)
        if labels is None:
            if len(self._labels_cache) >= LABELS_CACHE_SIZE:
                self._labels_cache.clear()
            cluster = self.kube.identity(ip) if self.kube is not None else None
            if cluster is not None:  # an address the cluster knows wins over a static prefix
                labels = cluster.labels
            else:
                try:
                    labels = self.identities.labels_for(ip)
                except ValueError:  # a fixed upstream given by name: no address, no labels
                    labels = {}
            self._labels_cache[ip] = labels
        return labels

    def identity_view(self) -> Any:
        """The identities in force, with where each address's labels came from (explain, admin)."""
        from proxyd.kube.cluster import LayeredIdentities

        return LayeredIdentities(self.kube, self.identities)

    def add_closed_bytes(self, listener: str, bytes_in: int, bytes_out: int) -> None:
        totals = self._closed_bytes.get(listener)
        if totals is None:
            totals = self._closed_bytes[listener] = [0, 0]
        totals[0] += bytes_in
        totals[1] += bytes_out

    def _bytes_totals(self) -> list[tuple[str, int, int]]:
        totals = {name: list(v) for name, v in self._closed_bytes.items()}
        for lr in [*self.listeners.values(), *self._retired]:
            t = totals.setdefault(lr.config.name, [0, 0])
            for conn in lr.conns:
                t[0] += conn.bytes_in
                t[1] += conn.bytes_out
        return [(name, t[0], t[1]) for name, t in sorted(totals.items())]

    # --- what the admin API asks (proxyd.admin.Control) ---------------------------------------

    def is_ready(self) -> bool:
        bound = all(lr.server is not None for lr in self.listeners.values())
        return self.ready and not self.stopping and bound

    async def listener_rows(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, lr in sorted(self.listeners.items()):
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
        return out

    def live_listeners(self) -> list[ListenerConfig]:
        listeners = []
        for lc in self.config.listeners:
            lr = self.listeners.get(lc.name)
            if lc.port == 0 and lr is not None and lr.lsock is not None:
                lc = replace(lc, port=lr.bound_address()[1])  # the port the kernel picked
            listeners.append(lc)
        return listeners

    def policy_change_failed(self) -> None:
        self.metrics.policy_reloads_total.labels("failure").inc()

    # --- what the data side tells (proxyd.dataside.DataHost) -------------------------------

    def listener_idle(self, lr: ListenerRuntime) -> None:
        """A listener's last connection ended: retire it if removed; end a drain if all idle."""
        self._retired.discard(lr)
        if self.stopping and not self.active_connections():
            self._idle.set()

    # --- file descriptors (fdbudget.py) ---------------------------------------------------

    def fds_check_soon(self) -> None:
        """Check the mode from a callback of its own (the caller may be inside the event
        loop's accept)."""
        if not self._fd_check_soon:
            self._fd_check_soon = True
            asyncio.get_running_loop().call_soon(self._fds_check_now)

    def _fds_check_now(self) -> None:
        self._fd_check_soon = False
        self.fds_check()

    def fds_check(self, exc: OSError | None = None) -> None:
        """Put every listener in the mode the count calls for (fdbudget.py, the marks)."""
        fds, mode = self.fds, self.accept_mode
        n = fds.in_use()
        if self._fd_hard or n + FDS_PER_CONNECTION > fds.high or (mode == PAUSED and n > fds.low):
            new = PAUSED
        elif n >= fds.fast_high or (mode != FAST and n > fds.fast_low):
            new = CAREFUL
        else:
            new = FAST
        if new == mode:
            return
        self.accept_mode = new
        for lr in self.listeners.values():
            lr.set_accepting(new)
        if not self._fd_ticking:
            self._fd_ticking = True
            asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._fd_tick)
        if new == PAUSED:
            self._fd_events += 1
            self._log_fd_pause(exc)

    def out_of_fds(self, exc: OSError) -> None:
        """EMFILE/ENFILE where the count saw none coming (another process, descriptors proxyd
        does not count): pause, and resume on a timer."""
        if self._fd_hard:
            return
        self._fd_hard = True
        if self.accept_mode == PAUSED:
            self._fd_events += 1
            self._log_fd_pause(exc)
        self.fds_check(exc)

    def data_fd_closed(self) -> None:
        """A client or upstream socket of the data path was closed."""
        self.fds.data -= 1
        if self.accept_mode != FAST:
            self.fds_check()

    def _log_fd_pause(self, exc: OSError | None) -> None:
        now = time.monotonic()
        if now - self._fd_log_at < FD_LOG_INTERVAL:
            return
        fds = self.fds
        self.log.error(
            "out of file descriptors: accepting paused",
            reason=(exc.strerror or str(exc)) if exc is not None else "only the reserve is left",
            open_fds=fds.in_use(),
            limit=fds.limit,
            reserve=fds.other,
            events=self._fd_events,
            hint="raise LimitNOFILE / ulimit -n, or lower limits.max_connections",
        )
        self._fd_log_at = now
        self._fd_events = 0

    def admin_connection_refused(self, limit: int) -> None:
        self.metrics.admin_connections_refused_total.inc()
        self._admin_refused += 1
        now = time.monotonic()
        if now - self._admin_log_at < FD_LOG_INTERVAL:
            return
        self.log.warning("admin API: too many connections, new ones closed at once", open=limit,
                         refused=self._admin_refused,
                         hint="a client holding idle connections (see admin.idle_timeout)")  # fmt: skip
        self._admin_log_at = now
        self._admin_refused = 0

    def _fd_tick(self) -> None:
        """While not on the fast path: end an EMFILE pause, and check the count now and then."""
        self._fd_hard = False
        self.fds_check()
        if self.accept_mode == FAST:
            self._fd_ticking = False
            return
        now = time.monotonic()
        if now - self._fd_recount_at >= FD_RECOUNT_INTERVAL:
            self._fd_recount_at = now
            self._spawn(self._recount_fds())
        asyncio.get_running_loop().call_later(ACCEPT_PAUSE, self._fd_tick)

    async def _recount_fds(self) -> None:
        """List the descriptors really open (on a worker thread: there may be a million) and
        correct the count down if it was high, so a miscount cannot keep accepting paused."""
        data_then = self.fds.data
        really_open = await asyncio.get_running_loop().run_in_executor(None, open_descriptors)
        if really_open is None:
            return
        excess = self.fds.correct(really_open, data_then)
        if excess:
            self.log.warning("file descriptors: fewer open than counted; count corrected",
                             counted_too_many=excess, open_fds=really_open)  # fmt: skip
            self.fds_check()

    def _count_fds(self, listeners_added: int | None = None) -> None:
        """Count what is open besides the data path: at start by listing /proc/self/fd, after
        a reload by the listeners added or removed (two descriptors each: listing every
        connection's would stall the loop)."""
        limit = nofile_limit()
        if listeners_added is not None:
            base = self.fds.base + 2 * listeners_added
        else:
            open_now = open_descriptors()
            base = open_now - self.fds.data if open_now is not None else 64
        self.fds.configure(limit, base, [lr.backlog for lr in self.listeners.values()])
        if base + FDS_PER_CONNECTION > self.fds.high:
            self.log.error("file descriptor limit too low: nothing is left for connections",
                           nofile=limit, open_fds=base, reserve=self.fds.other,
                           hint="raise LimitNOFILE / ulimit -n")  # fmt: skip
        self.fds_check()

    def is_own_listener(self, addr: tuple[str, int], local_ip: str) -> bool:
        ip, port = addr
        for lr in self.listeners.values():
            if lr.bound is None or lr.bound[1] != port:
                continue
            lhost, _, wildcard = lr.bound
            if lhost == ip or (wildcard and (ip == local_ip or ipaddress.ip_address(ip).is_loopback)):
                return True
        return False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.kubernetes is not None:
            await self._start_kubernetes()
        for lc in self.config.listeners:
            lr = ListenerRuntime(self, lc)
            await lr.bind()
            self.listeners[lc.name] = lr
            self.log.info("listening", listener=lc.name, address=lc.address, l7proto=lc.l7proto)
        await self._start_admin()
        self._count_fds()
        self.ready = True
        sdnotify.notify("READY=1", f"STATUS=serving {len(self.listeners)} listeners")
        interval = sdnotify.watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval))
        self._watch_files()
        self._spawn(self._watch_access_log())
        self._spawn(self._sweep_timeouts())

    async def _start_admin(self) -> None:
        if self.config.admin is not None and self._admin is None:
            from proxyd.admin import AdminServer

            admin = AdminServer(self, self.fds.admin)
            adm = self.config.admin
            try:
                await admin.start(adm.host, adm.port)  # OSError naming admin.address/socket
            except BaseException:
                await admin.stop()
                raise
            self._admin = admin  # only once it answers: admin_address() is then complete

    async def _start_kubernetes(self) -> None:
        """Start the cluster source and wait for its first full sync (admin up, /readyz 503)."""
        from proxyd.kube.cluster import KubeSource

        kc = self.config.kubernetes
        assert kc is not None
        await self._start_admin()

        def on_state(synced: bool, last_event: float) -> None:
            self.metrics.kubernetes_synced.set(1 if synced else 0)
            if last_event:
                self.metrics.kubernetes_last_event.set(last_event)

        self._kube_policies_due = asyncio.Event()
        self.kube = KubeSource(
            kc, on_change=self._cluster_changed, on_state=on_state,
            log_warning=lambda event, **kw: self.log.warning(event, **kw),
            on_policies=self._kube_policies_due.set,
        )  # fmt: skip
        self.kube.start()
        self.log.info("kubernetes: waiting for the first full sync before accepting")
        await self.kube.source.synced.wait()
        await self._apply_kube_policies()  # the first full list of policies, before accepting
        self._spawn(self._watch_kube_policies())
        self.log.info("kubernetes: synced", addresses=len(self.kube.state.identities()))

    async def _watch_kube_policies(self) -> None:
        while True:
            await self._kube_policies_due.wait()
            self._kube_policies_due.clear()
            try:
                await self._apply_kube_policies()
            except Exception as exc:  # a bug, not a bad object: log it and keep watching
                self.log.error("kubernetes: policy update failed", error=f"{type(exc).__name__}: {exc}")

    async def _apply_kube_policies(self) -> None:
        """Validate the changed API policy objects each alone (on a worker), then apply them."""
        from proxyd.kube.policies import validate

        pol = self.kube.policies
        while pol.pending:
            batch = pol.take()
            async with self._policy_lock:

                def build(batch: Any = batch) -> tuple[Any, Change]:
                    results = validate(batch, self.registry)
                    return results, self.policy.build_cluster(pol.preview(results))

                try:
                    results, change = await asyncio.get_running_loop().run_in_executor(None, build)
                except PolicyError as exc:  # the objects parse, the set does not compile
                    self._reload_rejected("kubernetes", exc)
                    continue
                refused = pol.commit(results)
                revision = self.policy.commit(change)
                self.policy.cluster_errors = dict(pol.errors)
            for name, problems in refused:
                self.metrics.policy_reloads_total.labels("failure").inc()
                self.log.error("kubernetes: policy object refused; its last good version stays",
                               name=name, problems=problems)  # fmt: skip
            if len(refused) < len(results):
                self._reloaded("kubernetes", revision)

    def _cluster_changed(self, ips: set[str]) -> None:
        """Addresses whose cluster identity changed: the next accept from them looks again."""
        if not ips:
            return
        if len(ips) > 256:  # a relist or a namespace relabel: cheaper to forget everything
            self._labels_cache = {}
            return
        cache = self._labels_cache
        for ip in ips:  # the keys are addresses as sockets report them (dual-stack: mapped)
            cache.pop(ip, None)
            cache.pop(f"::ffff:{ip}", None)

    def _watch_shape(self) -> tuple[tuple[Path, bool], ...]:
        """What the file watcher is set up for: each path, and whether it is a directory."""
        return tuple((p, p.is_dir()) for p in self.policy.paths)

    def _watch_files(self) -> None:
        """(Re)start watching ``policy.paths`` (at start, and when a SIGHUP changed them)."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        self._watched = self._watch_shape()
        if self.policy.paths:
            self._watch_task = self._spawn(self._watch_policy())

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task the daemon keeps a reference to and cancels at stop."""
        self._spawn(coro)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _watch_access_log(self) -> None:
        """Say when access-log lines are not being written: one line per interval at most.

        The sink's own thread writes and counts; this only reports, so an operator learns of a
        full disk from stderr and ``proxyd_access_log_dropped_total``, not from failed requests.
        """
        log = self.access_log
        path = self.config.access_log.path
        reported = 0  # dropped lines already reported
        said_at = -ACCESS_LOG_REPORT_INTERVAL
        failing = False  # a problem was reported and has not been seen to end
        while True:
            await asyncio.sleep(ACCESS_LOG_CHECK)
            problem, dropped = log.writer.problem(), log.dropped
            now = time.monotonic()
            if problem is None and failing:
                self.log.info("access log writing resumed", path=path, dropped=dropped - reported,
                              dropped_total=dropped)  # fmt: skip
                reported, failing = dropped, False
            elif (problem is not None or dropped > reported) and now - said_at >= ACCESS_LOG_REPORT_INTERVAL:
                self.log.error(
                    "access log cannot be written",
                    path=path,
                    # No problem now but lines dropped: a write blocked for a moment.
                    error=problem or "the sink took lines slower than they came",
                    dropped=dropped - reported,
                    dropped_total=dropped,
                    pending_bytes=log.writer.pending(),
                )
                reported, said_at, failing = dropped, now, problem is not None

    async def _sweep_timeouts(self) -> None:
        """Close connections whose idle or request timeout passed (one pass every interval).

        One sweep over all connections instead of a timer per connection: connection setup
        stays cheap, and a timeout fires within a quarter of its length (at most 1 s) late.
        """
        loop = asyncio.get_running_loop()
        while True:
            interval = 1.0
            for lr in self.listeners.values():
                for t in lr.timeouts():
                    if t:
                        interval = min(interval, max(0.05, t / 4))
            await asyncio.sleep(interval)
            now = loop.time()
            for lr in [*self.listeners.values(), *self._retired]:
                idle, request = lr.timeouts()
                if not (idle or request):
                    continue
                for conn in list(lr.conns):
                    conn.check_timeouts(now, idle, request)

    async def _watch_policy(self) -> None:
        """Reload the policy files the watcher reports written (proxyd/policywatch.py).

        Nothing a policy file contains may end this loop: a later good edit must still load.
        Where inotify cannot be used, fall back to comparing the files' identities every second.
        """
        while True:
            paths = self.policy.paths
            try:
                watcher = PolicyWatcher(paths)
            except OSError as exc:
                self.log.warning("policy files: inotify unavailable, checking them every second instead",
                                 error=exc.strerror or str(exc))  # fmt: skip
                self.policy.polling = True
                await self._poll_policy()
                return
            self.policy.polling = False
            try:
                while True:
                    rescan = False
                    try:
                        changed: set[str] | None = await watcher.changes()
                    except Rescan:
                        changed, rescan = None, True
                    if changed is not None and any(str(p) in changed for p in paths):
                        changed, rescan = None, True  # a watched path itself was replaced
                    try:
                        await self.reload_policy_async("file change", changed)
                    except Exception as exc:  # a bug, not a bad file: log it and keep watching
                        self.log.error("policy reload failed", trigger="file change",
                                       error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    if rescan:
                        break
            finally:
                # Closing an inotify descriptor waits for the kernel (~15 ms): not on this thread.
                asyncio.get_running_loop().run_in_executor(None, watcher.close)
            await asyncio.sleep(1.0)  # a directory went away: look for it again in a while

    async def _poll_policy(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                changed = self.policy.watch_mtimes()
            except OSError:
                changed = False
            if changed:
                try:
                    await self.reload_policy_async("file change")
                except Exception as exc:  # a bug, not a bad file: log it and keep watching
                    self.log.error("policy reload failed", trigger="file change",
                                   error=f"{type(exc).__name__}: {exc}")  # fmt: skip

    def admin_address(self) -> tuple[str, int] | None:
        if self._admin is None or self._admin.site is None:
            return None
        return self._admin.address()  # type: ignore[no-any-return]

    def reopen_access_log(self) -> None:
        """SIGUSR1 (logrotate moved the file): write to a new file at the configured path.

        When that fails (the directory went away) the old file stays open and the error is
        logged: lines keep going somewhere rather than nowhere.
        """
        exc = self.access_log.reopen()
        if exc is not None:
            self.log.error("access log reopen failed, still writing to the old file",
                           path=self.config.access_log.path, error=exc.strerror or str(exc))  # fmt: skip

    async def render_metrics(self) -> bytes:
        """The ``/metrics`` body (the control process of ``workers: N`` gathers its workers')."""
        return self.metrics.render()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`), then drain and stop."""
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: lambda: self._spawn(self.reload()),
            signal.SIGUSR1: self.reopen_access_log,
        }
        for sig, fn in handlers.items():
            loop.add_signal_handler(sig, fn)
        try:
            await self._stop.wait()
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
            await self.stop()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        sdnotify.notify("STOPPING=1")
        open_conns = self.active_connections()
        self.log.info("stopping: no new connections; draining open ones", open_connections=open_conns,
                      drain_timeout_s=self.config.limits.drain_timeout if open_conns else 0)  # fmt: skip
        for lr in self.listeners.values():
            lr.close_server()
        if self.active_connections():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.limits.drain_timeout)
        for lr in [*self.listeners.values(), *self._retired]:
            for conn in list(lr.conns):
                conn.close_now("drain timeout at shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self.kube is not None:
            await self.kube.stop()
        if self._admin is not None:
            await self._admin.stop()
        await asyncio.sleep(0)
        self.access_log.close()  # bounded: a sink that takes nothing is given up on, counted
        dropped = self.access_log.dropped
        if dropped:
            self.log.warning("stopped; access log lines were dropped", dropped_total=dropped,
                             path=self.config.access_log.path)  # fmt: skip
        else:
            self.log.info("stopped")

    # --- reload ----------------------------------------------------------------------------

    def reload_policy(self, why: str) -> bool:
        """Re-read the policy files now, on this thread (tests; the daemon itself uses
        :meth:`reload_policy_async`)."""
        try:
            revision = self.policy.reload_files()
        except PolicyError as exc:
            return self._reload_rejected(why, exc)
        return self._reloaded(why, revision)

    async def reload_policy_async(self, why: str, changed: set[str] | None = None) -> bool:
        """Re-read the policy files (only ``changed`` ones when given), parsing on a worker
        thread; the old policy stays on error."""
        try:
            revision = await self.change_policy(lambda: self.policy.build_reload(changed))
        except PolicyError as exc:
            return self._reload_rejected(why, exc)
        return self._reloaded(why, revision)

    def _reload_rejected(self, why: str, exc: PolicyError) -> bool:
        self.metrics.policy_reloads_total.labels("failure").inc()
        self.log.error("policy reload rejected, old policy kept", trigger=why, problems=exc.problems)
        return False

    def _reloaded(self, why: str, revision: int) -> bool:
        self.metrics.policy_reloads_total.labels("success").inc()
        self.metrics.policy_revision.set(revision)
        change = self.last_change
        read = change.read if change is not None else ()
        self.log.info("policy reloaded", trigger=why, revision=revision,
                      compiled=change.compiled if change is not None else 0, files_read=len(read),
                      files=list(read[:10]))  # fmt: skip
        return True

    async def change_policy(self, build: Callable[[], Change]) -> int:
        """Build a policy change on a worker thread (policy text is never parsed on the event
        loop: a slow or hostile document must not stall the data path), then put it in force.
        One change at a time. Raises what ``build`` raises; the old policy stays then."""
        async with self._policy_lock:
            change = await off_loop(build)
            return self._commit(change)

    def _commit(self, change: Change) -> int:
        old = [self.policy.current, self.last_change]
        revision = self.policy.commit(change)
        self.last_change = change
        self._retire(old)
        for warning in change.warnings:
            self.log.warning("policy change leaves endpoints without rules", problem=warning)
        return revision

    def policy_changed(self, revision: int) -> None:
        """Called after the admin API replaced imported documents."""
        self.metrics.policy_reloads_total.labels("success").inc()
        self.metrics.policy_revision.set(revision)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file; apply listener and policy changes, or keep all."""
        sdnotify.notify_reloading()
        try:
            return await self._reload()
        finally:
            sdnotify.notify("READY=1", f"STATUS=serving {len(self.listeners)} listeners")

    async def _reload(self) -> bool:
        source = self.config.source
        if source is None:
            return await self.reload_policy_async("SIGHUP")
        # Reading the config, building the identities table and the policy all happen on a
        # worker thread (100,000 identities take seconds); the event loop only swaps them in.
        async with self._policy_lock:
            try:
                new, identities, change = await off_loop(lambda: self._build_config(source))
            except ConfigError as exc:
                self.metrics.policy_reloads_total.labels("failure").inc()
                self.log.error("config reload rejected, old config kept", problems=exc.problems)
                return False
            except PolicyError as exc:
                return self._reload_rejected("SIGHUP", exc)
            # Open connections hold live views of this store, so it is updated, never replaced.
            revision = self._commit(change)
            self._retire([self.identities, self._labels_cache])
            self.identities = identities
            self._labels_cache = {}
        self._reloaded("SIGHUP", revision)
        if new.policy.state_dir != self.config.policy.state_dir:
            self.log.warning("policy.state_dir changes apply at the next restart")
        if new.kubernetes != self.config.kubernetes:
            self.log.warning("kubernetes section changes apply at the next restart")
        before = len(self.listeners)
        await self._apply_listeners(new)
        self._count_fds(listeners_added=len(self.listeners) - before)
        # Settings that only affect new connections take effect now; the access log and admin
        # address are fixed for the process lifetime (a restart applies them).
        old_config, self.config = self.config, replace(new, access_log=self.config.access_log,
                                                       admin=self.config.admin,
                                                       kubernetes=self.config.kubernetes)  # fmt: skip
        self._retire([old_config])
        del old_config
        self.metrics.connections_max.set(new.limits.max_connections)
        self.log.info("config reloaded", listeners=sorted(self.listeners), identities=len(identities))
        if self._watch_shape() != self._watched or self._watch_task is None or self._watch_task.done():
            self._watch_files()  # the paths changed, or the watcher ended
        return True

    def _retire(self, old: list[Any]) -> None:
        """Free what a change replaced on a worker thread: freeing 100,000 identities on the
        event loop thread would stall it for tens of milliseconds. (What is in force is frozen
        out of the cycle collector's sight by :func:`off_loop`; it is freed by reference
        counting when replaced, as the policy and identities hold no reference cycles.)"""

        def free() -> None:
            while old:
                item = old.pop()
                if isinstance(item, IdentityMap):
                    item.dismantle()
                elif isinstance(item, dict):
                    while item:
                        item.popitem()
                elif isinstance(item, Config):
                    # Its identities (a tuple: 200,000 objects for 100,000 entries) would be
                    # freed in one call with the config: held here, they go one at a time.
                    entries = list(item.identities)
                    del item
                    while entries:
                        entries.pop()
                item = None

        self._spawn(off_loop(free))

    def _build_config(self, source: Path) -> tuple[Config, IdentityMap, Change]:
        """The worker-thread part of a SIGHUP: config, identities, policy (nothing swapped)."""
        new = load_config(source, self.registry)
        try:
            identities = IdentityMap.from_entries(new.identities)
        except ValueError as exc:
            raise ConfigError([f"{source}:0: {exc}"]) from exc
        change = self.policy.build_reload(paths=new.policy.paths, endpoint_labels=identities.label_sets())
        return new, identities, change

    async def _apply_listeners(self, new_config: Config) -> None:
        wanted_by_name = {lc.name: lc for lc in new_config.listeners}
        # Before any new transparent listener binds (its loop check needs the registrations).
        self.transparent_listeners = _any_transparent(new_config)
        for name in list(self.listeners):
            lr = self.listeners[name]
            new = wanted_by_name.get(name)
            if new is None or (new.host, new.port) != (lr.config.host, lr.config.port):
                lr.close_server()
                del self.listeners[name]
                if lr.conns:
                    self._retired.add(lr)
                self.log.info("listener removed", listener=name, open_connections=len(lr.conns))
                # Its open connections go on until they end by themselves.
        for name, lc in wanted_by_name.items():
            current = self.listeners.get(name)
            if current is None:
                lr = ListenerRuntime(self, lc)
                # The runtime copied the daemon's settings, still the old config's at this point.
                lr.limits = new_config.limits
                lr.upstream_mark = new_config.upstream_mark
                await lr.bind()
                self.listeners[name] = lr
                self.log.info("listener added", listener=name, address=lc.address)
            else:
                # Same address: new connections use the new settings; open ones keep theirs.
                current.config = lc
                current.factory = self.registry.get(lc.l7proto) if lc.l7proto else None
                current.limits = new_config.limits
                current.upstream_mark = new_config.upstream_mark


#: The interpreter's thread switch interval while a worker thread builds a change. At the
#: default 5 ms, the event loop thread waits up to that long for the interpreter lock each time
#: it gave it up (every epoll wait, every socket call), several times per request: a busy
#: worker thread would stall open connections by tens of milliseconds.
BUILD_SWITCH_INTERVAL = 0.0005
_builds = 0
_saved = [0.005]
#: Whether builds freeze what they made (the daemon process, see :func:`run_daemon`; not a test
#: process running daemons in its own interpreter, whose cyclic garbage would be frozen too).
_freeze = [False]


async def off_loop(build: Callable[[], T]) -> T:
    """Run ``build`` on a worker thread without stalling the event loop thread meanwhile.

    Two things would: the interpreter lock (see :data:`BUILD_SWITCH_INTERVAL`), and the cycle
    collector, which a build allocating a million objects (100,000 identities) sets off in a
    full collection holding the lock for a tenth of a second. So the collector is off while
    builds run; then what they made is frozen out of its sight (:func:`gc.freeze`: loading
    policy and config leaves no cyclic garbage, and what is replaced is freed by reference
    counting) and the collector is turned back on.
    """
    global _builds
    if not _builds:
        _saved[0] = sys.getswitchinterval()
        sys.setswitchinterval(BUILD_SWITCH_INTERVAL)
        gc.disable()
    _builds += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(None, build)
    finally:
        _builds -= 1
        if not _builds:
            sys.setswitchinterval(_saved[0])
            if _freeze[0]:
                gc.freeze()  # what the build made, now in force or about to be dropped
            gc.enable()


def raise_fd_limit(max_connections: int) -> tuple[int, int, str | None]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (soft, needed, warning).

    ``needed`` is what ``max_connections`` takes: two sockets each, what is open before the
    first connection, and the reserve kept back from connections (fdbudget.py); the warning
    says so when the limit is lower.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    needed = max_connections * FDS_PER_CONNECTION + FD_BASE + FdBudget(soft, 0, []).other
    warning = None
    if soft < needed:
        warning = (f"limits.max_connections {max_connections} needs about {needed} file descriptors "
                   f"but RLIMIT_NOFILE is {soft}: raise LimitNOFILE / ulimit -n (hard limit) or "
                   f"lower max_connections; when descriptors run out, accepting pauses")  # fmt: skip
    return soft, needed, warning


async def run_daemon(
    config_path: Path, config: Config | None = None, registry: Registry | None = None
) -> int:
    """Entry point of ``proxyd run``: returns the process exit code. ``config`` and
    ``registry``: already loaded from ``config_path`` (the command line validates first)."""
    # Loading builds millions of objects and no cyclic garbage: the cycle collector would walk
    # the growing heap again and again (a third of the start time at 100,000 identities).
    gc.disable()
    _freeze[0] = True
    try:
        registry = registry if registry is not None else Registry.load()
        config = config if config is not None else load_config(config_path, registry)
        daemon = Daemon(config, registry)
        soft, needed, warning = raise_fd_limit(config.limits.max_connections)
        if warning:
            daemon.log.warning("file descriptor limit too low", nofile=soft, needed=needed, problem=warning)
        await daemon.start()
    finally:
        gc.freeze()  # what was just loaded is in force for good: see off_loop
        gc.enable()
    await daemon.serve()
    return 0


def _any_transparent(config: Config) -> bool:
    """Whether a listener of ``config`` takes its upstream from the original destination."""
    return any(lc.upstream is None for lc in config.listeners)
