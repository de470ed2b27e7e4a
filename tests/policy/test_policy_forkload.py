"""Policy files parsed partly in a forked child at start (proxyd/policy/forkload.py) give what a
one-process load gives: the same documents, matchers compiled by the daemon's own parsers, the
same problems in the same order, and a child that fails costs time only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxyd.errors import PolicyError
from proxyd.parser import ALLOW_ALL
from proxyd.policy import forkload
from proxyd.policy.model import Document, L7Rules
from proxyd.policy.store import PolicyStore
from proxyd.registry import Registry

REGISTRY = Registry.load()

RULES = [
    "rules: {l7proto: r2d2, l7: [{cmd: READ}, {cmd: WRITE, file: /tmp/a}]}",
    "rules: {l7proto: memcache}",  # visibility only: the built-in allow-all matcher
    'rules: {http: [{method: GET, path: "/v1/.*"}, {method: POST, headers: ["X-Rank: officer"]}]}',
    "rules: {l7proto: memcache, l7: [{command: get, keyPrefix: a/}]}",
    "rules: {l7proto: nosuchparser}",  # no matchers at all (a warning)
]


def doc(i: int) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p{i}}}
spec:
  endpointSelector: {{matchLabels: {{app: app{i % 7}}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{role: r{i % 3}}}}}]
    toPorts:
    - ports: [{{port: "{80 + i % 5}"}}]
      {RULES[i % len(RULES)]}
"""


BAD = "kind: CiliumNetworkPolicy\nmetadata: {name: bad}\nspec:\n  endpointSelector: 3\n"


def policy_dir(tmp_path: Path, n: int, bad: tuple[int, ...] = ()) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    for i in range(n):
        (d / f"p{i:04d}.yaml").write_text(BAD.replace("bad", f"bad{i}") if i in bad else doc(i))
    return d


def l7(docs: tuple[Document, ...]) -> list[L7Rules]:
    return [
        pr.l7 for d in docs for s in d.specs for r in s.rules for pr in r.to_ports if pr.l7 is not None
    ]


def test_split_load_gives_the_documents_and_matchers_of_a_one_process_load(tmp_path: Path) -> None:
    d = policy_dir(tmp_path, forkload.MIN_FILES + 44)
    split = PolicyStore(REGISTRY, [d], split=True).current.documents
    alone = PolicyStore(REGISTRY, [d]).current.documents
    assert split == alone
    assert [(x.raw, x.where, x.source, x.warnings) for x in split] == [
        (x.raw, x.where, x.source, x.warnings) for x in alone
    ]
    rules_split, rules_alone = l7(split), l7(alone)
    assert len(rules_split) == len(rules_alone) == len(split)
    for a, b in zip(rules_split, rules_alone, strict=True):
        assert (a.matchers is None) == (b.matchers is None)
        if a.matchers is not None and b.matchers is not None:
            assert [type(m) for m in a.matchers] == [type(m) for m in b.matchers]
    # Matchers are the daemon's own: the built-in allow-all is the very object parsers compare to.
    assert any(m is ALLOW_ALL for r in rules_split for m in r.matchers or ())


@pytest.mark.parametrize("bad", [(3,), (forkload.MIN_FILES + 40,), (1, forkload.MIN_FILES + 2)])
def test_split_load_reports_the_problems_of_a_one_process_load(tmp_path: Path, bad: tuple[int, ...]) -> None:
    d = policy_dir(tmp_path, forkload.MIN_FILES + 44, bad)
    with pytest.raises(PolicyError) as alone:
        PolicyStore(REGISTRY, [d, tmp_path / "missing"])
    with pytest.raises(PolicyError) as split:
        PolicyStore(REGISTRY, [d, tmp_path / "missing"], split=True)
    assert split.value.problems == alone.value.problems
    named = [p.split(":")[0] for p in split.value.problems]
    assert set(named) == {*(str(d / f"p{i:04d}.yaml") for i in bad), str(tmp_path / "missing")}
    assert named[-1] == str(tmp_path / "missing")  # after the files of the path listed before it


def test_a_child_that_fails_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = policy_dir(tmp_path, forkload.MIN_FILES + 4)

    def broken(self: Any, obj: Any) -> None:
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(forkload._NoMatchers, "dump", broken)  # in the child, after the fork
    split = PolicyStore(REGISTRY, [d], split=True).current.documents
    assert split == PolicyStore(REGISTRY, [d]).current.documents
