"""The interface between proxyd's two halves, as the data side sees it (docs/architecture.md).

The data side (listeners and admission, the relay, the engine and parsers, the TLS gate, the
access log) never imports the control side (the daemon, config, policy sources, admin API,
metrics registry, workers): it is handed objects with the members declared here, and these
types are all it relies on. The control side's :class:`proxyd.server.Daemon` is the
:class:`DataHost` every listener is given; mypy checks that it fits where it hands itself over.

Members are read-only properties where the data side only reads, so that frozen config
dataclasses and prometheus_client's objects fit as they are: nothing is wrapped, and the
per-connection path makes the same attribute lookups and calls as before the split.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from proxyd.accesslog import AccessLog
    from proxyd.fdbudget import FdBudget
    from proxyd.parser import ParserFactory
    from proxyd.policy.store import LiveConnectionPolicy

Address = tuple[str, int]
L_contra = TypeVar("L_contra", contravariant=True)


# --- metric sinks (prometheus_client's Counter and Gauge fit these) ---------------------------


class CounterSink(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeSink(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class LabelledCounter(Protocol):
    """A counter with labels; the data side resolves children once where it can (per listener)."""

    def labels(self, *labelvalues: str) -> CounterSink: ...


class ListenerSinks(Protocol):
    """One listener's pre-resolved counters (:class:`proxyd.metrics.ListenerMetrics`)."""

    @property
    def connections(self) -> CounterSink: ...

    @property
    def active(self) -> GaugeSink: ...

    @property
    def denials(self) -> CounterSink: ...

    @property
    def connect_failures(self) -> CounterSink: ...


class DataMetrics(Protocol):
    """The metrics the data side counts into (:class:`proxyd.metrics.Metrics` fits)."""

    @property
    def accept_pauses_total(self) -> LabelledCounter: ...

    @property
    def tls_denials_total(self) -> LabelledCounter: ...

    @property
    def connection_timeouts_total(self) -> LabelledCounter: ...

    @property
    def parser_errors_total(self) -> LabelledCounter: ...

    def for_listener(self, name: str) -> ListenerSinks: ...


# --- settings (proxyd.config's frozen dataclasses fit these) ----------------------------------


class LimitsView(Protocol):
    """``limits`` of the config: what bounds one connection."""

    @property
    def buffer_bytes(self) -> int: ...

    @property
    def max_connections(self) -> int: ...

    @property
    def connect_timeout(self) -> float: ...

    @property
    def idle_timeout(self) -> float: ...

    @property
    def request_timeout(self) -> float: ...


class ListenerSettings(Protocol):
    """One listener of the config."""

    @property
    def name(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def address(self) -> str: ...

    @property
    def l7proto(self) -> str | None: ...

    @property
    def upstream(self) -> Address | None: ...

    @property
    def direction(self) -> str: ...

    @property
    def parser_settings(self) -> Any: ...

    @property
    def policy_mode(self) -> str | None: ...

    @property
    def idle_timeout(self) -> float | None: ...

    @property
    def request_timeout(self) -> float | None: ...


# --- the control side's services --------------------------------------------------------------


class Parsers(Protocol):
    """The parser registry: the factory of an ``l7proto``."""

    def get(self, name: str) -> ParserFactory: ...


class LivePolicy(Protocol):
    """The policy in force; a view follows reloads for the life of its connection."""

    def view(
        self,
        direction: str,
        local_labels: Mapping[str, str],
        remote_ip: str,
        remote_labels: Mapping[str, str],
        port: int,
        l7proto: str | None,
        audit: bool = False,
    ) -> LiveConnectionPolicy: ...


class Log(Protocol):
    """The daemon's own log (structlog, one JSON object per line on stderr)."""

    def info(self, event: str, **kw: Any) -> Any: ...

    def warning(self, event: str, **kw: Any) -> Any: ...

    def error(self, event: str, **kw: Any) -> Any: ...


class DataHost(Protocol[L_contra]):
    """What the control side hands every listener (``L_contra``: the listener type it hosts).

    The descriptor budget (``fds`` and the ``fds_*``/``out_of_fds``/``data_fd_closed`` calls,
    fdbudget.py) is the daemon's: it moves every listener between accepting in bursts, one at a
    time, or not at all. ``upstream_locals`` is shared by all listeners: an upstream socket's
    local address while it connects, so an accept recognises proxyd's own connection
    redirected back to it. Only a transparent listener (no fixed ``upstream``) reads it, so
    ``transparent_listeners`` says whether the daemon has one (set before such a listener is
    bound): without one, upstream connects register nothing.
    """

    @property
    def registry(self) -> Parsers: ...

    @property
    def metrics(self) -> DataMetrics: ...

    @property
    def access_log(self) -> AccessLog: ...

    @property
    def log(self) -> Log: ...

    @property
    def policy(self) -> LivePolicy: ...

    @property
    def limits(self) -> LimitsView: ...

    @property
    def upstream_mark(self) -> int | None: ...

    @property
    def policy_mode(self) -> str: ...

    @property
    def reuse_port(self) -> bool: ...

    @property
    def fds(self) -> FdBudget: ...

    @property
    def conn_ids(self) -> Iterator[int]: ...

    @property
    def upstream_locals(self) -> dict[Address, Address]: ...

    @property
    def transparent_listeners(self) -> bool: ...

    def labels_for(self, ip: str) -> Mapping[str, str]: ...

    def is_own_listener(self, addr: Address, local_ip: str) -> bool: ...

    def admitted_connections(self) -> int: ...

    def connection_ended(self) -> None: ...

    def listener_idle(self, lr: L_contra) -> None: ...

    def add_closed_bytes(self, listener: str, bytes_in: int, bytes_out: int) -> None: ...

    def spawn(self, coro: Any) -> None: ...

    def fds_check(self, exc: OSError | None = None) -> None: ...

    def fds_check_soon(self) -> None: ...

    def out_of_fds(self, exc: OSError) -> None: ...

    def data_fd_closed(self) -> None: ...


class ListenerSide(Protocol):
    """What a relayed connection (:class:`proxyd.relay.Connection`, and the native relay's
    :class:`proxyd.nativerelay.NativeConnection` and accept loop) sees of its listener."""

    @property
    def conns(self) -> set[Any]: ...

    @property
    def host(self) -> DataHost[Any]: ...

    @property
    def config(self) -> ListenerSettings: ...

    @property
    def factory(self) -> ParserFactory | None: ...

    @property
    def metrics(self) -> ListenerSinks: ...

    @property
    def access_log(self) -> AccessLog: ...

    @property
    def limits(self) -> LimitsView: ...

    @property
    def upstream_mark(self) -> int | None: ...

    def accept(self, conn: Any) -> None: ...

    def forget(self, conn: Any) -> None: ...

    def accept_fd(self, fd: int, src_ip: str, src_port: int, local_ip: str, local_port: int) -> bool: ...
