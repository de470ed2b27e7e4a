"""Cilium's ``rules.kafka``: the fields and checks of its PortRuleKafka, role expansion, topic
semantics, and the policy loader reporting a bad value at its line."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxyd.errors import PolicyError, RuleError
from proxyd.parser import ALLOW_ALL
from proxyd.parsers.kafka.rules import API_NAMES, KafkaRequest, compile_rule
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import parse_text
from proxyd.registry import Registry

REGISTRY = Registry.load(entry_point_plugins=False)

# Cilium's Kafka getting-started policy (Documentation/security/kafka.rst), as written there.
EMPIRE = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
description: "enable empire-hq to produce to empire-announce and deathstar-plans"
metadata:
  name: "rule1"
spec:
  endpointSelector:
    matchLabels:
      app: kafka
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: empire-hq
    toPorts:
    - ports:
      - port: "9092"
        protocol: TCP
      rules:
        kafka:
        - role: "produce"
          topic: "deathstar-plans"
        - role: "produce"
          topic: "empire-announce"
  - fromEndpoints:
    - matchLabels:
        app: empire-outpost
    toPorts:
    - ports:
      - port: "9092"
        protocol: TCP
      rules:
        kafka:
        - role: "consume"
          topic: "empire-announce"
"""


def r(key: int, topic: str | None = None, *, version: int = 9, client: str | None = "c", typed: bool = True,
      trans: bool = False) -> KafkaRequest:  # fmt: skip
    return KafkaRequest(key, version, client, topic, typed, trans)


def test_empire_policy_loads_and_decides() -> None:
    docs = parse_text(EMPIRE, "p.yaml", REGISTRY)
    ps = PolicySet(docs, REGISTRY)
    hq = ps.connection_policy("ingress", {"app": "kafka"}, "10.0.0.2", {"app": "empire-hq"}, 9092, "kafka")
    outpost = ps.connection_policy(
        "ingress", {"app": "kafka"}, "10.0.0.2", {"app": "empire-outpost"}, 9092, "kafka"
    )
    assert hq.decide(r(0, "deathstar-plans")).allowed
    assert hq.decide(r(0, "empire-announce")).allowed
    assert not hq.decide(r(1, "empire-announce")).allowed  # hq may not consume
    assert not outpost.decide(r(0, "empire-announce")).allowed
    assert outpost.decide(r(1, "empire-announce")).allowed
    assert not outpost.decide(r(1, "deathstar-plans")).allowed
    assert outpost.decide(r(12, None, typed=False)).allowed  # Heartbeat carries no topic: ignored
    assert not outpost.decide(r(1, None)).allowed  # a Fetch naming no topic: topic rules don't match


@pytest.mark.parametrize(
    ("rule", "key", "problem"),
    [
        ({"role": "produce", "apiKey": "fetch"}, "apiKey", "cannot set both"),
        ({"role": "admin"}, "role", "invalid Kafka role"),
        ({"apiKey": "nope"}, "apiKey", "invalid Kafka apiKey"),
        ({"apiVersion": "x1"}, "apiVersion", "invalid Kafka apiVersion"),
        ({"apiVersion": "-1"}, "apiVersion", "invalid Kafka apiVersion"),
        ({"apiVersion": "32768"}, "apiVersion", "invalid Kafka apiVersion"),
        ({"topic": "a/b"}, "topic", "invalid Kafka topic"),
        ({"topic": "t" * 256}, "topic", "maximum len"),
        ({"topics": "x"}, "topics", "unknown field"),
        ({"topic": 5}, "topic", "must be a string"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(rule: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(RuleError) as exc:
        compile_rule(rule)
    assert exc.value.key == key and problem in str(exc.value)


def test_names_roles_and_matching() -> None:
    assert compile_rule({}) is ALLOW_ALL
    assert compile_rule({"topic": ""}) is ALLOW_ALL  # Go's omitempty: "" is absent
    assert API_NAMES[2] == "offsets" and API_NAMES[36] == "saslauthenticate"
    assert compile_rule({"apiKey": "ListOffsets"}).matches(r(2))  # Kafka's name too, any case
    assert compile_rule({"apiKey": "OFFSETS"}).matches(r(2))
    produce = compile_rule({"role": "Produce"})
    assert all(produce.matches(r(k)) for k in (0, 3, 18, 22))
    assert not produce.matches(r(22, trans=True))  # transactions need an explicit apiKey rule
    assert not produce.matches(r(1))
    consume = compile_rule({"role": "consume"})
    assert all(consume.matches(r(k)) for k in (1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23))
    assert not consume.matches(r(0))
    v = compile_rule({"apiKey": "fetch", "apiVersion": "+11", "clientID": "me", "topic": "t"})
    assert v.matches(r(1, "t", version=11, client="me"))
    assert not v.matches(r(1, "t", version=12, client="me"))
    assert not v.matches(r(1, "t", version=11, client="you"))
    assert not v.matches(r(1, "u", version=11, client="me"))
    assert not v.matches(r(1, None, version=11, client="me"))


AT = "p.yaml:20: spec.ingress[0].toPorts[0].rules.kafka[0]."


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        ('        - role: "produce"\n          apiKey: fetch\n', AT.replace("20", "21") + "apiKey: cannot"),
        ('        - role: "producer"\n', AT + "role: invalid"),
        ('        - topic: "a b"\n', AT + "topic: invalid"),
        ('        - apiVersion: "v1"\n', AT + "apiVersion: invalid"),
        ('        - colour: red\n', AT + "colour: unknown"),
    ],
)  # fmt: skip
def test_rule_errors_are_reported_at_their_line(rule: str, where: str) -> None:
    text = EMPIRE[: EMPIRE.index('        - role: "produce"\n          topic: "deathstar-plans"')] + rule
    with pytest.raises(PolicyError) as exc:
        parse_text(text, "p.yaml", REGISTRY)
    assert any(p.startswith(where) for p in exc.value.problems), exc.value.problems


def test_cilium_forms_empty_list_json_import_and_one_rule_type_per_port() -> None:
    # `kafka: []`: parsed by the kafka parser, every request allowed (Cilium's visibility form)
    consume = '        kafka:\n        - role: "consume"\n          topic: "empire-announce"\n'
    visibility = EMPIRE.replace(consume, "        kafka: []\n")
    assert "kafka: []" in visibility
    ps = PolicySet(parse_text(visibility, "p.yaml", REGISTRY), REGISTRY)
    cp = ps.connection_policy(
        "ingress", {"app": "kafka"}, "10.0.0.2", {"app": "empire-outpost"}, 9092, "kafka"
    )
    assert cp.decide(r(0, "anything")).allowed and cp.decide(r(32, None, typed=False)).allowed
    imported = json.dumps([{
        "endpointSelector": {"matchLabels": {"app": "kafka"}},
        "ingress": [{"toPorts": [{"ports": [{"port": "9092", "protocol": "tcp"}],
                                  "Rules": {"Kafka": [{"APIKey": "produce", "Topic": "t"}]}}]}],
    }])  # fmt: skip
    ps = PolicySet(parse_text(imported, "p.json", REGISTRY), REGISTRY)
    cp = ps.connection_policy("ingress", {"app": "kafka"}, "10.0.0.2", {}, 9092, "kafka")
    assert cp.decide(r(0, "t")).allowed and not cp.decide(r(0, "u")).allowed
    both = EMPIRE.replace(
        '        kafka:\n        - role: "consume"',
        '        http: [{}]\n        kafka:\n        - role: "consume"',
    )
    with pytest.raises(PolicyError) as exc:
        parse_text(both, "p.yaml", REGISTRY)
    assert any("one L7 rule type per port" in p for p in exc.value.problems)
