"""The parser API: what a protocol plugin implements and what it may call (docs/parser-api.md).

A parser is created per connection by its factory and never touches sockets, the event loop or
the clock. The framework hands it the unconsumed bytes of one direction and applies the
verdicts it answers (see :mod:`proxyd.ops`) one at a time, looping until MORE, NOP, ERROR or an
op that reaches past the buffered bytes.

The ``data`` argument is the framework's own buffer (a ``bytearray``) for speed: read it, slice
it, ``find`` in it, but do not keep a reference to it across calls or modify it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxyd.errors import ParserConfigError, RuleError
from proxyd.ops import Verdict

Data = bytes | bytearray
#: Access-log fields, or a callable producing them only when the line is written.
Fields = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


def wire_text(data: bytes | bytearray) -> str:
    """Bytes from the wire as text for a log field, unambiguously.

    Valid UTF-8 stays as it is; every byte that is not is written ``\\xNN``, and a backslash
    in the data is doubled, so the byte 0xff (``\\xff``) and the four characters ``\\xff``
    (``\\\\xff``) never log the same. The access log escapes control and line-separator
    characters on top of this.
    """
    if b"\\" in data:
        data = bytes(data).replace(b"\\", b"\\\\")
    return bytes(data).decode("utf-8", "backslashreplace")


class EntryType(enum.Enum):
    """Kinds of access-log entries a parser writes through :meth:`ConnectionContext.log`."""

    REQUEST = "request"  # a request that was forwarded (or audited)
    RESPONSE = "response"  # a reply the parser understood
    DENIED = "denied"  # a request the policy denied and the parser dropped


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a connection as policy sees it: address, port and identity labels."""

    ip: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


class RuleMatcher(Protocol):
    """A compiled ``l7`` rule: does it allow this parsed request?"""

    def matches(self, request: Any) -> bool: ...


class ConnectionContext(Protocol):
    """What a parser knows of its connection and may ask of the framework."""

    @property
    def conn_id(self) -> int: ...

    @property
    def listener(self) -> str: ...

    @property
    def direction(self) -> str:
        """``ingress`` or ``egress``: which side of policy applies."""
        ...

    @property
    def src(self) -> Endpoint: ...

    @property
    def dst(self) -> Endpoint: ...

    @property
    def local(self) -> Endpoint: ...

    @property
    def remote(self) -> Endpoint: ...

    def matches(self, request: Any) -> bool:
        """Whether the policy in force now allows ``request`` from the remote on this port.

        Consults the current policy at every call, so a reload applies to the next request.
        In audit mode a would-be denial answers True and the next log entry says ``audit``.
        """
        ...

    def inject(self, reply: bool, data: bytes) -> None:
        """Queue ``data`` to be sent toward the client (``reply=True``) or the server.

        Bytes queued for the direction being parsed go out at the INJECT op that names them,
        or at the end of the round. The round goes on while unconsumed bytes remain, so a
        parser that queues bytes and then PASSes the last buffered byte will not be called
        again this round: the engine sends them right after that PASS. (r2d2 and memcache use
        this to put a denial after the reply it must follow.) Bytes queued for the other
        direction go out at that direction's next frame boundary, promptly, even if no more
        bytes arrive there, and never inside bytes that were PASS-ed but not yet sent.
        """
        ...

    def log(self, entry_type: EntryType, fields: Fields) -> None:
        """Write one ``l7`` access-log entry with the parser's key-value fields.

        ``fields`` may be a zero-argument callable returning the mapping: it is called only
        if the line is written (``access_log.requests: denied`` skips forwarded requests), so
        the hot path of a busy parser need not build fields nobody reads. Request entries are
        counted in metrics either way.
        """
        ...


class Parser(abc.ABC):
    """A per-connection protocol parser. Subclasses implement :meth:`on_data`."""

    @abc.abstractmethod
    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        """Answer one verdict for the unconsumed bytes ``data`` of one direction.

        ``reply`` is False for bytes from the client, True for bytes from the server.
        ``end_stream`` is True when that side has closed its write side: ``data`` is then all
        that will ever arrive (it may be empty).
        """


class ParserFactory(abc.ABC):
    """Creates parsers for one ``l7proto`` and compiles that protocol's ``l7`` rules.

    Register a factory instance under its :attr:`name` (built-in) or through the entry-point
    group ``proxyd.parsers`` (third-party; the entry point may name the class or an instance).
    """

    #: The ``l7proto`` name listeners and policies use.
    name: str = ""
    #: Rule keys this protocol understands in policy ``l7`` rules (for ``proxyd parsers``).
    rule_keys: tuple[str, ...] = ()
    #: One line saying what the protocol is.
    description: str = ""

    def validate_config(self, config: Mapping[str, Any]) -> Any:
        """Check a listener's ``parser_config`` and return what :meth:`create` receives.

        Raises :class:`ParserConfigError` naming the bad key. The default accepts none.
        """
        for key in config:
            raise ParserConfigError(f"unknown key for parser {self.name!r}", key=str(key))
        return None

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        """Turn one policy rule into a matcher.

        An ``l7`` rule has string keys and values; a protocol with its own Cilium rule list
        (``rules.http``) gets each entry as written, so values may also be lists and mappings.

        Raises :class:`RuleError` naming the bad key. The default accepts only ``{}``
        (allow all), which is what every protocol must accept.
        """
        for key in rule:
            raise RuleError(f"unknown rule key for l7proto {self.name!r}", key=str(key))
        return ALLOW_ALL

    @abc.abstractmethod
    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        """Create the parser for one new connection; ``config`` is from validate_config."""


class _AllowAll:
    __slots__ = ()

    def matches(self, request: Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALLOW_ALL"


ALLOW_ALL: RuleMatcher = _AllowAll()
