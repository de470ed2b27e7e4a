"""``proxyd explain``: why a connection between two addresses is allowed or denied.

It resolves both endpoints through the ``identities`` table exactly as the daemon does
(docs/policy.md: the local endpoint is the destination on ingress and the source on egress;
the policy port is the destination's port), runs the engine's evaluation with tracing on, and
prints the local and remote labels, the documents whose specs select the local endpoint, every
rule that matches (and, of the selecting specs, those that do not, with why), the L3/L4 verdict
and the ``l7`` rules in force. :func:`explain_data` returns the same as structured data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxyd.policy.engine import Evaluation, PolicySet
from proxyd.policy.identity import parse_ip
from proxyd.policy.selector import LabelSet
from proxyd.policy.store import PolicyStore


class IdentityLookup(Protocol):
    """What explaining needs of the identities: :class:`IdentityMap`, or the daemon's view that
    puts the cluster's identities first (``origin_for`` then says where labels came from)."""

    def labels_for(self, ip: str) -> Mapping[str, str]: ...


def origin_of(identities: IdentityLookup, ip: str) -> str:
    """Where ``ip``'s labels came from: ``pod ns/name``, ``node NAME``, a static entry, or ""."""
    origin_for = getattr(identities, "origin_for", None)
    if origin_for is not None:
        return str(origin_for(ip))
    prefix_for = getattr(identities, "prefix_for", None)
    try:
        net = prefix_for(ip) if prefix_for is not None else None
    except ValueError:
        return ""
    return f"identities entry {net}" if net is not None else ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """What :func:`explain` prints, as data."""

    direction: str
    src: tuple[str, int]
    dst: tuple[str, int]
    local_labels: Mapping[str, str]
    remote_labels: Mapping[str, str]
    l7proto: str | None
    revision: int
    evaluation: Evaluation
    #: The TLS SNI the connection was evaluated with (``--sni``), or None.
    sni: str | None = None
    #: Where each endpoint's labels came from (``pod ns/name``, ``node NAME``, ``identities
    #: entry CIDR``), "" when nothing gave it labels.
    local_origin: str = ""
    remote_origin: str = ""

    @property
    def remote_ip(self) -> str:
        return self.src[0] if self.direction == "ingress" else self.dst[0]

    def as_dict(self) -> dict[str, Any]:
        ev = self.evaluation
        pol = ev.policy
        return {
            "direction": self.direction,
            "src": _addr(self.src),
            "dst": _addr(self.dst),
            "local_labels": dict(self.local_labels),
            "remote_labels": dict(self.remote_labels),
            "local_origin": self.local_origin,
            "remote_origin": self.remote_origin,
            "remote_entity": LabelSet.remote(
                self.remote_labels, ":" in self.remote_ip and parse_ip(self.remote_ip).version == 6
            ).entity,
            "l7proto": self.l7proto,
            "revision": self.revision,
            "selected_by": [{"document": d.name, "spec": s.path, "where": s.where} for d, s in ev.selecting],
            "deny": [str(r) for r in ev.deny],
            "allow": [str(r) for r in ev.allow_l4],
            "l7_rules": [
                {
                    "rule": str(ref),
                    "l7proto": ref.port_rule.l7.l7proto,
                    "rules": [dict(r) for r in ref.port_rule.l7.rules],
                }
                for ref, _ in ev.allow_l7
                if ref.port_rule is not None and ref.port_rule.l7 is not None
            ],
            "deny_all_l7": [{"rule": str(ref), "why": why} for ref, why in ev.deny_all_l7],
            "ignored": [{"rule": str(ref), "why": why} for ref, why in ev.ignored],
            "not_matching": [{"rule": str(ref), "why": why} for ref, why in ev.not_matching],
            "sni": self.sni,
            "reads_hello": pol.reads_hello,
            "l4_allowed": pol.l4_allowed and not pol.audit_l4,
            "l4_reason": pol.l4_reason,
            "policy": pol.policy_name,
            "l7": _l7_summary(ev),
        }

    def text(self) -> str:
        ev = self.evaluation
        pol = ev.policy
        local, remote = ("dst", "src") if self.direction == "ingress" else ("src", "dst")
        local_addr = self.dst if local == "dst" else self.src
        remote_addr = self.src if local == "dst" else self.dst
        lines = [
            f"direction: {self.direction}   port: {self.dst[1]}/TCP   "
            f"listener l7proto: {self.l7proto or '(none: plain L4)'}   policy revision: {self.revision}"
            + (f"   sni: {self.sni}" if self.sni is not None else ""),
            f"local  ({local}) {_addr(local_addr)}: {_labels(self.local_labels)}{_from(self.local_origin)}",
            f"remote ({remote}) {_addr(remote_addr)}: {_remote(self.remote_labels, remote_addr[0])}"
            + _from(self.remote_origin),
        ]
        if not ev.selecting:
            lines.append(f"selected by: no policy selects the local endpoint for {self.direction}")
        else:
            lines.append("selected by:")
            for doc, spec in ev.selecting:
                lines.append(
                    f"  {doc.name} {spec.path} ({spec.where}): endpointSelector {spec.endpoint_selector}"
                )
        for title, refs in (
            ("deny rules matching", ev.deny),
            ("allow rules matching (all requests)", ev.allow_l4),
        ):
            if refs:
                lines.append(f"{title}:")
                for ref in refs:
                    lines.append(f"  {ref}: {ref.rule.describe_l3()}{_ports(ref)}")
        if ev.allow_l7:
            lines.append("allow rules matching (with l7 rules):")
            for ref, _ in ev.allow_l7:
                lines.append(f"  {ref}: {ref.rule.describe_l3()}{_ports(ref)}")
        for title, pairs in (
            ("rules letting the connection in but no request", ev.deny_all_l7),
            ("matching rules that grant nothing here", ev.ignored),
            ("rules not matching", ev.not_matching),
        ):
            if pairs:
                lines.append(f"{title}:")
                for ref, why in pairs:
                    lines.append(f"  {ref}: {why}")
        if pol.audit_l4:
            verdict = "DENIED (audit mode: allowed and logged)"
        else:
            verdict = "allowed" if pol.l4_allowed else "DENIED"
        lines.append(f"L3/L4 verdict: {verdict}: {pol.l4_reason}")
        if pol.reads_hello:
            names = "; ".join(
                str(ref.port_rule.server_names)
                for ref in ev.sni_rules
                if ref.port_rule is not None and ref.port_rule.server_names is not None
            )
            given = f"SNI {self.sni!r}" if self.sni else "no SNI (give --sni NAME)"
            lines.append(
                f"TLS: serverNames rules apply ({names}): proxyd reads the ClientHello before connecting; "
                f"verdict above for {given}"
            )
        lines.append(f"L7: {_l7_summary(ev)}")
        for ref, _ in ev.allow_l7:
            pr = ref.port_rule
            if pr is None or pr.l7 is None:
                continue
            for i, rule in enumerate(pr.l7.rules):
                shown = ", ".join(f"{k}: {v}" for k, v in rule.items()) or "(empty: allows all)"
                lines.append(f"  - {{{shown}}}   [{ref.name} {pr.path}.rules.{pr.l7.key}[{i}]]")
        return "\n".join(lines) + "\n"


def _from(origin: str) -> str:
    return f"   [from {origin}]" if origin else ""


def _addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _labels(labels: Mapping[str, str]) -> str:
    plain = {k: v for k, v in labels.items() if not k.startswith("reserved:")}
    entity = LabelSet(labels).entity
    if not plain:
        return f"entity {entity}" if entity else "(no labels)"
    shown = "{" + ", ".join(f"{k}: {v}" for k, v in sorted(plain.items())) + "}"
    return f"{shown} (entity {entity})" if entity else shown


def _remote(labels: Mapping[str, str], ip: str) -> str:
    """The remote as policy sees it: an endpoint's labels, its entity, or world."""
    remote = LabelSet.remote(labels, ":" in ip and parse_ip(ip).version == 6)
    if remote.is_world:
        family = "world-ipv6" if "world-ipv6" in remote.reserved else "world-ipv4"
        return f"entity world ({family}: no identities entry gives it labels or an entity)"
    return _labels(labels)


def _ports(ref: Any) -> str:
    pr = ref.port_rule
    if pr is None:
        return ", all ports"
    names = f", serverNames {pr.server_names}" if pr.server_names is not None else ""
    return ", ports " + ", ".join(str(p) for p in pr.ports) + names


def _l7_summary(ev: Evaluation) -> str:
    pol = ev.policy
    if not ev.selecting:
        return "every request allowed (no policy)"
    if not pol.l4_allowed or pol.audit_l4:
        return "no request (connection denied)"
    if ev.l7proto is None:
        return "not parsed (plain L4 listener)"
    if pol.always is not None:
        return "every request allowed" if pol.always.allowed else "every request denied"
    n = len(pol.matchers)
    return f"a request is allowed when one of these {n} {ev.l7proto} rule(s) matches"


def explain_data(
    store_or_set: PolicyStore | PolicySet,
    identities: IdentityLookup,
    direction: str,
    src: tuple[str, int],
    dst: tuple[str, int],
    l7proto: str | None,
    sni: str | None = None,
    *,
    audit: bool = False,
) -> Explanation:
    """Evaluate the connection ``src`` -> ``dst`` as a listener of ``direction`` would, for a
    TLS client whose ClientHello names ``sni`` (None: no SNI); ``audit``: a listener whose policy
    mode is audit, which lets a would-be denial through.

    Raises ValueError for a bad direction or address.
    """
    pset = store_or_set.current if isinstance(store_or_set, PolicyStore) else store_or_set
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    local, remote = (dst, src) if direction == "ingress" else (src, dst)
    local_labels = identities.labels_for(local[0])
    remote_labels = identities.labels_for(remote[0])
    ev = pset.evaluate(
        direction, local_labels, remote[0], remote_labels, dst[1], l7proto, audit, trace=True, sni=sni
    )
    return Explanation(direction, src, dst, local_labels, remote_labels, l7proto, pset.revision, ev, sni,
                       origin_of(identities, local[0]), origin_of(identities, remote[0]))  # fmt: skip


def explain(
    store_or_set: PolicyStore | PolicySet,
    identities: IdentityLookup,
    direction: str,
    src: tuple[str, int],
    dst: tuple[str, int],
    l7proto: str | None,
    sni: str | None = None,
) -> str:
    """Human-readable account of the policy for ``src`` -> ``dst`` (see :func:`explain_data`)."""
    return explain_data(store_or_set, identities, direction, src, dst, l7proto, sni).text()
