"""Entities, namespaces, empty lists and enableDefaultDeny, in the shapes of Cilium's docs.

The fixture policies under ``fixtures/`` are written in the shapes of Cilium's documentation;
the identities are read through the config loader, as the daemon reads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_helpers import REGISTRY

from proxyd.config import load_config
from proxyd.errors import ConfigError, PolicyError
from proxyd.policy.engine import PolicySet
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import load_paths, parse_text, selector_key_warnings, warnings
from proxyd.policy.model import Document

FIXTURES = Path(__file__).parent / "fixtures"


def config_identities(tmp_path: Path, identities: str) -> list[tuple[str, dict[str, str]]]:
    """The ``identities`` of a config whose identities section is ``identities`` (YAML list)."""
    body = "listeners:\n  - {name: l, address: '127.0.0.1:0', upstream: '127.0.0.1:1'}\nidentities:\n"
    body += "".join(f"  {line}\n" for line in identities.splitlines())
    path = tmp_path / "proxyd.yaml"
    path.write_text(body)
    return [(cidr, dict(labels)) for cidr, labels in load_config(path).identities]


def config_problems(tmp_path: Path, identities: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_identities(tmp_path, identities)
    return info.value.problems


class World:
    """Policy decisions over an identities table, the way the daemon asks (per connection)."""

    def __init__(self, docs: list[Document], ids: IdentityMap) -> None:
        self.ps = PolicySet(docs, REGISTRY)
        self.ids = ids

    def allowed(self, src: str, dst: str, direction: str = "ingress", port: int = 80) -> bool:
        local, remote = (dst, src) if direction == "ingress" else (src, dst)
        cp = self.ps.connection_policy(
            direction, self.ids.labels_for(local), remote, self.ids.labels_for(remote), port, None
        )
        return cp.l4_allowed


# --- item 9: identities with entities ---------------------------------------------------------


def test_identities_take_an_entity_with_or_instead_of_labels(tmp_path: Path) -> None:
    got = config_identities(
        tmp_path,
        "- {cidr: 10.0.0.1/32, entity: host}\n"
        "- {cidr: 10.0.0.2/32, entity: kube-apiserver, labels: {component: apiserver}}\n"
        "- {cidr: 10.0.3.0/24, labels: {app: web}}\n"
        "- {cidr: 10.0.3.128/25, entity: world}\n",
    )
    assert got == [
        ("10.0.0.1/32", {"reserved:host": ""}),
        ("10.0.0.2/32", {"component": "apiserver", "reserved:kube-apiserver": ""}),
        ("10.0.3.0/24", {"app": "web"}),
        ("10.0.3.128/25", {"reserved:world": ""}),
    ]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("{cidr: 10.0.0.1/32, entity: cluster}", "identities[0].entity: must be one of host, remote-node,"),
        ("{cidr: 10.0.0.1/32, entity: world, labels: {a: b}}", "world is outside every endpoint"),
        ("{cidr: 10.0.0.1/32, labels: {'reserved:host': ''}}", "reserved: labels are proxyd's own"),
        ("{cidr: 10.0.0.1/32}", "must be a non-empty mapping of labels (or give an entity)"),
        (
            "{cidr: 10.0.0.1/32, entity: host, role: x}",
            "identities[0].role: unknown key (known: cidr, labels, entity)",
        ),
    ],
)
def test_bad_identities_entries(tmp_path: Path, entry: str, fragment: str) -> None:
    problems = config_problems(tmp_path, f"- {entry}\n")
    assert any(fragment in p for p in problems), problems


# --- items 10 and 11: entities and endpoint-only selectors ----------------------------------------


@pytest.fixture
def entity_world(tmp_path: Path) -> World:
    ids = IdentityMap.from_entries(
        config_identities(
            tmp_path,
            "- {cidr: 10.0.1.1/32, labels: {role: public}}\n"
            "- {cidr: 10.0.1.2/32, labels: {env: dev}}\n"
            "- {cidr: 10.0.1.3/32, labels: {role: internal}}\n"
            "- {cidr: 10.0.1.4/32, labels: {app: client}}\n"
            "- {cidr: 10.0.0.1/32, entity: host}\n"
            "- {cidr: 10.0.0.2/32, entity: remote-node}\n"
            "- {cidr: 10.0.0.3/32, entity: kube-apiserver}\n"
            "- {cidr: 10.0.0.4/32, entity: health}\n",
        )
    )
    return World(load_paths([FIXTURES / "entities.yaml"], REGISTRY), ids)


def test_from_entities_world_admits_only_addresses_outside_every_entry(entity_world: World) -> None:
    assert entity_world.allowed("192.0.2.7", "10.0.1.1")
    assert entity_world.allowed("2001:db8::7", "10.0.1.1")
    assert not entity_world.allowed("10.0.1.4", "10.0.1.1")  # an endpoint is not world
    assert not entity_world.allowed("10.0.0.1", "10.0.1.1")  # nor the host


def test_to_entities_kube_apiserver_with_ports(entity_world: World) -> None:
    assert entity_world.allowed("10.0.1.2", "10.0.0.3", "egress", 443)
    assert not entity_world.allowed("10.0.1.2", "10.0.0.3", "egress", 80)
    assert not entity_world.allowed("10.0.1.2", "192.0.2.7", "egress", 443)


def test_from_entities_host_and_remote_node(entity_world: World) -> None:
    assert entity_world.allowed("10.0.0.1", "10.0.1.2")
    assert entity_world.allowed("10.0.0.2", "10.0.1.2")
    assert not entity_world.allowed("10.0.0.4", "10.0.1.2")  # health is neither
    assert not entity_world.allowed("10.0.1.4", "10.0.1.2")


def test_from_entities_cluster_is_every_endpoint_and_entity_but_world(entity_world: World) -> None:
    for src in ("10.0.1.4", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        assert entity_world.allowed(src, "10.0.1.3"), src
    assert not entity_world.allowed("192.0.2.7", "10.0.1.3")


def test_from_endpoints_wildcard_never_admits_world_or_a_bare_entity(tmp_path: Path) -> None:
    docs = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: all-endpoints}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: server}}\n"
        "  ingress:\n  - fromEndpoints:\n    - {}\n",
        "p.yaml",
        REGISTRY,
    )
    ids = IdentityMap.from_entries(
        config_identities(
            tmp_path,
            "- {cidr: 10.0.0.10/32, labels: {app: server}}\n"
            "- {cidr: 10.0.0.11/32, labels: {app: client}}\n"
            "- {cidr: 10.0.0.12/32, entity: host}\n"
            "- {cidr: 10.0.0.13/32, entity: host, labels: {node: n1}}\n",
        )
    )
    w = World(docs, ids)
    assert w.allowed("10.0.0.11", "10.0.0.10")
    assert w.allowed("10.0.0.13", "10.0.0.10")  # labels make it an endpoint
    assert not w.allowed("10.0.0.12", "10.0.0.10")
    assert not w.allowed("192.0.2.1", "10.0.0.10")


def test_reserved_key_selector_selects_its_entity() -> None:
    docs = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: default}\n"
        "spec:\n  endpointSelector: {}\n"
        "  ingress:\n  - fromEndpoints:\n    - matchLabels: {'reserved:host': ''}\n",
        "p.yaml",
        REGISTRY,
    )
    [rule] = docs[0].specs[0].rules
    assert str(rule.endpoints[0]) == "{reserved:host=}"  # unscoped, as in Cilium
    ids = IdentityMap.from_entries(
        [
            ("10.0.0.1/32", {"reserved:host": ""}),
            ("10.0.0.10/32", {"k8s:io.kubernetes.pod.namespace": "default"}),
        ]
    )
    w = World(docs, ids)
    assert w.allowed("10.0.0.1", "10.0.0.10")
    assert not w.allowed("192.0.2.1", "10.0.0.10")


def test_cidr_rules_match_only_world() -> None:
    docs = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
        "spec:\n  endpointSelector: {matchLabels: {app: server}}\n"
        "  ingress:\n  - fromCIDR: [10.0.0.0/8]\n"
        "  - fromCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]\n",
        "p.yaml",
        REGISTRY,
    )
    ids = IdentityMap.from_entries(
        [
            ("10.0.0.10/32", {"app": "server"}),
            ("10.0.0.11/32", {"app": "client"}),
            ("10.0.0.1/32", {"reserved:host": ""}),
            ("10.0.5.0/24", {"reserved:world": ""}),
        ]
    )
    w = World(docs, ids)
    assert not w.allowed("10.0.0.11", "10.0.0.10")  # an endpoint inside the CIDR: not matched
    assert not w.allowed("10.0.0.1", "10.0.0.10")  # nor an entity
    assert w.allowed("10.0.0.99", "10.0.0.10")  # no entry: world
    assert w.allowed("10.0.5.3", "10.0.0.10")  # entity world
    assert w.allowed("192.0.2.1", "10.0.0.10")


def test_entities_load_with_every_name() -> None:
    names = ["world", "world-ipv4", "world-ipv6", "cluster", "all", "none", "host", "remote-node",
             "kube-apiserver", "health", "ingress", "init", "unmanaged"]  # fmt: skip
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n"
    text += f"  endpointSelector: {{}}\n  egress:\n  - toEntities: [{', '.join(names)}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert doc.specs[0].rules[0].entities == tuple(names)


# --- item 5: explicit empty lists --------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["fromEndpoints: []", "fromCIDR: []", "fromCIDRSet: []", "fromEntities: []"]
)
def test_explicit_empty_list_selects_nothing(field: str) -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n"
    text += f"  endpointSelector: {{}}\n  ingress:\n  - {field}\n    toPorts: [{{ports: [{{port: '80'}}]}}]\n"
    docs = parse_text(text, "p.yaml", REGISTRY)
    [rule] = docs[0].specs[0].rules
    assert rule.has_l3 and rule.describe_l3() == "no remote (an empty list selects nothing)"
    ids = IdentityMap.from_entries(
        [("10.0.0.11/32", {"app": "client"}), ("10.0.0.1/32", {"reserved:host": ""})]
    )
    w = World(docs, ids)
    for src in ("10.0.0.11", "10.0.0.1", "192.0.2.1"):
        assert not w.allowed(src, "10.0.0.10"), src


def test_null_list_is_absent_as_in_go() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n"
    text += "  endpointSelector: {}\n  ingress:\n  - fromEndpoints: null\n"
    text += "    toPorts: [{ports: [{port: '80'}]}]\n"
    w = World(parse_text(text, "p.yaml", REGISTRY), IdentityMap.from_entries([]))
    assert w.allowed("192.0.2.1", "10.0.0.10")  # toPorts without an L3 part: any remote


def test_explicit_empty_to_endpoints_on_egress() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n"
    text += "  endpointSelector: {}\n  egress:\n  - toEndpoints: []\n    toPorts: [{ports: [{port: '80'}]}]\n"
    ids = IdentityMap.from_entries([("10.0.0.11/32", {"app": "db"})])
    w = World(parse_text(text, "p.yaml", REGISTRY), ids)
    assert not w.allowed("10.0.0.10", "10.0.0.11", "egress")


# --- item 6: enableDefaultDeny ------------------------------------------------------------------


def test_enable_default_deny_false_as_in_cilium_docs() -> None:
    # The shape of Cilium's "enableDefaultDeny" example: add a deny without taking the endpoint
    # into default deny.
    text = """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: deny-metadata-without-default-deny
spec:
  endpointSelector: {}
  enableDefaultDeny:
    egress: false
  egressDeny:
  - toCIDR:
    - 169.254.169.254/32
"""
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert doc.specs[0].enable_default_deny == (None, False)
    w = World([doc], IdentityMap.from_entries([("10.0.0.10/32", {"app": "web"})]))
    assert w.allowed("10.0.0.10", "192.0.2.1", "egress")
    assert not w.allowed("10.0.0.10", "169.254.169.254", "egress")
    assert w.allowed("192.0.2.1", "10.0.0.10", "ingress")


# --- item 12: namespaces ----------------------------------------------------------------------


@pytest.fixture
def ns_world(tmp_path: Path) -> World:
    entries = (FIXTURES / "identities" / "namespaces.yaml").read_text()
    ids = IdentityMap.from_entries(config_identities(tmp_path, entries))
    return World(load_paths([FIXTURES / "namespaces.yaml"], REGISTRY), ids)


LEIA, HAN, LUKE, VADER, HOST = "10.1.0.10", "10.1.0.11", "10.2.0.20", "10.2.0.21", "10.9.0.1"


def test_namespaced_document_scopes_its_selectors(ns_world: World) -> None:
    isolate = ns_world.ps.documents[0]
    assert str(isolate.specs[0].endpoint_selector) == "{k8s:io.kubernetes.pod.namespace=ns1}"
    assert str(isolate.specs[0].rules[0].endpoints[0]) == "{k8s:io.kubernetes.pod.namespace=ns1}"
    assert ns_world.allowed(HAN, LEIA)  # same namespace
    assert ns_world.allowed(LEIA, HAN)
    assert not ns_world.allowed(VADER, HAN)  # isolate-ns1: other namespaces refused
    assert not ns_world.allowed(HOST, HAN)
    assert ns_world.allowed(VADER, LUKE)  # ns2 is not selected by the ns1 documents


def test_selector_naming_the_namespace_key_is_not_scoped(ns_world: World) -> None:
    expose = ns_world.ps.documents[1]
    [sel] = expose.specs[0].rules[0].endpoints
    assert str(sel) == "{k8s:io.kubernetes.pod.namespace=ns2, name=luke}"
    assert ns_world.allowed(LUKE, LEIA)


def test_clusterwide_document_is_not_scoped(ns_world: World) -> None:
    cw = ns_world.ps.documents[2]
    assert str(cw.specs[0].endpoint_selector) == "{name=leia}"
    assert ns_world.allowed(VADER, LEIA)


def test_endpoint_selector_is_always_in_its_own_namespace() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns1}\n"
    text += "spec:\n  endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: ns2}}\n"
    text += "  ingress: [{}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert str(doc.specs[0].endpoint_selector) == "{k8s:io.kubernetes.pod.namespace=ns1}"
    assert warnings([doc]) == [
        "p.yaml:5: spec.endpointSelector: a namespaced policy selects only endpoints of its own namespace "
        "(ns1); the endpointSelector's namespace requirement is replaced"
    ]


@pytest.mark.parametrize(
    ("peer", "shown"),
    [
        ("{matchLabels: {io.kubernetes.pod.namespace: ns2}}", "{io.kubernetes.pod.namespace=ns2}"),
        ("{matchLabels: {any:io.kubernetes.pod.namespace: ns2}}", "{any:io.kubernetes.pod.namespace=ns2}"),
        (
            "{matchExpressions: [{key: k8s:io.kubernetes.pod.namespace, operator: Exists}]}",
            "{k8s:io.kubernetes.pod.namespace Exists}",
        ),
        (
            "{matchLabels: {k8s:io.cilium.k8s.namespace.labels.team: a}}",
            "{k8s:io.cilium.k8s.namespace.labels.team=a}",
        ),
        ("{matchLabels: {app: x}}", "{app=x, k8s:io.kubernetes.pod.namespace=ns1}"),
    ],
)
def test_which_peer_selectors_are_scoped(peer: str, shown: str) -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns1}\n"
    text += f"spec:\n  endpointSelector: {{}}\n  egress:\n  - toEndpoints: [{peer}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert str(doc.specs[0].rules[0].endpoints[0]) == shown


def test_init_subject_peers_are_not_scoped() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: ns1}\n"
    text += "spec:\n  endpointSelector: {matchLabels: {'reserved:init': ''}}\n"
    text += "  egress:\n  - toEndpoints: [{matchLabels: {app: dns}}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert str(doc.specs[0].rules[0].endpoints[0]) == "{app=dns}"


def test_bare_rules_and_clusterwide_namespace_are_not_scoped() -> None:
    [doc] = parse_text(
        '[{"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}],'
        ' "labels": [{"key": "name", "value": "x"}]}]',
        "import.json",
        REGISTRY,
    )
    assert str(doc.specs[0].endpoint_selector) == "{} (all endpoints)"
    text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\n"
    text += "metadata: {name: p, namespace: ns1}\n"
    text += "spec:\n  endpointSelector: {}\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert str(doc.specs[0].endpoint_selector) == "{} (all endpoints)"
    assert warnings([doc]) == [
        "p.yaml:3: metadata.namespace: ignored: a clusterwide policy has no namespace (as in Kubernetes)"
    ]


def test_check_warns_about_selector_keys_no_identity_carries() -> None:
    docs = load_paths([FIXTURES / "namespaces.yaml"], REGISTRY)
    plain = [("10.1.0.10/32", {"name": "leia"}), ("10.2.0.20/32", {"name": "luke"})]
    got = selector_key_warnings(docs, plain)
    where = FIXTURES / "namespaces.yaml"
    assert got == [
        f"{where}:8: spec.endpointSelector: selector key 'k8s:io.kubernetes.pod.namespace' (every selector "
        "of a document in namespace ns1 requires it): no identities entry carries it, so this selector "
        "matches nothing",
        f"{where}:22: spec.endpointSelector: selector key 'k8s:io.kubernetes.pod.namespace' (every selector "
        "of a document in namespace ns1 requires it): no identities entry carries it, so this selector "
        "matches nothing",
    ]
    # With the namespace label on the identities (as the docs' example gives it): no warning.
    with_ns = [("10.1.0.10/32", {"k8s:io.kubernetes.pod.namespace": "ns1", "name": "leia"})]
    assert selector_key_warnings(docs, with_ns) == []


def test_same_name_in_two_namespaces_loads_as_in_kubernetes() -> None:
    # Cilium's examples/policies/kubernetes/namespace/isolate-namespaces.yaml shape: one name,
    # one document per namespace.
    doc = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: isolate\n  namespace: {ns}\n"
        "spec:\n  endpointSelector: {{matchLabels: {{}}}}\n"
        "  ingress:\n  - fromEndpoints: [{{matchLabels: {{}}}}]\n"
    )
    docs = parse_text(doc.format(ns="ns1") + "---\n" + doc.format(ns="ns2"), "p.yaml", REGISTRY)
    assert [d.name for d in docs] == ["ns1/isolate", "ns2/isolate"]
    with pytest.raises(PolicyError, match="duplicate policy name 'ns1/isolate'"):
        parse_text(doc.format(ns="ns1") + "---\n" + doc.format(ns="ns1"), "p.yaml", REGISTRY)


@pytest.mark.parametrize("section", ["egress:", "egress: []"])
def test_empty_section_enforces_nothing_and_says_so(section: str) -> None:
    # The shape of Cilium's old "egress default deny" example. Cilium counts rules
    # (len(Egress) > 0) to enforce a direction, so an empty section enforces nothing.
    text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: deny-all-egress}\n"
    text += f"spec:\n  endpointSelector:\n    matchLabels:\n      role: restricted\n  {section}\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert warnings([doc]) == [
        "p.yaml:8: spec.egress: no rules: this does not turn on default deny for egress "
        "(write `egress: [{}]` to deny everything)"
    ]
    w = World([doc], IdentityMap.from_entries([("10.0.0.10/32", {"role": "restricted"})]))
    assert w.allowed("10.0.0.10", "192.0.2.1", "egress")
    deny_all = parse_text(text.replace(section, "egress: [{}]"), "p.yaml", REGISTRY)
    assert not World(deny_all, w.ids).allowed("10.0.0.10", "192.0.2.1", "egress")
