"""Every Prometheus metric proxyd exports, declared in one place (DESIGN.md section 6).

Labels never carry addresses, keys or other unbounded values. Each daemon owns its own
``CollectorRegistry`` so several daemons can run in one process (the in-process tests do).
Hot-path code keeps the per-listener children (``ListenerMetrics``) instead of calling
``labels()`` per event.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


@dataclass(slots=True)
class ListenerMetrics:
    """Pre-resolved children for one listener."""

    connections: Counter
    active: Gauge
    denials: Counter
    connect_failures: Counter
    bytes_in: Counter
    bytes_out: Counter


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
        self.bytes_total = Counter(
            "proxyd_bytes",
            "Bytes relayed; direction in = from clients, out = to clients",
            ["listener", "direction"],
            registry=r,
        )
        self.l7_requests_total = Counter(
            "proxyd_l7_requests", "L7 requests by verdict", ["l7proto", "verdict"], registry=r
        )
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
        for result in ("success", "failure"):
            self.policy_reloads_total.labels(result)

    def for_listener(self, name: str) -> ListenerMetrics:
        return ListenerMetrics(
            connections=self.connections_total.labels(name),
            active=self.connections_active.labels(name),
            denials=self.connection_denials_total.labels(name),
            connect_failures=self.upstream_connect_failures_total.labels(name),
            bytes_in=self.bytes_total.labels(name, "in"),
            bytes_out=self.bytes_total.labels(name, "out"),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
