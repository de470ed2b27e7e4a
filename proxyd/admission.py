"""Admission: whether an accepted connection is relayed, and where to. Sans-IO.

The listener (:meth:`proxyd.listener.ListenerRuntime.accept`) gathers the facts (its own
address, the original destination ``SO_ORIGINAL_DST`` answered, the upstream sockets connecting
now, the connections admitted) and asks; these functions answer without touching a socket, the
clock or the daemon, so each refusal and its order is unit-tested (tests/test_admission.py).

Refused, before any upstream connect and in this order (the first reason is the one logged):

1. not redirected: no original destination, or the listener's own address (what
   ``SO_ORIGINAL_DST`` answers where NAT is loaded but did not apply);
2. a loop: the original destination is one of proxyd's listeners, or the connection is
   proxyd's own upstream connection that a NAT rule sent back to it;
3. over ``limits.max_connections``;
4. denied by the policy at L3/L4 (:func:`by_policy`). Where a ``serverNames`` rule could apply,
   the verdict waits for the client's TLS ClientHello (:mod:`proxyd.tlsgate`), still before
   any upstream connect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

Address = tuple[str, int]

#: :func:`by_policy`'s answers besides :class:`Refuse`: relay; relay and write an ``audit``
#: connection line (audit mode, the policy would deny); read the ClientHello first.
ADMIT = "admit"
AUDIT = "audit"
READ_HELLO = "read-hello"


class Refuse(NamedTuple):
    """Close the connection at accept; ``reason`` goes to the daemon's log and the access log."""

    reason: str


class L4Verdict(Protocol):
    """The policy's verdict on a connection at L3/L4 (:class:`proxyd.policy.engine.ConnectionPolicy`)."""

    @property
    def l4_allowed(self) -> bool: ...

    @property
    def l4_reason(self) -> str: ...

    @property
    def audit_l4(self) -> bool: ...

    @property
    def reads_hello(self) -> bool: ...


def admit(
    fixed: Address | None,
    local: Address,
    src: Address,
    odst: Address | None,
    is_listener: Callable[[Address, str], bool],
    upstream_locals: Mapping[Address, Address],
    admitted: Callable[[], int],
    max_connections: int,
) -> tuple[Address, Refuse | None]:
    """Where the connection goes, and why it is refused before the policy is asked (or None).

    ``fixed``: the listener's ``upstream`` (then ``odst`` is not read). ``odst``: the original
    destination, unmapped, None when there is none. ``is_listener(addr, local_ip)``: whether
    ``addr`` is one of proxyd's listeners. ``upstream_locals``: local -> remote address of
    proxyd's upstream sockets. ``admitted()`` is asked last, and only when nothing else refused
    (a worker of ``workers: N`` publishes its count when asked).
    """
    refuse: Refuse | None = None
    if fixed is not None:
        upstream = fixed
    elif odst is None:
        upstream, refuse = local, Refuse("not redirected: no original destination")
    else:
        upstream = odst
        if upstream == local:
            refuse = Refuse("not redirected: original destination is the listener itself")
        elif is_listener(upstream, local[0]):
            refuse = Refuse(f"loop: original destination {upstream[0]}:{upstream[1]} is a proxyd listener")
        elif upstream_locals.get(src) == upstream:
            refuse = Refuse("loop: this is proxyd's own upstream connection, redirected back to it")
    if refuse is None and admitted() > max_connections:
        refuse = Refuse(f"max_connections ({max_connections}) reached")
    return upstream, refuse


def by_policy(l4: L4Verdict) -> str | Refuse:
    """The policy's part: :data:`ADMIT`, :data:`AUDIT`, :data:`READ_HELLO` or :class:`Refuse`."""
    if l4.reads_hello:
        return READ_HELLO  # decided on the ClientHello's SNI (proxyd.tlsgate)
    if not l4.l4_allowed:
        return Refuse(f"policy: {l4.l4_reason}")
    if l4.audit_l4:
        return AUDIT
    return ADMIT
