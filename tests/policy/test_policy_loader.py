"""Loading: every unsupported or malformed field is an error naming file, line and field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from policy_helpers import MEMCACHED_13, REGISTRY

from proxyd.errors import PolicyError
from proxyd.policy.loader import load_paths, parse_text, warnings
from proxyd.policy.model import CIDRRule, PortProtocol

TOP = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
HEAD = TOP + "metadata: {name: p}\nspec:\n  endpointSelector: {}\n"
# Bodies start at line 6.
ING = "  ingress:\n  - "  # the rule's first key is on line 7
PORTS = "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n"  # rules keys from line 10


def problems_of(text: str, source: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_text(text, source, REGISTRY)
    return info.value.problems


ERRORS: list[tuple[str, str, str]] = [
    # (body after HEAD, "line: path", fragment of the message)
    (
        PORTS + "        kafka: [{topic: 't t'}]\n",
        "10: spec.ingress[0].toPorts[0].rules.kafka[0].topic",
        "invalid Kafka topic name",
    ),
    (
        PORTS + "        dns: [{matchName: x}]\n",
        "10: spec.ingress[0].toPorts[0].rules.dns",
        "not supported by proxyd",
    ),
    (
        "  egress:\n  - toFQDNs: [{matchName: a.com}]\n",
        "7: spec.egress[0].toFQDNs",
        "not supported by proxyd (proxyd has no DNS",
    ),
    (
        "  egress:\n  - toServices: [{k8sService: {serviceName: s}}]\n",
        "7: spec.egress[0].toServices",
        "not supported",
    ),
    ("  egress:\n  - toEntities: [wrld]\n", "7: spec.egress[0].toEntities[0]", "unknown entity 'wrld'"),
    (ING + "fromEntities: world\n", "7: spec.ingress[0].fromEntities", "must be a list"),
    (
        ING + "fromEntities: [world]\n    fromEndpoints: [{}]\n",
        "7: spec.ingress[0]",
        "combining fromEndpoints and fromEntities in one rule is not supported",
    ),
    (ING + "fromRequires: [{}]\n", "7: spec.ingress[0].fromRequires", "not supported"),
    (
        ING + "icmps: [{fields: [{type: 8}]}]\n",
        "7: spec.ingress[0].icmps",
        "not supported by proxyd (proxyd relays TCP only)",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: '443'}]\n      serverNames: [a.com, 'x.*.com']\n",
        "9: spec.ingress[0].toPorts[0].serverNames[1]",
        "a wildcard may only be a whole first label",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: '443'}]\n      terminatingTLS: {}\n",
        "9: spec.ingress[0].toPorts[0].terminatingTLS",
        "not supported",
    ),
    ("  nodeSelector: {}\n", "6: spec.nodeSelector", "not supported"),
    ("  enableDefaultDeny: {ingress: 'no'}\n", "6: spec.enableDefaultDeny.ingress", "must be true or false"),
    ("  enableDefaultDeny: {ingres: true}\n", "6: spec.enableDefaultDeny.ingres", "unknown field"),
    ("  ingres: []\n", "6: spec.ingres", "unknown field"),
    (ING + "toEndpoints: [{}]\n", "7: spec.ingress[0].toEndpoints", "unknown field"),
    (
        ING + "fromCIDRSet: [{cidrGroupRef: g}]\n",
        "7: spec.ingress[0].fromCIDRSet[0].cidrGroupRef",
        "not supported",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: http}]\n",
        "8: spec.ingress[0].toPorts[0].ports[0].port",
        "named port 'http'",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: 70000}]\n",
        "8: spec.ingress[0].toPorts[0].ports[0].port",
        "0-65535",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: 80, protocol: ICMP}]\n",
        "8: spec.ingress[0].toPorts[0].ports[0].protocol",
        "must be one of TCP",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: 80, endPort: 70}]\n",
        "8: spec.ingress[0].toPorts[0].ports[0].endPort",
        "at least port",
    ),
    (
        ING + "toPorts:\n    - ports: [{port: 80, nope: 1}]\n",
        "8: spec.ingress[0].toPorts[0].ports[0].nope",
        "unknown field",
    ),
    (
        ING + "fromCIDR: [10.0.0.1/8]\n",
        "7: spec.ingress[0].fromCIDR[0]",
        "host bits set (did you mean 10.0.0.0/8?)",
    ),
    (ING + "fromCIDR: [banana]\n", "7: spec.ingress[0].fromCIDR[0]", "is not a CIDR"),
    (
        ING + "fromCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [192.168.0.0/16]\n",
        "9: spec.ingress[0].fromCIDRSet[0].except[0]",
        "is not inside 10.0.0.0/8",
    ),
    (
        ING + "fromCIDRSet:\n    - except: [10.0.0.0/16]\n",
        "8: spec.ingress[0].fromCIDRSet[0].cidr",
        "missing",
    ),
    (
        ING + "fromEndpoints: [{}]\n    fromCIDR: [10.0.0.0/8]\n",
        "7: spec.ingress[0]",
        "combining fromEndpoints and fromCIDR",
    ),
    (
        ING + "fromEndpoints:\n    - matchExpressions: [{key: app, operator: Like, values: [a]}]\n",
        "8: spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
        "must be one of In, NotIn",
    ),
    (
        ING + "fromEndpoints:\n    - matchExpressions: [{key: app, operator: In}]\n",
        "8: spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
        "In needs at least one value",
    ),
    (
        ING + "fromEndpoints:\n    - matchExpressions: [{key: app, operator: Exists, values: [a]}]\n",
        "8: spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
        "Exists takes no values",
    ),
    (
        ING + "fromEndpoints:\n    - matchLabels: {enabled: true}\n",
        "8: spec.ingress[0].fromEndpoints[0].matchLabels.enabled",
        "quote it",
    ),
    (
        ING + "fromEndpoints:\n    - matchLables: {app: a}\n",
        "8: spec.ingress[0].fromEndpoints[0].matchLables",
        "unknown field",
    ),
    (PORTS + "        l7: [{cmd: READ}]\n", "10: spec.ingress[0].toPorts[0].rules.l7proto", "missing"),
    (
        PORTS + "        l7proto: http\n        l7: [{method: GET}]\n",
        "10: spec.ingress[0].toPorts[0].rules.l7proto",
        "HTTP rules are written as Cilium writes them: `rules: {http:",
    ),
    (
        PORTS + "        http: [{method: GET}]\n        l7proto: r2d2\n",
        "10: spec.ingress[0].toPorts[0].rules",
        "give one of http, kafka, or l7proto",
    ),
    (
        PORTS + "        l7proto: r2d2\n        l7:\n        - cmd: READ\n          file: '(['\n",
        "13: spec.ingress[0].toPorts[0].rules.l7[0].file",
        "bad regular expression '(['",
    ),
    (
        PORTS + "        l7proto: r2d2\n        l7:\n        - method: GET\n",
        "12: spec.ingress[0].toPorts[0].rules.l7[0].method",
        "unknown rule key",
    ),
    (
        PORTS + "        l7proto: r2d2\n        l7:\n        - cmd: FLY\n",
        "12: spec.ingress[0].toPorts[0].rules.l7[0].cmd",
        "must be one of",
    ),
    (
        PORTS + "        l7proto: memcache\n        l7:\n        - keyRegex: '*x'\n",
        "12: spec.ingress[0].toPorts[0].rules.l7[0].keyRegex",
        "bad regular expression",
    ),
    (
        PORTS + "        l7proto: r2d2\n        l7: [READ]\n",
        "11: spec.ingress[0].toPorts[0].rules.l7[0]",
        "must be a mapping",
    ),
    (
        "  ingressDeny:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules: {l7proto: r2d2, l7: [{}]}\n",
        "9: spec.ingressDeny[0].toPorts[0].rules",
        "not allowed in deny rules",
    ),
    ("  ingress: {fromEndpoints: []}\n", "6: spec.ingress", "must be a list"),
]


@pytest.mark.parametrize(
    ("body", "at", "fragment"), ERRORS, ids=[e[1].split(": ")[1] + f"#{i}" for i, e in enumerate(ERRORS)]
)
def test_error_names_file_line_and_field(body: str, at: str, fragment: str) -> None:
    problems = problems_of(HEAD + body)
    assert any(p.startswith(f"p.yaml:{at}: ") and fragment in p for p in problems), problems


DOC_ERRORS = [
    (
        TOP.replace("v2", "v1") + "metadata: {name: p}\nspec: {endpointSelector: {}}\n",
        "p.yaml:1: apiVersion: must be cilium.io/v2",
    ),
    (
        "apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n",
        "p.yaml:2: kind: must be one of CiliumNetworkPolicy",
    ),
    (
        TOP + "metadata: {}\nspec: {endpointSelector: {}}\n",
        "p.yaml:3: metadata.name: missing",
    ),
    (
        TOP + "metadata: {name: 'a/b'}\nspec: {endpointSelector: {}}\n",
        "p.yaml:3: metadata.name: 'a/b' is not a valid name",
    ),
    (TOP + "metadata: {name: p}\n", "p.yaml:1: spec: missing"),
    (
        TOP + "metadata: {name: p}\nspec:\n  ingress: []\n",
        "p.yaml:5: spec.endpointSelector: missing (use {} to select every endpoint)",
    ),
    (
        TOP + "metadata: {name: p}\nspecs:\n- endpointSelector: {}\n- {}\n",
        "p.yaml:6: specs[1].endpointSelector: missing",
    ),
    (
        TOP + "metadata: {name: p}\nspec: {endpointSelector: {}\n",
        "p.yaml:",
    ),
    ("- 42\n", "p.yaml:1: [0]: must be a mapping"),
    ("42\n", "p.yaml:1: a policy document must be a mapping"),
]


@pytest.mark.parametrize(("text", "expected"), DOC_ERRORS)
def test_document_errors(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_of_all_files_are_reported_and_nothing_loads(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + "  ingress:\n  - toFQDNs: []\n    icmps: []\n")
    (tmp_path / "b.yaml").write_text(
        HEAD.replace("name: p", "name: q") + "  egress:\n  - toPorts:\n    - ports: [{port: x}]\n"
    )
    good = tmp_path / "c.yaml"
    good.write_text(HEAD.replace("name: p", "name: r"))
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path], REGISTRY)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{tmp_path / 'a.yaml'}:7: spec.ingress[0].toFQDNs: not supported")
    assert problems[1].startswith(f"{tmp_path / 'a.yaml'}:8: spec.ingress[0].icmps: not supported")
    assert problems[2].startswith(
        f"{tmp_path / 'b.yaml'}:8: spec.egress[0].toPorts[0].ports[0].port: named port"
    )


def test_directory_loads_policy_files_sorted_and_skips_others(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(HEAD.replace("name: p", "name: b"))
    (tmp_path / "a.yaml").write_text(
        HEAD.replace("name: p", "name: a") + "---\n" + HEAD.replace("name: p", "name: a2")
    )
    (tmp_path / "README.md").write_text("not policy")
    (tmp_path / ".hidden.yaml").write_text("garbage: [")
    (tmp_path / "..data").mkdir()
    docs = load_paths([tmp_path], REGISTRY)
    assert [d.name for d in docs] == ["a", "a2", "b"]
    assert docs[0].source == str(tmp_path / "a.yaml")


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file or directory"):
        load_paths([tmp_path / "nope.yaml"], REGISTRY)


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD)
    (tmp_path / "b.yaml").write_text("# comment\n" + HEAD)
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path], REGISTRY)
    assert info.value.problems == [
        f"{tmp_path / 'b.yaml'}:2: metadata.name: duplicate policy name 'p' (also in {tmp_path / 'a.yaml'}:1)"
    ]


BARE_JSON = """[
\t{
\t\t"endpointSelector": {"matchLabels": {"app": "server"}},
\t\t"ingress": [{
\t\t\t"fromEndpoints": [{"matchLabels": {"app": "client"}}],
\t\t\t"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
\t\t\t             "rules": {"l7proto": "r2d2", "l7": [{"cmd": "READ"}]}}]
\t\t}],
\t\t"labels": [{"key": "name", "value": "from-json", "source": "unspec"}]
\t},
\t{"endpointSelector": {}, "egressDeny": [{"toCIDR": ["192.0.2.0/24"]}]}
]
"""


def test_bare_json_rule_list_as_cilium_policy_import_takes(tmp_path: Path) -> None:
    f = tmp_path / "rules.json"
    f.write_text(BARE_JSON)
    [doc] = load_paths([f], REGISTRY)
    assert doc.name == "from-json"
    assert len(doc.specs) == 2
    assert doc.specs[0].rules[0].to_ports[0].l7 is not None
    assert doc.specs[1].rules[0].deny
    assert doc.specs[1].rules[0].cidrs == (CIDRRule(__import__("ipaddress").ip_network("192.0.2.0/24")),)
    assert doc.raw["kind"] == "CiliumNetworkPolicy"
    assert doc.raw["metadata"] == {"name": "from-json"}
    json.dumps(doc.raw)


def test_bare_json_without_name_label_is_named_after_the_file(tmp_path: Path) -> None:
    f = tmp_path / "my rules.json"
    f.write_text('[{"endpointSelector": {}}]')
    [doc] = load_paths([f], REGISTRY)
    assert doc.name == "my-rules"


def test_json_errors_have_lines() -> None:
    text = '[\n  {\n    "endpointSelector": {},\n    "ingress": [{"toFQDNs": []}]\n  }\n]\n'
    assert problems_of(text, "api") == [
        "api:4: [0].ingress[0].toFQDNs: not supported by proxyd "
        "(proxyd has no DNS proxy to learn FQDN addresses; use toCIDR)"
    ]


def test_json_cnp_objects_and_kubernetes_list() -> None:
    obj = {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": "cw"},
        "spec": {"endpointSelector": {}},
    }
    [doc] = parse_text(json.dumps(obj), "api", REGISTRY)
    assert (doc.name, doc.kind) == ("cw", "CiliumClusterwideNetworkPolicy")
    listed = {"apiVersion": "v1", "kind": "List", "items": [obj, {**obj, "metadata": {"name": "cw2"}}]}
    assert [d.name for d in parse_text(json.dumps(listed), "api", REGISTRY)] == ["cw", "cw2"]


def test_kubectl_output_loads_with_server_fields() -> None:
    text = (
        TOP + "metadata:\n  name: p\n  namespace: default\n"
        "  creationTimestamp: 2024-01-01T00:00:00Z\n  uid: abc\n  resourceVersion: '1'\n  labels: {a: b}\n"
        "spec:\n  endpointSelector: {}\n  description: hello\nstatus:\n  nodes: {}\n"
    )
    [doc] = parse_text(text, "k.yaml", REGISTRY)
    assert doc.namespace == "default"
    assert doc.name == "default/p"  # names are unique per namespace, as in Kubernetes
    assert doc.specs[0].description == "hello"
    assert "status" not in doc.raw
    json.dumps(doc.raw)


def test_unknown_l7proto_loads_with_a_warning() -> None:
    text = HEAD + PORTS.replace("'80'", "'70'") + "        l7proto: gopher\n        l7: [{anything: goes}]\n"
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    l7 = doc.specs[0].rules[0].to_ports[0].l7
    assert l7 is not None
    assert l7.matchers is None
    assert warnings([doc]) == [
        "p.yaml:10: spec.ingress[0].toPorts[0].rules.l7proto: unknown l7proto 'gopher' (no parser of that "
        "name): port 70/ANY denies every request"
    ]


def test_udp_port_loads_with_a_warning() -> None:
    [doc] = parse_text(
        HEAD + ING + "toPorts:\n    - ports: [{port: 53, protocol: UDP}]\n", "p.yaml", REGISTRY
    )
    assert doc.specs[0].rules[0].to_ports[0].ports == (PortProtocol(53, 53, "UDP"),)
    assert warnings([doc]) == [
        "p.yaml:8: spec.ingress[0].toPorts[0].ports[0].protocol: UDP never matches: proxyd relays TCP only"
    ]


def test_ports_as_numbers_or_strings_and_empty_sections() -> None:
    text = (
        HEAD
        + "  ingress:\n  - toPorts:\n"
        + "    - ports: [{port: 80}, {port: '8080', endPort: '8090'}, {port: 0}]\n  egress:\n"
    )
    [doc] = parse_text(text, "p.yaml", REGISTRY)
    assert doc.specs[0].rules[0].to_ports[0].ports == (
        PortProtocol(80, 80, "ANY"),
        PortProtocol(8080, 8090, "ANY"),
        PortProtocol(0, 0, "ANY"),
    )
    assert str(doc.specs[0].rules[0].to_ports[0].ports[1]) == "8080-8090/ANY"


def test_yaml_syntax_error_has_line() -> None:
    problems = problems_of(HEAD + "  ingress: [\n")
    assert len(problems) == 1
    assert problems[0].startswith("p.yaml:")
    assert "invalid YAML" in problems[0]


def test_memcached_policy_of_the_cilium_13_announcement_loads() -> None:
    [doc] = parse_text(MEMCACHED_13, "memcd-sw-security-policy.yaml", REGISTRY)
    assert doc.name == "secure-fleet"
    rules = doc.specs[0].rules
    assert len(rules) == 3
    assert [r.where for r in rules] == [
        "memcd-sw-security-policy.yaml:10",
        "memcd-sw-security-policy.yaml:24",
        "memcd-sw-security-policy.yaml:38",
    ]
    for r in rules:
        [pr] = r.to_ports
        assert pr.ports == (PortProtocol(11211, 11211, "TCP"),)
        assert pr.l7 is not None
        assert pr.l7.l7proto == "memcache"
        assert pr.l7.matchers is not None
        assert len(pr.l7.matchers) == 2
    assert warnings([doc]) == []
