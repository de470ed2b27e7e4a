"""The TLS gate: a connection's verdict from its ClientHello, before the upstream connect.

Where a ``serverNames`` rule could apply to a connection (the policy says so at accept:
``ConnectionPolicy.reads_hello``), the relay does not connect upstream at once. It hands the
client's first bytes to a :class:`HelloGate`, which reads the ClientHello
(:mod:`proxyd.tls.clienthello`, bounded by ``limits.buffer_bytes``) and, once it has an answer,
asks the policy again with the SNI (``with_sni``). Allowed: the relay connects and sends every
byte read so far, byte-exact, then relays as usual. Denied: a client that started with a TLS
handshake record gets the fatal ``access_denied`` alert in its own record version; anything
else (plain text, an SSLv2 hello) is closed without an answer (docs/policy.md, "TLS server
names"). The gate decides once; it never looks at later bytes.

No I/O here: the relay feeds bytes, the end of the stream and the request timeout in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from proxyd.context import L7Policy
from proxyd.parser import wire_text
from proxyd.tls.clienthello import (
    HELLO,
    NEED_MORE,
    NOT_TLS,
    ClientHello,
    ClientHelloReader,
    Outcome,
    access_denied_alert,
)


class SNIView(L7Policy, Protocol):
    """The connection's policy view (:class:`proxyd.policy.store.LiveConnectionPolicy`)."""

    def with_sni(self, sni: str | None) -> SNIView: ...

    def l4(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class GateVerdict:
    allowed: bool
    #: Denied by policy but let through (``policy.mode: audit``).
    audit: bool
    #: For the connection log line: why it was (or would have been) refused.
    reason: str
    #: Bounded label value for ``proxyd_tls_denials_total`` (``proxyd.metrics.TLS_DENIAL_REASONS``).
    label: str
    #: The connection's policy from now on (its parser's, on an ``l7proto`` listener).
    policy: L7Policy
    #: ``sni`` and ``alpn`` for the connection log line.
    fields: dict[str, Any] = field(default_factory=dict)
    #: What to send the client before closing when denied (None: close without an answer).
    alert: bytes | None = None
    policy_name: str | None = None


def sni_text(hello: ClientHello | None) -> str | None:
    """The SNI as policy matches it and the log shows it (wire bytes escaped), or None."""
    if hello is None or hello.sni is None:
        return None
    return wire_text(hello.sni)


class HelloGate:
    """Holds a connection's first bytes until its ClientHello decides it."""

    __slots__ = ("reader", "view")

    def __init__(self, view: SNIView, limit: int) -> None:
        self.view = view
        # A record header and a handshake header at least, whatever buffer_bytes says.
        self.reader = ClientHelloReader(max(limit, 16))

    @property
    def data(self) -> bytes:
        """Every byte the client sent so far: forwarded byte-exact once allowed."""
        return bytes(self.reader.data)

    def feed(self, data: bytes) -> GateVerdict | None:
        """The verdict once the bytes so far decide it, else None (read on)."""
        out = self.reader.feed(data)
        if out.kind is NEED_MORE:
            return None
        return self._verdict(out, "")

    def end(self, why: str) -> GateVerdict:
        """The stream ended or the request timeout passed (``why``: ``incomplete`` | ``timeout``)
        before a ClientHello was complete: decide without one."""
        out = self.reader.outcome or self.reader.feed(b"")
        if out.kind is NEED_MORE:
            return self._verdict(out, why)
        return self._verdict(out, "")

    def _verdict(self, out: Outcome, cut: str) -> GateVerdict:
        hello = out.hello if out.kind is HELLO else None
        sni = sni_text(hello)
        view = self.view.with_sni(sni)
        cp = view.l4()
        fields: dict[str, Any] = {
            "sni": sni,
            "alpn": [wire_text(p) for p in hello.alpn] if hello is not None else [],
        }
        if hello is not None:
            label = "sni_not_allowed" if sni is not None else "no_sni"
            what = f"SNI {sni!r} not allowed" if sni is not None else "ClientHello without SNI"
        elif cut:
            label = cut
            what = (
                "no complete ClientHello within request_timeout"
                if cut == "timeout"
                else "the client ended its stream before its ClientHello was complete"
            )
        elif out.kind is NOT_TLS:
            label, what = "not_tls", f"not TLS: {out.reason}"
        else:
            label, what = "malformed", f"malformed ClientHello: {out.reason}"
        reason = f"tls: {what} (policy: {cp.l4_reason})"
        alert = access_denied_alert(out.record_version) if out.record_version is not None else None
        allowed = bool(cp.l4_allowed)
        return GateVerdict(allowed, bool(cp.audit_l4), reason, label, view, fields, alert, cp.policy_name)
