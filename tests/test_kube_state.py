"""Identities from cluster objects (docs/kubernetes.md): the sans-IO state, fed events directly."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.kube.state import ClusterState, Node, Pod


def pod(uid: str, ip: str, *, ns: str = "prod", name: str | None = None, **kw: object) -> Pod:
    return Pod(uid=uid, namespace=ns, name=name or f"p-{uid}", ips=(ip,), **kw)  # type: ignore[arg-type]


def test_pod_labels_are_derived_as_cilium_does() -> None:
    s = ClusterState(cluster_name="east")
    s.apply_namespace("ADDED", "prod", {"team": "a", "kubernetes.io/metadata.name": "prod"})
    changed = s.apply_pod(
        "ADDED", Pod("u1", "prod", "web-1", {"app": "web"}, "websa", ("10.0.0.5", "fd00::5"))
    )
    assert changed == {"10.0.0.5", "fd00::5"}
    ident = s.identity("10.0.0.5")
    assert ident is not None
    assert dict(ident.labels) == {
        "k8s:app": "web",
        "k8s:io.kubernetes.pod.namespace": "prod",
        "k8s:io.cilium.k8s.policy.serviceaccount": "websa",
        "k8s:io.cilium.k8s.policy.cluster": "east",
        "k8s:io.cilium.k8s.namespace.labels.team": "a",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod",
    }
    assert ident.origin == "pod prod/web-1"
    assert s.identity("fd00::5") == ident


def test_namespace_relabel_touches_only_its_pods() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("a", "10.0.0.1", ns="one"))
    s.apply_pod("ADDED", pod("b", "10.0.0.2", ns="two"))
    assert s.apply_namespace("ADDED", "one", {"env": "x"}) == {"10.0.0.1"}
    assert s.identity("10.0.0.1").labels["k8s:io.cilium.k8s.namespace.labels.env"] == "x"  # type: ignore[union-attr]
    assert s.apply_namespace("MODIFIED", "one", {"env": "x"}) == set()
    assert s.apply_namespace("DELETED", "one", {}) == {"10.0.0.1"}


def test_host_network_pods_and_pods_without_ip_are_not_endpoints() -> None:
    s = ClusterState()
    assert s.apply_pod("ADDED", pod("a", "10.0.0.1", host_network=True)) == set()
    assert s.apply_pod("ADDED", Pod("b", "prod", "pending")) == set()
    assert s.identities() == {}


def test_relabel_and_delete() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("a", "10.0.0.1", labels={"app": "web"}))
    assert s.apply_pod("MODIFIED", pod("a", "10.0.0.1", labels={"app": "db"})) == {"10.0.0.1"}
    assert s.identity("10.0.0.1").labels["k8s:app"] == "db"  # type: ignore[union-attr]
    assert s.apply_pod("DELETED", pod("a", "10.0.0.1")) == {"10.0.0.1"}
    assert s.identity("10.0.0.1") is None


def test_reused_ip_goes_to_the_new_pod_whatever_the_order() -> None:
    old = pod("old", "10.0.0.9", labels={"app": "old"})
    new = pod("new", "10.0.0.9", labels={"app": "new"})
    # delete first, then add
    s = ClusterState()
    s.apply_pod("ADDED", old)
    s.apply_pod("DELETED", old)
    s.apply_pod("ADDED", new)
    assert s.identity("10.0.0.9").labels["k8s:app"] == "new"  # type: ignore[union-attr]
    # add first, then the late delete of the old pod
    s = ClusterState()
    s.apply_pod("ADDED", old)
    s.apply_pod("ADDED", new)
    assert s.identity("10.0.0.9").labels["k8s:app"] == "new"  # type: ignore[union-attr]
    s.apply_pod("DELETED", old)
    assert s.identity("10.0.0.9").labels["k8s:app"] == "new"  # type: ignore[union-attr]


def test_a_terminating_pod_yields_its_ip_to_a_live_one() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("new", "10.0.0.9", labels={"app": "new"}))
    s.apply_pod("ADDED", pod("old", "10.0.0.9", labels={"app": "old"}, terminating=True))
    assert s.identity("10.0.0.9").labels["k8s:app"] == "new"  # type: ignore[union-attr]
    # an update of the old pod is not a new claim on the address
    s.apply_pod("MODIFIED", pod("new", "10.0.0.9", labels={"app": "new2"}))
    assert s.identity("10.0.0.9").labels["k8s:app"] == "new2"  # type: ignore[union-attr]


def test_relist_removes_what_vanished() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("a", "10.0.0.1"))
    s.apply_pod("ADDED", pod("b", "10.0.0.2"))
    changed = s.replace_pods([pod("b", "10.0.0.2"), pod("c", "10.0.0.3")])
    assert changed == {"10.0.0.1", "10.0.0.3"}
    assert set(s.identities()) == {"10.0.0.2", "10.0.0.3"}


def test_nodes_and_the_api_server() -> None:
    s = ClusterState(node_name="n1")
    s.apply_node("ADDED", Node("n1", {"zone": "a"}, ("192.168.0.1",)))
    s.apply_node("ADDED", Node("n2", {"zone": "b"}, ("192.168.0.2",)))
    s.set_apiserver(["192.168.0.2", "192.168.0.10"])
    h = s.identity("192.168.0.1")
    assert h is not None and dict(h.labels) == {"node:zone": "a", "reserved:host": ""}
    assert h.origin == "node n1"
    r = s.identity("192.168.0.2")
    assert r is not None
    assert dict(r.labels) == {"node:zone": "b", "reserved:remote-node": "", "reserved:kube-apiserver": ""}
    a = s.identity("192.168.0.10")
    assert a is not None and dict(a.labels) == {"reserved:kube-apiserver": ""}
    assert s.apply_node("DELETED", Node("n2")) == {"192.168.0.2"}
    assert dict(s.identity("192.168.0.2").labels) == {"reserved:kube-apiserver": ""}  # type: ignore[union-attr]


def test_ipv4_mapped_addresses_are_the_ipv4_address() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("a", "::ffff:10.0.0.1"))
    assert s.identity("10.0.0.1") is not None


# --- any order of events ends where the final state applied at once does -----------------------

NAMESPACES = ("a", "b")
IPS = [f"10.1.0.{i}" for i in range(1, 6)]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[tuple[str, object]], list[Pod], dict[str, dict[str, str]]]:
    """Per-object histories interleaved at random, and the final state they end in."""
    per_object: list[list[tuple[str, object]]] = []
    final_pods: list[Pod] = []
    final_ips = draw(st.lists(st.sampled_from(IPS), unique=True, max_size=4))
    n_pods = draw(st.integers(0, 6))
    for i in range(n_pods):
        uid = f"u{i}"
        ns = draw(st.sampled_from(NAMESPACES))
        versions = [
            Pod(uid, ns, uid, {"v": str(j), "app": draw(st.sampled_from(["x", "y"]))},
                ips=(draw(st.sampled_from(IPS)),))
            for j in range(draw(st.integers(1, 3)))
        ]  # fmt: skip
        events: list[tuple[str, object]] = [("ADDED", versions[0])]
        events += [("MODIFIED", v) for v in versions[1:]]
        if i < len(final_ips):  # survives, holding an address no other survivor holds
            last = Pod(uid, ns, uid, {"final": "1"}, ips=(final_ips[i],))
            events.append(("MODIFIED", last))
            final_pods.append(last)
        else:
            events.append(("DELETED", versions[-1]))
        per_object.append(events)
    if final_pods and draw(st.booleans()):
        # a pod on its way out holding a survivor's address: the survivor keeps it, in any order
        ip = final_pods[0].ips[0]
        live = Pod("t", "a", "t", {"old": "1"}, ips=(ip,))
        dying = Pod("t", "a", "t", {"old": "1"}, ips=(ip,), terminating=True)
        per_object.append([("ADDED", live), ("MODIFIED", dying)])
        final_pods.append(dying)
    final_ns: dict[str, dict[str, str]] = {}
    for ns in NAMESPACES:
        versions_ns = draw(st.lists(st.sampled_from(["1", "2", "3"]), max_size=3))
        events_ns: list[tuple[str, object]] = [("NS", (ns, {"gen": v})) for v in versions_ns]
        if versions_ns and draw(st.booleans()):
            events_ns.append(("NSDEL", (ns, {})))
        elif versions_ns:
            final_ns[ns] = {"gen": versions_ns[-1]}
        per_object.append(events_ns)
    merged: list[tuple[str, object]] = []
    queues = [list(q) for q in per_object if q]
    while queues:
        q = queues[draw(st.integers(0, len(queues) - 1))]
        merged.append(q.pop(0))
        queues = [q for q in queues if q]
    return merged, final_pods, final_ns


@settings(max_examples=150, deadline=None)
@given(histories())
def test_any_event_order_ends_in_the_final_state(
    history: tuple[list[tuple[str, object]], list[Pod], dict[str, dict[str, str]]],
) -> None:
    events, final_pods, final_ns = history
    s = ClusterState()
    for kind, obj in events:
        if kind in ("NS", "NSDEL"):
            name, labels = obj  # type: ignore[misc]
            s.apply_namespace("DELETED" if kind == "NSDEL" else "MODIFIED", name, labels)
        else:
            s.apply_pod(kind, obj)  # type: ignore[arg-type]
    at_once = ClusterState()
    at_once.replace_namespaces(final_ns)
    at_once.replace_pods(final_pods)
    assert dict(s.identities()) == dict(at_once.identities())


def test_node_labels_select_only_as_node_keys_and_do_not_make_an_endpoint() -> None:
    from proxyd.policy.selector import EndpointSelector, LabelSet

    s = ClusterState(node_name="n1")
    s.apply_node("ADDED", Node("n2", {"zone": "a"}, ("192.168.0.2",)))
    ident = s.identity("192.168.0.2")
    assert ident is not None
    labels = LabelSet(ident.labels)
    assert not labels.is_endpoint and labels.entity == "remote-node"
    assert not EndpointSelector().matches_peer(labels)  # fromEndpoints: [{}] never admits a node
    assert not EndpointSelector.from_labels({"zone": "a"}).matches(labels)
    assert not EndpointSelector.from_labels({"k8s:zone": "a"}).matches(labels)
    assert EndpointSelector.from_labels({"node:zone": "a"}).matches(labels)


def test_kubernetes_config_section_errors_name_file_line_and_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from proxyd.config import KubernetesConfig, parse_config
    from proxyd.errors import ConfigError
    from proxyd.registry import Registry

    base = 'listeners:\n  - name: l\n    address: "127.0.0.1:0"\n'
    cfg = tmp_path / "proxyd.yaml"
    (tmp_path / "kc").write_text("{}")
    good = parse_config(base + "kubernetes:\n  kubeconfig: kc\n  cluster_name: east\n  node_name: n1\n",
                        cfg, Registry.load())  # fmt: skip
    assert good.kubernetes == KubernetesConfig(tmp_path / "kc", "east", "n1", True, True)
    assert parse_config(base + "kubernetes:\n", cfg, Registry.load()).kubernetes == KubernetesConfig()
    assert parse_config(base, cfg, Registry.load()).kubernetes is None
    bad = base + "kubernetes:\n  kubeconfig: missing\n  identities: 'yes'\n  clustr_name: x\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(bad, cfg, Registry.load())
    assert exc.value.problems == [
        f"{cfg}:5: kubernetes.kubeconfig: no such file: {tmp_path / 'missing'}",
        f"{cfg}:6: kubernetes.identities: must be true or false, not 'yes'",
        f"{cfg}:7: kubernetes.clustr_name: unknown key (known: kubeconfig, cluster_name, node_name, "
        "identities, policies)",
    ]


def test_no_node_name_means_no_host_with_a_warning(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from proxyd.config import KubernetesConfig
    from proxyd.kube.cluster import KubeSource

    def source(kc: KubernetesConfig) -> tuple[KubeSource, list[str]]:
        said: list[str] = []
        src = KubeSource(kc, on_change=lambda ips: None, on_state=lambda up, t: None,
                         log_warning=lambda event, **kw: said.append(event), client=object())  # fmt: skip
        return src, said

    monkeypatch.delenv("NODE_NAME", raising=False)
    src, said = source(KubernetesConfig())
    assert src.node_name is None and any("no address is the entity host" in s for s in said)
    src.state.apply_node("ADDED", Node("n1", {}, ("192.168.0.1",)))
    assert dict(src.state.identity("192.168.0.1").labels) == {"reserved:remote-node": ""}  # type: ignore[union-attr]
    monkeypatch.setenv("NODE_NAME", "n1")
    src, said = source(KubernetesConfig())
    assert src.node_name == "n1" and said == []
    src, _ = source(KubernetesConfig(node_name="n2"))  # the config wins over the environment
    assert src.node_name == "n2"


def test_a_terminating_pod_alone_keeps_its_ip_until_deleted() -> None:
    s = ClusterState()
    s.apply_pod("ADDED", pod("a", "10.0.0.3", labels={"app": "a"}))
    assert s.apply_pod("MODIFIED", pod("a", "10.0.0.3", labels={"app": "a"}, terminating=True)) == set()
    assert s.identity("10.0.0.3").labels["k8s:app"] == "a"  # type: ignore[union-attr]
    s.apply_pod("DELETED", pod("a", "10.0.0.3"))
    assert s.identity("10.0.0.3") is None
