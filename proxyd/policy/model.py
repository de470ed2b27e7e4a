"""The policy model: immutable, validated values built by :mod:`proxyd.policy.loader`.

A :class:`Document` is one ``CiliumNetworkPolicy`` (or one JSON file of bare rules); it holds
one :class:`Spec` per ``spec`` / ``specs`` entry, each with an endpoint selector and its
:class:`Rule` list (``ingress``, ``egress``, ``ingressDeny``, ``egressDeny`` entries). Rules keep
their field path and source line so that ``explain`` and error messages can point at them.
Everything here is checked when built; the enforcement engine (:mod:`proxyd.policy.engine`)
only reads it.

Rule semantics, as in Cilium (docs/policy.md):

- a rule's L3 part is its endpoint selectors, its CIDR rules *or* its entities (Cilium does not
  allow two kinds in one rule). A rule that gives none of them matches every remote when it
  has ``toPorts``, and matches nothing when it has neither (Cilium's ``ingress: [{}]``,
  "default deny"). A rule that gives one as an empty list (``fromEndpoints: []``) has an L3
  part that selects nothing: it matches no remote;
- endpoint selectors match only endpoints (see :mod:`proxyd.policy.selector`), CIDR rules only
  ``world`` addresses (Cilium's CIDR identities cover only what is outside the cluster), and
  entities as :func:`entity_matches` says;
- a rule without ``toPorts`` matches every port; ``port: 0`` matches every port; ``endPort``
  makes a range; a ``toPorts`` entry without ``ports`` matches no port. proxyd only relays
  TCP, so ``UDP`` / ``SCTP`` ports never match (they describe traffic proxyd does not see, and
  the loader warns about them); ``TCP`` and ``ANY`` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxyd.parser import RuleMatcher
from proxyd.policy.identity import IPAddress, IPNetwork, parse_ip
from proxyd.policy.selector import (
    SERVICE_SOURCE,
    WORLD_NAMES,
    EndpointSelector,
    LabelSet,
    decode_service_labels,
)
from proxyd.policy.servernames import ServerNames

INGRESS: Final = "ingress"
EGRESS: Final = "egress"
DIRECTIONS: Final = (INGRESS, EGRESS)
#: Entities an ``identities`` entry may give an address (Cilium's reserved identities).
ENTITIES: Final = ("host", "remote-node", "kube-apiserver", "health", "ingress", "init", "unmanaged", "world")
#: Names ``fromEntities`` / ``toEntities`` accept: the entities plus Cilium's aggregates.
POLICY_ENTITIES: Final = (*ENTITIES, "world-ipv4", "world-ipv6", "cluster", "all", "none")
#: Protocols that match a TCP connection.
TCP_PROTOCOLS: Final = frozenset({"TCP", "ANY"})
PROTOCOLS: Final = ("TCP", "UDP", "SCTP", "ANY")


def entity_matches(entity: str, labels: LabelSet) -> bool:
    """Whether a ``fromEntities``/``toEntities`` name selects a remote with ``labels``.

    ``all``: everything. ``none``: nothing. ``cluster``: every endpoint and every entity but
    world. ``world``, ``world-ipv4``, ``world-ipv6``: an address outside every endpoint and
    entity (of that family). Any other name: an address whose entry has that entity.
    """
    if entity == "all":
        return True
    if entity == "cluster":
        return labels.is_endpoint or bool(labels.reserved - WORLD_NAMES)
    return entity in labels.reserved


@dataclass(frozen=True, slots=True)
class CIDRRule:
    """``fromCIDR`` / ``toCIDR`` entry, or ``fromCIDRSet`` / ``toCIDRSet`` with ``except``."""

    cidr: IPNetwork
    except_: tuple[IPNetwork, ...] = ()

    def contains(self, addr: IPAddress) -> bool:
        if addr not in self.cidr:
            return False
        return not any(addr in ex for ex in self.except_)

    def __str__(self) -> str:
        if self.except_:
            return f"{self.cidr} except {', '.join(str(e) for e in self.except_)}"
        return str(self.cidr)


@dataclass(frozen=True, slots=True)
class PortProtocol:
    """One ``toPorts[].ports[]`` entry: ``port`` (0 = all) up to ``end_port``, and protocol."""

    port: int
    end_port: int
    protocol: str = "ANY"
    #: A named port (``port: http``, with a ``kubernetes`` source): the destination pod's
    #: container port of that name, read from its ``namedport:NAME`` label (docs/kubernetes.md).
    name: str = ""

    def matches(self, port: int, destination: Mapping[str, str] | None = None) -> bool:
        """Whether a TCP connection to ``port`` (of an endpoint with labels ``destination``) matches."""
        if self.protocol not in TCP_PROTOCOLS:
            return False
        if self.name:
            named = destination.get(f"namedport:{self.name}") if destination is not None else None
            return named is not None and named == str(port)
        return self.port == 0 or self.port <= port <= self.end_port

    def __str__(self) -> str:
        if self.name:
            return f"{self.name}/{self.protocol}"
        if self.port == 0:
            where = "*"
        elif self.end_port != self.port:
            where = f"{self.port}-{self.end_port}"
        else:
            where = str(self.port)
        return f"{where}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class L7Rules:
    """``toPorts[].rules``: ``l7proto`` and its key-value ``l7`` rules, or ``http`` and its rules.

    A visibility-only rule (``l7proto: X`` without ``l7``, ``l7: []``, ``http: []``) is held
    as the one rule ``{}``, which every parser compiles to "allow all". ``matchers`` holds the
    compiled rules, in order; it is None when no parser of that name was registered at load
    time, which makes the port deny-all for L7 requests.
    """

    l7proto: str
    rules: tuple[Mapping[str, Any], ...]
    matchers: tuple[RuleMatcher, ...] | None = field(default=None, compare=False)
    where: str = ""
    #: The policy field the rules came from: ``l7`` (key-value rules for ``l7proto``), ``http``
    #: or ``kafka`` (Cilium's own rule lists, for the parser registered under that name).
    key: str = "l7"

    @property
    def known(self) -> bool:
        return self.matchers is not None


@dataclass(frozen=True, slots=True)
class PortRule:
    """One ``toPorts`` entry: the ports it names and, optionally, their L7 rules.

    ``server_names`` (``serverNames``): the entry matches only connections whose TLS
    ClientHello carries an SNI they allow (never together with L7 rules: the loader refuses it).
    """

    ports: tuple[PortProtocol, ...]
    l7: L7Rules | None = None
    path: str = ""
    where: str = ""
    server_names: ServerNames | None = None

    def matches(self, port: int, destination: Mapping[str, str] | None = None) -> bool:
        return any(p.matches(port, destination) for p in self.ports)


@dataclass(frozen=True, slots=True)
class ServiceSelector:
    """One ``toServices`` entry: a service by name, or services by label, in a namespace.

    It matches an address that backs a matching service (its ``service:NS/NAME`` labels, from
    the EndpointSlices the ``kubernetes`` source reads; docs/kubernetes.md).
    """

    namespace: str | None  # None: any namespace
    name: str | None = None  # k8sService
    selector: EndpointSelector | None = None  # k8sServiceSelector

    def matches(self, labels: LabelSet) -> bool:
        for key, value in labels.labels.items():
            source, sep, rest = str(key).partition(":")
            if source != SERVICE_SOURCE or not sep:
                continue
            ns, _, name = rest.partition("/")
            if self.namespace is not None and ns != self.namespace:
                continue
            if self.name is not None and name != self.name:
                continue
            sel = self.selector
            if sel is None or sel.matches(LabelSet(decode_service_labels(value))):
                return True
        return False

    def __str__(self) -> str:
        ns = self.namespace or "*"
        if self.name is not None:
            return f"k8sService {ns}/{self.name}"
        return f"k8sServiceSelector {ns} {self.selector}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of ``ingress``, ``egress``, ``ingressDeny`` or ``egressDeny``."""

    direction: str  # ingress | egress
    deny: bool
    endpoints: tuple[EndpointSelector, ...] = ()
    cidrs: tuple[CIDRRule, ...] = ()
    to_ports: tuple[PortRule, ...] = ()
    path: str = ""
    where: str = ""
    entities: tuple[str, ...] = ()
    #: Whether the rule gives an L3 field at all; given but empty, it selects no remote.
    l3: bool = False
    services: tuple[ServiceSelector, ...] = ()

    @property
    def section(self) -> str:
        """The policy field this rule came from: ``ingress``, ``egressDeny``, ..."""
        return self.direction + ("Deny" if self.deny else "")

    @property
    def has_l3(self) -> bool:
        return self.l3 or bool(self.endpoints or self.cidrs or self.entities or self.services)

    def matches_remote(self, addr: IPAddress, labels: LabelSet) -> bool:
        """Whether the rule's L3 part matches the remote endpoint (see module docstring)."""
        if self.endpoints:
            return any(sel.matches_peer(labels) for sel in self.endpoints)
        if self.cidrs:
            return labels.is_world and any(c.contains(addr) for c in self.cidrs)
        if self.entities:
            return any(entity_matches(e, labels) for e in self.entities)
        if self.services:
            return any(s.matches(labels) for s in self.services)
        if self.l3:
            return False  # an explicitly empty list selects nothing
        return bool(self.to_ports)

    def describe_l3(self) -> str:
        side = "from" if self.direction == INGRESS else "to"
        if self.endpoints:
            return f"{side}Endpoints " + " | ".join(str(s) for s in self.endpoints)
        if self.cidrs:
            return f"{side}CIDR " + " | ".join(str(c) for c in self.cidrs)
        if self.entities:
            return f"{side}Entities " + ", ".join(self.entities)
        if self.services:
            return "toServices " + " | ".join(str(s) for s in self.services)
        if self.l3:
            return "no remote (an empty list selects nothing)"
        if self.to_ports:
            return "any remote"
        return "no remote (empty rule: default deny)"


@dataclass(frozen=True, slots=True)
class Spec:
    """One ``spec`` (or ``specs[i]``): which endpoints it selects and its rules."""

    endpoint_selector: EndpointSelector
    rules: tuple[Rule, ...]
    description: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    path: str = "spec"
    where: str = ""
    #: ``enableDefaultDeny``: (ingress, egress), None where not given.
    enable_default_deny: tuple[bool | None, bool | None] = (None, None)

    def has_rules(self, direction: str) -> bool:
        """Whether this spec has any rule (allow or deny) for ``direction``."""
        return any(r.direction == direction for r in self.rules)

    def default_deny(self, direction: str) -> bool:
        """Whether this spec puts a selected endpoint in default deny for ``direction``.

        As in Cilium: ``enableDefaultDeny`` for that direction when given, else whether the
        spec has rules (allow or deny) for it.
        """
        given = self.enable_default_deny[0 if direction == INGRESS else 1]
        return self.has_rules(direction) if given is None else given

    def selects_direction(self, direction: str) -> bool:
        """Whether this spec takes part in ``direction`` at all: as in Cilium, only when it has
        rules (allow or deny) for it; ``enableDefaultDeny`` alone enforces nothing."""
        return self.has_rules(direction)


@dataclass(frozen=True, slots=True)
class Document:
    """One policy document: a CiliumNetworkPolicy, or a JSON file of bare rules."""

    name: str  # metadata.name; `namespace/name` for a namespaced CiliumNetworkPolicy
    specs: tuple[Spec, ...]
    source: str  # file path, or where an imported document came from
    kind: str = "CiliumNetworkPolicy"
    namespace: str | None = None
    where: str = ""
    #: The document as JSON-able data, in CiliumNetworkPolicy shape (for GET /v1/policy and
    #: for persisting imported documents).
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: Things ``proxyd check`` should report that do not make the document invalid.
    warnings: tuple[str, ...] = ()
    #: The document's ``description`` (top level or ``metadata.description``), for display.
    description: str = ""


def addr_of(ip: str) -> IPAddress:
    """Parse a remote address for CIDR matching (IPv4-mapped IPv6 becomes IPv4)."""
    return parse_ip(ip)


__all__ = [
    "DIRECTIONS",
    "EGRESS",
    "INGRESS",
    "CIDRRule",
    "Document",
    "EndpointSelector",
    "L7Rules",
    "PortProtocol",
    "PortRule",
    "Rule",
    "Spec",
    "addr_of",
    "entity_matches",
]
