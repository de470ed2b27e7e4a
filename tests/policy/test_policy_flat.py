"""The flattened-policy interface (proxyd.policy.flat): what the compiled parsers read of a policy.

The builder turns a connection's ConnectionPolicy into plain data; :func:`flat.evaluate` is the
reference of what the C evaluator does with it, so it is held equal here to
``ConnectionPolicy.decide`` on random memcache rules and requests, and to ``matches`` for the
redis and http rules' flat forms (the equivalence tests then
hold the C evaluator equal to the Python parser). The connection's view builds the flat form once
per revision and shares the store's revision cell, which is how a twin checks for a reload
without a Python call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.context import ALLOWED, L7Decision
from proxyd.parser import ALLOW_ALL
from proxyd.parsers.memcache.rules import FIELD_COMMAND, FIELD_KEY, MemcacheRequest, compile_rule
from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy import flat
from proxyd.policy.engine import ConnectionPolicy
from proxyd.policy.regex import ANCHOR_BOTH, UNANCHORED, compile_rule_regex
from proxyd.policy.store import PolicyStore
from proxyd.registry import Registry

ALLOW = L7Decision(True, "p")
DENY = L7Decision(False, "p")
AUDIT = L7Decision(False, "p", audit=True)


class Opaque:
    """A matcher with no flat form: the interface hands it over as a call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def matches(self, request: Any) -> bool:
        return bool(self.inner.matches(request))


def test_a_memcache_rule_flattens_to_its_conditions() -> None:
    rule = compile_rule({"command": "get", "keyPrefix": "a/", "keyRegex": "^a/[0-9]$"})
    cmd, prefix, rx = rule.flat()  # type: ignore[attr-defined]
    assert cmd == (FIELD_COMMAND, flat.IN, frozenset({"get", "gets"}))
    assert prefix == (FIELD_KEY, flat.PREFIX, b"a/")
    field, form, operand = rx
    assert (field, form) == (FIELD_KEY, flat.REGEX)
    assert isinstance(operand, flat.Regex) and operand.anchor is UNANCHORED
    # the RE2 form answers as the reference callable does
    for key in (b"a/1", b"a/12", b"xa/1", b"a/\xff"):
        assert (operand.match(operand.anchor, key, 0, len(key))[0][0] != -1) == operand.test(key)
    storage = frozenset({"set", "add", "replace", "append", "prepend", "cas", "incr", "decr"})
    assert compile_rule({"command": "storage", "keyExact": "k"}).flat() == (  # type: ignore[attr-defined]
        (FIELD_COMMAND, flat.IN, storage),
        (FIELD_KEY, flat.EXACT, b"k"),
    )
    assert compile_rule({"command": "stats"}).flat() == (  # type: ignore[attr-defined]
        (FIELD_COMMAND, flat.IN, frozenset({"stats"})),
    )


def test_regex_operands_name_their_anchor() -> None:
    rx = compile_rule_regex("^ab", "keyRegex")
    assert flat.search(rx) == flat.Regex(rx.search, rx.re2_match, UNANCHORED)
    full = flat.fullmatch(rx)
    assert full.anchor is ANCHOR_BOTH and full.test == rx.fullmatch
    assert full.match(full.anchor, b"ab", 0, 2)[0][0] == 0
    assert full.match(full.anchor, b"abc", 0, 3)[0][0] == -1


def test_build_keeps_policy_order_and_precomputes_forwarding() -> None:
    rule = compile_rule({"command": "get"})
    opaque = Opaque(rule)
    cp = ConnectionPolicy(True, "", always=None, matchers=((ALLOW_ALL, ALLOW), (rule, AUDIT), (opaque, DENY)),
                          denied=DENY)  # fmt: skip
    cell: list[object] = [object()]
    fp = flat.build(cp, cell[0], cell)
    assert fp.stamp is cell[0] and fp.current is cell
    assert fp.always is None
    assert [r.conditions for r in fp.rules] == [(), rule.flat(), ((None, flat.CALL, opaque.matches),)]  # type: ignore[attr-defined]
    assert [r.then for r in fp.rules] == [
        flat.FlatDecision(ALLOW, True),
        flat.FlatDecision(AUDIT, True),  # audit: denied, but forwarded
        flat.FlatDecision(DENY, False),
    ]
    assert fp.otherwise == flat.FlatDecision(DENY, False)
    # allow-all and deny-all connections: one answer, no rules
    assert flat.build(ConnectionPolicy(True, ""), None, cell).always == flat.FlatDecision(ALLOWED, True)
    deny_all = flat.build(ConnectionPolicy(True, "", always=DENY), None, cell)
    assert deny_all.always == flat.FlatDecision(DENY, False) and deny_all.rules == ()


def test_the_reference_evaluator_refuses_an_unknown_form() -> None:
    fp = flat.FlatPolicy(None, [None], None, (flat.FlatRule(((FIELD_KEY, "glob", b"*"),),
                         flat.FlatDecision(ALLOW, True)),), flat.FlatDecision(DENY, False))  # fmt: skip
    with pytest.raises(ValueError, match="unknown condition form 'glob'"):
        flat.evaluate(fp, MemcacheRequest("get", (b"k",)), MemcacheRequest("get", (b"k",)).values)


RULES: list[Mapping[str, str]] = [
    {"command": "get", "keyPrefix": "a/"},
    {"command": "get", "keyRegex": "^a/[0-9]$"},
    {"command": "writeGroup", "keyRegex": "(?s)^.{2}[0-9]"},
    {"command": "storage", "keyExact": "a/1"},
    {"command": "meta", "keyRegex": "\u00e9|\ufffd"},
    {"command": "meta", "keyPrefix": "a/", "keyExact": "a/1"},
    {"command": "mg"},
    {"command": "stats"},
    {"command": "gat", "keyPrefix": "b/", "keyRegex": "1$"},
    {},
]
KEYS = [b"a/1", b"a/12", b"b/1", b"x1", b"\xc3\xa9", b"\xff", b"a/\xff", b"", b"zz9"]
COMMANDS = ["get", "gets", "set", "delete", "touch", "mg", "ms", "mn", "stats", "gat", "incr"]
DECISIONS = [ALLOW, DENY, AUDIT, L7Decision(True, "q", audit=True)]
KEY_LISTS = st.lists(st.sampled_from(KEYS), max_size=3).map(tuple)
REQUESTS = st.builds(MemcacheRequest, st.sampled_from(COMMANDS), KEY_LISTS, st.booleans())


@settings(max_examples=int(os.environ.get("PROXYD_EQUIV_EXAMPLES", "150")), deadline=None)
@given(
    rules=st.lists(st.tuples(st.sampled_from(RULES), st.sampled_from(DECISIONS), st.booleans()), max_size=5),
    always=st.sampled_from([None, None, None, ALLOWED, DENY]),
    denied=st.sampled_from(DECISIONS),
    requests=st.lists(REQUESTS, min_size=1, max_size=6),
)
def test_evaluate_decides_as_the_connection_policy(
    rules: list[tuple[Mapping[str, str], L7Decision, bool]], always: L7Decision | None, denied: L7Decision,
    requests: list[MemcacheRequest],
) -> None:  # fmt: skip
    matchers = []
    for rule, decision, opaque in rules:
        m = compile_rule(rule)
        matchers.append((Opaque(m) if opaque else m, decision))
    cp = ConnectionPolicy(True, "", always=always, matchers=tuple(matchers), denied=denied)
    fp = flat.build(cp, None, [None])
    for req in requests:
        got = flat.evaluate(fp, req, req.values)
        want = cp.decide(req)
        assert got.decision is want
        assert got.forwards == (want.allowed or want.audit)


def memcache_doc(rule: str) -> str:
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: mc}}
spec:
  endpointSelector: {{matchLabels: {{app: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "11211"}}]
      rules: {{l7proto: memcache, l7: [{rule}]}}
"""


def reload(store: PolicyStore, path: Path, text: str) -> None:
    path.write_text(text)
    store.reload_files()


def test_a_connection_builds_its_flat_form_once_per_revision(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(memcache_doc('{command: get, keyPrefix: "a/"}'))
    store = PolicyStore(Registry.load(), [path])
    view = store.view("ingress", {"app": "server"}, "10.0.0.5", {"app": "client"}, 11211, "memcache")
    fp = view.flat()
    assert view.flat() is fp  # not rebuilt per request
    assert fp.current is store.revision_cell and fp.current[0] is fp.stamp is store.current
    [rule] = fp.rules
    assert rule.conditions[1] == (FIELD_KEY, flat.PREFIX, b"a/")
    assert rule.then == flat.FlatDecision(L7Decision(True, "mc"), True)
    get_b = MemcacheRequest("get", (b"b/1",))
    assert flat.evaluate(fp, get_b, get_b.values).decision == view.decide(get_b) == L7Decision(False, "mc")

    reload(store, path, memcache_doc('{command: get, keyPrefix: "b/"}'))
    # the cell moved under the old copy: that is what a twin checks, without a call
    assert fp.current[0] is not fp.stamp
    new = view.flat()
    assert new is not fp and new.stamp is store.current and view.flat() is new
    assert flat.evaluate(new, get_b, get_b.values).decision == view.decide(get_b) == L7Decision(True, "mc")
    # another connection of the store shares the cell
    other = store.view("ingress", {"app": "server"}, "10.0.0.6", {"app": "client"}, 11211, "memcache")
    assert other.flat().current is new.current


def test_a_connection_denied_at_l4_by_a_reload_flattens_to_deny_all(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(memcache_doc("{command: get}"))
    store = PolicyStore(Registry.load(), [path])
    view = store.view("ingress", {"app": "server"}, "10.0.0.5", {"app": "client"}, 11211, "memcache")
    assert view.flat().always is None
    reload(store, path, memcache_doc("{command: get}").replace('"11211"', '"11212"'))
    fp = view.flat()
    assert fp.always is not None and not fp.always.forwards
    assert fp.always.decision == view.decide(MemcacheRequest("get", (b"k",)))


def test_rules_without_a_flat_form_are_handed_over_as_calls(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(memcache_doc("{}").replace("memcache", "r2d2").replace("[{}]", "[{cmd: READ}]"))
    store = PolicyStore(Registry.load(), [path])
    view = store.view("ingress", {"app": "server"}, "10.0.0.5", {"app": "client"}, 11211, "r2d2")
    [rule] = view.flat().rules
    [(field, form, call)] = rule.conditions
    assert (field, form) == (None, flat.CALL)
    assert call(R2d2Request("READ", "/a")) and not call(R2d2Request("HALT", ""))
    fp = view.flat()
    for req in (R2d2Request("READ", "/a"), R2d2Request("HALT", "")):
        assert flat.evaluate(fp, req, lambda field: ()).decision == view.decide(req)


# --- the redis and http rules' flat forms ---------------------------------------------------

REDIS_RULES: list[dict[str, str]] = [
    {"command": "get"},
    {"command": "config|get"},
    {"command": "@read"},
    {"command": "@all", "keyPrefix": "a"},
    {"command": "@string", "keyRegex": "^a[0-9]+$"},
    {"keyExact": "b"},
    {"command": "set", "keyPrefix": "a"},
]


def _redis_requests() -> list[Any]:
    """The questions the parser asks (its table lookup), each keyless and with a few keys."""
    from proxyd.parsers.redis.rules import RedisRequest
    from proxyd.parsers.redis.table import lookup

    out = []
    commands = [(b"GET", None), (b"set", None), (b"CONFIG", b"get"), (b"config", b"set"),
                (b"config", b"nosuch"), (b"ping", None), (b"hget", None), (b"nosuch", None),
                (b"config|get", None)]  # fmt: skip
    for word, sub in commands:
        name, cmd = lookup(word, sub)
        cats = cmd.categories if cmd is not None else frozenset()
        for key in (None, b"a1", b"ab", b"b", b"\xff"):
            out.append(RedisRequest(name, name.partition("|")[0], cats, cmd is not None, key))
    return out


@pytest.mark.parametrize("rule", REDIS_RULES)
def test_redis_rule_flat_decides_as_matches(rule: dict[str, str]) -> None:
    from proxyd.parsers.redis.rules import compile_rule as redis_rule

    m = redis_rule(rule)
    cp = ConnectionPolicy(True, "", always=None, matchers=((m, ALLOW),), denied=DENY)
    fp = flat.build(cp, None, [None])
    assert fp.rules[0].conditions and all(c[1] != flat.CALL for c in fp.rules[0].conditions)
    for req in _redis_requests():
        assert flat.evaluate(fp, req, req.values).decision is (ALLOW if m.matches(req) else DENY), (rule, req)


HTTP_RULES: list[dict[str, Any]] = [
    {"method": "GET"},
    {"path": "/a/.*", "host": "h(:80)?"},
    {"method": "GET|POST", "headers": ["X-A", "X-B: 1"]},
    {"headerMatches": [{"name": "X-C", "value": "on", "mismatch": "ADD"}]},
]


@pytest.mark.parametrize("rule", HTTP_RULES)
def test_http_rule_flat_decides_as_matches(rule: dict[str, Any]) -> None:
    from proxyd.parsers.http.rules import HttpRequest
    from proxyd.parsers.http.rules import compile_rule as http_rule

    m = http_rule(rule)
    cp = ConnectionPolicy(True, "", always=None, matchers=((m, ALLOW),), denied=DENY)
    fp = flat.build(cp, None, [None])
    for method in ("GET", "PUT"):
        for path in ("/a/b", "/c"):
            for host in ("h", "h:80", ""):
                for headers in ((), (("x-a", "z"),), (("x-a", ""), ("x-b", "1")), (("x-c", "on"),)):
                    req = HttpRequest(method, path, host, "HTTP/1.1", headers)
                    if rule.get("headerMatches"):
                        with pytest.raises(flat.Deferred):
                            flat.evaluate(fp, req, req.values)
                        continue
                    want = ALLOW if m.matches(req) else DENY
                    assert flat.evaluate(fp, req, req.values).decision is want, (rule, req)
