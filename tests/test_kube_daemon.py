"""The daemon's Kubernetes source against the stand-in API server, through lightkube itself.

Covers docs/kubernetes.md: identities from pods, namespaces, nodes and ``default/kubernetes``;
list then watch resuming from the last ``resourceVersion`` (bookmarks too); ``410 Gone``
relists and swaps atomically; an outage keeps the last state and reports it; listeners accept
only after the first full sync.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from kube_apiserver import FakeApiServer, pod

import proxyd.kube.watch
from proxyd.config import parse_config
from proxyd.registry import Registry
from proxyd.server import Daemon


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxyd.kube.watch, "BACKOFF_START", 0.02)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def config_text(kubeconfig: Path, extra: str = "") -> str:
    return f"""
listeners:
  - name: l
    address: "127.0.0.1:0"
admin:
  address: "127.0.0.1:0"
kubernetes:
  kubeconfig: {kubeconfig}
  cluster_name: east
  node_name: n1
{extra}"""


@contextlib.asynccontextmanager
async def kube_daemon(api: FakeApiServer, tmp_path: Path, extra: str = "") -> AsyncIterator[Daemon]:
    text = config_text(api.kubeconfig(tmp_path / "kubeconfig"), extra)
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text(text)
    registry = Registry.load()
    d = Daemon(parse_config(text, cfg, registry), registry)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


def labels(d: Daemon, ip: str) -> dict[str, str]:
    return dict(d.labels_for(ip))


async def test_pods_namespaces_nodes_and_apiserver_become_identities(
    api: FakeApiServer, tmp_path: Path
) -> None:
    await api.put("namespaces", {"metadata": {"name": "prod", "labels": {"team": "a"}}})
    await api.put("pods", pod("web-1", "10.0.0.5", ns="prod", labels={"app": "web"}, sa="websa"))
    await api.put("pods", pod("hostnet", "10.9.9.9", hostNetwork=True))
    await api.put("nodes", {"metadata": {"name": "n1", "labels": {"zone": "a"}},
                            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"},
                                                     {"type": "Hostname", "address": "n1"}]}})  # fmt: skip
    n2 = {"addresses": [{"type": "InternalIP", "address": "192.168.1.2"}]}
    await api.put("nodes", {"metadata": {"name": "n2"}, "status": n2})
    for svc, ip in (("kubernetes", "192.168.1.100"), ("other", "192.168.1.101")):
        md = {"name": f"{svc}-1", "namespace": "default", "labels": {"kubernetes.io/service-name": svc}}
        eps = [{"addresses": [ip]}]
        await api.put("endpointslices", {"metadata": md, "addressType": "IPv4", "endpoints": eps})
    async with kube_daemon(
        api, tmp_path, "identities:\n  - cidr: 10.0.0.0/8\n    labels: {static: 'yes'}\n"
    ) as d:
        assert labels(d, "10.0.0.5") == {
            "k8s:app": "web",
            "k8s:io.kubernetes.pod.namespace": "prod",
            "k8s:io.cilium.k8s.policy.serviceaccount": "websa",
            "k8s:io.cilium.k8s.policy.cluster": "east",
            "k8s:io.cilium.k8s.namespace.labels.team": "a",
        }
        assert labels(d, "::ffff:10.0.0.5")["k8s:app"] == "web"
        assert d.kube.identity("10.0.0.5").origin == "pod prod/web-1"
        assert labels(d, "10.9.9.9") == {"static": "yes"}  # hostNetwork: not an endpoint; static applies
        assert labels(d, "192.168.1.1") == {"node:zone": "a", "reserved:host": ""}
        assert labels(d, "192.168.1.2") == {"reserved:remote-node": ""}
        assert labels(d, "192.168.1.100") == {"reserved:kube-apiserver": "", "service:default/kubernetes": ""}
        assert d.kube.identity("192.168.1.100").origin == "service default/kubernetes"
        assert labels(d, "192.168.1.101") == {"service:default/other": ""}  # a backend, no entity

        # events: relabel, namespace relabel, delete; each seen at the next lookup
        await api.put("pods", pod("web-1", "10.0.0.5", ns="prod", labels={"app": "db"}, sa="websa"))
        await until(lambda: labels(d, "10.0.0.5").get("k8s:app") == "db", "relabel")
        await api.put("namespaces", {"metadata": {"name": "prod", "labels": {"team": "b"}}})
        await until(lambda: labels(d, "10.0.0.5").get("k8s:io.cilium.k8s.namespace.labels.team") == "b",
                    "namespace relabel")  # fmt: skip
        await api.delete("pods", "web-1", "prod")
        await until(lambda: labels(d, "10.0.0.5") == {"static": "yes"}, "delete")


async def test_reused_ip_both_orders_through_the_watch(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("pods", pod("old", "10.0.0.7", labels={"app": "old"}))
    async with kube_daemon(api, tmp_path) as d:
        await api.put("pods", pod("new", "10.0.0.7", labels={"app": "new"}))  # add before the delete
        await until(lambda: labels(d, "10.0.0.7").get("k8s:app") == "new", "new pod takes the ip")
        await api.delete("pods", "old", "default")
        await asyncio.sleep(0.05)
        await until(lambda: labels(d, "10.0.0.7").get("k8s:app") == "new", "late delete keeps it")
        await api.delete("pods", "new", "default")  # delete before the add
        await until(lambda: labels(d, "10.0.0.7") == {}, "gone")
        await api.put("pods", pod("newer", "10.0.0.7", labels={"app": "newer"}))
        await until(lambda: labels(d, "10.0.0.7").get("k8s:app") == "newer", "newer pod")


async def test_410_gone_relists_and_removes_what_vanished(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("pods", pod("a", "10.0.0.1", labels={"app": "a"}))
    await api.put("pods", pod("b", "10.0.0.2", labels={"app": "b"}))
    async with kube_daemon(api, tmp_path) as d:
        pods = next(r for r in d.kube.source.reflectors if r.name == "Pod")
        assert pods.lists == 1
        # while the watch is cut, a pod goes away and history is compacted past our version
        api.down = True
        await api.drop_streams()
        await until(lambda: not pods.watching, "watch down")
        await api.delete("pods", "a", "default")
        await api.put("pods", pod("c", "10.0.0.3", labels={"app": "c"}))
        api.compact()
        api.down = False
        await until(lambda: pods.lists == 2, "relisted after 410")
        assert labels(d, "10.0.0.1") == {}
        assert labels(d, "10.0.0.2")["k8s:app"] == "b"
        assert labels(d, "10.0.0.3")["k8s:app"] == "c"
        await until(lambda: pods.watching, "watching again")


async def test_watch_resumes_from_the_last_version_and_bookmarks(api: FakeApiServer, tmp_path: Path) -> None:
    async with kube_daemon(api, tmp_path) as d:
        pods = next(r for r in d.kube.source.reflectors if r.name == "Pod")
        await api.put("pods", pod("a", "10.0.0.1"))
        await until(lambda: labels(d, "10.0.0.1") != {}, "event applied")
        await api.put("namespaces", {"metadata": {"name": "x"}})  # moves the store's version on
        await api.bookmark("pods")
        bookmark_rv = str(api.rv)
        await until(lambda: pods.resource_version == bookmark_rv, "bookmark version kept")
        await api.drop_streams()
        await until(
            lambda: any(p == "/api/v1/pods" and q.get("watch") == "true"
                        and q.get("resourceVersion") == bookmark_rv for p, q in api.requests),
            "re-watch from the bookmark's version",
        )  # fmt: skip
        assert pods.lists == 1  # a dropped stream is resumed, not relisted
        await api.put("pods", pod("b", "10.0.0.2"))
        await until(lambda: labels(d, "10.0.0.2") != {}, "events after the resume")


async def test_outage_keeps_the_last_state_and_reports_it(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("pods", pod("a", "10.0.0.1", labels={"app": "a"}))
    async with kube_daemon(api, tmp_path) as d:
        metrics = d.metrics
        assert metrics.kubernetes_synced._value.get() == 1
        first = metrics.kubernetes_last_event._value.get()
        assert first > 0
        api.down = True
        await api.drop_streams()
        await until(lambda: metrics.kubernetes_synced._value.get() == 0, "synced drops to 0")
        assert labels(d, "10.0.0.1")["k8s:app"] == "a"  # last state in force
        host, port = d.admin_address()  # type: ignore[misc]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{host}:{port}/readyz") as r:
                assert r.status == 200  # the last state is in force: still ready
            async with s.get(f"http://{host}:{port}/metrics") as r:
                text = await r.text()
        assert "proxyd_kubernetes_synced 0.0" in text
        assert "proxyd_kubernetes_last_event_timestamp_seconds" in text
        api.down = False
        await until(lambda: metrics.kubernetes_synced._value.get() == 1, "synced again")
        await api.put("pods", pod("a", "10.0.0.1", labels={"app": "a2"}))
        await until(lambda: labels(d, "10.0.0.1")["k8s:app"] == "a2", "events flow again")


async def test_listeners_accept_only_after_the_first_sync(api: FakeApiServer, tmp_path: Path) -> None:
    api.down = True
    text = config_text(api.kubeconfig(tmp_path / "kubeconfig"))
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text(text)
    registry = Registry.load()
    d = Daemon(parse_config(text, cfg, registry), registry)
    start = asyncio.get_running_loop().create_task(d.start())
    try:
        await until(lambda: d.admin_address() is not None, "admin up")
        host, port = d.admin_address()  # type: ignore[misc]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{host}:{port}/readyz") as r:
                assert r.status == 503
            assert d.listeners == {}  # nothing bound, nothing accepted
            api.down = False
            await asyncio.wait_for(start, 10)
            async with s.get(f"http://{host}:{port}/readyz") as r:
                assert r.status == 200
        assert d.listeners["l"].server is not None
    finally:
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
        await d.stop()


KUBE_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: cache
  namespace: shop
spec:
  endpointSelector:
    matchLabels: {app: memcached}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: client}
"""


async def memcache_set(src: str, port: int) -> bytes:
    """One ``set`` from a client bound to ``src`` (a pod's address on loopback); b"" when closed."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    try:
        w.write(b"set k 0 0 1\r\nx\r\n")
        await w.drain()
        try:
            return await asyncio.wait_for(r.readline(), 5)
        except ConnectionError:
            return b""
    finally:
        w.close()


async def test_end_to_end_a_pod_address_gets_its_pod_labels(api: FakeApiServer, tmp_path: Path) -> None:
    """Real memcached behind the daemon; clients bound to pod addresses on loopback."""
    from memcached_fixture import start_memcached

    await api.put("namespaces", {"metadata": {"name": "shop"}})
    await api.put("pods", pod("cache-0", "127.0.0.1", ns="shop", labels={"app": "memcached"}))
    await api.put("pods", pod("client-0", "127.0.0.23", ns="shop", labels={"app": "client"}))
    await api.put("pods", pod("other-0", "127.0.0.24", ns="shop", labels={"app": "other"}))
    await api.put("pods", pod("client-elsewhere", "127.0.0.25", ns="dev", labels={"app": "client"}))
    (tmp_path / "policy.yaml").write_text(KUBE_POLICY)
    with start_memcached() as mc_port:
        extra = "policy:\n  paths: [policy.yaml]\n"
        text = config_text(api.kubeconfig(tmp_path / "kubeconfig"), extra).replace(
            'address: "127.0.0.1:0"\nadmin', f'address: "127.0.0.1:0"\n    l7proto: memcache\n'
            f'    upstream: "127.0.0.1:{mc_port}"\nadmin', 1)  # fmt: skip
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(text)
        registry = Registry.load()
        d = Daemon(parse_config(text, cfg, registry), registry)
        await d.start()
        try:
            port = d.listeners["l"].bound_address()[1]
            assert await memcache_set("127.0.0.23", port) == b"STORED\r\n"
            assert await memcache_set("127.0.0.24", port) == b""  # app=other: denied at L3
            assert await memcache_set("127.0.0.25", port) == b""  # other namespace: not selected
            # the pod is relabelled: its next connection is judged by the new labels
            revision, policy_set = d.policy.revision, d.policy.current
            await api.put("pods", pod("client-0", "127.0.0.23", ns="shop", labels={"app": "gone"}))
            await until(lambda: d.labels_for("127.0.0.23").get("k8s:app") == "gone", "relabel")
            assert await memcache_set("127.0.0.23", port) == b""
            # a pod event changes identities only: the compiled policy is the same object
            assert d.policy.revision == revision and d.policy.current is policy_set
            await api.put("pods", pod("other-0", "127.0.0.24", ns="shop", labels={"app": "client"}))
            await until(lambda: d.labels_for("127.0.0.24").get("k8s:app") == "client", "relabel")
            assert await memcache_set("127.0.0.24", port) == b"STORED\r\n"
        finally:
            await d.stop()


def cnp(name: str, ns: str, from_app: str, **extra: object) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "memcached"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": from_app}}], **extra}],
        },
        "status": {"nodes": {"n1": {"ok": True}}},
    }


async def get_json(d: Daemon, path: str) -> object:
    host, port = d.admin_address()  # type: ignore[misc]
    async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}{path}") as r:
        return await r.json()


async def test_api_policies_each_validated_alone(api: FakeApiServer, tmp_path: Path) -> None:
    from memcached_fixture import start_memcached

    await api.put("pods", pod("cache-0", "127.0.0.1", ns="shop", labels={"app": "memcached"}))
    await api.put("pods", pod("client-0", "127.0.0.23", ns="shop", labels={"app": "client"}))
    await api.put("pods", pod("other-0", "127.0.0.24", ns="shop", labels={"app": "other"}))
    await api.put("ciliumnetworkpolicies", cnp("cache", "shop", "client"))
    await api.put("ciliumnetworkpolicies", cnp("broken", "shop", "other", toFQDNs=[{"matchName": "x"}]))
    with start_memcached() as mc_port:
        text = config_text(api.kubeconfig(tmp_path / "kubeconfig")).replace(
            'address: "127.0.0.1:0"\nadmin',
            f'address: "127.0.0.1:0"\n    upstream: "127.0.0.1:{mc_port}"\nadmin',
            1,
        )
        # a file document of the same name as an API object: named apart, both in force
        (tmp_path / "policy.yaml").write_text(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cache, namespace: shop}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: nothing}}\n  ingress: [{}]\n"
        )
        text += "policy:\n  paths: [policy.yaml]\n"
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(text)
        registry = Registry.load()
        d = Daemon(parse_config(text, cfg, registry), registry)
        await d.start()
        try:
            port = d.listeners["l"].bound_address()[1]
            assert await memcache_set("127.0.0.23", port) == b"STORED\r\n"
            assert await memcache_set("127.0.0.24", port) == b""  # the broken object is not enforced
            docs = (await get_json(d, "/v1/policy"))["documents"]  # type: ignore[index]
            by = {(x["name"], x.get("origin")): x for x in docs}
            assert by[("shop/cache", "file")]["source"].endswith("policy.yaml")
            assert by[("shop/cache", "kubernetes")]["source"] == "kubernetes"
            refused = by[("shop/broken", None)]
            assert refused["source"] == "kubernetes" and "toFQDNs" in " ".join(refused["errors"])
            assert d.metrics.policy_reloads_total.labels("failure")._value.get() == 1

            # an invalid edit of a good object: its last good version stays
            await api.put(
                "ciliumnetworkpolicies", cnp("cache", "shop", "client", toFQDNs=[{"matchName": "y"}])
            )
            await until(lambda: "shop/cache" in d.policy.cluster_errors, "edit refused")
            assert d.metrics.policy_reloads_total.labels("failure")._value.get() == 2
            assert await memcache_set("127.0.0.23", port) == b"STORED\r\n"
            # fixing the broken one puts it in force; deleting the good one removes it
            await api.put("ciliumnetworkpolicies", cnp("broken", "shop", "other"))
            await until(lambda: "shop/broken" not in d.policy.cluster_errors, "fixed")
            assert await memcache_set("127.0.0.24", port) == b"STORED\r\n"
            await api.delete("ciliumnetworkpolicies", "cache", "shop")
            await until(lambda: "shop/cache" not in d.policy.cluster_errors, "deleted")
            assert await memcache_set("127.0.0.23", port) == b""
        finally:
            await d.stop()


async def test_missing_crds_are_a_warning_and_retried(api: FakeApiServer, tmp_path: Path) -> None:
    api.missing = {"ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"}
    async with kube_daemon(api, tmp_path) as d:
        assert d.metrics.kubernetes_synced._value.get() == 1
        assert [x for x in d.policy.documents()] == []
        api.missing = set()
        await api.put("ciliumclusterwidenetworkpolicies", {
            "metadata": {"name": "cw"}, "spec": {"endpointSelector": {}, "ingress": [{}]}})  # fmt: skip
        await until(lambda: [x["name"] for x in d.policy.documents()] == ["cw"], "found once installed")


async def test_identities_and_explain_say_where_labels_came_from(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("pods", pod("web-1", "10.0.0.5", ns="prod", labels={"app": "web"}))
    n2 = {"addresses": [{"type": "InternalIP", "address": "192.168.1.2"}]}
    await api.put("nodes", {"metadata": {"name": "n2"}, "status": n2})
    extra = "identities:\n  - cidr: 172.16.0.0/16\n    labels: {static: 'yes'}\n"
    async with kube_daemon(api, tmp_path, extra) as d:
        one = await get_json(d, "/v1/identities?ip=10.0.0.5")
        assert one["origin"] == "pod prod/web-1" and one["labels"]["k8s:app"] == "web"  # type: ignore[index]
        node = await get_json(d, "/v1/identities?ip=192.168.1.2")
        assert node["origin"] == "node n2"  # type: ignore[index]
        static = await get_json(d, "/v1/identities?ip=172.16.3.4")
        assert static == {
            "ip": "172.16.3.4",
            "labels": {"static": "yes"},
            "origin": "identities entry 172.16.0.0/16",
        }
        everything = await get_json(d, "/v1/identities")
        origins = {e["cidr"]: e["origin"] for e in everything["identities"]}  # type: ignore[index]
        assert origins == {"10.0.0.5/32": "pod prod/web-1", "192.168.1.2/32": "node n2",
                           "172.16.0.0/16": "identities entry 172.16.0.0/16"}  # fmt: skip
        port = d.listeners["l"].bound_address()[1]
        answer = await get_json(d, f"/v1/explain?src=172.16.3.4&dst=10.0.0.5:{port}")
        assert answer["explanation"]["local_origin"] == "pod prod/web-1"  # type: ignore[index]
        assert answer["explanation"]["remote_origin"] == "identities entry 172.16.0.0/16"  # type: ignore[index]
        assert "[from pod prod/web-1]" in answer["text"]  # type: ignore[index]


async def test_named_ports_come_from_the_pods_container_ports(api: FakeApiServer, tmp_path: Path) -> None:
    ports = [
        {"name": "http", "containerPort": 8080},
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"containerPort": 9000},
    ]
    containers = [{"name": "c", "image": "x", "ports": ports}]
    await api.put("pods", pod("web-0", "10.0.0.5", labels={"app": "web"}, containers=containers))
    async with kube_daemon(api, tmp_path) as d:
        got = labels(d, "10.0.0.5")
        assert got["namedport:http"] == "8080"
        assert "namedport:dns" not in got


async def test_services_and_endpointslices_through_the_watch(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("services", {"metadata": {"name": "db", "namespace": "shop", "labels": {"tier": "data"}}})
    slice_ = {
        "metadata": {"name": "db-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.0.5"], "conditions": {"ready": True}},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": False}},
        ],
    }
    await api.put("endpointslices", slice_)
    async with kube_daemon(api, tmp_path) as d:
        assert labels(d, "10.0.0.5") == {"service:shop/db": "tier=data"}
        assert labels(d, "10.0.0.6") == {}  # not ready: not a backend
        assert d.kube.identity("10.0.0.5").origin == "endpointslices of shop/db"
        await api.put("services", {"metadata": {"name": "db", "namespace": "shop", "labels": {"tier": "x"}}})
        await until(lambda: labels(d, "10.0.0.5") == {"service:shop/db": "tier=x"}, "service relabel")
        await api.delete("endpointslices", "db-x1", "shop")
        await until(lambda: labels(d, "10.0.0.5") == {}, "slice deleted")


def _self_signed(tmp: Path, name: str, san: str) -> tuple[Path, Path]:
    import subprocess

    from needs import need_binary

    need_binary("openssl")
    cert, key = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", "-addext", san],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_with_ca_client_certificate_and_token(tmp_path: Path) -> None:
    """The kubeconfig's CA verifies the server, its client certificate and token authenticate."""
    import ssl

    server_cert, server_key = _self_signed(tmp_path, "apiserver", "subjectAltName=IP:127.0.0.1")
    client_cert, client_key = _self_signed(tmp_path, "proxyd", "extendedKeyUsage=clientAuth")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no connection
    ctx.load_verify_locations(client_cert)
    api = FakeApiServer()
    api.token = "s3cret"
    await api.start(ssl_context=ctx)
    try:
        await api.put("pods", pod("web-1", "10.0.0.5", labels={"app": "web"}))
        kc = api.kubeconfig(
            tmp_path / "kubeconfig", token="s3cret",
            cluster={"certificate-authority": str(server_cert)},
            user={"client-certificate": str(client_cert), "client-key": str(client_key)},
        )  # fmt: skip
        text = config_text(kc)
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(text)
        registry = Registry.load()
        d = Daemon(parse_config(text, cfg, registry), registry)
        await asyncio.wait_for(d.start(), 20)
        try:
            assert labels(d, "10.0.0.5")["k8s:app"] == "web"
        finally:
            await d.stop()
    finally:
        await api.stop()


async def test_reconnects_back_off_up_to_30_seconds(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxyd.kube.watch, "BACKOFF_START", 0.5)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    async with kube_daemon(api, tmp_path) as d:
        pods = next(r for r in d.kube.source.reflectors if r.name == "Pod")
        monkeypatch.setattr(proxyd.kube.watch, "sleep", recorded)
        api.down = True
        await api.drop_streams()
        await until(lambda: len(waits) >= 120, "many retries")  # every reflector retries
        assert pods.watching is False
        assert max(waits) <= 30.0
        assert max(waits) >= 0.8 * 30.0  # the cap is reached
        assert min(waits) >= 0.8 * 0.5
        api.down = False
        await until(lambda: d.metrics.kubernetes_synced._value.get() == 1, "back")


async def test_identities_only_and_nothing_at_all(api: FakeApiServer, tmp_path: Path) -> None:
    await api.put("pods", pod("a", "10.0.0.1", labels={"app": "a"}))
    await api.put("ciliumnetworkpolicies", cnp("c", "default", "x"))
    async with kube_daemon(api, tmp_path, "  policies: false\n") as d:
        assert labels(d, "10.0.0.1")["k8s:app"] == "a"
        assert d.policy.documents() == []
        assert not any("cilium" in p for p, _ in api.requests)  # not even asked
    async with kube_daemon(api, tmp_path, "  policies: false\n  identities: false\n") as d:
        assert labels(d, "10.0.0.1") == {}
        assert d.listeners["l"].server is not None
