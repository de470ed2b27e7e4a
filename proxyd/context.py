"""The connection context handed to parser factories: identity, policy, injection, logging.

It joins the sans-IO parser to the rest of proxyd through three narrow interfaces, so the same
class serves the daemon and the test harness: an :class:`L7Policy` (the policy layer's view of
this connection), a :class:`LogSink` (access log and metrics) and the :class:`Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxyd.native import Engine
from proxyd.parser import Endpoint, EntryType, Fields


@dataclass(frozen=True, slots=True)
class L7Decision:
    """The outcome of one policy check: allowed, which document decided, and audit mode."""

    allowed: bool
    policy: str | None = None
    audit: bool = False  # denied by policy, but forwarded because the mode is audit


ALLOWED = L7Decision(True)


class L7Policy(Protocol):
    """The policy as it applies to one connection (remote, port, l7proto)."""

    def decide(self, request: Any) -> L7Decision: ...


class AllowAllPolicy:
    """Used where no policy is configured: every request is allowed."""

    __slots__ = ()

    def decide(self, request: Any) -> L7Decision:
        return ALLOWED


class LogSink(Protocol):
    """Receives the parser's access-log entries (already classified)."""

    def l7(
        self,
        ctx: Context,
        entry_type: str,
        verdict: str,
        fields: Fields,
        policy: str | None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """Immutable facts about one connection, as policy and the access log see them."""

    conn_id: int
    listener: str
    direction: str  # ingress | egress
    src: Endpoint
    dst: Endpoint
    l7proto: str

    @property
    def local(self) -> Endpoint:
        return self.dst if self.direction == "ingress" else self.src

    @property
    def remote(self) -> Endpoint:
        return self.src if self.direction == "ingress" else self.dst


class Context:
    """The :class:`proxyd.parser.ConnectionContext` implementation."""

    __slots__ = ("engine", "info", "last_decision", "policy", "sink")

    def __init__(self, info: ConnInfo, engine: Engine, policy: L7Policy, sink: LogSink) -> None:
        self.info = info
        self.engine = engine
        self.policy = policy
        self.sink = sink
        #: The decision of the last policy check, which :meth:`log` reports (and resets): set
        #: by :meth:`matches`, and by a compiled parser that decides in C (proxyd.policy.flat).
        self.last_decision: L7Decision = ALLOWED

    @property
    def conn_id(self) -> int:
        return self.info.conn_id

    @property
    def listener(self) -> str:
        return self.info.listener

    @property
    def direction(self) -> str:
        return self.info.direction

    @property
    def src(self) -> Endpoint:
        return self.info.src

    @property
    def dst(self) -> Endpoint:
        return self.info.dst

    @property
    def local(self) -> Endpoint:
        return self.info.local

    @property
    def remote(self) -> Endpoint:
        return self.info.remote

    @property
    def logs_responses(self) -> bool:
        """Whether a ``response`` entry can reach the access log at all.

        False under ``access_log.requests: denied`` or ``none``, which discard every response
        entry: a parser may then skip building them (the memcache parser does).
        """
        return bool(getattr(self.sink, "log_forwarded", True))

    def quiet_counter(self) -> tuple[dict[tuple[str, str], int], tuple[str, str]] | None:
        """``(counts, key)`` where a forwarded request that gets no log line is counted, or None.

        For native parsers (proxyd._native): after an allowed, non-audit request they may do
        ``counts[key] += 1`` and reset ``last_decision`` instead of calling :meth:`log`, which would
        count it the same way and write nothing.
        """
        quiet = getattr(self.sink, "quiet_counter", None)
        return None if quiet is None else quiet(self.info.l7proto)  # type: ignore[no-any-return]

    def matches(self, request: Any) -> bool:
        decision = self.policy.decide(request)
        self.last_decision = decision
        return decision.allowed or decision.audit

    def inject(self, reply: bool, data: bytes) -> None:
        self.engine.queue_inject(reply, data)

    def log(self, entry_type: EntryType, fields: Fields) -> None:
        last = self.last_decision
        if entry_type is EntryType.RESPONSE:
            self.sink.l7(self, "response", "forwarded", fields, None)
            return
        if entry_type is EntryType.DENIED:
            verdict = "denied"
        else:
            verdict = "audit" if last.audit else "forwarded"
        self.sink.l7(self, "request", verdict, fields, last.policy)
        self.last_decision = ALLOWED
