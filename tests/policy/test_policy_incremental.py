"""Incremental policy changes: only the files named (or changed) are read, only new documents
are compiled, the result is the policy a full build gives, and an endpoint left without its
rules is warned about by file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from policy_helpers import REGISTRY

from proxyd.errors import PolicyError
from proxyd.policy.engine import PolicySet
from proxyd.policy.identity import IdentityMap
from proxyd.policy.store import PolicyStore


def doc(name: str, app: str, cmd: str = "READ", port: int = 80) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{role: client}}}}]
    toPorts:
    - ports: [{{port: "{port}"}}]
      rules: {{l7proto: r2d2, l7: [{{cmd: {cmd}}}]}}
"""


def policy_dir(tmp_path: Path, n: int) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    for i in range(n):
        (d / f"p{i:02d}.yaml").write_text(doc(f"p{i}", f"app{i % 5}"))
    return d


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def verdicts(ps: PolicySet) -> list[tuple[bool, str]]:
    out = []
    for app in ("app0", "app1", "app4", "none"):
        for role in ("client", "other"):
            cp = ps.connection_policy("ingress", {"app": app}, "10.0.0.1", {"role": role}, 80, "r2d2")
            out.append((cp.l4_allowed, cp.l4_reason))
    return out


def test_one_named_file_is_read_and_its_document_alone_compiled(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 30)
    store = PolicyStore(REGISTRY, [d])
    assert store.current.compiled == 30
    replace_file(d / "p07.yaml", doc("p7", "app2", "HALT"))
    (d / "p08.yaml").write_text(doc("p8", "app3", "HALT"))  # written, but no event named it yet
    change = store.build_reload({str(d / "p07.yaml")})
    assert change.read == (str(d / "p07.yaml"),) and change.compiled == 1
    store.commit(change)
    names = {x["name"]: x["document"] for x in store.documents()}
    assert "HALT" in str(names["p7"]) and "HALT" not in str(names["p8"])
    # The result is what a build from scratch gives.
    assert verdicts(store.current) == verdicts(PolicySet(store.current.documents, REGISTRY))


def test_sighup_reads_the_files_whose_identity_changed(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 10)
    store = PolicyStore(REGISTRY, [d])
    replace_file(d / "p03.yaml", doc("p3", "app3", "HALT"))
    change = store.build_reload()
    assert change.read == (str(d / "p03.yaml"),) and change.compiled == 1
    store.commit(change)
    again = store.build_reload()
    assert again.read == () and again.compiled == 0 and again.policy is store.current


def test_a_named_removed_file_is_dropped_and_a_new_one_added(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 5)
    store = PolicyStore(REGISTRY, [d])
    (d / "p01.yaml").unlink()
    replace_file(d / "new.yaml", doc("new", "app9"))
    store.commit(store.build_reload({str(d / "p01.yaml"), str(d / "new.yaml")}))
    assert sorted(x["name"] for x in store.documents()) == ["new", "p0", "p2", "p3", "p4"]
    assert store.current.compiled == 1


def test_a_bad_named_file_keeps_the_old_policy(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 3)
    store = PolicyStore(REGISTRY, [d])
    rev = store.revision
    replace_file(d / "p00.yaml", "kind: [\n")
    with pytest.raises(PolicyError, match=r"p00\.yaml"):
        store.build_reload({str(d / "p00.yaml")})
    assert store.revision == rev and len(store.documents()) == 3


def test_an_import_compiles_the_posted_documents_only(tmp_path: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_dir(tmp_path, 20)])
    change = store.build_import(doc("imp", "app1", "HALT"), "admin-api", replace_all=False)
    assert change.compiled == 1
    store.commit(change)
    assert store.build_import(doc("imp2", "app2"), "admin-api", replace_all=False).compiled == 1


def test_selector_index_finds_what_a_scan_finds(tmp_path: Path) -> None:
    text = "---\n".join(
        [
            doc("a", "web"),
            doc("b", "db").replace(
                "matchLabels: {app: db}", "matchExpressions: [{key: app, operator: Exists}]"
            ),
            doc("c", "x").replace("matchLabels: {app: x}", "matchLabels: {'k8s:app': web, tier: front}"),
            doc("d", "y").replace("endpointSelector: {matchLabels: {app: y}}", "endpointSelector: {}"),
        ]
    )
    (tmp_path / "p.yaml").write_text(text)
    ps = PolicyStore(REGISTRY, [tmp_path / "p.yaml"]).current
    for labels, names in [
        ({"app": "web"}, ["a", "b", "d"]),
        ({"app": "web", "tier": "front"}, ["a", "b", "c", "d"]),
        ({"k8s:app": "web", "tier": "front"}, ["a", "b", "c", "d"]),
        ({"tier": "front"}, ["d"]),
    ]:
        assert [e[0].name for e in ps.selecting("ingress", labels)] == names, labels


def test_an_endpoint_left_without_rules_is_warned_about_by_file(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 5)
    store = PolicyStore(REGISTRY, [d])
    store.endpoint_labels = IdentityMap.from_entries(
        [("10.0.0.1/32", {"app": "app2"}), ("10.0.0.2/32", {"app": "app3"})]
    ).label_sets()
    replace_file(d / "p02.yaml", "# emptied\n")
    change = store.build_reload({str(d / "p02.yaml")})
    assert len(change.warnings) == 1
    assert change.warnings[0].startswith(
        f"{d / 'p02.yaml'}: the file changed; endpoints with labels {{app=app2}}"
    )
    # A change that leaves every endpoint selected warns about nothing.
    replace_file(d / "p03.yaml", doc("p3", "app3", "HALT"))
    assert store.build_reload({str(d / "p03.yaml")}).warnings == ()


def test_identities_exact_and_prefixes_share_label_sets() -> None:
    entries = [(f"10.1.{i >> 8}.{i & 255}/32", {"app": f"a{i % 3}", "t": "x"}) for i in range(3000)]
    ids = IdentityMap.from_entries(
        [*entries, ("10.1.0.0/16", {"app": "net"}), ("fd00::1/128", {"app": "v6"})]
    )
    assert dict(ids.labels_for("10.1.0.7")) == {"app": "a1", "t": "x"}
    assert dict(ids.labels_for("10.1.200.1")) == {"app": "net"}
    assert dict(ids.labels_for("fd00::1")) == {"app": "v6"}
    assert str(ids.prefix_for("10.1.0.7")) == "10.1.0.7/32"
    assert len(ids.label_sets()) == 5
    assert ids.labels_for("10.1.0.1") is ids.labels_for("10.1.0.4")
    ids.dismantle()
    assert len(ids) == 0 and dict(ids.labels_for("10.1.0.7")) == {}


def test_a_named_file_may_not_take_another_file_s_or_an_import_s_name(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, 5)
    store = PolicyStore(REGISTRY, [d])
    store.import_documents(doc("imp", "app1"), "admin-api", replace_all=False)
    replace_file(d / "p01.yaml", doc("p3", "app1"))
    with pytest.raises(PolicyError, match="duplicate policy name 'p3'"):
        store.build_reload({str(d / "p01.yaml")})
    replace_file(d / "p01.yaml", doc("imp", "app1"))
    with pytest.raises(PolicyError, match="duplicate policy name 'imp'"):
        store.build_reload({str(d / "p01.yaml")})
    # Renamed in one file and taken by another in the same change: fine.
    replace_file(d / "p01.yaml", doc("p1-renamed", "app1"))
    replace_file(d / "p02.yaml", doc("p1", "app2"))
    store.commit(store.build_reload({str(d / "p01.yaml"), str(d / "p02.yaml")}))
    assert sorted(x["name"] for x in store.documents()) == ["imp", "p0", "p1", "p1-renamed", "p3", "p4"]
