"""Cilium's own shapes load as Cilium reads them (visibility, ``rules.http``, policy import JSON).

Each test uses the exact shape Cilium's docs and ``cilium policy import`` use; the fixture files
under ``fixtures/`` are such documents, written for these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policy_helpers import HTTP_REGISTRY, REGISTRY

from proxyd.errors import PolicyError
from proxyd.parsers.r2d2 import R2d2Request
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import ParserLookup, load_paths, parse_text, warnings
from proxyd.policy.model import Document, PortRule

FIXTURES = Path(__file__).parent / "fixtures"
TOP = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
TOP += "spec:\n  endpointSelector: {}\n"
PORTS = "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n"  # rules keys from line 10
READ = R2d2Request("READ", "/secret")


def problems_of(text: str, registry: ParserLookup = REGISTRY, source: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_text(text, source, registry)
    return info.value.problems


def port_rules(doc: Document) -> list[PortRule]:
    return [pr for spec in doc.specs for rule in spec.rules for pr in rule.to_ports]


def decide(
    docs: list[Document], registry: ParserLookup, remote: dict[str, str], l7proto: str, req: object
) -> bool:
    ps = PolicySet(docs, registry)
    cp = ps.connection_policy("ingress", {"app": "r2d2"}, "10.0.0.2", remote, 80, l7proto)
    return cp.l4_allowed and cp.decide(req).allowed


# --- item 1: visibility and `rules: {}` ---------------------------------------------------------


def test_visibility_l7proto_without_l7_and_with_empty_l7_allow_every_request() -> None:
    [doc] = load_paths([FIXTURES / "visibility-l7proto.yaml"], REGISTRY)
    no_l7, empty_l7, l4_only = port_rules(doc)
    for pr in (no_l7, empty_l7):
        assert pr.l7 is not None and pr.l7.l7proto == "r2d2"
        assert pr.l7.rules == ({},)  # held as `l7: [{}]`, which every parser compiles to "allow all"
        assert pr.l7.matchers is not None and len(pr.l7.matchers) == 1
    assert l4_only.l7 is None  # `rules: {}` is an L4-only rule
    for role in ("reader", "admin", "ops"):
        assert decide([doc], REGISTRY, {"role": role}, "r2d2", READ)
    # Visibility still means "parse with r2d2": on a memcache listener every request is denied.
    ps = PolicySet([doc], REGISTRY)
    cp = ps.connection_policy("ingress", {"app": "r2d2"}, "10.0.0.2", {"role": "reader"}, 80, "memcache")
    assert cp.l4_allowed and not cp.decide({"command": "get"}).allowed
    assert warnings([doc]) == []
    assert doc.description == "Log every r2d2 request to the droid, allow them all"


def test_visibility_with_unknown_l7proto_is_deny_all_with_a_warning() -> None:
    [doc] = parse_text(TOP + PORTS + "        l7proto: gopher\n", "p.yaml", REGISTRY)
    assert warnings([doc]) == [
        "p.yaml:10: spec.ingress[0].toPorts[0].rules.l7proto: unknown l7proto 'gopher' "
        "(no parser of that name): port 80/ANY denies every request"
    ]
    ps = PolicySet([doc], REGISTRY)
    cp = ps.connection_policy("ingress", {}, "10.0.0.2", {}, 80, "gopher")
    assert cp.l4_allowed and not cp.decide(object()).allowed


@pytest.mark.parametrize("rules", ["rules: {}", "rules:", "rules: null", "rules: {http: null}"])
def test_empty_rules_is_l4_only(rules: str) -> None:
    text = TOP + "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      " + rules + "\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    [pr] = port_rules(doc)
    assert pr.l7 is None


def test_empty_rules_in_a_deny_rule_is_accepted_l7_rules_are_not() -> None:
    deny = TOP + "  ingressDeny:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules: {}\n"
    [doc] = parse_text(deny, "p.yaml", REGISTRY)
    assert port_rules(doc)[0].l7 is None
    bad = deny.replace("rules: {}", "rules: {l7proto: r2d2}")
    assert any("not allowed in deny rules" in p for p in problems_of(bad))


# --- rules.http plumbing --------------------------------------------------------------------------


def test_rules_http_is_the_http_parsers_rule_list_with_lists_and_mappings() -> None:
    [doc] = load_paths([FIXTURES / "http-rules.yaml"], HTTP_REGISTRY)
    landing, alliance = port_rules(doc)
    assert landing.l7 is not None and landing.l7.l7proto == "http" and landing.l7.key == "http"
    assert landing.l7.rules[1] == {
        "method": "GET",
        "path": "/v1/.*",
        "headers": ["X-Empire", "X-Rank: officer"],
        "headerMatches": [{"name": "X-Token", "value": "sith"}],
    }
    empire = {"org": "empire"}
    post = {"method": "POST", "path": "/v1/request-landing"}
    get = {
        "method": "GET",
        "path": "/v1/x",
        "headers": {"X-Empire": "", "X-Rank": "officer", "X-Token": "sith"},
    }
    ps = PolicySet([doc], HTTP_REGISTRY)
    local = {"org": "empire", "class": "deathstar"}
    cp = ps.connection_policy("ingress", local, "10.0.0.2", empire, 80, "http")
    assert cp.decide(post).allowed and cp.decide(get).allowed
    assert not cp.decide({"method": "PUT", "path": "/v1/exhaust-port"}).allowed
    assert not cp.decide({**get, "headers": {"X-Empire": "", "X-Rank": "officer"}}).allowed
    # `http: []`: visibility, every request allowed.
    assert alliance.l7 is not None and alliance.l7.matchers is not None
    cp = ps.connection_policy("ingress", local, "10.0.0.2", {"org": "alliance"}, 80, "http")
    assert cp.decide({"method": "PUT", "path": "/v1/exhaust-port"}).allowed
    assert doc.description == "L7 policy to restrict access to specific HTTP call"


def test_rules_http_compiler_errors_are_reported_at_the_entry() -> None:
    text = TOP + PORTS + "        http:\n        - method: GET\n          path: '(a)\\1'\n"
    [problem] = problems_of(text, HTTP_REGISTRY)
    assert problem.startswith(
        "p.yaml:12: spec.ingress[0].toPorts[0].rules.http[0].path: bad regular expression"
    )
    text = TOP + PORTS + "        http:\n        - headers: {X-A: b}\n"
    [problem] = problems_of(text, HTTP_REGISTRY)
    assert problem == "p.yaml:11: spec.ingress[0].toPorts[0].rules.http[0].headers: must be a list of strings"
    [problem] = problems_of(TOP + PORTS + "        http: [GET]\n", HTTP_REGISTRY)
    assert problem.startswith("p.yaml:10: spec.ingress[0].toPorts[0].rules.http[0]: must be a mapping")


def test_rules_http_without_an_http_parser_is_deny_all_with_a_warning() -> None:
    [doc] = load_paths([FIXTURES / "http-rules.yaml"], REGISTRY)
    assert warnings([doc]) == [
        f"{FIXTURES / 'http-rules.yaml'}:22: spec.ingress[0].toPorts[0].rules.http: no http parser is "
        "registered: port 80/TCP denies every request",
        f"{FIXTURES / 'http-rules.yaml'}:39: spec.ingress[1].toPorts[0].rules.http: no http parser is "
        "registered: port 80/TCP denies every request",
    ]
    ps = PolicySet([doc], REGISTRY)
    cp = ps.connection_policy(
        "ingress", {"org": "empire", "class": "deathstar"}, "10.0.0.2", {"org": "alliance"}, 80, "http"
    )
    assert cp.l4_allowed and not cp.decide({"method": "GET", "path": "/"}).allowed


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        ("l7proto: http\n        l7: [{method: GET}]\n", "HTTP rules are written as Cilium writes them"),
        ("l7proto: http\n", "`http: [{}]` or `http: []` allows every request"),
        ("kafka: [{role: consume, apiKey: fetch}]\n", "cannot set both role"),
        ("http: []\n        kafka: []\n", "one L7 rule type per port"),
        ("dns: [{matchPattern: '*'}]\n", "not supported by proxyd (proxyd has no DNS proxy"),
        ("HTTP: [{method: GET}]\n", "unknown field"),  # YAML documents are case-sensitive, as in Kubernetes
    ],
)
def test_other_l7_forms_are_rejected(rules: str, fragment: str) -> None:
    [problem] = problems_of(TOP + PORTS + "        " + rules, HTTP_REGISTRY)
    assert problem.startswith("p.yaml:10: spec.ingress[0].toPorts[0].rules")
    assert fragment in problem


# --- item 2: `cilium policy import` JSON ----------------------------------------------------------


def test_policy_import_json_keys_are_case_insensitive_as_in_go() -> None:
    [doc] = load_paths([FIXTURES / "policy-import.json"], HTTP_REGISTRY)
    assert doc.name == "import-l7"
    [spec] = doc.specs
    assert sorted(r.key for r in spec.endpoint_selector.requirements) == [
        "App",
        "app",
    ]  # label keys as written
    l7, http = port_rules(doc)
    assert [str(p) for p in l7.ports] == ["80/TCP"]
    assert (
        l7.l7 is not None
        and l7.l7.l7proto == "r2d2"
        and l7.l7.rules == ({"cmd": "READ", "file": "^/public/"},)
    )
    assert [str(p) for p in http.ports] == ["8080/ANY"]  # "protocol": "" is ANY
    assert http.l7 is not None and http.l7.rules == (
        {"method": "GET", "path": "/", "headerMatches": [{"name": "X-A", "value": "1"}]},
    )
    # What is kept (GET /v1/policy, the state file) has the canonical names, so it reloads as a CNP.
    again = parse_text(json.dumps(doc.raw), "state.json", HTTP_REGISTRY)
    assert [(p.ports, p.l7 and p.l7.rules) for p in port_rules(again[0])] == [
        (p.ports, p.l7 and p.l7.rules) for p in port_rules(doc)
    ]


def test_policy_import_json_same_field_twice_is_an_error() -> None:
    text = '[{"endpointSelector": {}, "EndpointSelector": {}}]'
    [problem] = problems_of(text, source="p.json")
    assert problem == "p.json:1: [0].EndpointSelector: given twice (also as 'endpointSelector')"


@pytest.mark.parametrize(
    ("written", "shown"), [("tcp", "TCP"), ("Tcp", "TCP"), ("udp", "UDP"), ("", "ANY"), ("any", "ANY")]
)
def test_protocols_are_read_upper_cased_and_empty_is_any(written: str, shown: str) -> None:
    text = TOP + f"  ingress:\n  - toPorts:\n    - ports: [{{port: '80', protocol: '{written}'}}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert [str(p) for pr in port_rules(doc) for p in pr.ports] == [f"80/{shown}"]


def test_bad_protocol_is_still_an_error() -> None:
    [problem] = problems_of(TOP + "  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: tpc}]\n")
    assert "protocol: must be one of TCP, UDP, SCTP, ANY, not 'TPC'" in problem


# --- items 3, 4, 7 ---------------------------------------------------------------------------------


def test_top_level_and_metadata_description_are_kept() -> None:
    top = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\ndescription: 'L3-L4 policy'\n"
    [doc] = parse_text(top + "metadata: {name: p}\nspec: {endpointSelector: {}}\n", "p.yaml", REGISTRY)
    assert doc.description == "L3-L4 policy"
    [doc] = parse_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, description: meta}\n"
        "spec: {endpointSelector: {}}\n",
        "p.yaml",
        REGISTRY,
    )
    assert doc.description == "meta"


def test_to_ports_without_ports_grants_nothing_with_a_warning() -> None:
    text = TOP + "  ingress:\n  - toPorts:\n    - rules: {l7proto: r2d2, l7: [{}]}\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert warnings([doc]) == [
        "p.yaml:8: spec.ingress[0].toPorts[0].ports: no ports: this toPorts entry matches no connection "
        "(as in Cilium)"
    ]
    ps = PolicySet([doc], REGISTRY)
    for port in (80, 0, 1):
        assert not ps.connection_policy("ingress", {}, "10.0.0.2", {}, port, "r2d2").l4_allowed


def test_node_selector_is_one_clear_line() -> None:
    text = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: host}\n"
    text += "spec:\n  nodeSelector: {matchLabels: {node-access: ssh}}\n"
    text += "  ingress: [{toPorts: [{ports: [{port: '22'}]}]}]\n"
    assert problems_of(text) == [
        "p.yaml:5: spec.nodeSelector: not supported by proxyd (host policies select nodes, whose labels come "
        "from the cluster: needs a `kubernetes` section in the config (docs/kubernetes.md); or select the "
        "endpoints with endpointSelector)"
    ]
