"""``explain``: labels, selecting documents, matching rules, the L3/L4 verdict and the l7 rules in force."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import MEMCACHED_13, REGISTRY

from proxyd.policy.engine import PolicySet
from proxyd.policy.explain import explain, explain_data
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import parse_text
from proxyd.policy.store import PolicyStore

IDS = IdentityMap.from_entries(
    [
        ("10.0.1.0/24", {"app": "memcd-server"}),
        ("10.0.2.0/24", {"app": "a-wing"}),
        ("10.0.3.0/24", {"app": "x-wing"}),
        ("10.0.4.0/24", {"name": "fleet-tracker"}),
        ("fd00:2::/64", {"app": "a-wing"}),
        ("fd00:1::/64", {"app": "memcd-server"}),
    ]
)
SERVER = ("10.0.1.10", 11211)


@pytest.fixture(scope="module")
def fleet() -> PolicySet:
    return PolicySet(parse_text(MEMCACHED_13, "memcd.yaml", REGISTRY), REGISTRY, 7)


def test_a_wing_sees_its_own_rules(fleet: PolicySet) -> None:
    text = explain(fleet, IDS, "ingress", ("10.0.2.5", 40000), SERVER, "memcache")
    assert "local  (dst) 10.0.1.10:11211: {app: memcd-server}" in text
    assert "remote (src) 10.0.2.5:40000: {app: a-wing}" in text
    assert "policy revision: 7" in text
    assert "secure-fleet spec (memcd.yaml:5): endpointSelector {app=memcd-server}" in text
    assert (
        "secure-fleet spec.ingress[0].toPorts[0] (memcd.yaml:14): fromEndpoints {app=a-wing}, ports 11211/TCP"
        in text
    )
    assert "secure-fleet spec.ingress[1] (memcd.yaml:24): remote does not match" in text
    assert "secure-fleet spec.ingress[2] (memcd.yaml:38): remote does not match" in text
    assert "L3/L4 verdict: allowed" in text
    assert "L7: a request is allowed when one of these 2 memcache rule(s) matches" in text
    assert (
        "  - {command: get, keyExact: awing-coord}   [secure-fleet spec.ingress[0].toPorts[0].rules.l7[0]]"
        in text
    )
    assert (
        "  - {command: set, keyExact: awing-coord}   [secure-fleet spec.ingress[0].toPorts[0].rules.l7[1]]"
        in text
    )
    assert "xwing-coord}" not in text


def test_fleet_tracker_reads_both_writes_none(fleet: PolicySet) -> None:
    data = explain_data(fleet, IDS, "ingress", ("10.0.4.5", 40000), SERVER, "memcache")
    d = data.as_dict()
    assert d["l4_allowed"] is True
    assert d["policy"] == "secure-fleet"
    assert [r["rules"] for r in d["l7_rules"]] == [
        [{"command": "get", "keyExact": "awing-coord"}, {"command": "get", "keyExact": "xwing-coord"}]
    ]
    cp = data.evaluation.policy
    assert cp.decide({"command": "get", "key": "xwing-coord"}).allowed
    assert cp.decide({"command": "get", "key": "awing-coord"}).allowed
    assert not cp.decide({"command": "set", "key": "awing-coord"}).allowed


def test_x_wing_cannot_touch_a_wing_keys(fleet: PolicySet) -> None:
    cp = explain_data(fleet, IDS, "ingress", ("10.0.3.5", 40000), SERVER, "memcache").evaluation.policy
    assert cp.decide({"command": "set", "key": "xwing-coord"}).allowed
    assert not cp.decide({"command": "get", "key": "awing-coord"}).allowed


def test_unknown_client_denied_at_l4(fleet: PolicySet) -> None:
    text = explain(fleet, IDS, "ingress", ("192.0.2.1", 40000), SERVER, "memcache")
    # Shown as what policy matches it as (it used to print "(no labels)").
    assert (
        "remote (src) 192.0.2.1:40000: entity world "
        "(world-ipv4: no identities entry gives it labels or an entity)" in text
    )
    assert (
        "L3/L4 verdict: DENIED: default deny: secure-fleet select(s) the local endpoint for ingress" in text
    )
    assert "L7: no request (connection denied)" in text


def test_other_port_and_plain_listener(fleet: PolicySet) -> None:
    text = explain(fleet, IDS, "ingress", ("10.0.2.5", 40000), ("10.0.1.10", 22), None)
    assert "spec.ingress[0].toPorts[0] (memcd.yaml:14): port 22/TCP is not in 11211/TCP" in text
    assert "DENIED" in text
    text = explain(fleet, IDS, "ingress", ("10.0.2.5", 40000), SERVER, None)
    assert "matching rules that grant nothing here:" in text
    assert "plain L4 listener cannot enforce" in text


def test_egress_local_is_the_source_and_ipv6(fleet: PolicySet) -> None:
    text = explain(fleet, IDS, "egress", ("fd00:2::5", 40000), ("fd00:1::10", 11211), "memcache")
    assert "local  (src) [fd00:2::5]:40000: {app: a-wing}" in text
    assert "remote (dst) [fd00:1::10]:11211: {app: memcd-server}" in text
    assert "no policy selects the local endpoint for egress" in text
    assert "L7: every request allowed (no policy)" in text


def test_explain_from_a_store(tmp_path: Path) -> None:
    f = tmp_path / "memcd.yaml"
    f.write_text(MEMCACHED_13)
    store = PolicyStore(REGISTRY, [f])
    assert "secure-fleet spec.ingress[0].toPorts[0]" in explain(
        store, IDS, "ingress", ("10.0.2.5", 1), SERVER, "memcache"
    )
    with pytest.raises(ValueError, match="direction"):
        explain(store, IDS, "both", ("10.0.2.5", 1), SERVER, "memcache")


def test_the_cilium_13_policy_with_the_real_memcache_parser(tmp_path: Path) -> None:
    """The announcement's policy compiles with the real memcache rule compiler, and `proxyd
    explain` (the CLI) shows each group its own rules."""
    import subprocess
    import sys

    from proxyd.registry import Registry

    real = Registry.load()
    docs = parse_text(MEMCACHED_13, "memcd.yaml", real)
    assert [d.name for d in docs] == ["secure-fleet"]
    (tmp_path / "memcd.yaml").write_text(MEMCACHED_13)
    (tmp_path / "proxyd.yaml").write_text(
        "listeners:\n"
        '  - {name: memcache, address: "127.0.0.1:15001", l7proto: memcache, upstream: "10.0.1.10:11211"}\n'
        "identities:\n"
        "  - {cidr: 10.0.1.0/24, labels: {app: memcd-server}}\n"
        "  - {cidr: 10.0.2.0/24, labels: {app: a-wing}}\n"
        "  - {cidr: 10.0.4.0/24, labels: {name: fleet-tracker}}\n"
        "policy: {paths: [memcd.yaml]}\n"
    )

    def explain_cli(src: str) -> str:
        cmd = ["explain", "--config", str(tmp_path / "proxyd.yaml"), "--src", src, "--dst", "10.0.1.10:11211"]
        res = subprocess.run(
            [sys.executable, "-m", "proxyd", *cmd], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    a_wing = explain_cli("10.0.2.5")
    assert "{command: get, keyExact: awing-coord}" in a_wing
    assert "{command: set, keyExact: awing-coord}" in a_wing
    assert "xwing-coord" not in a_wing
    tracker = explain_cli("10.0.4.5")
    assert "awing-coord" in tracker and "xwing-coord" in tracker and "command: set" not in tracker
    stranger = explain_cli("10.0.9.9")
    assert "L3/L4 verdict: DENIED: default deny" in stranger


def test_entity_remotes_are_shown_as_their_entity() -> None:
    ids = IdentityMap.from_entries(
        [
            ("10.0.1.10/32", {"app": "memcd-server"}),
            ("10.0.0.1/32", {"reserved:host": ""}),
            ("10.0.0.2/32", {"app": "agent", "reserved:health": ""}),
        ]
    )
    docs = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: from-host}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: memcd-server}}\n"
        "  ingress:\n  - fromEntities: [host]\n",
        "host.yaml",
        REGISTRY,
    )
    pset = PolicySet(docs, REGISTRY)
    text = explain(pset, ids, "ingress", ("10.0.0.1", 4000), ("10.0.1.10", 11211), "memcache")
    assert "remote (src) 10.0.0.1:4000: entity host   [from identities entry 10.0.0.1/32]\n" in text
    assert "fromEntities host" in text and "L3/L4 verdict: allowed" in text
    data = explain_data(pset, ids, "ingress", ("10.0.0.2", 4000), ("10.0.1.10", 11211), "memcache")
    agent = "remote (src) 10.0.0.2:4000: {app: agent} (entity health)"
    assert f"{agent}   [from identities entry 10.0.0.2/32]\n" in data.text()
    assert data.as_dict()["remote_entity"] == "health"
    ipv6 = explain_data(pset, ids, "ingress", ("2001:db8::1", 4000), ("10.0.1.10", 11211), "memcache")
    assert ipv6.as_dict()["remote_entity"] == "world"
    assert "entity world (world-ipv6" in ipv6.text()
