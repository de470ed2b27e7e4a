"""fromNodes / toNodes / nodeSelector: enforced with a kubernetes source, load errors without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.errors import PolicyError
from proxyd.kube.state import ClusterState, Node, Pod
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import parse_text
from proxyd.registry import Registry

REGISTRY = Registry.load()

FROM_NODES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-nodes, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromNodes:
        - matchLabels: {zone: a}
"""

NODE_SELECTOR = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host}
spec:
  nodeSelector: {matchLabels: {node-access: ssh}}
  ingress:
    - fromEntities: [world]
      toPorts: [{ports: [{port: "22"}]}]
"""


def cluster() -> ClusterState:
    s = ClusterState(node_name="n1")
    s.apply_node("ADDED", Node("n1", {"zone": "a", "node-access": "ssh"}, ("192.168.0.1",)))
    s.apply_node("ADDED", Node("n2", {"zone": "a"}, ("192.168.0.2",)))
    s.apply_node("ADDED", Node("n3", {"zone": "b"}, ("192.168.0.3",)))
    s.apply_pod("ADDED", Pod("u1", "shop", "db-0", {"app": "db"}, ips=("10.0.0.5",)))
    s.apply_pod("ADDED", Pod("u2", "shop", "web-0", {"zone": "a"}, ips=("10.0.0.6",)))
    return s


def labels(s: ClusterState, ip: str) -> dict[str, str]:
    ident = s.identity(ip)
    return dict(ident.labels) if ident is not None else {}


@pytest.mark.parametrize(
    ("text", "field"),
    [(FROM_NODES, "spec.ingress[0].fromNodes"), (NODE_SELECTOR, "spec.nodeSelector"),
     (FROM_NODES.replace("ingress", "egress").replace("fromNodes", "toNodes"), "spec.egress[0].toNodes")],
)  # fmt: skip
def test_without_a_kubernetes_section_they_are_errors_that_say_so(text: str, field: str) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_text(text, "p.yaml", REGISTRY)
    assert len(exc.value.problems) == 1
    assert f"{field}: not supported by proxyd" in exc.value.problems[0]
    assert "needs a `kubernetes` section" in exc.value.problems[0]


def test_from_nodes_admits_the_nodes_whose_labels_match() -> None:
    s = cluster()
    ps = PolicySet(parse_text(FROM_NODES, "p.yaml", REGISTRY, kubernetes=True), REGISTRY)
    db = labels(s, "10.0.0.5")

    def allowed(ip: str) -> bool:
        return ps.connection_policy("ingress", db, ip, labels(s, ip), 5432, None).l4_allowed

    assert allowed("192.168.0.1")  # this node (host), zone a
    assert allowed("192.168.0.2")  # remote-node, zone a
    assert not allowed("192.168.0.3")  # zone b
    assert not allowed("10.0.0.6")  # a pod labelled zone=a is not a node


def test_to_nodes_on_egress() -> None:
    s = cluster()
    text = FROM_NODES.replace("ingress", "egress").replace("fromNodes", "toNodes")
    ps = PolicySet(parse_text(text, "p.yaml", REGISTRY, kubernetes=True), REGISTRY)
    db = labels(s, "10.0.0.5")
    for ip, allowed in (("192.168.0.2", True), ("192.168.0.3", False)):
        assert ps.connection_policy("egress", db, ip, labels(s, ip), 10250, None).l4_allowed is allowed


def test_node_selector_selects_this_node_when_its_labels_match() -> None:
    s = cluster()
    ps = PolicySet(parse_text(NODE_SELECTOR, "p.yaml", REGISTRY, kubernetes=True), REGISTRY)
    host = labels(s, "192.168.0.1")
    # selected: only port 22 from world is allowed now
    assert ps.connection_policy("ingress", host, "8.8.8.8", {}, 22, None).l4_allowed
    assert not ps.connection_policy("ingress", host, "8.8.8.8", {}, 80, None).l4_allowed
    # a pod is not selected by a node selector: no policy, allowed
    assert ps.connection_policy("ingress", labels(s, "10.0.0.5"), "8.8.8.8", {}, 80, None).l4_allowed


NAMED_PORT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{}]
      toPorts: [{ports: [{port: http, protocol: TCP}]}]
"""


def test_named_ports_resolve_through_the_destination_pods_container_ports() -> None:
    with pytest.raises(PolicyError) as exc:
        parse_text(NAMED_PORT, "p.yaml", REGISTRY)
    assert "named port 'http': needs a `kubernetes` section" in exc.value.problems[0]
    s = ClusterState()
    s.apply_pod("ADDED", Pod("u1", "shop", "web-0", {"app": "web"}, ips=("10.0.0.5",),
                             named_ports={"http": (8080, "TCP"), "dns": (53, "UDP")}))  # fmt: skip
    s.apply_pod("ADDED", Pod("u2", "shop", "web-1", {"app": "web"}, ips=("10.0.0.6",),
                             named_ports={"http": (9090, "TCP")}))  # fmt: skip
    s.apply_pod("ADDED", Pod("u3", "shop", "client", {"app": "client"}, ips=("10.0.0.7",)))
    ps = PolicySet(parse_text(NAMED_PORT, "p.yaml", REGISTRY, kubernetes=True), REGISTRY)
    client = labels(s, "10.0.0.7")

    def allowed(dst: str, port: int) -> bool:
        return ps.connection_policy("ingress", labels(s, dst), "10.0.0.7", client, port, None).l4_allowed

    assert allowed("10.0.0.5", 8080) and not allowed("10.0.0.5", 9090)
    assert allowed("10.0.0.6", 9090) and not allowed("10.0.0.6", 8080)
    assert "namedport:dns" not in labels(s, "10.0.0.5")  # UDP: never matches a TCP connection
    # the named-port labels select nothing and are not endpoint labels
    from proxyd.policy.selector import EndpointSelector, LabelSet

    assert not EndpointSelector.from_labels({"http": "8080"}).matches(LabelSet(labels(s, "10.0.0.5")))


TO_SERVICES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-db, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
    - toServices:
        - k8sService: {serviceName: db}
        - k8sServiceSelector: {selector: {matchLabels: {tier: cache}}, namespace: infra}
"""


def test_to_services_select_the_backends_of_the_services() -> None:
    from proxyd.kube.state import EndpointSlice

    with pytest.raises(PolicyError) as exc:
        parse_text(TO_SERVICES, "p.yaml", REGISTRY)
    assert "spec.egress[0].toServices: not supported by proxyd" in exc.value.problems[0]
    assert "needs a `kubernetes` section" in exc.value.problems[0]
    s = cluster()
    s.apply_pod("ADDED", Pod("w", "shop", "web-1", {"app": "web"}, ips=("10.0.1.1",)))
    s.apply_service("ADDED", "shop", "db", {"app": "db"})
    s.apply_service("ADDED", "infra", "redis", {"tier": "cache"})
    s.apply_service("ADDED", "other", "redis", {"tier": "cache"})
    s.apply_endpointslice("ADDED", EndpointSlice("shop", "db-abc", "db", ("10.0.0.5",)))
    s.apply_endpointslice("ADDED", EndpointSlice("infra", "redis-1", "redis", ("203.0.113.9",)))  # external
    s.apply_endpointslice("ADDED", EndpointSlice("other", "redis-1", "redis", ("203.0.113.10",)))
    ps = PolicySet(parse_text(TO_SERVICES, "p.yaml", REGISTRY, kubernetes=True), REGISTRY)
    web = labels(s, "10.0.1.1")

    def allowed(ip: str) -> bool:
        return ps.connection_policy("egress", web, ip, labels(s, ip), 5432, None).l4_allowed

    assert allowed("10.0.0.5")  # the db pod backs shop/db
    assert not allowed("10.0.0.6")  # a pod backing nothing
    assert allowed("203.0.113.9")  # an external backend of infra/redis (labels tier=cache)
    assert not allowed("203.0.113.10")  # the same labels in another namespace
    assert not allowed("203.0.113.11")
    # an external backend is still world to CIDR rules; a pod backend keeps its own labels
    from proxyd.policy.selector import LabelSet

    assert LabelSet.remote(labels(s, "203.0.113.9")).is_world
    assert labels(s, "10.0.0.5")["k8s:app"] == "db"
    # the slice goes away: so does the permission
    s.apply_endpointslice("DELETED", EndpointSlice("shop", "db-abc", "db"))
    assert not allowed("10.0.0.5")


def test_check_validates_cluster_only_fields_offline(tmp_path: Path) -> None:
    """`proxyd check` with a kubernetes section loads them without asking any API server."""
    import os
    import subprocess
    import sys

    (tmp_path / "policy.yaml").write_text("---".join((FROM_NODES, NODE_SELECTOR, NAMED_PORT, TO_SERVICES)))
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    base = 'listeners:\n  - name: l\n    address: "127.0.0.1:0"\npolicy:\n  paths: [policy.yaml]\n'
    env = {**os.environ}
    for text, code in ((base + "kubernetes:\n  kubeconfig: kubeconfig\n", 0), (base, 1)):
        (tmp_path / "proxyd.yaml").write_text(text)
        cmd = [sys.executable, "-m", "proxyd", "check", "--config", str(tmp_path / "proxyd.yaml")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == code, res.stderr
        if code:
            assert "needs a `kubernetes` section" in res.stderr
        else:
            assert "4 policy documents" in res.stdout and "warning" not in res.stderr
