"""Every Prometheus metric proxyd exports, declared in one place (docs/access-log-and-metrics.md).

Labels never carry addresses, keys or other unbounded values. Each daemon owns its own
``CollectorRegistry`` so several daemons can run in one process (the in-process tests do).
Hot-path code keeps the per-listener children (``ListenerMetrics``) instead of calling
``labels()`` per event. The two per-chunk and per-request counters (bytes, L7 requests) are not
Prometheus objects at all: a locked ``inc()`` per chunk and per request was a measurable share
of the relay's CPU (bench/README.md). Connections count their bytes in plain ints and requests
count into a dict; a collector sums them when ``/metrics`` is scraped, so the values are exact
at every scrape and cost nothing on the data path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: Values of the ``reason`` label of ``proxyd_tls_denials_total`` (see proxyd.tlsgate).
TLS_DENIAL_REASONS = ("sni_not_allowed", "no_sni", "not_tls", "malformed", "incomplete", "timeout")
#: (listener, bytes from clients, bytes to clients) for every listener that ever existed.
BytesSource = Callable[[], Iterable[tuple[str, int, int]]]


@dataclass(slots=True)
class ListenerMetrics:
    """Pre-resolved children for one listener."""

    connections: Counter
    active: Gauge
    denials: Counter
    connect_failures: Counter


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections_total = Counter(
            "proxyd_connections", "Connections accepted, counted at accept", ["listener"], registry=r
        )
        self.connections_active = Gauge(
            "proxyd_connections_active", "Connections open now", ["listener"], registry=r
        )
        self.connection_denials_total = Counter(
            "proxyd_connection_denials",
            "Connections refused at accept (policy L3/L4, not redirected, loop, max_connections)",
            ["listener"],
            registry=r,
        )
        self.upstream_connect_failures_total = Counter(
            "proxyd_upstream_connect_failures",
            "Upstream connections that failed or timed out",
            ["listener"],
            registry=r,
        )
        #: limits.max_connections, so alerts can compare proxyd_connections_active with it.
        self.connections_max = Gauge(
            "proxyd_connections_max", "limits.max_connections: connections beyond it are refused", registry=r
        )
        self.connection_timeouts_total = Counter(
            "proxyd_connection_timeouts",
            "Connections closed by a timeout; reason idle (no byte either way for idle_timeout) or "
            "request (a partial request waited request_timeout for more bytes)",
            ["listener", "reason"],
            registry=r,
        )
        self.tls_denials_total = Counter(
            "proxyd_tls_denials",
            "Connections refused on their TLS ClientHello (serverNames); reason sni_not_allowed, "
            "no_sni, not_tls, malformed, incomplete or timeout",
            ["listener", "reason"],
            registry=r,
        )
        self.accept_pauses_total = Counter(
            "proxyd_accept_pauses",
            "Times accepting paused for want of file descriptors (the reserve was reached, or EMFILE)",
            ["listener"],
            registry=r,
        )
        #: (l7proto, verdict) -> requests; incremented by the access log.
        self.l7_counts: dict[tuple[str, str], int] = {}
        #: Set by the daemon: where byte totals come from at scrape time.
        self.bytes_source: BytesSource = lambda: ()
        #: Set by the access log: lines its sink dropped (counted by its writer thread).
        self.access_log_dropped: Callable[[], int] = lambda: 0
        r.register(_DataPathCollector(self))
        self.parser_errors_total = Counter(
            "proxyd_parser_errors",
            "Connections closed by a parser error, contract violation, exception or buffer limit",
            ["l7proto"],
            registry=r,
        )
        self.policy_reloads_total = Counter(
            "proxyd_policy_reloads", "Policy reload attempts by result", ["result"], registry=r
        )
        self.policy_revision = Gauge("proxyd_policy_revision", "Revision of the policy in force", registry=r)
        #: `workers`: 1 for the single-process daemon; the control process of workers: N sets it.
        self.workers = Gauge("proxyd_workers", "Worker processes running", registry=r)
        self.workers.set(1)
        self.worker_restarts_total = Counter(
            "proxyd_worker_restarts", "Worker processes restarted after they exited", registry=r
        )
        self.admin_connections_refused_total = Counter(
            "proxyd_admin_connections_refused",
            "Admin API connections closed at accept: as many as it may hold were open",
            registry=r,
        )
        for result in ("success", "failure"):
            self.policy_reloads_total.labels(result)
        #: Only with a `kubernetes` section (docs/kubernetes.md): how fresh the cluster state is.
        self.kubernetes_synced = Gauge(
            "proxyd_kubernetes_synced", "1 while every Kubernetes list/watch is up, else 0", registry=r
        )
        self.kubernetes_last_event = Gauge(
            "proxyd_kubernetes_last_event_timestamp_seconds",
            "Unix time of the last Kubernetes list or watch event applied", registry=r,
        )  # fmt: skip
        from proxyd import __version__
        from proxyd.native import IMPLEMENTATION

        #: proxyd_build_info{version, data_path}: data_path is native (compiled twin) or python.
        self.build_info = Info("proxyd_build", "proxyd version and which data path runs", registry=r)
        self.build_info.info({"version": __version__, "data_path": IMPLEMENTATION})

    def for_listener(self, name: str) -> ListenerMetrics:
        # Series that exist from the start (at 0), so rate() and alerts see them before the
        # first event.
        for reason in ("idle", "request"):
            self.connection_timeouts_total.labels(name, reason)
        for reason in TLS_DENIAL_REASONS:
            self.tls_denials_total.labels(name, reason)
        self.accept_pauses_total.labels(name)
        return ListenerMetrics(
            connections=self.connections_total.labels(name),
            active=self.connections_active.labels(name),
            denials=self.connection_denials_total.labels(name),
            connect_failures=self.upstream_connect_failures_total.labels(name),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DataPathCollector(Collector):
    """Exposes the data-path counters kept outside prometheus_client (see module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        b = CounterMetricFamily(
            "proxyd_bytes", "Bytes relayed; direction in = from clients, out = to clients",
            labels=["listener", "direction"],
        )  # fmt: skip
        for listener, bytes_in, bytes_out in self.metrics.bytes_source():
            b.add_metric([listener, "in"], bytes_in)
            b.add_metric([listener, "out"], bytes_out)
        yield b
        r = CounterMetricFamily("proxyd_l7_requests", "L7 requests by verdict", labels=["l7proto", "verdict"])
        for (l7proto, verdict), n in sorted(self.metrics.l7_counts.items()):
            r.add_metric([l7proto, verdict], n)
        yield r
        yield CounterMetricFamily(
            "proxyd_access_log_dropped",
            "Access log lines dropped because the log could not be written (disk full, I/O error, "
            "a pipe nobody reads); the requests themselves were served",
            value=self.metrics.access_log_dropped(),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())
