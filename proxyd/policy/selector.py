"""Endpoint selectors: ``matchLabels`` / ``matchExpressions`` over identity labels, as in Cilium.

Theory of operation. In Cilium a label is ``source:key=value`` (sources such as ``k8s``,
``container``, ``reserved``) and a selector key may name a source (``k8s:app``) or not
(``app``, which Cilium reads as ``any:app``); the source ``any`` matches a label of every source
(cilium/cilium ``pkg/labels``, ``pkg/policy/api/selector.go``). proxyd's identity labels come
from its config, where operators usually write plain keys (``app: web``) and sometimes copy
Cilium's prefixed ones (``k8s:app: web``). The rule, applied per selector key:

- ``app`` or ``any:app`` matches a label ``app`` of any source, or of none;
- ``k8s:app`` matches a label ``k8s:app``, or a label ``app`` written without a source (so the
  policies users already have for Kubernetes select the plain labels of the config), but not
  ``container:app``;
- ``reserved:...`` keys match only labels proxyd itself assigns (the config refuses them): an
  ``identities`` entry with an ``entity`` gives its addresses ``reserved:<entity>``, and a
  remote no entry covers (or an entry with ``entity: world``) carries ``reserved:world`` and
  ``reserved:world-ipv4`` or ``reserved:world-ipv6``, as traffic from outside the cluster does
  in Cilium.

Operators follow Kubernetes: ``In`` / ``NotIn`` (non-empty values), ``Exists`` /
``DoesNotExist`` (no values). ``NotIn`` also matches when the key is absent. A ``matchLabels``
entry ``k: v`` is ``k In [v]``. All requirements must hold; the empty selector ``{}`` has none.

Who a selector can match, as in Cilium: an ``endpointSelector`` matches the local labels as
they are. A *peer* selector (``fromEndpoints``/``toEndpoints``) matches only *endpoints*,
addresses whose ``identities`` entry has labels (Cilium scopes these selectors to pods, with a
namespace requirement), so ``{}`` never admits ``world`` or a bare entity; the one exception is
a selector that names a ``reserved:`` key, which Cilium leaves unscoped and which therefore
selects the entity it names (``reserved:host``, ``reserved:world``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

ANY_SOURCE: Final = "any"
RESERVED_SOURCE: Final = "reserved"
#: Node labels on node addresses (docs/kubernetes.md): only ``node:`` keys select them, and they
#: do not make an address an endpoint (Cilium's nodes are entities, selected by fromNodes).
NODE_SOURCE: Final = "node"
#: A pod's named container ports on its address (``namedport:http=8080``): read by named-port
#: rules (``port: http``), never by a selector.
NAMED_PORT_SOURCE: Final = "namedport"
#: The services an address backs (``service:NS/NAME`` = the service's labels, encoded by
#: :func:`encode_service_labels`): read by ``toServices`` rules, never by a selector.
SERVICE_SOURCE: Final = "service"
#: Sources only keys naming them select, which do not make an address an endpoint.
HIDDEN_SOURCES: Final = frozenset({NODE_SOURCE, NAMED_PORT_SOURCE, SERVICE_SOURCE})


def encode_service_labels(labels: Mapping[str, str]) -> str:
    """A service's labels as one label value (``k=v,k2=v2``; label keys and values have no ``,``)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def decode_service_labels(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(",") if "=" in item)
WORLD: Final = "world"
WORLD_LABEL: Final = "reserved:world"
#: The reserved names a world address carries (``world`` plus its address family's).
WORLD_NAMES: Final = frozenset({"world", "world-ipv4", "world-ipv6"})
OPERATORS: Final = ("In", "NotIn", "Exists", "DoesNotExist")


def split_key(key: str) -> tuple[str | None, str]:
    """``k8s:app`` -> (``k8s``, ``app``); ``app`` -> (None, ``app``); ``any:app`` -> (None, ``app``)."""
    source, sep, name = key.partition(":")
    if not sep or not source or not name:
        return None, key
    if source == ANY_SOURCE:
        return None, name
    return source, name


class LabelSet:
    """An endpoint's labels indexed for selector matching (build once per endpoint).

    ``reserved`` is the set of ``reserved:`` names it carries (its entity, or the world
    names); ``is_endpoint`` is True when it carries any other label.
    """

    __slots__ = ("_by_name", "is_endpoint", "labels", "reserved")

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = labels
        by_name: dict[str, list[tuple[str | None, str]]] = {}
        reserved: set[str] = set()
        endpoint = False
        for key, value in labels.items():
            source, name = split_key(str(key))
            by_name.setdefault(name, []).append((source, str(value)))
            if source == RESERVED_SOURCE:
                reserved.add(name)
            elif source not in HIDDEN_SOURCES:
                endpoint = True
        self._by_name: dict[str, tuple[tuple[str | None, str], ...]] = {
            k: tuple(v) for k, v in by_name.items()
        }
        self.reserved: frozenset[str] = frozenset(reserved)
        self.is_endpoint = endpoint

    @classmethod
    def remote(cls, labels: Mapping[str, str], ipv6: bool = False) -> LabelSet:
        """A remote endpoint's labels: none at all (or only ``reserved:world``) means world.

        A world address also carries ``reserved:world-ipv4`` or ``reserved:world-ipv6``.
        """
        if not labels or (len(labels) == 1 and WORLD_LABEL in labels):
            family = "reserved:world-ipv6" if ipv6 else "reserved:world-ipv4"
            return cls({WORLD_LABEL: "", family: ""})
        if all(split_key(str(k))[0] in HIDDEN_SOURCES for k in labels):
            # e.g. an external address a service's EndpointSlice names: still world to policy
            family = "reserved:world-ipv6" if ipv6 else "reserved:world-ipv4"
            return cls({**labels, WORLD_LABEL: "", family: ""})
        return cls(labels)

    @property
    def is_world(self) -> bool:
        """Outside every endpoint and entity: what CIDR rules and ``world`` select."""
        return not self.is_endpoint and WORLD in self.reserved

    @property
    def entity(self) -> str | None:
        """The entity name to show for this endpoint (``world``, ``host``, ...), if any."""
        if WORLD in self.reserved:
            return WORLD
        others = sorted(self.reserved - WORLD_NAMES)
        return others[0] if others else None

    def values(self, source: str | None, name: str) -> list[str]:
        """Values of the labels a selector key (source, name) refers to."""
        entries = self._by_name.get(name, ())
        if source is None:
            return [v for s, v in entries if s not in HIDDEN_SOURCES]
        if source == RESERVED_SOURCE or source in HIDDEN_SOURCES:
            return [v for s, v in entries if s == source]
        return [v for s, v in entries if s is None or s == source]


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``matchExpressions`` entry (or one ``matchLabels`` pair as ``In``)."""

    key: str  # as written in the policy
    operator: str  # one of OPERATORS
    values: frozenset[str] = frozenset()

    def matches(self, labels: LabelSet) -> bool:
        source, name = split_key(self.key)
        found = labels.values(source, name)
        op = self.operator
        if op == "In":
            return any(v in self.values for v in found)
        if op == "NotIn":
            return not any(v in self.values for v in found)
        if op == "Exists":
            return bool(found)
        return not found  # DoesNotExist

    def __str__(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{self.key} {self.operator}"
        if self.operator == "In" and len(self.values) == 1:
            return f"{self.key}={next(iter(self.values))}"
        return f"{self.key} {self.operator} [{', '.join(sorted(self.values))}]"


@dataclass(frozen=True, slots=True)
class EndpointSelector:
    """A label selector; the empty one selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def from_labels(cls, match_labels: Mapping[str, str]) -> EndpointSelector:
        return cls(tuple(Requirement(k, "In", frozenset([v])) for k, v in match_labels.items()))

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    @property
    def names_reserved(self) -> bool:
        """Whether a requirement is on a ``reserved:`` key (an entity selector, unscoped)."""
        return any(split_key(r.key)[0] == RESERVED_SOURCE for r in self.requirements)

    def names(self, *names: str, prefix: bool = False) -> bool:
        """Whether a requirement's key (any source) is one of ``names`` (or starts with one)."""
        for req in self.requirements:
            _, name = split_key(req.key)
            if name in names or (prefix and name.startswith(names)):
                return True
        return False

    def matches(self, labels: LabelSet) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def matches_peer(self, labels: LabelSet) -> bool:
        """As a ``fromEndpoints``/``toEndpoints`` selector: endpoints only (module docstring)."""
        if not labels.is_endpoint and not self.names_reserved:
            return False
        return self.matches(labels)

    def __str__(self) -> str:
        if not self.requirements:
            return "{} (all endpoints)"
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


WILDCARD: Final = EndpointSelector()
