"""deploy/kubernetes: every object validates against the Kubernetes OpenAPI schemas (offline, via
kubernetes-validate's bundled schemas, strict: unknown fields fail), plus the invariants the
deployment depends on; the embedded proxyd config and policy pass ``proxyd check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KDIR = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # oldest version the manifests promise to support
FILES = sorted(KDIR.glob("*.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(path: Path, kind: str) -> dict[str, Any]:
    (obj,) = [d for d in docs(path) if d["kind"] == kind]
    return obj


def test_manifests_exist() -> None:
    assert {f.name for f in FILES} >= {"node-daemonset.yaml", "sidecar-example.yaml"}


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_schema_valid(path: Path) -> None:
    for d in docs(path):
        kv.validate(d, K8S_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    ds = one(KDIR / "node-daemonset.yaml", "DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _check_proxyd_container(c: dict[str, Any], via_host: bool) -> None:
    sc = c["securityContext"]
    assert sc["runAsUser"] == 10001
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = _mounts(c)
    assert "subPath" not in mounts["/etc/proxyd/policy"], "policy must be a directory mount to update live"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        p = c[probe]
        if via_host:
            assert p["httpGet"]["path"] == path
            assert p["httpGet"]["port"] == 9901
        else:
            assert f"http://127.0.0.1:9901{path}" in " ".join(p["exec"]["command"])


def _check_init(c: dict[str, Any]) -> None:
    cmd = c["command"]
    assert cmd[:2] == ["proxyd", "iptables"]
    assert "--apply" in cmd
    assert cmd[cmd.index("--uid") + 1] == "10001"
    assert "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]


def test_daemonset_invariants() -> None:
    ds = one(KDIR / "node-daemonset.yaml", "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (init,) = spec["initContainers"]
    _check_init(init)
    assert "/run/xtables.lock" in _mounts(init)
    vols = {v["name"]: v for v in spec["volumes"]}
    lock = vols[_mounts(init)["/run/xtables.lock"]["name"]]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    (main,) = spec["containers"]
    _check_proxyd_container(main, via_host=True)
    assert spec["terminationGracePeriodSeconds"] > 10  # limits.drain_timeout
    # Policy changes over the admin socket, in the pod's own emptyDir (not a host path).
    admin = _embedded_config(KDIR / "node-daemonset.yaml", "proxyd-node-config")["admin"]
    assert admin["address"].startswith("127.0.0.1:") and "token_file" not in admin
    sock_dir = str(Path(admin["socket"]).parent)
    assert "emptyDir" in vols[_mounts(main)[sock_dir]["name"]]


def _embedded_config(path: Path, name: str) -> dict[str, Any]:
    (cm,) = [d for d in docs(path) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    config: dict[str, Any] = yaml.safe_load(cm["data"]["proxyd.yaml"])
    return config


def test_sidecar_invariants() -> None:
    dep = one(KDIR / "sidecar-example.yaml", "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork")
    (init,) = spec["initContainers"]
    _check_init(init)
    sidecar = next(c for c in spec["containers"] if c["name"] == "proxyd")
    _check_proxyd_container(sidecar, via_host=False)
    # Policy changes with a bearer token from a Secret, readable by the sidecar's group only.
    admin = _embedded_config(KDIR / "sidecar-example.yaml", "memcached-proxyd-config")["admin"]
    token_dir = str(Path(admin["token_file"]).parent)
    vols = {v["name"]: v for v in spec["volumes"]}
    secret = vols[_mounts(sidecar)[token_dir]["name"]]["secret"]
    assert secret["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001
    assert not any(d["kind"] == "Secret" for d in docs(KDIR / "sidecar-example.yaml")), "no token ships"


@pytest.mark.parametrize(
    ("path", "config", "policy"),
    [
        ("node-daemonset.yaml", "proxyd-node-config", "proxyd-node-policy"),
        ("sidecar-example.yaml", "memcached-proxyd-config", "memcached-proxyd-policy"),
    ],
)
def test_embedded_config_and_policy_pass_proxyd_check(
    tmp_path: Path, path: str, config: str, policy: str
) -> None:
    maps = {d["metadata"]["name"]: d for d in docs(KDIR / path) if d["kind"] == "ConfigMap"}
    (tmp_path / "proxyd.yaml").write_text(
        maps[config]["data"]["proxyd.yaml"]
        .replace("/var/lib/proxyd", "state")
        .replace("/etc/proxyd/admin/token", "admin-token")
        .replace("/run/proxyd/", "run/")
    )
    (tmp_path / "admin-token").write_text("a-token\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "policy").mkdir()
    for name, text in maps[policy]["data"].items():
        (tmp_path / "policy" / name).write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "proxyd", "check", "--config", str(tmp_path / "proxyd.yaml")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", ["node-daemonset.yaml", "sidecar-example.yaml"])
def test_rbac_grants_exactly_what_the_cluster_source_reads(path: str) -> None:
    """The ClusterRole names every (group, resource) proxyd lists and watches, no more."""
    from proxyd.config import KubernetesConfig
    from proxyd.kube.cluster import KubeSource

    src = KubeSource(KubernetesConfig(node_name="n"), on_change=lambda ips: None,
                     on_state=lambda synced, t: None, log_warning=lambda *a, **k: None,
                     client=object())  # fmt: skip
    read = set()
    for r in src.source.reflectors:
        info = r.resource._api_info
        read.add((info.resource.group, info.plural, r.namespace if r.namespace != "*" else None))
    granted = set()
    for rule in one(KDIR / path, "ClusterRole")["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"]  # reads only
        granted |= {(g, res, None) for g in rule["apiGroups"] for res in rule["resources"]}
    assert not any(d["kind"] in ("Role", "RoleBinding") for d in docs(KDIR / path))
    assert granted == read
    workload = next(d for d in docs(KDIR / path) if d["kind"] in ("DaemonSet", "Deployment"))
    spec = workload["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == one(KDIR / path, "ServiceAccount")["metadata"]["name"]
    proxyd = next(c for c in spec["containers"] if c["name"] == "proxyd")
    env = {e["name"]: e for e in proxyd["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    config = next(d for d in docs(KDIR / path) if d["kind"] == "ConfigMap" and "proxyd.yaml" in d["data"])
    embedded = yaml.safe_load(config["data"]["proxyd.yaml"])
    assert "kubernetes" in embedded and "identities" not in embedded  # no hand-written identities
