"""``workers: N``: one control process and N worker processes (docs/deployment.md, "Workers").

The control process (:class:`ControlDaemon`) owns the config, the policy sources (files, admin
imports), the admin API and ``/metrics``; it binds no listener and accepts no data connection.
Each worker (:func:`worker_main`, started as ``python -m proxyd.workers``) is an ordinary
:class:`~proxyd.server.Daemon` on its own uvloop loop, with SO_REUSEPORT listeners on every
listener address, no admin server and no policy files of its own.

Control and worker talk over a socketpair: length-prefixed pickles, trusted both ways (the two
ends are the same program, started by the same user). Messages are tuples whose first item
names them; see :meth:`ControlDaemon._read_worker` and :func:`_worker_loop`.

Policy travels as *source documents* (each document's JSON and its source name), not compiled:
a compiled :class:`~proxyd.policy.engine.PolicySet` holds RE2 objects and parser-built matchers
that cannot cross a process boundary. The expensive, error-prone part (reading files, YAML,
validation with file:line errors) happens once, in the control process; a worker re-parses the
already valid JSON of only the documents it has not seen (cached by text) and builds the set,
off its loop. Every change goes through :meth:`ControlDaemon.change_policy`, which answers only
once every worker acknowledged the revision.

Kubernetes (docs/kubernetes.md): the control process runs the one cluster source. Policy objects
from the API are documents like the others (pushed as above, with every revision); identities
travel as deltas of the addresses an event changed (:mod:`proxyd.kube.mirror`), coalesced while
a push is in flight, and a worker (re)starting gets the whole table in its start message, so it
binds its listeners with the current cluster state. The control process reports ready only
after the first full sync, as the single-process daemon does.

Metrics: workers report their registry's samples (on every scrape, which asks them, every
second, and when they exit); the control process sums them. prometheus_client's multiprocess
mode was not used: it cannot carry proxyd's custom scrape-time collector (bytes and L7 request
counts are plain ints summed at scrape, metrics.py), needs a shared directory of mmap files
cleaned at every start, and gives gauges per-pid semantics to configure one by one. A worker
killed with SIGKILL loses at most the counts since its last report (one second).
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import ctypes
import itertools
import json
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from proxyd import sdnotify
from proxyd.config import Config, load_config
from proxyd.errors import ConfigError, PolicyError
from proxyd.kube.mirror import ClusterMirror, Delta, delta, snapshot
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import parse_text
from proxyd.policy.model import Document
from proxyd.policy.store import Change, FileEntry
from proxyd.registry import Registry
from proxyd.server import Daemon, off_loop, raise_fd_limit

_LEN = struct.Struct("!I")
#: How long a worker may take from spawn to "listening" before the start (or restart) fails.
START_TIMEOUT = 60.0
#: How long the control process waits for every worker to apply a policy or config change.
APPLY_TIMEOUT = 60.0
#: Seconds between a worker's unsolicited metrics reports (what a SIGKILL can lose).
REPORT_INTERVAL = 1.0
#: How long a scrape waits for fresh worker reports before using the last ones.
SCRAPE_TIMEOUT = 2.0
#: Pause before retrying a worker restart that failed (the port may be briefly taken).
RESTART_BACKOFF = 1.0
#: Families the control process answers itself (its config and policy, not the data path).
CONTROL_FAMILIES = frozenset({"proxyd_policy_reloads", "proxyd_policy_revision", "proxyd_connections_max",
                              "proxyd_build", "proxyd_workers", "proxyd_worker_restarts",
                              "proxyd_kubernetes_synced", "proxyd_admin_connections_refused",
                              "proxyd_kubernetes_last_event_timestamp_seconds"})  # fmt: skip
PR_SET_PDEATHSIG = 1
_SLOT = struct.Struct("=q")
#: A worker's conn_ids are (its start number << this) + 1, 2, ...: 4 billion connections each.
CONN_ID_BITS = 32
#: A pickled identities delta larger than this is read off a worker's event loop (a relist).
BIG_DELTA = 1 << 16
#: Environment a worker must not inherit: systemd would take its notifications for the daemon's.
_CONTROL_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

PolicyEntries = tuple[tuple[str, str], ...]  # (document JSON, source) in force order


# --- the channel -----------------------------------------------------------------------------

# Identity labels are interned as read-only mappings (policy/identity.py), which pickle cannot
# carry; a worker gets them as the same mappings over plain dicts.
def _read_only(labels: dict[str, str]) -> MappingProxyType[str, str]:
    return MappingProxyType(labels)


copyreg.pickle(MappingProxyType, lambda m: (_read_only, (dict(m),)))


async def _send(writer: asyncio.StreamWriter, msg: tuple[Any, ...]) -> None:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at EOF (the other end exited)."""
    try:
        head = await reader.readexactly(_LEN.size)
        data = await reader.readexactly(_LEN.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg = pickle.loads(data)
    assert isinstance(msg, tuple)
    return msg


def policy_entries(documents: Sequence[Document]) -> PolicyEntries:
    return tuple((json.dumps(d.raw, default=str), d.source) for d in documents)


def worker_config(config: Config) -> Config:
    """A worker's part of ``config``: no admin server, no policy files. A ``kubernetes``
    section stays: in a worker it makes Kubernetes-only policy fields load and the cluster's
    identities come from the control process (:class:`WorkerDaemon`), never from the API."""
    policy = replace(config.policy, paths=(), state_dir=None)
    return replace(config, admin=None, policy=policy, workers=1)


class ConnectionCounts:
    """Open connections per worker, in shared memory: ``limits.max_connections`` holds for the
    whole daemon. Each worker writes only its own 8-byte slot (its count, at every accept and
    close) and reads the others' at accept; no lock, so workers accepting at the same instant
    at the limit can together pass it by at most N - 1. The control process zeroes a dead
    worker's slot before restarting it."""

    def __init__(self, fd: int, workers: int) -> None:
        self.fd = fd
        self.workers = workers
        self.map = mmap.mmap(fd, 8 * workers)
        self._all = struct.Struct(f"={workers}q")

    @classmethod
    def create(cls, workers: int) -> ConnectionCounts:
        fd = os.memfd_create("proxyd-connections", 0)  # inheritable only where passed (pass_fds)
        os.ftruncate(fd, 8 * workers)
        return cls(fd, workers)

    def publish(self, index: int, count: int) -> None:
        _SLOT.pack_into(self.map, 8 * index, count)

    def total(self) -> int:
        return sum(self._all.unpack_from(self.map))


# --- metrics ---------------------------------------------------------------------------------

Families = list[Metric]


def _sum_families(reports: Sequence[Families]) -> Iterator[Metric]:
    """Families of all reports with their samples summed by (name, labels); ``_created`` takes
    the earliest."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in reports:
        for fam in families:
            if fam.name in CONTROL_FAMILIES:
                continue
            if fam.name not in merged:
                merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            vals = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in vals:
                    vals[key] = s.value
                elif s.name.endswith("_created"):
                    vals[key] = min(vals[key], s.value)
                else:
                    vals[key] += s.value
    for name, metric in merged.items():
        for (sname, labels), value in values[name].items():
            metric.add_sample(sname, dict(labels), value)
        yield metric


def _counters_only(families: Families) -> Families:
    """What a dead worker leaves to the totals: its counters (its gauges ended with it)."""
    out: Families = []
    for fam in families:
        if fam.type == "counter" and fam.name not in CONTROL_FAMILIES:
            m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                if not s.name.endswith("_created"):
                    m.add_sample(s.name, s.labels, s.value)
            out.append(m)
    return out


class _Families(Collector):
    def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return self.families()


# --- the control process ---------------------------------------------------------------------


@dataclass(eq=False)
class WorkerHandle:
    index: int
    proc: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int = 0
    ready: bool = False
    #: Sequence number -> future set to the worker's answer, or to None when it exits first.
    waiting: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    report: Families = field(default_factory=list)


class WorkerStartError(OSError):
    """A worker could not start (its listener address is taken...): the daemon does not start."""


class ControlDaemon(Daemon):
    """The control process of ``workers: N``: a :class:`Daemon` without listeners whose policy
    changes, reloads, log reopening and metrics reach every worker."""

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        super().__init__(config, registry)
        self.n_workers = config.workers
        self.workers: dict[int, WorkerHandle] = {}
        self.restarts = 0
        self._seq = itertools.count(1)
        self._spawns = itertools.count(0)  # every worker start gets its own conn_id range
        self.counts = ConnectionCounts.create(self.n_workers)
        self._push_lock = asyncio.Lock()
        self._pushed: PolicySet | None = None  # the set every worker was last sent
        #: Addresses whose cluster identity changed since the last push to the workers.
        self._identities_pending: set[str] = set()
        self._identities_due = asyncio.Event()
        #: Counters of workers that exited: they stay in the totals.
        self._retired_counters: Families = []
        #: What /metrics shows: the control's own families and the workers' summed.
        self._scrape = CollectorRegistry(auto_describe=False)
        self._scrape.register(_Families(self._families))

    # --- workers -----------------------------------------------------------------------

    async def _spawn_worker(self, index: int) -> WorkerHandle:
        """Start worker ``index`` with the current config and policy; returns when it listens.

        Holds the push lock from the snapshot it is given until it is registered, so it
        misses no revision. Raises :class:`WorkerStartError`."""
        parent, child = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in _CONTROL_ONLY_ENV}
        try:
            proc = subprocess.Popen(  # noqa: ASYNC220 (fork+exec: quick; nothing to wait on)
                [
                    sys.executable,
                    "-m",
                    "proxyd.workers",
                    str(child.fileno()),
                    str(os.getpid()),
                    str(self.counts.fd),
                ],
                pass_fds=[child.fileno(), self.counts.fd],
                env=env,
                process_group=0,  # a terminal's Ctrl-C reaches the control process only
            )
        finally:
            child.close()
        reader, writer = await asyncio.open_connection(sock=parent)
        w = WorkerHandle(index, proc, reader, writer)
        async with self._push_lock:
            store = self.policy
            cfg = worker_config(self.config)
            entries = policy_entries(store.current.documents)
            cluster = snapshot(self.kube.state) if self.kube is not None else None
            start = ("start", cfg, index, self.n_workers, next(self._spawns), store.revision, entries,
                     cluster)  # fmt: skip
            await _send(writer, start)
            self.workers[index] = w
        try:
            msg = await asyncio.wait_for(_recv(reader), START_TIMEOUT)
        except TimeoutError:
            msg = ("failed", f"worker {index} did not start within {START_TIMEOUT:.0f}s")
        if msg is None or msg[0] != "ready":
            if self.workers.get(index) is w:
                del self.workers[index]
            for fut in w.waiting.values():  # a change pushed meanwhile: do not wait for it
                if not fut.done():
                    fut.set_result(None)
            writer.close()
            proc.kill()
            status = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
            why = msg[1] if msg is not None else f"worker {index} exited with status {status} while starting"
            raise WorkerStartError(0, why)
        w.pid, w.ready = proc.pid, True
        self.log.info("worker started", worker=index, pid=proc.pid)
        self.spawn(self._read_worker(w))
        return w

    async def _read_worker(self, w: WorkerHandle) -> None:
        while True:
            msg = await _recv(w.reader)
            if msg is None:
                break
            kind = msg[0]
            if kind == "metrics":
                w.report = msg[2]
            if kind in ("metrics", "applied", "apply_failed"):
                fut = w.waiting.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        await self._worker_exited(w)

    async def _worker_exited(self, w: WorkerHandle) -> None:
        if self.workers.get(w.index) is w:
            del self.workers[w.index]
        for fut in w.waiting.values():
            if not fut.done():
                fut.set_result(None)
        w.writer.close()
        # Folded into one set of sums: restarts do not make the scrape grow.
        self._retired_counters = list(_sum_families([self._retired_counters, _counters_only(w.report)]))
        loop = asyncio.get_running_loop()
        try:
            status = await asyncio.wait_for(loop.run_in_executor(None, w.proc.wait), 10)
        except TimeoutError:
            w.proc.kill()
            status = await loop.run_in_executor(None, w.proc.wait)
        self.counts.publish(w.index, 0)  # its connections died with it
        if self.stopping:
            return
        self.restarts += 1
        self.metrics.worker_restarts_total.inc()
        self.log.error("worker exited, restarting it", worker=w.index, pid=w.pid, status=status,
                       restarts=self.restarts)  # fmt: skip
        while not self.stopping:
            try:
                await self._spawn_worker(w.index)
                return
            except WorkerStartError as exc:
                self.log.error("worker restart failed, retrying", worker=w.index, error=exc.strerror)
                await asyncio.sleep(RESTART_BACKOFF)

    async def _ask_all(
        self, make: Callable[[int], tuple[Any, ...]], wait_s: float, *, starting: bool = True
    ) -> list[tuple[WorkerHandle, Any]]:
        """Send a message to every worker and wait for each one's answer: (worker, answer), the
        answer None when it exited or did not answer in time. ``starting=False``: a worker still
        starting gets the message (it reads it once it listens) but is not waited for."""
        loop = asyncio.get_running_loop()
        asked: list[tuple[WorkerHandle, asyncio.Future[Any]]] = []
        for w in list(self.workers.values()):
            seq = next(self._seq)
            fut: asyncio.Future[Any] = loop.create_future()
            w.waiting[seq] = fut
            if starting or w.ready:
                asked.append((w, fut))
            try:
                await _send(w.writer, make(seq))
            except (ConnectionError, RuntimeError):
                fut.set_result(None)  # exiting: its reader task restarts it
        if not asked:
            return []
        done, _ = await asyncio.wait([f for _, f in asked], timeout=wait_s)
        return [(w, f.result() if f in done else None) for w, f in asked]

    # --- what reaches the workers ----------------------------------------------------------

    async def change_policy(self, build: Callable[[], Change]) -> int:
        # Daemon.change_policy builds and commits (one change at a time); then every worker gets
        # what is in force, and only then does the caller (an admin request) get its answer.
        revision = await super().change_policy(build)
        await self._push_policy()
        return revision

    async def _push_policy(self) -> None:
        """Send every worker the policy in force now, unless it already has it. One push at a
        time, each reading the store when it starts: the last push carries the last commit,
        and a worker never receives an older revision after a newer one."""
        async with self._push_lock:
            current = self.policy.current
            if current is self._pushed:
                return
            revision, entries = self.policy.revision, policy_entries(current.documents)
            answers = await self._ask_all(lambda seq: ("policy", seq, revision, entries), APPLY_TIMEOUT)
            self._pushed = current
        for w, answer in answers:
            if answer is not None and answer[0] == "apply_failed":
                # Valid here, refused there: a bug. The worker restarts with the current policy.
                self.log.error("worker could not apply the policy; restarting it", worker=w.index,
                               revision=revision, error=answer[2])  # fmt: skip
                w.proc.kill()

    async def _apply_kube_policies(self) -> None:
        # Daemon's commits the API objects' documents; every worker then gets the new revision.
        await super()._apply_kube_policies()
        await self._push_policy()

    def _cluster_changed(self, ips: set[str]) -> None:
        super()._cluster_changed(ips)  # the control's own label cache (explain, /v1/identities)
        if ips:
            self._identities_pending |= ips
            self._identities_due.set()

    async def _push_identities(self) -> None:
        """Send every worker the identities of the addresses that changed, as they are now.

        Events that arrive while a push waits for the workers' answers are sent together next:
        a burst of pod events costs a few messages, not one per event per worker."""
        while True:
            await self._identities_due.wait()
            self._identities_due.clear()
            try:
                await self._send_identities()
            except Exception as exc:  # a bug: log it and keep pushing
                self.log.error("kubernetes: identities push failed", error=f"{type(exc).__name__}: {exc}")

    async def _send_identities(self) -> None:
        async with self._push_lock:
            ips, self._identities_pending = self._identities_pending, set()
            if not ips or self.kube is None:
                return
            try:
                # Pickled once for every worker; a worker unpickles a big one off its loop.
                blob = pickle.dumps(delta(self.kube.state, ips), protocol=pickle.HIGHEST_PROTOCOL)
                # Not waiting for a worker that is starting: it may take seconds to load
                # (100,000 identities), and the others' tables must not lag meanwhile.
                answers = await self._ask_all(lambda seq: ("identities", seq, blob), APPLY_TIMEOUT,
                                              starting=False)  # fmt: skip
            except BaseException:
                self._identities_pending |= ips  # sent again with the next change
                raise
        for w, answer in answers:
            if answer is None and w.ready and self.workers.get(w.index) is w and not self.stopping:
                # It did not answer in time: restarted, it gets the whole table.
                self.log.error("worker did not apply the identities; restarting it", worker=w.index)
                w.proc.kill()

    async def _apply_listeners(self, new_config: Config) -> None:
        # Called by Daemon._reload (SIGHUP), which commits the new policy itself (built off the
        # loop with the config): it reaches every worker before their listeners change.
        await self._push_policy()
        if new_config.workers != self.n_workers:
            self.log.warning("workers changes apply at the next restart", workers=self.n_workers,
                             configured=new_config.workers)  # fmt: skip
        cfg = worker_config(replace(new_config, access_log=self.config.access_log))
        await self._ask_all(lambda seq: ("config", seq, cfg), APPLY_TIMEOUT)

    def reopen_access_log(self) -> None:
        super().reopen_access_log()
        self.spawn(self._ask_all(lambda seq: ("reopen", seq), APPLY_TIMEOUT))

    async def render_metrics(self) -> bytes:
        self.metrics.workers.set(len(self.workers))
        answers = await self._ask_all(lambda seq: ("metrics?", seq), SCRAPE_TIMEOUT)
        del answers  # each answer updated its worker's report
        return generate_latest(self._scrape)

    async def listener_rows(self) -> list[dict[str, Any]]:
        """``GET /v1/listeners``: the configured listeners, bound in every worker, with their
        open connections summed over the workers (asked now, as a scrape does)."""
        await self._ask_all(lambda seq: ("metrics?", seq), SCRAPE_TIMEOUT)
        active: dict[str, float] = {}
        for fam in _sum_families([w.report for w in self.workers.values()]):
            if fam.name == "proxyd_connections_active":
                for sample in fam.samples:
                    active[sample.labels["listener"]] = sample.value
        mode = self.config.policy.mode
        return [
            {
                "name": c.name,
                "address": c.address,
                "bound": c.address if self.workers else None,
                "l7proto": c.l7proto,
                "upstream": "original-destination" if c.upstream is None else "{}:{}".format(*c.upstream),
                "direction": c.direction,
                "policy_mode": c.policy_mode or mode,
                "active_connections": int(active.get(c.name, 0)),
                "workers": len(self.workers),
            }
            for c in sorted(self.config.listeners, key=lambda c: c.name)
        ]

    def _families(self) -> Iterator[Metric]:
        for fam in self.metrics.registry.collect():
            if fam.name in CONTROL_FAMILIES:
                yield fam
        reports = [w.report for w in self.workers.values()]
        yield from _sum_families([*reports, self._retired_counters])

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.kubernetes is not None:
            # As the single-process daemon: admin up (/readyz 503) until the first full sync
            # of identities and policies; only then do the workers start and bind.
            await self._start_kubernetes()
        self._pushed = self.policy.current  # what every worker starts with
        self._identities_pending.clear()  # every worker starts with the whole table
        try:
            await asyncio.gather(*(self._spawn_worker(i) for i in range(self.n_workers)))
        except BaseException:
            self.stopping = True
            await self._stop_workers(0.0)
            raise
        self.log.info("workers started", workers=self.n_workers, pids=[w.pid for w in self.workers.values()])
        if self.kube is not None:
            self.spawn(self._push_identities())
        # Daemon.start without the listeners (the workers have them).
        await self._start_admin()
        self.ready = True
        sdnotify.notify("READY=1", f"STATUS=serving with {self.n_workers} workers")
        interval = sdnotify.watchdog_interval()
        if interval:
            self.spawn(self._watchdog(interval))
        if self.config.policy.paths:
            self.spawn(self._watch_policy())

    async def _stop_workers(self, drain: float) -> None:
        workers = list(self.workers.values())
        for w in workers:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await _send(w.writer, ("stop", 0))
        loop = asyncio.get_running_loop()
        for w in workers:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, w.proc.wait), drain + 5)
            except TimeoutError:
                w.proc.kill()
                await loop.run_in_executor(None, w.proc.wait)

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        self.log.info("stopping: draining every worker", workers=len(self.workers),
                      drain_timeout_s=self.config.limits.drain_timeout)  # fmt: skip
        await self._stop_workers(self.config.limits.drain_timeout)
        self.stopping = False  # Daemon.stop: admin server, tasks, logs
        await super().stop()


async def run_control(
    config_path: Path, config: Config | None = None, registry: Registry | None = None
) -> int:
    """``proxyd run`` with ``workers`` > 1: the control process. Returns the exit code.
    ``config`` and ``registry``: already loaded from ``config_path``."""
    registry = registry if registry is not None else Registry.load()
    config = config if config is not None else load_config(config_path, registry)
    daemon = ControlDaemon(config, registry)
    soft, needed, warning = raise_fd_limit(config.limits.max_connections)
    if warning:
        daemon.log.warning("file descriptor limit too low", nofile=soft, needed=needed, problem=warning)
    await daemon.start()
    await daemon.serve()
    return 0


# --- a worker process ------------------------------------------------------------------------


class WorkerDaemon(Daemon):
    """A worker: listeners with SO_REUSEPORT, policy pushed by the control process."""

    reuse_port = True

    def __init__(self, config: Config, registry: Registry, index: int, counts: ConnectionCounts) -> None:
        super().__init__(config, registry)
        self.index = index
        self.counts = counts
        self.log = self.log.bind(worker=index, pid=os.getpid())  # N processes share stderr
        self._parsed: dict[tuple[str, str], list[Document]] = {}
        #: The cluster's identities as the control process sends them (proxyd/kube/mirror.py).
        self.kube = ClusterMirror() if config.kubernetes is not None else None

    async def _start_kubernetes(self) -> None:
        """Nothing to start: the control process runs the cluster source, and the start message
        brought the current identities (applied before :meth:`start` binds the listeners)."""

    def apply_identities(self, changes: Delta) -> None:
        if self.kube is not None:
            self._cluster_changed(self.kube.apply(changes))

    def _build(
        self, revision: int, entries: PolicyEntries
    ) -> tuple[Change, dict[tuple[str, str], list[Document]]]:
        # Runs on a thread: parses only documents not seen at the last revision.
        parsed: dict[tuple[str, str], list[Document]] = {}
        docs: list[Document] = []
        for text, source in entries:
            got = self._parsed.get((text, source)) or parse_text(
                text, source, self.registry, kubernetes=self.policy.kubernetes
            )
            parsed[(text, source)] = got
            docs.extend(got)
        # The worker reads no file: every document is the control process's, under one entry.
        files = {"control process": FileEntry(None, tuple(docs))}
        # Documents parsed at an earlier revision are the same objects: not compiled again.
        new = PolicySet(docs, self.registry, revision, previous=self.policy.current)
        return Change(files, {}, new), parsed

    async def apply_policy(self, revision: int, entries: PolicyEntries) -> None:
        change, parsed = await asyncio.get_running_loop().run_in_executor(
            None, self._build, revision, entries
        )
        self.policy.commit(change)
        self._parsed = parsed

    async def apply_config(self, config: Config) -> None:
        from proxyd.policy.identity import IdentityMap

        self.identities = IdentityMap.from_entries(config.identities)
        self._labels_cache = {}
        await self._apply_listeners(config)
        self.config = replace(config, access_log=self.config.access_log)

    def admitted_connections(self) -> int:
        self.counts.publish(self.index, self.active_connections())
        return self.counts.total()

    def connection_ended(self) -> None:
        self.counts.publish(self.index, self.active_connections())

    async def reload(self) -> bool:
        return True  # SIGHUP goes to the control process, which pushes what changed

    def request_stop(self) -> None:
        """SIGTERM/SIGINT sent to a worker itself do nothing: under systemd every process of the
        unit gets SIGTERM, and the control process drains the workers (:meth:`control_stop`);
        a worker that stopped by itself would look like a crash and be restarted."""

    def control_stop(self) -> None:
        super().request_stop()


def _set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the control process exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


async def _worker_loop(
    daemon: WorkerDaemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        msg = await _recv(reader)
        if msg is None:  # the control process is gone
            daemon.log.error("control process gone; worker stopping", worker=daemon.index)
            daemon.control_stop()
            return
        kind, seq = msg[0], msg[1]
        if kind == "policy":
            try:
                await daemon.apply_policy(msg[2], msg[3])
            except PolicyError as exc:
                await _send(writer, ("apply_failed", seq, "; ".join(exc.problems)))
                continue
            await _send(writer, ("applied", seq))
        elif kind == "identities":
            daemon.apply_identities(await _unpickle(msg[2]))
            await _send(writer, ("applied", seq))
        elif kind == "config":
            await daemon.apply_config(msg[2])
            await _send(writer, ("applied", seq))
        elif kind == "reopen":
            daemon.reopen_access_log()
            await _send(writer, ("applied", seq))
        elif kind == "metrics?":
            await _send(writer, ("metrics", seq, list(daemon.metrics.registry.collect())))
        elif kind == "stop":
            daemon.control_stop()


async def _unpickle(blob: bytes) -> Any:
    """A pickled delta; a big one (a relist) off the loop with the cycle collector paused."""
    if len(blob) > BIG_DELTA:
        return await off_loop(lambda: pickle.loads(blob))
    return pickle.loads(blob)


async def _report(daemon: WorkerDaemon, writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(REPORT_INTERVAL)
        await _send(writer, ("metrics", 0, list(daemon.metrics.registry.collect())))


async def _worker(sock: socket.socket, counts_fd: int) -> int:
    reader, writer = await asyncio.open_connection(sock=sock)
    msg = await _recv(reader)
    if msg is None or msg[0] != "start":
        return 1
    _, config, index, config_workers, spawn, revision, entries, cluster = msg
    registry = Registry.load()
    daemon = WorkerDaemon(config, registry, index, ConnectionCounts(counts_fd, config_workers))
    # conn_id stays unique per daemon run: each worker start counts in its own range.
    daemon.conn_ids = itertools.count((spawn << CONN_ID_BITS) + 1)
    raise_fd_limit(config.limits.max_connections)
    if cluster is not None:
        daemon.apply_identities(cluster)
    try:
        await daemon.apply_policy(revision, entries)
        await daemon.start()
    except (OSError, PolicyError, ConfigError) as exc:
        if isinstance(exc, OSError):
            why = exc.strerror if exc.strerror and exc.filename is None else str(exc)
        else:
            why = "; ".join(exc.problems)
        await _send(writer, ("failed", f"worker {index}: {why}"))
        return 1
    await _send(writer, ("ready", os.getpid()))
    daemon.spawn(_worker_loop(daemon, reader, writer))
    daemon.spawn(_report(daemon, writer))
    await daemon.serve()
    with contextlib.suppress(ConnectionError):
        await _send(writer, ("metrics", 0, list(daemon.metrics.registry.collect())))
    writer.close()
    return 0


def worker_main(argv: Sequence[str]) -> int:
    """``python -m proxyd.workers FD CONTROL_PID COUNTS_FD``: what the control process starts."""
    import uvloop

    fd, control_pid = int(argv[0]), int(argv[1])
    _set_pdeathsig(signal.SIGKILL)  # the control process is gone without stopping us: no drain
    if os.getppid() != control_pid:  # it exited before the prctl: nobody would stop us
        return 1
    sock = socket.socket(fileno=fd)
    return uvloop.run(_worker(sock, int(argv[2])))


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
