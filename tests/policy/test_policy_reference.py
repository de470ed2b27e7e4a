"""proxyd's decisions equal a small reference evaluator of the policy semantics (docs/policy.md).

The reference below is written straight from the documented rules, on the raw documents (dicts)
and a raw identities table, without any of proxyd's model, selector or engine code: longest
prefix wins; an address no entry covers is world; peer endpoint selectors match only endpoints
(unless they name a ``reserved:`` key); CIDR rules match only world; entities as documented;
explicit empty lists select nothing; namespaced documents are scoped; ``enableDefaultDeny`` is
honoured; a deny wins; an L4-only allow allows every request; else a request needs a matching
``l7`` rule of the listener's ``l7proto``; an ``l7`` rule on a plain L4 listener grants nothing.
Hypothesis generates the documents and the identities; every connection of a small grid and a
few requests are compared.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_helpers import REGISTRY

from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy.engine import PolicySet
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import parse_text

NS_KEY = "k8s:io.kubernetes.pod.namespace"
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5", "fd00::1", "fd00::2")
PORTS = (80, 81)
LISTENERS = ("r2d2", None)
REQUESTS = (R2d2Request("READ", "/public/a"), R2d2Request("WRITE", "/x"), R2d2Request("HALT", ""))

# --- the reference ------------------------------------------------------------------------------

Identity = tuple[dict[str, str], str | None]  # (labels without reserved ones, entity)


def ref_identity(table: list[tuple[str, dict[str, str], str | None]], ip: str) -> Identity:
    addr = ipaddress.ip_address(ip)
    best: tuple[int, Identity] | None = None
    for cidr, labels, entity in table:
        net = ipaddress.ip_network(cidr)
        if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, (labels, entity))
    return best[1] if best is not None else ({}, "world")


def all_labels(ident: Identity) -> dict[str, str]:
    labels, entity = ident
    return {**labels, f"reserved:{entity}": ""} if entity else dict(labels)


def ref_selector(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in (sel.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in sel.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def sel_keys(sel: dict[str, Any]) -> list[str]:
    return [*(sel.get("matchLabels") or {}), *(e["key"] for e in sel.get("matchExpressions") or [])]


def scope(sel: dict[str, Any], ns: str | None, subject: bool) -> dict[str, Any]:
    if ns is None:
        return sel
    if subject:
        kept = {k: v for k, v in (sel.get("matchLabels") or {}).items() if k != NS_KEY}
        return {"matchLabels": {**kept, NS_KEY: ns}, "matchExpressions": sel.get("matchExpressions") or []}
    if NS_KEY in sel_keys(sel) or any(k.startswith("reserved:") for k in sel_keys(sel)):
        return sel
    return {"matchLabels": {**(sel.get("matchLabels") or {}), NS_KEY: ns}, **{
        k: v for k, v in sel.items() if k == "matchExpressions"}}  # fmt: skip


def ref_entity(name: str, ident: Identity, ip: str) -> bool:
    labels, entity = ident
    world = not labels and entity == "world"
    v6 = ipaddress.ip_address(ip).version == 6
    return {
        "all": True,
        "none": False,
        "cluster": bool(labels) or (entity is not None and entity != "world"),
        "world": world,
        "world-ipv4": world and not v6,
        "world-ipv6": world and v6,
    }.get(name, entity == name)


def ref_remote(rule: dict[str, Any], side: str, ident: Identity, ip: str, ns: str | None) -> bool:
    if f"{side}Endpoints" in rule:
        for sel in rule[f"{side}Endpoints"]:
            reserved = any(k.startswith("reserved:") for k in sel_keys(sel))
            if (ident[0] or reserved) and ref_selector(scope(sel, ns, False), all_labels(ident)):
                return True
        return False
    if f"{side}CIDR" in rule:
        world = not ident[0] and ident[1] == "world"
        return world and any(ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in rule[f"{side}CIDR"])
    if f"{side}Entities" in rule:
        return any(ref_entity(e, ident, ip) for e in rule[f"{side}Entities"])
    return "toPorts" in rule


def ref_ports(rule: dict[str, Any], port: int) -> list[dict[str, Any] | None]:
    """The toPorts entries naming ``port`` over TCP (None: the rule has no toPorts)."""
    if "toPorts" not in rule:
        return [None]
    return [
        entry
        for entry in rule["toPorts"]
        if any(
            p.get("protocol", "ANY").upper() in ("TCP", "ANY") and int(p["port"]) in (0, port)
            for p in entry.get("ports", [])
        )
    ]


def ref_r2d2(rule: dict[str, str], req: R2d2Request) -> bool:
    if "cmd" in rule and rule["cmd"] != req.cmd:
        return False
    return "file" not in rule or re.search(rule["file"], req.file) is not None


def reference(
    docs: list[dict[str, Any]], table: list[Any], d: str, local_ip: str, remote_ip: str, port: int,
    listener: str | None, req: R2d2Request,
) -> tuple[bool, bool]:  # fmt: skip
    side = "from" if d == "ingress" else "to"
    local, remote = ref_identity(table, local_ip), ref_identity(table, remote_ip)
    selecting = []
    for doc in docs:
        ns = doc["metadata"].get("namespace") if doc["kind"] == "CiliumNetworkPolicy" else None
        spec = doc["spec"]
        has_rules = bool(spec.get(d) or spec.get(d + "Deny"))
        default_deny = spec.get("enableDefaultDeny", {}).get(d, has_rules)
        if has_rules and ref_selector(
            scope(spec["endpointSelector"], ns, True), all_labels(local)
        ):
            selecting.append((spec, ns, default_deny))
    if not selecting:
        return True, True
    allows = []
    for spec, ns, _ in selecting:
        for rule in spec.get(d + "Deny") or []:
            if ref_remote(rule, side, remote, remote_ip, ns) and ref_ports(rule, port):
                return False, False
        for rule in spec.get(d) or []:
            if ref_remote(rule, side, remote, remote_ip, ns):
                allows += ref_ports(rule, port)
    if any(entry is None or not entry.get("rules") for entry in allows):  # L4 only (`rules: {}` too)
        return True, True
    if allows and listener is not None:
        rules = [
            r
            for e in allows
            if e is not None and e["rules"]["l7proto"] == listener
            for r in e["rules"].get("l7") or [{}]
        ]
        return True, any(ref_r2d2(r, req) for r in rules)
    if allows:
        return False, False  # l7 rules a plain L4 listener cannot enforce: fail closed
    if not any(dd for _, _, dd in selecting):
        return True, True
    return False, False


# --- generated documents and identities ---------------------------------------------------------

apps = st.sampled_from(["a", "b"])
namespaces = st.sampled_from(["ns1", "ns2"])
subject_selectors = st.one_of(
    st.just({}),
    apps.map(lambda v: {"matchLabels": {"app": v}}),
    namespaces.map(lambda ns: {"matchLabels": {NS_KEY: ns}}),
)
peer_selectors = st.one_of(
    subject_selectors,
    st.just({"matchLabels": {"reserved:host": ""}}),
    apps.map(lambda v: {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [v]}]}),
    st.just({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}),
)
entities = st.sampled_from(
    ["world", "world-ipv4", "world-ipv6", "cluster", "all", "none", "host", "kube-apiserver"]
)
cidrs = st.sampled_from(["10.0.0.0/30", "10.0.0.2/32", "10.0.0.0/8", "fd00::/64", "0.0.0.0/0"])
ports = st.sampled_from(
    [
        [{"port": "80", "protocol": "TCP"}],
        [{"port": 0}],
        [{"port": "81", "protocol": "tcp"}],
        [{"port": "80", "protocol": "UDP"}],
        None,
    ]
)
l7s = st.one_of(
    st.none(),
    st.just({}),
    st.just({"l7proto": "r2d2"}),
    st.lists(st.sampled_from([{}, {"cmd": "READ"}, {"cmd": "HALT"}, {"file": "^/public"}]), max_size=2).map(
        lambda rules: {"l7proto": "r2d2", "l7": rules}
    ),
    st.just({"l7proto": "gopher", "l7": [{}]}),
)


@st.composite
def rules(draw: st.DrawFn, side: str, deny: bool) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    kind = draw(st.sampled_from(["none", "endpoints", "cidr", "entities"]))
    if kind == "endpoints":
        rule[f"{side}Endpoints"] = draw(st.lists(peer_selectors, max_size=2))  # [] selects nothing
    elif kind == "cidr":
        rule[f"{side}CIDR"] = draw(st.lists(cidrs, max_size=2))
    elif kind == "entities":
        rule[f"{side}Entities"] = draw(st.lists(entities, max_size=2))
    if draw(st.booleans()):
        entry: dict[str, Any] = {}
        p = draw(ports)
        if p is not None:
            entry["ports"] = p
        l7 = draw(l7s)
        if l7 is not None and not (deny and l7):
            entry["rules"] = l7
        rule["toPorts"] = [entry]
    return rule


@st.composite
def documents(draw: st.DrawFn, i: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": draw(subject_selectors)}
    for d, side in (("ingress", "from"), ("egress", "to")):
        allow = draw(st.lists(rules(side, False), max_size=2))
        if allow:
            spec[d] = allow
        deny = draw(st.lists(rules(side, True), max_size=1))
        if deny:
            spec[d + "Deny"] = deny
    dd = draw(
        st.sampled_from([None, {"ingress": False}, {"egress": True}, {"ingress": True, "egress": False}])
    )
    if dd is not None:
        spec["enableDefaultDeny"] = dd
    kind = draw(st.sampled_from(["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]))
    meta: dict[str, Any] = {"name": f"doc{i}"}
    ns = draw(st.none() | namespaces)
    if ns is not None and kind == "CiliumNetworkPolicy":
        meta["namespace"] = ns
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, "spec": spec}


@st.composite
def identity_tables(draw: st.DrawFn) -> list[tuple[str, dict[str, str], str | None]]:
    table: list[tuple[str, dict[str, str], str | None]] = []
    prefixes = [f"{a}/{32 if '.' in a else 128}" for a in ADDRESSES] + ["10.0.0.0/30", "fd00::/120"]
    for prefix in prefixes:
        kind = draw(st.sampled_from(["absent", "labels", "entity", "both"]))
        if kind == "absent":
            continue
        labels: dict[str, str] = {}
        entity = None
        if kind in ("labels", "both"):
            labels = {"app": draw(apps)}
            if draw(st.booleans()):
                labels[NS_KEY] = draw(namespaces)
        if kind in ("entity", "both"):
            entity = draw(
                st.sampled_from(["host", "kube-apiserver"] + (["world"] if kind == "entity" else []))
            )
        table.append((prefix, labels, entity))
    return table


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.integers(1, 3).flatmap(lambda n: st.tuples(*(documents(i) for i in range(n)))),
    table=identity_tables(),
)
def test_decisions_equal_the_reference(docs: tuple[dict[str, Any], ...], table: list[Any]) -> None:
    text = "\n---\n".join(json.dumps(d) for d in docs)
    ps = PolicySet(parse_text(text, "gen.yaml", REGISTRY), REGISTRY)
    ids = IdentityMap.from_entries(
        [(cidr, {**labels, **({f"reserved:{e}": ""} if e else {})}) for cidr, labels, e in table]
    )
    for d, local_ip, remote_ip, port, listener in itertools.product(
        ("ingress", "egress"), ADDRESSES, ADDRESSES, PORTS, LISTENERS
    ):
        cp = ps.connection_policy(
            d, ids.labels_for(local_ip), remote_ip, ids.labels_for(remote_ip), port, listener
        )
        for req in REQUESTS:
            got = (cp.l4_allowed, cp.l4_allowed and cp.decide(req).allowed)
            want = reference(list(docs), table, d, local_ip, remote_ip, port, listener, req)
            assert got == want, (d, local_ip, remote_ip, port, listener, req, cp.l4_reason)
