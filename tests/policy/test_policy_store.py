"""The store: validated swaps, revisions, imports (POST/PUT/DELETE), persistence, watching, live views."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from policy_helpers import REGISTRY

from proxyd.context import L7Decision
from proxyd.errors import PolicyError
from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy.store import STATE_FILE, PolicyStore

READ = R2d2Request("READ", "/a")
HALT = R2d2Request("HALT", "")


def doc(name: str, cmd: str, port: int = 80) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {name}}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "{port}"}}]
      rules: {{l7proto: r2d2, l7: [{{cmd: {cmd}}}]}}
"""


def view_args(port: int = 80) -> tuple[str, dict[str, str], str, dict[str, str], int, str, bool]:
    return ("ingress", {"app": "server"}, "10.0.0.5", {"app": "client"}, port, "r2d2", False)


def touch(path: Path, text: str) -> None:
    """Write and move the mtime forward so the change is seen even on coarse clocks."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    f = tmp_path / "policy.yaml"
    f.write_text(doc("files", "READ"))
    return f


def test_initial_load(policy_file: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file])
    assert store.revision == 1
    assert store.current.revision == 1
    [entry] = store.documents()
    assert entry["name"] == "files"
    assert entry["source"] == str(policy_file)
    assert entry["origin"] == "file"
    assert entry["document"]["metadata"] == {"name": "files"}
    json.dumps(store.documents())


def test_bad_policy_at_start_raises(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("apiVersion: cilium.io/v2\n")
    with pytest.raises(PolicyError):
        PolicyStore(REGISTRY, [f])


def test_bad_reload_keeps_old_policy_and_revision(policy_file: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file])
    view = store.view(*view_args())
    assert view.decide(READ).allowed
    old = store.current
    touch(policy_file, doc("files", "READ") + "    icmps: []\n")
    assert store.watch_mtimes()
    with pytest.raises(PolicyError, match=r"policy.yaml:11: spec.ingress\[0\].icmps: not supported"):
        store.reload_files()
    assert store.current is old
    assert store.revision == 1
    assert view.decide(READ).allowed
    assert not store.watch_mtimes()  # the failed attempt is not retried until the file changes again


def test_good_reload_bumps_revision_and_open_connections_follow(policy_file: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file])
    view = store.view(*view_args())
    assert view.l4().l4_allowed
    assert view.decide(READ) == L7Decision(True, "files")
    assert view.decide(HALT) == L7Decision(False, "files")
    assert not store.watch_mtimes()
    touch(policy_file, doc("files", "HALT"))
    assert store.watch_mtimes()
    assert store.reload_files() == 2
    assert not store.watch_mtimes()
    assert view.revision == 1  # nothing recomputed until the next request
    assert view.decide(READ) == L7Decision(False, "files")
    assert view.decide(HALT) == L7Decision(True, "files")
    assert view.revision == 2
    touch(policy_file, doc("files", "HALT", port=81))
    store.reload_files()
    assert not view.l4().l4_allowed
    assert view.decide(HALT).allowed is False


def test_watch_sees_files_added_to_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "policies"
    d.mkdir()
    store = PolicyStore(REGISTRY, [d])
    assert store.revision == 1
    assert store.current.documents == ()
    assert not store.watch_mtimes()
    (d / "notes.txt").write_text("ignored")
    (d / "a.yaml").write_text(doc("a", "READ"))
    assert store.watch_mtimes()
    store.reload_files()
    assert [x["name"] for x in store.documents()] == ["a"]
    touch(d / "a.yaml", doc("a", "HALT"))
    assert store.watch_mtimes()


def test_import_post_put_delete(policy_file: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file])
    view = store.view(*view_args())
    assert not view.decide(HALT).allowed
    assert store.import_documents(doc("halts", "HALT"), "api", replace_all=False) == 2
    assert view.decide(HALT) == L7Decision(True, "halts")
    # POST of the same name replaces it; other imported documents stay
    store.import_documents(doc("writes", "WRITE"), "api", replace_all=False)
    store.import_documents(doc("halts", "RESET"), "api", replace_all=False)
    assert [(x["name"], x["origin"]) for x in store.documents()] == [
        ("files", "file"),
        ("writes", "imported"),
        ("halts", "imported"),
    ]
    assert not view.decide(HALT).allowed
    # PUT replaces every imported document, never the files' ones
    assert store.import_documents(doc("halts", "HALT"), "cli", replace_all=True) == 5
    assert [x["name"] for x in store.documents()] == ["files", "halts"]
    assert store.documents()[1]["source"] == "cli"
    assert store.delete_imported("halts") == 6
    assert not view.decide(HALT).allowed
    with pytest.raises(KeyError):
        store.delete_imported("halts")
    with pytest.raises(KeyError):
        store.delete_imported("files")
    assert store.revision == 6


def test_rejected_imports_change_nothing(policy_file: Path, tmp_path: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file], state_dir=tmp_path / "state")
    store.import_documents(doc("halts", "HALT"), "api", replace_all=False)
    state = (tmp_path / "state" / STATE_FILE).read_text()
    current = store.current
    with pytest.raises(
        PolicyError, match=r"api:10: spec.ingress\[0\].toPorts\[0\].rules.l7\[0\].cmd: must be one of"
    ):
        store.import_documents(doc("bad", "FLY"), "api", replace_all=True)
    with pytest.raises(PolicyError, match="duplicate policy name 'files'"):
        store.import_documents(doc("files", "HALT"), "api", replace_all=False)
    with pytest.raises(PolicyError, match="duplicate policy name 'x'"):
        store.import_documents(doc("x", "HALT") + "---\n" + doc("x", "READ"), "api", replace_all=False)
    assert store.current is current
    assert store.revision == 2
    assert (tmp_path / "state" / STATE_FILE).read_text() == state


def test_file_reusing_an_imported_name_is_rejected(policy_file: Path) -> None:
    store = PolicyStore(REGISTRY, [policy_file])
    store.import_documents(doc("halts", "HALT"), "api", replace_all=False)
    touch(policy_file, doc("halts", "READ"))
    with pytest.raises(PolicyError, match="duplicate policy name 'halts'"):
        store.reload_files()
    assert store.revision == 2


def test_state_dir_round_trip(policy_file: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = PolicyStore(REGISTRY, [policy_file], state_dir=state)
    assert not (state / STATE_FILE).exists()
    store.import_documents(doc("halts", "HALT"), "admin", replace_all=False)
    store.import_documents(
        '[{"endpointSelector": {}, "labels": [{"key": "name", "value": "bare"}]}]',
        "x.json",
        replace_all=False,
    )
    assert [p.name for p in state.iterdir()] == [STATE_FILE]  # no temporary files left
    again = PolicyStore(REGISTRY, [policy_file], state_dir=state)
    assert [(x["name"], x["source"], x["origin"]) for x in again.documents()] == [
        ("files", str(policy_file), "file"),
        ("halts", "admin", "imported"),
        ("bare", "x.json", "imported"),
    ]
    assert again.documents()[1]["document"] == store.documents()[1]["document"]
    view = again.view(*view_args())
    assert view.decide(HALT) == L7Decision(True, "halts")
    again.delete_imported("halts")
    third = PolicyStore(REGISTRY, [policy_file], state_dir=state)
    assert [x["name"] for x in third.documents()] == ["files", "bare"]


def test_corrupt_state_file_is_a_policy_error(policy_file: Path, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(PolicyError, match="cannot read imported policy"):
        PolicyStore(REGISTRY, [policy_file], state_dir=tmp_path)
    (tmp_path / STATE_FILE).write_text(
        json.dumps(
            {
                "version": 1,
                "documents": [
                    {
                        "source": "api",
                        "document": {
                            "apiVersion": "cilium.io/v2",
                            "kind": "CiliumNetworkPolicy",
                            "metadata": {"name": "z"},
                            "spec": {"endpointSelector": {}, "x": 1},
                        },
                    }
                ],
            }
        )
    )
    with pytest.raises(PolicyError, match=r"imported document 0: api:\d+: spec.x: unknown field"):
        PolicyStore(REGISTRY, [policy_file], state_dir=tmp_path)


def test_no_paths_no_policy_allows_all() -> None:
    store = PolicyStore(REGISTRY, [])
    cp = store.view(*view_args()).l4()
    assert cp.l4_allowed
    assert cp.decide(HALT).allowed
    assert store.warnings() == []


def test_namespaced_imports_are_keyed_by_namespace_and_name_and_persist(tmp_path: Path) -> None:
    ns_doc = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: isolate, namespace: {ns}}}\n"
        "spec:\n  endpointSelector: {{}}\n  ingress:\n  - fromEndpoints: [{{}}]\n"
    )
    store = PolicyStore(REGISTRY, [], state_dir=tmp_path)
    both = ns_doc.format(ns="ns1") + "---\n" + ns_doc.format(ns="ns2")
    store.import_documents(both, "api", replace_all=False)
    assert [d["name"] for d in store.documents()] == ["ns1/isolate", "ns2/isolate"]
    again = PolicyStore(REGISTRY, [], state_dir=tmp_path)  # reloaded from the state file
    assert [d["name"] for d in again.documents()] == ["ns1/isolate", "ns2/isolate"]
    again.delete_imported("ns1/isolate")
    assert [d["name"] for d in again.documents()] == ["ns2/isolate"]
    with pytest.raises(KeyError):
        again.delete_imported("isolate")
