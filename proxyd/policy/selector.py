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
- ``reserved:...`` keys match only labels proxyd itself assigns: a remote endpoint with no
  identity labels at all carries ``reserved:world`` (as traffic from outside the cluster does in
  Cilium). The local endpoint never gets reserved labels.

Operators follow Kubernetes: ``In`` / ``NotIn`` (non-empty values), ``Exists`` /
``DoesNotExist`` (no values). ``NotIn`` also matches when the key is absent. A ``matchLabels``
entry ``k: v`` is ``k In [v]``. All requirements must hold; the empty selector ``{}`` has none
and so selects every endpoint, labelled or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

ANY_SOURCE: Final = "any"
RESERVED_SOURCE: Final = "reserved"
WORLD_LABEL: Final = "reserved:world"
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
    """An endpoint's labels indexed for selector matching (build once per endpoint)."""

    __slots__ = ("_by_name", "labels")

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = labels
        by_name: dict[str, list[tuple[str | None, str]]] = {}
        for key, value in labels.items():
            source, name = split_key(str(key))
            by_name.setdefault(name, []).append((source, str(value)))
        self._by_name: dict[str, tuple[tuple[str | None, str], ...]] = {
            k: tuple(v) for k, v in by_name.items()
        }

    @classmethod
    def remote(cls, labels: Mapping[str, str]) -> LabelSet:
        """A remote endpoint's labels: none at all means ``reserved:world``."""
        return cls(labels if labels else {WORLD_LABEL: ""})

    def values(self, source: str | None, name: str) -> list[str]:
        """Values of the labels a selector key (source, name) refers to."""
        entries = self._by_name.get(name, ())
        if source is None:
            return [v for _, v in entries]
        if source == RESERVED_SOURCE:
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

    def matches(self, labels: LabelSet) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def __str__(self) -> str:
        if not self.requirements:
            return "{} (all endpoints)"
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


WILDCARD: Final = EndpointSelector()
