"""One connection explained against a set of listeners: which listener judges it, and how.

Shared by ``GET /v1/explain`` (the running daemon's listeners, identities and policy, imported
documents included) and ``proxyd explain`` when no daemon answers (the files alone), so both
give the same answer to the same question and refuse the same questions.

A question is refused when the daemon would never judge it: a fixed-upstream listener judges
every connection with its upstream as the destination (never its own address, never another
one); a transparent listener refuses a connection addressed to itself (not redirected) or to
another proxyd listener (a loop). docs/admin-api.md ("GET /v1/explain") is the contract.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxyd.config import ListenerConfig, parse_hostport, parse_port
from proxyd.policy.engine import PolicySet
from proxyd.policy.explain import Explanation, IdentityLookup, explain_data
from proxyd.policy.store import PolicyStore

Address = tuple[str, int]


class ExplainRefused(ValueError):
    """The question has no answer: a bad address, an unknown listener, or a destination no
    listener judges. The message says which, and what to ask instead."""


def parse_src(value: str) -> Address:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (ip, port); ValueError if not."""
    host, port = value, "0"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not an address")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, parse_port(port, allow_zero=True)


def parse_dst(value: str) -> Address:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); ValueError if not."""
    return parse_hostport(value)


def _addr(a: Address) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _same(a: Address, b: Address) -> bool:
    if a[1] != b[1]:
        return False
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:  # an upstream given by name is never an --dst IP
        return a[0] == b[0]


def _is_address_of(lc: ListenerConfig, dst: Address) -> bool:
    """Whether a connection to ``dst`` reaches ``lc`` itself (as the daemon's loop check sees it)."""
    if dst[1] != lc.port:
        return False
    host = ipaddress.ip_address(lc.host)
    ip = ipaddress.ip_address(dst[0])
    return ip == host or (host.is_unspecified and (ip.is_loopback or ip.is_unspecified))


def why_not_judged(lc: ListenerConfig, dst: Address, listeners: Sequence[ListenerConfig]) -> str | None:
    """Why ``lc`` never judges a connection to ``dst``, or None when it does."""
    if lc.upstream is not None:
        if _same(dst, lc.upstream):
            return None
        own = " (that is the listener's own address)" if _is_address_of(lc, dst) else ""
        return (f"listener {lc.name!r} sends every connection to its fixed upstream "
                f"{_addr(lc.upstream)} and judges it with that destination, never {_addr(dst)}{own}: "
                f"ask with --dst {_addr(lc.upstream)}")  # fmt: skip
    if _is_address_of(lc, dst):
        return (f"listener {lc.name!r} refuses a connection addressed to its own address "
                f"{lc.address} (not redirected): ask with the destination the client used, which "
                "iptables redirected to the listener")  # fmt: skip
    loop = next((other for other in listeners if other is not lc and _is_address_of(other, dst)), None)
    if loop is not None:
        return (f"{_addr(dst)} is proxyd listener {loop.name!r}: listener {lc.name!r} refuses a "
                "connection redirected to it (a loop)")  # fmt: skip
    return None


def pick_listener(
    listeners: Sequence[ListenerConfig], dst: Address, name: str | None = None
) -> tuple[ListenerConfig, list[str]]:
    """The listener that judges a connection to ``dst`` (``name``, or the only candidate), and
    warnings. Raises :class:`ExplainRefused`."""
    warnings: list[str] = []
    if name:
        lc = next((lc for lc in listeners if lc.name == name), None)
        if lc is None:
            known = ", ".join(lc.name for lc in listeners)
            raise ExplainRefused(f"no listener named {name!r} (listeners: {known})")
        why = why_not_judged(lc, dst, listeners)
        if why is not None:
            raise ExplainRefused(why)
        if lc.upstream is None and lc.redirect is not None and dst[1] not in lc.redirect.ports:
            ports = ", ".join(str(p) for p in lc.redirect.ports)
            warnings.append(f"listener {lc.name!r} gets redirects for ports {ports} only "
                            f"(redirect.ports): port {dst[1]} reaches it only through rules proxyd "
                            "does not install")  # fmt: skip
        return lc, warnings
    judging = [lc for lc in listeners if why_not_judged(lc, dst, listeners) is None]
    fixed = [lc for lc in judging if lc.upstream is not None]
    redirected = [lc for lc in judging if lc.upstream is None and lc.redirect and dst[1] in lc.redirect.ports]
    catch_all = [lc for lc in judging if lc.upstream is None and lc.redirect is None]
    for group in (fixed + redirected, catch_all):
        if len(group) == 1:
            return group[0], warnings
        if len(group) > 1:
            names = ", ".join(lc.name for lc in group)
            raise ExplainRefused(
                f"several listeners could judge {_addr(dst)} ({names}): name one with --listener"
            )
    if len(listeners) == 1:
        why = why_not_judged(listeners[0], dst, listeners)
        if why is not None:
            raise ExplainRefused(why)
    whys = []
    for lc in listeners:
        if lc.upstream is not None:
            whys.append(f"{lc.name} judges only its upstream {_addr(lc.upstream)}")
        elif lc.redirect is not None:
            whys.append(f"{lc.name} gets ports {', '.join(str(p) for p in lc.redirect.ports)}")
    raise ExplainRefused(f"no listener judges {_addr(dst)} ({'; '.join(whys)}): "
                         "check --dst, or name a listener with --listener")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Answer:
    """What ``proxyd explain`` prints and ``GET /v1/explain`` returns."""

    listener: ListenerConfig
    mode: str
    explanation: Explanation
    warnings: tuple[str, ...] = ()

    def header(self) -> str:
        lc = self.listener
        return f"listener: {lc.name} ({lc.direction}, l7proto {lc.l7proto or 'none'})"

    def as_json(self) -> dict[str, Any]:
        lc = self.listener
        return {
            "listener": {
                "name": lc.name,
                "address": lc.address,
                "direction": lc.direction,
                "l7proto": lc.l7proto,
                "upstream": "original-destination" if lc.upstream is None else _addr(lc.upstream),
                "policy_mode": self.mode,
            },
            "revision": self.explanation.revision,
            "warnings": list(self.warnings),
            "text": f"{self.header()}\n{self.explanation.text()}",
            "explanation": self.explanation.as_dict(),
        }


def explain_connection(
    listeners: Sequence[ListenerConfig],
    policy: PolicyStore | PolicySet,
    identities: IdentityLookup,
    src: Address,
    dst: Address,
    *,
    listener: str | None = None,
    sni: str | None = None,
    default_mode: str = "enforce",
) -> Answer:
    """Explain ``src`` -> ``dst`` (a TLS client naming ``sni``, if given) as the listener that
    judges it would. Raises :class:`ExplainRefused`."""
    lc, warnings = pick_listener(listeners, dst, listener)
    mode = lc.policy_mode or default_mode
    explanation = explain_data(policy, identities, lc.direction, src, dst, lc.l7proto, sni,
                               audit=mode == "audit")  # fmt: skip
    return Answer(lc, mode, explanation, tuple(warnings))
