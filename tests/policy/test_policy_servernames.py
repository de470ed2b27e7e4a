"""``toPorts[].serverNames``: Cilium's name patterns, the loader's refusals at their line, the
engine's "this port rule matches only an allowed SNI", and ``explain --sni``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from policy_helpers import REGISTRY

from proxyd.errors import PolicyError
from proxyd.policy.engine import PolicySet
from proxyd.policy.explain import explain, explain_data
from proxyd.policy.identity import IdentityMap
from proxyd.policy.loader import parse_text
from proxyd.policy.servernames import ServerNames, parse_pattern

# --- patterns -----------------------------------------------------------------------------------

MATCHES = [
    # (pattern, sni, allowed)
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "API.EXAMPLE.COM", True),
    ("api.example.com", "api.example.com.", True),
    ("API.Example.com.", "api.example.com", True),
    ("api.example.com", "x.api.example.com", False),
    ("api.example.com", "example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "A.Example.Com.", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", ".example.com", False),
    ("*.example.com", "a.notexample.com", False),
    ("**.example.com", "a.example.com", True),
    ("**.example.com", "a.b.c.example.com", True),
    ("**.example.com", "example.com", False),
    ("**.example.com", "aexample.com", False),
    ("**.example.com", "a..example.com", False),
    ("*.com", "example.com", True),
    ("xn--bcher-kva.example", "XN--BCHER-KVA.example", True),
    ("api.example.com", "api.example.com\x00.evil", False),
    ("api.example.com", "api.ex\u00e4mple.com", False),
]


@pytest.mark.parametrize(("pattern", "sni", "allowed"), MATCHES)
def test_matching(pattern: str, sni: str, allowed: bool) -> None:
    names = ServerNames.build((parse_pattern(pattern),))
    assert names.matches(sni) is allowed


def test_no_sni_never_matches() -> None:
    names = ServerNames.build(tuple(parse_pattern(p) for p in ("a.com", "*.a.com", "**.a.com")))
    assert not names.matches(None) and not names.matches("")


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("", "empty server name"),
        ("*", "wildcard"),
        ("**", "wildcard"),
        ("a.*.com", "wildcard"),
        ("f*.example.com", "wildcard"),
        ("***.example.com", "wildcard"),
        ("*.", "wildcard"),
        ("**..", "empty label"),
        ("a..com", "empty label"),
        ("a.com..", "empty label"),
        ("-a.com", "label '-a'"),
        ("a b.com", "label 'a b'"),
        ("b\u00fccher.example", "xn--"),
        ("a" * 64 + ".com", "label"),
        (("a" * 60 + ".") * 5 + "com", "longer than 253"),
    ],
)
def test_bad_patterns(pattern: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_pattern(pattern)
    assert why in str(info.value)


# --- loading ------------------------------------------------------------------------------------

DOC = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: sni
spec:
  endpointSelector: {{}}
  egress:
  - toPorts:
    - ports:
      - port: "443"
        protocol: TCP
{extra}      serverNames:
      - one.one.one.one
      - "*.example.com"
      - "{third}"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_text(text, "p.yaml", REGISTRY)
    return info.value.problems


def test_bad_names_are_reported_at_their_line() -> None:
    got = problems(DOC.format(extra="", third="a.*.example.org").replace('- "*.example.com"', "- ''"))
    assert got == [
        "p.yaml:14: spec.egress[0].toPorts[0].serverNames[1]: empty server name is not allowed "
        "(as in Cilium)",
        "p.yaml:15: spec.egress[0].toPorts[0].serverNames[2]: 'a.*.example.org': a wildcard may only be a "
        "whole first label, '*.' (one label) or '**.' (any depth)",
    ]
    (bad,) = problems(DOC.format(extra="", third="x").replace("- one.one.one.one", "- {a: b}"))
    assert bad.startswith("p.yaml:13: spec.egress[0].toPorts[0].serverNames[0]: must be a string")


@pytest.mark.parametrize(
    "rules",
    [
        "      rules:\n        l7proto: r2d2\n",
        "      rules:\n        l7proto: r2d2\n        l7: [{cmd: READ}]\n",
        "      rules:\n        http: []\n",
        "      rules:\n        http: [{method: GET}]\n",
    ],
)
def test_with_rules_on_the_same_port_is_refused(rules: str) -> None:
    (bad,) = problems(DOC.format(extra=rules, third="**.deep.org"))
    assert "serverNames: not allowed with L7 rules or l7proto on the same port" in bad
    assert "TLS termination" in bad


def test_rules_empty_is_fine_and_an_empty_list_restricts_nothing() -> None:
    (doc,) = parse_text(DOC.format(extra="      rules: {}\n", third="**.deep.org"), "p.yaml", REGISTRY)
    pr = doc.specs[0].rules[0].to_ports[0]
    assert pr.l7 is None and pr.server_names is not None
    assert pr.server_names.patterns == ("one.one.one.one", "*.example.com", "**.deep.org")
    text = DOC.format(extra="", third="x").split("      serverNames:")[0] + "      serverNames: []\n"
    (doc,) = parse_text(text, "p.yaml", REGISTRY)
    assert doc.specs[0].rules[0].to_ports[0].server_names is None


def test_deny_rules_have_no_server_names() -> None:
    text = DOC.format(extra="", third="x").replace("  egress:\n", "  egressDeny:\n")
    (bad,) = problems(text)
    assert "p.yaml:12: spec.egressDeny[0].toPorts[0].serverNames: not allowed in deny rules" in bad


def test_cilium_import_json_with_go_case() -> None:
    rules = [
        {
            "EndpointSelector": {},
            "Egress": [
                {"ToPorts": [{"Ports": [{"Port": "443", "Protocol": "tcp"}], "ServerNames": ["A.com."]}]}
            ],
            "Labels": [{"key": "name", "value": "j", "source": "unspec"}],
        }
    ]
    (doc,) = parse_text(json.dumps(rules), "r.json", REGISTRY)
    names = doc.specs[0].rules[0].to_ports[0].server_names
    assert names is not None and names.patterns == ("a.com",)
    assert '"serverNames": ["A.com."]' in json.dumps(doc.raw)  # kept with the canonical field name


# --- enforcement --------------------------------------------------------------------------------

IDS = IdentityMap.from_entries([("10.0.0.0/24", {"app": "client"})])
CLIENT = ("10.0.0.5", 40000)
SERVER = ("203.0.113.9", 443)


def pset(extra: str = "") -> PolicySet:
    text = DOC.format(extra="", third="**.deep.org") + extra
    return PolicySet(parse_text(text, "p.yaml", REGISTRY), REGISTRY, 3)


def verdict(ps: PolicySet, sni: str | None, port: int = 443) -> tuple[bool, bool]:
    cp = ps.connection_policy("egress", {"app": "client"}, SERVER[0], {}, port, None, False, sni)
    return cp.l4_allowed, cp.reads_hello


def test_the_port_rule_matches_only_allowed_names() -> None:
    ps = pset()
    assert verdict(ps, None) == (False, True)  # no SNI (or not read yet): denied, read the hello
    assert verdict(ps, "one.one.one.one") == (True, True)
    assert verdict(ps, "x.example.com") == (True, True)
    assert verdict(ps, "a.b.deep.org") == (True, True)
    assert verdict(ps, "evil.org") == (False, True)
    assert verdict(ps, "x.example.com", port=8443) == (False, False)  # another port: no hello to read


def test_another_rule_for_the_port_grants_every_name() -> None:
    ps = pset("  - toPorts:\n    - ports: [{port: '443'}]\n")
    assert verdict(ps, None) == (True, True)
    assert verdict(ps, "evil.org") == (True, True)


def test_a_deny_rule_wins_without_reading_the_hello() -> None:
    ps = pset("  egressDeny:\n  - toCIDR: [203.0.113.0/24]\n")
    assert verdict(ps, "one.one.one.one") == (False, False)


def test_explain_with_and_without_sni() -> None:
    ps = pset()
    text = explain(ps, IDS, "egress", CLIENT, SERVER, None, "x.example.com")
    assert "sni: x.example.com" in text
    assert "ports 443/TCP, serverNames one.one.one.one, *.example.com, **.deep.org" in text
    assert "L3/L4 verdict: allowed" in text
    assert "TLS: serverNames rules apply" in text and "verdict above for SNI 'x.example.com'" in text
    text = explain(ps, IDS, "egress", CLIENT, SERVER, None)
    assert "L3/L4 verdict: DENIED" in text
    assert "no SNI: the connection's name must be in serverNames one.one.one.one" in text
    assert "verdict above for no SNI (give --sni NAME)" in text
    data = explain_data(ps, IDS, "egress", CLIENT, SERVER, None, "evil.org").as_dict()
    assert data["sni"] == "evil.org" and data["reads_hello"] is True and data["l4_allowed"] is False
    assert any("SNI 'evil.org' is not in serverNames" in x["why"] for x in data["not_matching"])


def test_cli_explain_sni(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(DOC.format(extra="", third="**.deep.org"))
    (tmp_path / "proxyd.yaml").write_text(
        "listeners:\n  - name: tls\n    address: 127.0.0.1:0\n    direction: egress\n"
        "    upstream: 203.0.113.9:443\n"
        "identities:\n  - cidr: 10.0.0.0/24\n    labels: {app: client}\npolicy:\n  paths: [p.yaml]\n"
    )
    base = [sys.executable, "-m", "proxyd", "explain", "-c", str(tmp_path / "proxyd.yaml"),
            "--src", "10.0.0.5", "--dst", "203.0.113.9:443"]  # fmt: skip
    out = subprocess.run([*base, "--sni", "a.deep.org"], capture_output=True, text=True, check=True).stdout
    assert "sni: a.deep.org" in out and "L3/L4 verdict: allowed" in out
    out = subprocess.run([*base, "--sni", "deep.org"], capture_output=True, text=True, check=True).stdout
    assert "L3/L4 verdict: DENIED" in out
