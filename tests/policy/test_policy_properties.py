"""Monotonicity of the policy (issue 3): more allow rules never deny more, more deny rules never allow more.

Small random policies over a few labels, addresses, ports and r2d2 rules are compared before and
after one rule is added, over every connection of a small grid (both directions, two local
endpoints, IPv4 and IPv6 remotes with and without labels, two ports, r2d2 / other / plain L4
listeners) and four requests. The allow property holds once the direction is selected (adding
the first rule that selects an endpoint is what turns it default-deny), so every base policy
here selects every endpoint in both directions with Cilium's empty rule ``{}``.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import build, cnp

from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy.engine import PolicySet

DIRECTIONS = ("ingress", "egress")
LOCALS = ({"app": "a"}, {"app": "b"})
REMOTES = (
    ("10.0.0.1", {"app": "a"}),
    ("10.0.0.2", {"app": "b"}),
    ("10.0.0.3", {}),
    ("fd00::1", {"app": "c"}),
    ("fd00::2", {}),
)
PORTS = (80, 81)
LISTENER_PROTOS = ("r2d2", "memcache", None)
REQUESTS = (
    R2d2Request("READ", "/public/x"),
    R2d2Request("READ", "/secret"),
    R2d2Request("WRITE", "/x"),
    R2d2Request("HALT", ""),
)

labels = st.sampled_from(["a", "b", "c"])
selectors = st.one_of(
    st.just({}),
    labels.map(lambda v: {"matchLabels": {"app": v}}),
    st.builds(
        lambda op, vs: {"matchExpressions": [{"key": "app", "operator": op, "values": vs}]},
        st.sampled_from(["In", "NotIn"]),
        st.lists(labels, min_size=1, max_size=2, unique=True),
    ),
    st.sampled_from(["Exists", "DoesNotExist"]).map(
        lambda op: {"matchExpressions": [{"key": "app", "operator": op}]}
    ),
)
cidrs = st.sampled_from(["10.0.0.0/30", "10.0.0.2/31", "10.0.0.1/32", "fd00::/126", "0.0.0.0/0", "::/0"])
cidr_sets = st.sampled_from(
    [
        {"cidr": "10.0.0.0/24", "except": ["10.0.0.2/32"]},
        {"cidr": "fd00::/64", "except": ["fd00::2/128"]},
        {"cidr": "10.0.0.0/8"},
    ]
)
r2d2_rules = st.lists(
    st.sampled_from(
        [{}, {"cmd": "READ"}, {"cmd": "HALT"}, {"cmd": "READ", "file": "^/public"}, {"file": "x"}]
    ),
    min_size=1,
    max_size=3,
)
l7_rules = st.one_of(
    st.none(),
    r2d2_rules.map(lambda rules: {"l7proto": "r2d2", "l7": rules}),
    st.just({"l7proto": "memcache", "l7": [{"command": "get"}]}),
    st.just({"l7proto": "gopher", "l7": [{}]}),
)
ports = st.lists(
    st.sampled_from(
        [{"port": "80", "protocol": "TCP"}, {"port": 81}, {"port": 0}, {"port": 80, "protocol": "UDP"}]
    ),
    min_size=1,
    max_size=2,
)


@st.composite
def rules(draw: st.DrawFn, direction: str, deny: bool) -> dict[str, Any]:
    side = "from" if direction == "ingress" else "to"
    rule: dict[str, Any] = {}
    l3 = draw(st.sampled_from(["none", "endpoints", "cidr", "cidrset"]))
    if l3 == "endpoints":
        rule[f"{side}Endpoints"] = draw(st.lists(selectors, min_size=1, max_size=2))
    elif l3 == "cidr":
        rule[f"{side}CIDR"] = draw(st.lists(cidrs, min_size=1, max_size=2))
    elif l3 == "cidrset":
        rule[f"{side}CIDRSet"] = [draw(cidr_sets)]
    if draw(st.booleans()):
        entry: dict[str, Any] = {"ports": draw(ports)}
        l7 = None if deny else draw(l7_rules)
        if l7 is not None:
            entry["rules"] = l7
        rule["toPorts"] = [entry]
    return rule


@st.composite
def specs(draw: st.DrawFn, allow_deny: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": draw(selectors)}
    for direction in DIRECTIONS:
        allow = draw(st.lists(rules(direction, False), max_size=2))
        if allow:
            spec[direction] = allow
        if allow_deny:
            deny = draw(st.lists(rules(direction, True), max_size=1))
            if deny:
                spec[direction + "Deny"] = deny
    return spec


BASE_SELECT_ALL = {"endpointSelector": {}, "ingress": [{}], "egress": [{}]}


def verdicts(ps: PolicySet) -> dict[tuple[Any, ...], tuple[bool, tuple[bool, ...]]]:
    out = {}
    for d, local, (rip, rlabels), port, proto in itertools.product(
        DIRECTIONS, range(len(LOCALS)), REMOTES, PORTS, LISTENER_PROTOS
    ):
        cp = ps.connection_policy(d, LOCALS[local], rip, rlabels, port, proto)
        reqs = tuple(cp.l4_allowed and cp.decide(r).allowed for r in REQUESTS)
        out[(d, local, rip, port, proto)] = (cp.l4_allowed, reqs)
    return out


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    base=st.lists(specs(), max_size=3),
    direction=st.sampled_from(DIRECTIONS),
    selector=selectors,
    data=st.data(),
)
def test_adding_an_allow_rule_never_denies_more(
    base: list[dict[str, Any]], direction: str, selector: dict[str, Any], data: st.DataObject
) -> None:
    new_rule = data.draw(rules(direction, False))
    as_new_document = data.draw(st.booleans())
    docs = [cnp("base", BASE_SELECT_ALL, *base)]
    before = verdicts(build(*docs))
    if as_new_document:
        docs.append(cnp("added", {"endpointSelector": selector, direction: [new_rule]}))
    else:
        first = dict(BASE_SELECT_ALL)
        first[direction] = [*first[direction], new_rule]
        docs = [cnp("base", first, *base)]
    after = verdicts(build(*docs))
    for key, (l4, reqs) in before.items():
        l4_after, reqs_after = after[key]
        assert l4_after or not l4, key
        for i, (was, now) in enumerate(zip(reqs, reqs_after, strict=True)):
            assert now or not was, (key, REQUESTS[i])


@SETTINGS
@given(
    base=st.lists(specs(), max_size=3),
    direction=st.sampled_from(DIRECTIONS),
    selector=selectors,
    select_all=st.booleans(),
    data=st.data(),
)
def test_adding_a_deny_rule_never_allows_more(
    base: list[dict[str, Any]],
    direction: str,
    selector: dict[str, Any],
    select_all: bool,
    data: st.DataObject,
) -> None:
    new_rule = data.draw(rules(direction, True))
    docs = [cnp("base", BASE_SELECT_ALL, *base)] if select_all or not base else [cnp("base", *base)]
    before = verdicts(build(*docs))
    docs.append(cnp("added", {"endpointSelector": selector, direction + "Deny": [new_rule]}))
    after = verdicts(build(*docs))
    for key, (l4, reqs) in before.items():
        l4_after, reqs_after = after[key]
        assert l4 or not l4_after, key
        for i, (was, now) in enumerate(zip(reqs, reqs_after, strict=True)):
            assert was or not now, (key, REQUESTS[i])
