"""Enforcement semantics, one row per rule of docs/policy.md, for ingress and egress, IPv4 and IPv6.

Each case builds documents for a direction (``fromX`` on ingress, ``toX`` on egress) and checks
the L3/L4 verdict, the document that decided and the L7 verdict of three r2d2 requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from policy_helpers import build, cnp

from proxyd.context import L7Decision
from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy.engine import ConnectionPolicy, PolicySet

READ = R2d2Request("READ", "/public/a")
WRITE = R2d2Request("WRITE", "/secret")
HALT = R2d2Request("HALT", "")
REQUESTS = {"READ": READ, "WRITE": WRITE, "HALT": HALT}

ADDR = {
    "v4": {
        "server": "10.0.1.1",
        "client": "10.0.2.5",
        "client2": "10.0.2.6",
        "wclient": "10.0.2.5",  # the client's addresses without an identity: world
        "wclient2": "10.0.2.6",
        "node": "10.0.4.1",
        "other": "10.0.3.7",
        "client_net": "10.0.2.0/24",
        "client_host": "10.0.2.5/32",
        "all": "0.0.0.0/0",
    },
    "v6": {
        "server": "fd00:1::1",
        "client": "fd00:2::5",
        "client2": "fd00:2::6",
        "wclient": "fd00:2::5",
        "wclient2": "fd00:2::6",
        "node": "fd00:4::1",
        "other": "fd00:3::7",
        "client_net": "fd00:2::/64",
        "client_host": "fd00:2::5/128",
        "all": "::/0",
    },
}
LABELS = {
    "server": {"app": "server"},
    "client": {"app": "client"},
    "client2": {"app": "client"},
    "other": {"app": "other"},
    "node": {"reserved:host": ""},  # an identities entry with `entity: host`
}
SERVER = {"matchLabels": {"app": "server"}}
CLIENT = {"matchLabels": {"app": "client"}}


def rule(
    d: str,
    *,
    eps: Any = None,
    cidr: Any = None,
    cidrset: Any = None,
    entities: Any = None,
    ports: Any = None,
    l7: Any = None,
    l7proto: str = "r2d2",
) -> dict[str, Any]:
    side = "from" if d == "ingress" else "to"
    r: dict[str, Any] = {}
    if eps is not None:
        r[f"{side}Endpoints"] = eps
    if cidr is not None:
        r[f"{side}CIDR"] = cidr
    if cidrset is not None:
        r[f"{side}CIDRSet"] = cidrset
    if entities is not None:
        r[f"{side}Entities"] = entities
    if ports is not None:
        pr: dict[str, Any] = {
            "ports": [p if isinstance(p, dict) else {"port": str(p), "protocol": "TCP"} for p in ports]
        }
        if l7 is not None:
            pr["rules"] = {"l7proto": l7proto, "l7": l7}
        r["toPorts"] = [pr]
    return r


def spec(
    d: str, *rules: dict[str, Any], deny: tuple[dict[str, Any], ...] = (), sel: dict[str, Any] = SERVER
) -> dict[str, Any]:
    s: dict[str, Any] = {"endpointSelector": sel}
    if rules:
        s[d] = list(rules)
    if deny:
        s[d + "Deny"] = list(deny)
    return s


@dataclass
class Case:
    docs: Callable[[str, dict[str, str]], list[dict[str, Any]]]
    l4: bool
    policy: str | None = None
    allowed: tuple[str, ...] = ("READ", "WRITE", "HALT")
    remote: str = "client"
    port: int = 80
    l7proto: str | None = "r2d2"
    extra: dict[str, Any] = field(default_factory=dict)


def other_dir(d: str) -> str:
    return "egress" if d == "ingress" else "ingress"


CASES: dict[str, Case] = {
    "no policy: allow all": Case(lambda d, a: [], True),
    "policy selects another endpoint: allow all": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT]), sel={"matchLabels": {"app": "db"}}))], True
    ),
    "policy selects only the other direction: allow all": Case(
        lambda d, a: [cnp("p", spec(other_dir(d), rule(other_dir(d), eps=[CLIENT])))], True
    ),
    "selected, remote and port match, no l7: allow all requests": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80])))], True, "p"
    ),
    "selected, rule without toPorts: every port": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT])))], True, "p", port=4242
    ),
    "selected, remote does not match: default deny": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80])))], False, None, (), remote="other"
    ),
    "selected, port does not match: default deny": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[81])))], False, None, ()
    ),
    "empty rule {} selects and allows nothing (Cilium default deny)": Case(
        lambda d, a: [cnp("p", spec(d, {}))], False, None, ()
    ),
    "toPorts without L3: any remote": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, ports=[80])))], True, "p", remote="other"
    ),
    "empty endpoint selector matches a labelled remote": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[{}], ports=[80])))], True, "p"
    ),
    "empty endpoint selector never admits world (an unlabelled remote)": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[{}], ports=[80])))], False, None, (), remote="unknown"
    ),
    "empty endpoint selector never admits a bare entity": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[{}], ports=[80])))], False, None, (), remote="node"
    ),
    "explicit empty fromEndpoints/toEndpoints selects nothing": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[], ports=[80])))], False, None, ()
    ),
    "explicit empty fromCIDR/toCIDR selects nothing": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidr=[], ports=[80])))], False, None, (), remote="wclient"
    ),
    "explicit empty CIDR set selects nothing": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidrset=[], ports=[80])))], False, None, (), remote="wclient"
    ),
    "entities: world admits an unlabelled remote": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["world"], ports=[80])))], True, "p", remote="wclient"
    ),
    "entities: world never admits an endpoint": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["world"], ports=[80])))], False, None, ()
    ),
    "entities: world-ipv4/world-ipv6 of the remote's family": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(d, rule(d, entities=["world-ipv6" if ":" in a["all"] else "world-ipv4"], ports=[80])),
            )
        ],
        True,
        "p",
        remote="wclient",
    ),
    "entities: world of the other family never matches": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(d, rule(d, entities=["world-ipv4" if ":" in a["all"] else "world-ipv6"], ports=[80])),
            )
        ],
        False,
        None,
        (),
        remote="wclient",
    ),
    "entities: cluster admits endpoints and entities": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["cluster"], ports=[80])))], True, "p", remote="node"
    ),
    "entities: cluster never admits world": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["cluster"], ports=[80])))],
        False,
        None,
        (),
        remote="wclient",
    ),
    "entities: all admits world": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["all"], ports=[80])))], True, "p", remote="wclient"
    ),
    "entities: host admits only the host": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["host"], ports=[80])))], True, "p", remote="node"
    ),
    "entities: host is not an endpoint": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["host", "remote-node"], ports=[80])))],
        False,
        None,
        (),
    ),
    "entities: none selects nothing": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, entities=["none"], ports=[80])))],
        False,
        None,
        (),
        remote="wclient",
    ),
    "enableDefaultDeny false: what no rule matches is allowed": Case(
        lambda d, a: [
            cnp("p", {**spec(d, rule(d, eps=[CLIENT], ports=[81])), "enableDefaultDeny": {d: False}})
        ],
        True,
        None,
        remote="other",
    ),
    "enableDefaultDeny false: deny rules still deny": Case(
        lambda d, a: [
            cnp("p", {**spec(d, deny=(rule(d, eps=[CLIENT], ports=[80]),)), "enableDefaultDeny": {d: False}})
        ],
        False,
        "p",
        (),
    ),
    "enableDefaultDeny false: l7 rules still restrict their remote and port": Case(
        lambda d, a: [
            cnp(
                "p",
                {
                    **spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "READ"}])),
                    "enableDefaultDeny": {d: False},
                },
            )
        ],
        True,
        "p",
        ("READ",),
    ),
    "enableDefaultDeny false in one policy, default deny in another: default deny": Case(
        lambda d, a: [
            cnp("p", {**spec(d, rule(d, eps=[CLIENT], ports=[81])), "enableDefaultDeny": {d: False}}),
            cnp("q", spec(d, rule(d, eps=[CLIENT], ports=[82]))),
        ],
        False,
        None,
        (),
    ),
    "enableDefaultDeny true without rules enforces nothing (as in Cilium)": Case(
        lambda d, a: [cnp("p", {"endpointSelector": SERVER, "enableDefaultDeny": {d: True}})], True
    ),
    "enableDefaultDeny for the other direction only: allow all": Case(
        lambda d, a: [cnp("p", {"endpointSelector": SERVER, "enableDefaultDeny": {other_dir(d): True}})], True
    ),
    "deny rule wins over allow": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80]), deny=(rule(d, eps=[CLIENT]),)))],
        False,
        "p",
        (),
    ),
    "deny rule in another document wins": Case(
        lambda d, a: [
            cnp("allow", spec(d, rule(d, eps=[CLIENT], ports=[80]))),
            cnp("deny", spec(d, deny=(rule(d, eps=[{"matchLabels": {"app": "client"}}], ports=[80]),))),
        ],
        False,
        "deny",
        (),
    ),
    "deny rule for another port does not deny": Case(
        lambda d, a: [
            cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80]), deny=(rule(d, eps=[CLIENT], ports=[22]),)))
        ],
        True,
        "p",
    ),
    "deny-only policy selects: default deny": Case(
        lambda d, a: [cnp("p", spec(d, deny=(rule(d, eps=[CLIENT], ports=[22]),)))], False, None, ()
    ),
    "l7 rules: a request is allowed when one matches": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d,
                    rule(
                        d,
                        eps=[CLIENT],
                        ports=[80],
                        l7=[{"cmd": "READ", "file": "^/public/"}, {"cmd": "HALT"}],
                    ),
                ),
            )
        ],
        True,
        "p",
        ("READ", "HALT"),
    ),
    "l7 [{}] allows every request": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{}])))], True, "p"
    ),
    "l4-only rule on the same port widens l7 rules for its remote": Case(
        lambda d, a: [
            cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "READ"}]))),
            cnp(
                "q",
                spec(
                    d, rule(d, eps=[{"matchExpressions": [{"key": "app", "operator": "Exists"}]}], ports=[80])
                ),
            ),
        ],
        True,
        "q",
    ),
    "l4-only rule for another remote does not widen": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d,
                    rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "READ"}]),
                    rule(d, eps=[{"matchLabels": {"app": "other"}}], ports=[80]),
                ),
            )
        ],
        True,
        "p",
        ("READ",),
    ),
    "rules from all documents are OR'ed": Case(
        lambda d, a: [
            cnp("a", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "READ"}]))),
            cnp(
                "b",
                spec(
                    d, rule(d, eps=[{"matchLabels": {"k8s:app": "client"}}], ports=[80], l7=[{"cmd": "HALT"}])
                ),
            ),
        ],
        True,
        "a",
        ("READ", "HALT"),
    ),
    "unknown l7proto: connection in, every request denied": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{}], l7proto="gopher")))],
        True,
        "p",
        (),
    ),
    "unknown l7proto grants nothing beside a known rule": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d,
                    rule(d, eps=[CLIENT], ports=[80], l7=[{}], l7proto="gopher"),
                    rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "HALT"}]),
                ),
            )
        ],
        True,
        "p",
        ("HALT",),
    ),
    "another parser's l7proto on the port: every request denied": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{}], l7proto="memcache")))],
        True,
        "p",
        (),
    ),
    "plain L4 listener, port with l7 rules: denied at accept (fail closed)": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{}])))],
        False,
        "p",
        (),
        l7proto=None,
    ),
    "plain L4 listener, l7 rules plus an L4-only rule: allowed": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{}]), rule(d, eps=[CLIENT])))],
        True,
        "p",
        l7proto=None,
    ),
    "fromCIDR / toCIDR matches a world remote's address": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidr=[a["client_net"]], ports=[80])))],
        True,
        "p",
        remote="wclient",
    ),
    "fromCIDR / toCIDR never matches an endpoint": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidr=[a["client_net"]], ports=[80])))], False, None, ()
    ),
    "fromCIDR / toCIDR never matches an entity": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidr=[a["all"]], ports=[80])))], False, None, (), remote="node"
    ),
    "CIDR does not match another address": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, cidr=[a["client_net"]], ports=[80])))],
        False,
        None,
        (),
        remote="other",
    ),
    "CIDR set with except: excepted address denied": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d, rule(d, cidrset=[{"cidr": a["client_net"], "except": [a["client_host"]]}], ports=[80])
                ),
            )
        ],
        False,
        None,
        (),
        remote="wclient",
    ),
    "CIDR set with except: other address of the set allowed": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d, rule(d, cidrset=[{"cidr": a["client_net"], "except": [a["client_host"]]}], ports=[80])
                ),
            )
        ],
        True,
        "p",
        remote="wclient2",
    ),
    "CIDR of the other family never matches": Case(
        lambda d, a: [
            cnp("p", spec(d, rule(d, cidr=["0.0.0.0/0" if ":" in a["all"] else "::/0"], ports=[80])))
        ],
        False,
        None,
        (),
        remote="wclient",
    ),
    "protocol UDP never matches a TCP connection": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[{"port": "80", "protocol": "UDP"}])))],
        False,
        None,
        (),
    ),
    "protocol ANY matches": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[{"port": 80, "protocol": "ANY"}])))],
        True,
        "p",
    ),
    "port 0 matches every port": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[{"port": 0}])))], True, "p", port=6553
    ),
    "endPort range includes the port": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[{"port": 8000, "endPort": 8100}])))],
        True,
        "p",
        port=8080,
    ),
    "endPort range excludes the port": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[{"port": 8000, "endPort": 8100}])))],
        False,
        None,
        (),
        port=8101,
    ),
    "k8s: prefixed selector matches plain labels": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d,
                    rule(d, eps=[{"matchLabels": {"k8s:app": "client"}}], ports=[80]),
                    sel={"matchLabels": {"k8s:app": "server"}},
                ),
            )
        ],
        True,
        "p",
    ),
    "matchExpressions NotIn excludes": Case(
        lambda d, a: [
            cnp(
                "p",
                spec(
                    d,
                    rule(
                        d,
                        eps=[
                            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["client"]}]}
                        ],
                        ports=[80],
                    ),
                ),
            )
        ],
        False,
        None,
        (),
    ),
    "reserved:world selects a remote without identity": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[{"matchLabels": {"reserved:world": ""}}], ports=[80])))],
        True,
        "p",
        remote="unknown",
    ),
    "reserved:world does not select a labelled remote": Case(
        lambda d, a: [cnp("p", spec(d, rule(d, eps=[{"matchLabels": {"reserved:world": ""}}], ports=[80])))],
        False,
        None,
        (),
    ),
    "specs: every spec counts": Case(
        lambda d, a: [
            cnp("p", spec(d, rule(d, eps=[CLIENT], ports=[81])), spec(d, rule(d, eps=[CLIENT], ports=[80])))
        ],
        True,
        "p",
    ),
}


def connection(ps: PolicySet, case: Case, d: str, fam: str, audit: bool = False) -> ConnectionPolicy:
    a = ADDR[fam]
    remote_ip = a.get(case.remote, a["other"].replace("3", "9"))
    remote_labels = LABELS.get(case.remote, {})
    return ps.connection_policy(d, LABELS["server"], remote_ip, remote_labels, case.port, case.l7proto, audit)


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("d", ["ingress", "egress"])
@pytest.mark.parametrize("name", list(CASES))
def test_semantics(name: str, d: str, fam: str) -> None:
    case = CASES[name]
    ps = build(*case.docs(d, ADDR[fam]))
    cp = connection(ps, case, d, fam)
    assert cp.l4_allowed is case.l4, cp.l4_reason
    assert cp.audit_l4 is False
    assert cp.policy_name == case.policy, cp.l4_reason
    if case.l7proto is None:
        return
    got = tuple(k for k, req in REQUESTS.items() if cp.decide(req).allowed)
    assert got == case.allowed, cp.l4_reason
    for req in REQUESTS.values():
        decision = cp.decide(req)
        assert decision.audit is False
        if case.policy is not None:
            assert decision.policy is not None


@pytest.mark.parametrize("fam", ["v4", "v6"])
@pytest.mark.parametrize("d", ["ingress", "egress"])
@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if not c.l4 or c.allowed != ("READ", "WRITE", "HALT")]
)
def test_audit_mode_forwards_what_enforce_denies(name: str, d: str, fam: str) -> None:
    case = CASES[name]
    ps = build(*case.docs(d, ADDR[fam]))
    enforce = connection(ps, case, d, fam)
    audit = connection(ps, case, d, fam, audit=True)
    assert audit.l4_allowed is True
    assert audit.audit_l4 is (not enforce.l4_allowed)
    assert audit.policy_name == enforce.policy_name
    for req in REQUESTS.values():
        e, a = enforce.decide(req), audit.decide(req)
        assert a.allowed == (e.allowed and enforce.l4_allowed)
        assert a.audit == (not a.allowed)


def test_decisions_name_the_document_that_allowed() -> None:
    d = "ingress"
    ps = build(
        cnp("reads", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "READ"}]))),
        cnp("halts", spec(d, rule(d, eps=[CLIENT], ports=[80], l7=[{"cmd": "HALT"}]))),
    )
    cp = ps.connection_policy(d, LABELS["server"], "10.0.2.5", LABELS["client"], 80, "r2d2")
    assert cp.decide(READ) == L7Decision(True, "reads")
    assert cp.decide(HALT) == L7Decision(True, "halts")
    assert cp.decide(WRITE) == L7Decision(False, "reads")


def test_ipv4_mapped_remote_matches_ipv4_cidr() -> None:
    d = "ingress"
    ps = build(cnp("p", spec(d, rule(d, cidr=["10.0.2.0/24"], ports=[80]))))
    cp = ps.connection_policy(d, LABELS["server"], "::ffff:10.0.2.5", {}, 80, "r2d2")
    assert cp.l4_allowed
    cp = ps.connection_policy(d, LABELS["server"], "::ffff:10.0.3.5", {}, 80, "r2d2")
    assert not cp.l4_allowed


def test_bad_direction_and_address_raise() -> None:
    ps = build(cnp("p", spec("ingress", rule("ingress", ports=[80]))))
    with pytest.raises(ValueError, match="direction"):
        ps.connection_policy("sideways", {}, "10.0.0.1", {}, 80, None)
    with pytest.raises(ValueError, match="not-an-ip"):
        ps.connection_policy("ingress", LABELS["server"], "not-an-ip", {}, 80, None)


def test_selection_cache_is_bounded() -> None:
    from proxyd.policy import engine

    ps = build(cnp("p", spec("ingress", rule("ingress", ports=[80]), sel={})))
    for i in range(engine.SELECT_CACHE_SIZE + 10):
        assert ps.connection_policy("ingress", {"n": str(i)}, "10.0.0.1", {}, 80, None).l4_allowed
    assert len(ps._cache) <= engine.SELECT_CACHE_SIZE
