"""Endpoint selectors: matchLabels, matchExpressions operators, {} and Cilium's label sources."""

from __future__ import annotations

import pytest

from proxyd.policy.selector import EndpointSelector, LabelSet, Requirement, split_key

LABELS = {"app": "web", "k8s:tier": "front", "container:role": "cache", "env": ""}


def req(key: str, op: str, *values: str) -> EndpointSelector:
    return EndpointSelector((Requirement(key, op, frozenset(values)),))


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        (EndpointSelector(), True),
        (EndpointSelector.from_labels({"app": "web"}), True),
        (EndpointSelector.from_labels({"app": "db"}), False),
        (EndpointSelector.from_labels({"app": "web", "tier": "front"}), True),
        (EndpointSelector.from_labels({"app": "web", "tier": "back"}), False),
        (EndpointSelector.from_labels({"env": ""}), True),
        (req("app", "In", "db", "web"), True),
        (req("app", "In", "db"), False),
        (req("app", "NotIn", "db"), True),
        (req("app", "NotIn", "web"), False),
        (req("missing", "NotIn", "web"), True),
        (req("app", "Exists"), True),
        (req("missing", "Exists"), False),
        (req("app", "DoesNotExist"), False),
        (req("missing", "DoesNotExist"), True),
        # sources: plain and any: match every source; k8s: matches k8s: and unsourced labels
        (EndpointSelector.from_labels({"k8s:app": "web"}), True),
        (EndpointSelector.from_labels({"any:app": "web"}), True),
        (EndpointSelector.from_labels({"k8s:tier": "front"}), True),
        (EndpointSelector.from_labels({"tier": "front"}), True),
        (EndpointSelector.from_labels({"any:tier": "front"}), True),
        (EndpointSelector.from_labels({"container:tier": "front"}), False),
        (EndpointSelector.from_labels({"k8s:role": "cache"}), False),
        (EndpointSelector.from_labels({"container:role": "cache"}), True),
        (EndpointSelector.from_labels({"role": "cache"}), True),
        (req("k8s:role", "DoesNotExist"), True),
        (req("k8s:tier", "Exists"), True),
        # reserved: only labels proxyd assigns
        (EndpointSelector.from_labels({"reserved:world": ""}), False),
    ],
)
def test_selector_matches(selector: EndpointSelector, matches: bool) -> None:
    assert selector.matches(LabelSet(LABELS)) is matches


def test_remote_without_labels_is_world() -> None:
    world = EndpointSelector.from_labels({"reserved:world": ""})
    assert world.matches(LabelSet.remote({}))
    assert not world.matches(LabelSet.remote({"app": "x"}))
    assert not world.matches(LabelSet.remote({"world": ""}))
    assert not world.matches(LabelSet({}))
    assert EndpointSelector().matches(LabelSet.remote({}))


def test_split_key() -> None:
    assert split_key("k8s:app") == ("k8s", "app")
    assert split_key("any:app") == (None, "app")
    assert split_key("app") == (None, "app")
    assert split_key("io.kubernetes.pod.namespace") == (None, "io.kubernetes.pod.namespace")
    assert split_key(":x") == (None, ":x")


def test_str() -> None:
    assert str(EndpointSelector()) == "{} (all endpoints)"
    assert str(req("app", "In", "b", "a")) == "{app In [a, b]}"
    assert str(req("app", "Exists")) == "{app Exists}"
    assert str(EndpointSelector.from_labels({"app": "a", "k8s:tier": "b"})) == "{app=a, k8s:tier=b}"
