"""Helpers for the policy tests: a registry with r2d2 and a stub memcache rule compiler.

The memcache parser lands in its own issue; the stub here compiles the rule keys of Cilium's
memcached policies (``command``, ``keyExact``, ``keyPrefix``, ``keyRegex``) so documents written
for it load and match dict requests ``{"command": ..., "key": ...}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.errors import RuleError
from proxyd.parser import ConnectionContext, Parser, ParserFactory, RuleMatcher
from proxyd.parsers.kafka import KafkaFactory
from proxyd.parsers.r2d2 import R2d2Factory
from proxyd.policy.engine import PolicySet
from proxyd.policy.loader import parse_text
from proxyd.policy.regex import RuleRegex, compile_rule_regex
from proxyd.registry import Registry


@dataclass(frozen=True)
class StubMemcacheRule:
    command: str | None
    exact: str | None
    prefix: str | None
    regex: re.Pattern[str] | None

    def matches(self, request: Any) -> bool:
        if not isinstance(request, dict):
            return False
        key = request.get("key", "")
        if self.command is not None and request.get("command") != self.command:
            return False
        if self.exact is not None and key != self.exact:
            return False
        if self.prefix is not None and not key.startswith(self.prefix):
            return False
        return self.regex is None or self.regex.search(key) is not None


class StubMemcacheFactory(ParserFactory):
    name = "memcache"
    rule_keys = ("command", "keyExact", "keyPrefix", "keyRegex")

    def compile_rule(self, rule: Mapping[str, str]) -> RuleMatcher:
        values: dict[str, Any] = {}
        for key, value in rule.items():
            if key not in self.rule_keys:
                raise RuleError("unknown rule key for l7proto 'memcache'", key)
            values[key] = value
        regex = None
        if "keyRegex" in values:
            try:
                regex = re.compile(values["keyRegex"])
            except re.error as exc:
                raise RuleError(f"bad regular expression: {exc}", "keyRegex") from exc
        return StubMemcacheRule(values.get("command"), values.get("keyExact"), values.get("keyPrefix"), regex)

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        raise NotImplementedError


def make_registry() -> Registry:
    reg = Registry()
    reg.register("r2d2", R2d2Factory(), "built-in")
    reg.register("memcache", StubMemcacheFactory(), "test stub")
    reg.register("kafka", KafkaFactory(), "built-in")  # rules.kafka: Cilium's own fields, light to compile
    return reg


REGISTRY = make_registry()


def cnp(name: str, *specs: Mapping[str, Any], kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    """A CiliumNetworkPolicy dict with one spec (``spec``) or several (``specs``)."""
    doc: dict[str, Any] = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": name}}
    if len(specs) == 1:
        doc["spec"] = dict(specs[0])
    else:
        doc["specs"] = [dict(s) for s in specs]
    return doc


def build(*docs: Mapping[str, Any], revision: int = 1) -> PolicySet:
    """Parse documents given as dicts (through the JSON text path) into a PolicySet."""
    text = "\n---\n".join(json.dumps(d) for d in docs)
    return PolicySet(parse_text(text, "test.yaml", REGISTRY), REGISTRY, revision)


#: The memcached policy of the Cilium 1.3 announcement (cilium/cilium
#: examples/kubernetes-memcached/memcd-sw-security-policy.yaml).
MEMCACHED_13 = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "secure-fleet"
spec:
  endpointSelector:
    matchLabels:
      app: memcd-server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: a-wing
    toPorts:
    - ports:
      - port: '11211'
        protocol: TCP
      rules:
        l7proto: memcache
        l7:
        - command: get
          keyExact: awing-coord
        - command: set
          keyExact: awing-coord
  - fromEndpoints:
    - matchLabels:
        app: x-wing
    toPorts:
    - ports:
      - port: '11211'
        protocol: TCP
      rules:
        l7proto: memcache
        l7:
        - command: get
          keyExact: xwing-coord
        - command: set
          keyExact: xwing-coord
  - fromEndpoints:
    - matchLabels:
        name: fleet-tracker
    toPorts:
    - ports:
      - port: '11211'
        protocol: TCP
      rules:
        l7proto: memcache
        l7:
        - command: get
          keyExact: awing-coord
        - command: get
          keyExact: xwing-coord
"""


# --- a test-only ``http`` rule compiler, for the ``rules.http`` plumbing -------------------------
#
# Not an HTTP parser: it compiles Cilium's PortRuleHTTP shape (``method``/``path``/``host`` as
# RE2 full matches, ``headers`` as "Name" or "Name: value" strings, ``headerMatches`` as
# {name, value, mismatch}) so the loader's handing of those values can be tested, and matches
# dict requests {"method", "path", "host", "headers": {name: value}}.

HTTP_RULE_KEYS = ("method", "path", "host", "headers", "headerMatches")


@dataclass(frozen=True)
class StubHttpRule:
    regexes: tuple[tuple[str, RuleRegex], ...]
    headers: tuple[tuple[str, str | None], ...]

    def matches(self, request: Any) -> bool:
        if not isinstance(request, dict):
            return False
        for key, rx in self.regexes:
            if not rx.fullmatch(str(request.get(key, ""))):
                return False
        have = {k.lower(): v for k, v in request.get("headers", {}).items()}
        return all(n.lower() in have and (v is None or have[n.lower()] == v) for n, v in self.headers)


class StubHttpFactory(ParserFactory):
    name = "http"
    rule_keys = HTTP_RULE_KEYS

    def compile_rule(self, rule: Mapping[str, Any]) -> RuleMatcher:
        regexes: list[tuple[str, RuleRegex]] = []
        headers: list[tuple[str, str | None]] = []
        for key, value in rule.items():
            if key in ("method", "path", "host"):
                regexes.append((key, compile_rule_regex(value, key)))
            elif key == "headers":
                if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
                    raise RuleError("must be a list of strings", key)
                for h in value:
                    name, sep, val = h.partition(":")
                    headers.append((name.strip(), val.strip() if sep else None))
            elif key == "headerMatches":
                if not isinstance(value, list) or not all(isinstance(h, dict) for h in value):
                    raise RuleError("must be a list of {name, value, mismatch}", key)
                for h in value:
                    if set(h) - {"name", "value", "mismatch"} or not isinstance(h.get("name"), str):
                        raise RuleError(f"bad header match {h!r}", key)
                    headers.append((h["name"], h.get("value")))
            else:
                raise RuleError("unknown rule key for l7proto 'http'", str(key))
        return StubHttpRule(tuple(regexes), tuple(headers))

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        raise NotImplementedError


def make_http_registry() -> Registry:
    reg = make_registry()
    reg.register("http", StubHttpFactory(), "test stub")
    return reg


HTTP_REGISTRY = make_http_registry()
