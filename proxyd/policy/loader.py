"""Loading policy documents: Cilium's shapes in, validated :mod:`model` objects out, or every problem.

Theory of operation. Sources are YAML files of ``---``-separated documents (``kind:
CiliumNetworkPolicy`` / ``CiliumClusterwideNetworkPolicy``, or a Kubernetes ``kind: List`` of
them, as ``kubectl get -o yaml`` writes) and JSON files holding the bare list of rules that
``cilium policy import`` takes (one document, named after a rule label ``name`` /
``io.cilium.k8s.policy.name`` or else the file's stem). JSON is parsed by the same line-tracking
YAML reader (JSON is YAML once its tabs are spaces), so every problem is reported as
``file:line: field.path: problem``.

Loading fails closed, like Cilium's ``proxylib/policymap.go``: every field of the document is
either understood and enforced, or an error naming its path; a field Cilium has but proxyd
cannot enforce (``toFQDNs``, ``rules.http``, ...) is "not supported by proxyd", never ignored
(docs/policy.md). ``l7`` rules are compiled by the parser factory registered for their
``l7proto``, so a bad key or regular expression is reported at its line. An ``l7proto`` no
parser is registered for is *not* an error (the policy may be meant for a daemon with more
parsers); that port then denies every request (see :mod:`proxyd.policy.engine`) and the
document carries a warning that ``proxyd check`` prints. All problems of all sources are
collected and raised together as one :class:`~proxyd.errors.PolicyError`; nothing is ever
partially loaded. Document names must be unique across all sources.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from proxyd.errors import PolicyError, RuleError
from proxyd.parser import ParserFactory, RuleMatcher
from proxyd.policy.identity import IPNetwork, parse_cidr
from proxyd.policy.model import (
    EGRESS,
    INGRESS,
    POLICY_ENTITIES,
    PROTOCOLS,
    CIDRRule,
    Document,
    L7Rules,
    PortProtocol,
    PortRule,
    Rule,
    ServiceSelector,
    Spec,
)
from proxyd.policy.selector import (
    NODE_SOURCE,
    OPERATORS,
    RESERVED_SOURCE,
    EndpointSelector,
    LabelSet,
    Requirement,
    split_key,
)
from proxyd.policy.servernames import ServerNames, parse_pattern
from proxyd.yamlsrc import LList, LMap, Where, YamlSyntaxError, load_documents

API_VERSION: Final = "cilium.io/v2"
KINDS: Final = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
#: File suffixes read from a policy directory (other files, and dot-files such as the
#: ``..data`` links of a Kubernetes ConfigMap volume, are skipped).
POLICY_SUFFIXES: Final = (".yaml", ".yml", ".json")
#: A container port name (Kubernetes' IANA_SVC_NAME): at most 15 of a-z 0-9 -, with a letter.
NAMED_PORT_RE: Final = re.compile(r"^(?=.*[a-z])(?!-)(?!.*--)[a-z0-9-]{1,15}(?<!-)$")
NAME_RE: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
#: Rule labels that name a document in a bare JSON rule list.
NAME_LABELS: Final = ("io.cilium.k8s.policy.name", "name")

#: The pod namespace label Cilium scopes namespaced policies with (``k8s:`` source).
POD_NAMESPACE: Final = "io.kubernetes.pod.namespace"
POD_NAMESPACE_KEY: Final = f"k8s:{POD_NAMESPACE}"
#: Namespace labels Cilium gives endpoints; a selector on them is not namespace-scoped.
NAMESPACE_LABELS: Final = "io.cilium.k8s.namespace.labels"
NEEDS_KUBERNETES: Final = "needs a `kubernetes` section in the config (docs/kubernetes.md)"
#: Fields of Cilium rules that proxyd knows and refuses, with why (or what to do instead).
UNSUPPORTED_RULE_FIELDS: Final[Mapping[str, str]] = {
    "fromRequires": "deprecated in Cilium; not enforced",
    "toRequires": "deprecated in Cilium; not enforced",
    "fromGroups": "cloud provider groups are not available",
    "toGroups": "cloud provider groups are not available",
    "fromNodes": f"node identities come from the cluster: {NEEDS_KUBERNETES}",
    "toNodes": f"node identities come from the cluster: {NEEDS_KUBERNETES}",
    "toServices": f"service backends come from the cluster: {NEEDS_KUBERNETES}",
    "toFQDNs": "proxyd has no DNS proxy to learn FQDN addresses; use toCIDR",
    "icmps": "proxyd relays TCP only",
    "authentication": "mutual authentication is not implemented",
}
UNSUPPORTED_SPEC_FIELDS: Final[Mapping[str, str]] = {
    "nodeSelector": f"host policies select nodes, whose labels come from the cluster: {NEEDS_KUBERNETES}; "
    "or select the endpoints with endpointSelector",
}
#: Fields a ``kubernetes`` config section makes enforceable (docs/kubernetes.md).
NODE_RULE_FIELDS: Final = ("fromNodes", "toNodes", "toServices")
UNSUPPORTED_PORT_RULE_FIELDS: Final[Mapping[str, str]] = {
    "terminatingTLS": "TLS interception is not implemented",
    "originatingTLS": "TLS interception is not implemented",
    "listener": "Envoy listeners are not available",
}
_L7_HINT = "rules for proxyd's own parsers are written as `l7proto: NAME` with `l7` key-value rules"
#: ``toPorts[].rules.http``: the rule list of the parser registered under this name.
HTTP: Final = "http"
#: Fields of Cilium's PortRuleHTTP and HeaderMatch (for Go's case-insensitive JSON keys).
HTTP_RULE_FIELDS: Final = ("path", "method", "host", "headers", "headerMatches")
HTTP_HEADER_MATCH_FIELDS: Final = ("mismatch", "name", "secret", "value")
#: ``toPorts[].rules.kafka``: the rule list of the parser registered under this name.
KAFKA: Final = "kafka"
#: Fields of Cilium's PortRuleKafka (for Go's case-insensitive JSON keys).
KAFKA_RULE_FIELDS: Final = ("role", "apiKey", "apiVersion", "clientID", "topic")
UNSUPPORTED_L7_FIELDS: Final[Mapping[str, str]] = {
    "dns": f"proxyd has no DNS proxy; {_L7_HINT}",
}
UNSUPPORTED_CIDR_SET_FIELDS: Final[Mapping[str, str]] = {
    "cidrGroupRef": "CIDR groups are not available",
    "cidrGroupSelector": "CIDR groups are not available",
}
#: metadata fields a Kubernetes API server fills in; read and ignored (they say nothing about
#: what to enforce), so `kubectl get cnp -o yaml` output loads as is.
SERVER_METADATA: Final = frozenset(
    {"uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink"}
)


class ParserLookup(Protocol):
    """What the loader needs of :class:`proxyd.registry.Registry`."""

    def get(self, name: str) -> ParserFactory: ...

    def __contains__(self, name: object) -> bool: ...


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _typename(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def plain(value: Any) -> Any:
    """``value`` as JSON-able data (line-tracking containers become dicts and lists)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class _Loader:
    """Accumulates problems over any number of sources."""

    def __init__(self, registry: ParserLookup, kubernetes: bool = False) -> None:
        self.registry = registry
        #: A ``kubernetes`` source is on: node selectors are enforceable.
        self.kubernetes = kubernetes
        self.problems: list[str] = []
        self._warnings: list[str] = []
        #: Fold field names case-insensitively (bare JSON rule lists, read as Go reads them).
        self.fold = False
        #: The namespace of the document being read (None: clusterwide or bare rules).
        self.namespace: str | None = None
        #: Whether the spec being read selects ``reserved:init`` (its peers are not scoped).
        self.subject_init = False

    # --- reporting ---------------------------------------------------------------------------

    def err(self, where: Where | str, path: str, message: str) -> None:
        self.problems.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def warn(self, where: Where | str, path: str, message: str) -> None:
        self._warnings.append(f"{where}: {path}: {message}")

    def fields(
        self,
        node: LMap,
        path: str,
        allowed: Collection[str],
        unsupported: Mapping[str, str] | None = None,
    ) -> LMap:
        """Check ``node``'s keys; returns it, with keys case-folded as Go reads them when folding.

        ``cilium policy import`` reads JSON with Go's ``encoding/json``, which matches a key to a
        struct field exactly or else case-insensitively (``"EndpointSelector"``, ``"HTTP"``), so
        bare rule lists (:attr:`fold`) get their field names mapped to the canonical spelling.
        """
        if self.fold:
            node = self.canon(node, path, [*allowed, *(unsupported or ())])
        for key in node:
            if key in allowed:
                continue
            if unsupported and key in unsupported:
                self.err(
                    node.where_of(key), _join(path, key), f"not supported by proxyd ({unsupported[key]})"
                )
            else:
                self.err(
                    node.where_of(key), _join(path, key), f"unknown field (expected: {', '.join(allowed)})"
                )
        return node

    def canon(self, node: LMap, path: str, known: Collection[str]) -> LMap:
        """Rename, in place, each key of ``node`` that case-insensitively names a ``known`` field.

        In place, so that the document kept for display and persistence has the canonical names.
        """
        folded = {k.lower(): k for k in known}
        items = list(node.items())
        lines = {k: node.where_of(k).line for k, _ in items}
        node.clear()
        node.key_lines = {}
        for key, value in items:
            name = key if key in known else folded.get(key.lower(), key)
            if name in node:
                # Go keeps the last; two spellings of one field is a mistake worth reporting.
                self.err(
                    Where(node.where.file, lines[key]), _join(path, key), f"given twice (also as {name!r})"
                )
                continue
            node[name] = value
            node.key_lines[name] = lines[key]
        return node

    # --- typed access ------------------------------------------------------------------------

    def as_map(self, value: Any, where: Where, path: str, hint: str = "") -> LMap | None:
        if isinstance(value, LMap):
            return value
        self.err(where, path, f"must be a mapping, not {_typename(value)}{hint}")
        return None

    def as_list(self, value: Any, where: Where, path: str) -> LList | None:
        if isinstance(value, LList):
            return value
        self.err(where, path, f"must be a list, not {_typename(value)}")
        return None

    def as_str(self, value: Any, where: Where, path: str) -> str | None:
        if isinstance(value, str):
            return value
        # YAML reads `1` and `1.5` as numbers where Kubernetes expects strings: accept those.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        self.err(where, path, f"must be a string, not {_typename(value)}")
        return None

    def items(self, node: LMap, key: str, path: str) -> Iterable[tuple[Any, Where, str]]:
        """The items of list field ``key`` with where each is and its path."""
        lst = self.as_list(node[key], node.where_of(key), _join(path, key))
        if lst is None:
            return []
        return [(item, lst.where_of(i), f"{_join(path, key)}[{i}]") for i, item in enumerate(lst)]

    # --- sources -----------------------------------------------------------------------------

    def parse_source(self, text: str, source: str) -> list[Document]:
        stripped = text.lstrip()
        if source.endswith(".json") or stripped.startswith(("[", "{")):
            # Valid JSON has tabs only between tokens, where YAML does not accept them.
            text = text.replace("\t", " ")
        try:
            loaded = list(load_documents(text, source))
        except YamlSyntaxError as exc:
            self.problems.append(str(exc))
            return []
        docs: list[Document] = []
        for node, where in loaded:
            docs.extend(self.top(node, where, source))
        return docs

    def top(self, node: Any, where: Where, source: str) -> list[Document]:
        if node is None:
            return []
        if isinstance(node, LList):
            if any(isinstance(item, LMap) and ("apiVersion" in item or "kind" in item) for item in node):
                return self.documents_in(node, "", source)
            doc = self.bare_rules(node, where, source)
            return [doc] if doc else []
        if isinstance(node, LMap):
            if node.get("kind") == "List":
                node = self.fields(node, "", ("apiVersion", "kind", "items", "metadata"))
                if "items" not in node:
                    return []
                lst = self.as_list(node["items"], node.where_of("items"), "items")
                return self.documents_in(lst, "items", source) if lst is not None else []
            doc = self.cnp(node, where, source, "")
            return [doc] if doc else []
        self.err(where, "", f"a policy document must be a mapping or a list of rules, not {_typename(node)}")
        return []

    def documents_in(self, lst: LList, path: str, source: str) -> list[Document]:
        docs = []
        for i, item in enumerate(lst):
            m = self.as_map(item, lst.where_of(i), f"{path}[{i}]")
            if m is not None:
                doc = self.cnp(m, lst.where_of(i), source, f"{path}[{i}]")
                if doc:
                    docs.append(doc)
        return docs

    def cnp(self, node: LMap, where: Where, source: str, path: str) -> Document | None:
        start = len(self.problems)
        self._warnings = []
        node = self.fields(
            node, path, ("apiVersion", "kind", "metadata", "spec", "specs", "status", "description")
        )
        description = ""
        if "description" in node:  # Cilium's examples carry one beside metadata: kept for display
            description = (
                self.as_str(node["description"], node.where_of("description"), _join(path, "description"))
                or ""
            )
        if node.get("apiVersion") != API_VERSION:
            self.err(
                node.where_of("apiVersion"),
                _join(path, "apiVersion"),
                f"must be {API_VERSION}" + ("" if "apiVersion" in node else " (missing)"),
            )
        kind = node.get("kind")
        if kind not in KINDS:
            self.err(
                node.where_of("kind"),
                _join(path, "kind"),
                f"must be one of {', '.join(KINDS)}" + ("" if "kind" in node else " (missing)"),
            )
        name: str | None = None
        namespace: str | None = None
        if "metadata" not in node:
            self.err(where, _join(path, "metadata"), "missing (metadata.name names the document)")
        else:
            meta = self.as_map(node["metadata"], node.where_of("metadata"), _join(path, "metadata"))
            if meta is not None:
                mpath = _join(path, "metadata")
                meta = self.fields(
                    meta,
                    mpath,
                    ("name", "namespace", "labels", "annotations", "description", *sorted(SERVER_METADATA)),
                )
                if "description" in meta and not description:
                    description = (
                        self.as_str(
                            meta["description"], meta.where_of("description"), _join(mpath, "description")
                        )
                        or ""
                    )
                if "name" not in meta:
                    self.err(meta.where, _join(mpath, "name"), "missing")
                else:
                    name = self.name(meta["name"], meta.where_of("name"), _join(mpath, "name"))
                if "namespace" in meta:
                    namespace = self.as_str(
                        meta["namespace"], meta.where_of("namespace"), _join(mpath, "namespace")
                    )
                    if kind == "CiliumClusterwideNetworkPolicy" and namespace is not None:
                        self.warn(
                            meta.where_of("namespace"),
                            _join(mpath, "namespace"),
                            "ignored: a clusterwide policy has no namespace (as in Kubernetes)",
                        )
                        namespace = None
                    elif namespace == "":
                        namespace = None
        specs: list[Spec] = []
        if "spec" not in node and "specs" not in node:
            self.err(where, _join(path, "spec"), "missing (give spec or specs)")
        self.namespace = namespace
        try:
            if "spec" in node:
                spec = self.spec(node["spec"], node.where_of("spec"), _join(path, "spec"))
                if spec:
                    specs.append(spec)
            if "specs" in node:
                for item, iwhere, ipath in self.items(node, "specs", path):
                    spec = self.spec(item, iwhere, ipath)
                    if spec:
                        specs.append(spec)
        finally:
            self.namespace = None
        if len(self.problems) > start or name is None:
            return None
        raw = plain({k: v for k, v in node.items() if k != "status"})
        return Document(
            # Kubernetes names are unique per namespace: a namespaced document is `ns/name`
            # (as kubectl writes it), so `default-deny` in every namespace loads.
            name=f"{namespace}/{name}" if namespace is not None else name,
            specs=tuple(specs),
            source=source,
            kind=str(kind),
            namespace=namespace,
            where=str(where),
            description=description,
            raw=raw,
            warnings=tuple(self._warnings),
        )

    def bare_rules(self, node: LList, where: Where, source: str) -> Document | None:
        start = len(self.problems)
        self._warnings = []
        specs: list[Spec] = []
        name: str | None = None
        self.fold = True  # `cilium policy import` JSON: Go's case-insensitive field names
        try:
            parsed = [self.spec(item, node.where_of(i), f"[{i}]") for i, item in enumerate(node)]
        finally:
            self.fold = False
        for spec in parsed:
            if spec:
                specs.append(spec)
                for key, value in spec.labels:
                    if name is None and key in NAME_LABELS:
                        name = value
        if name is None:
            stem = re.sub(r"[^-A-Za-z0-9_.]+", "-", Path(source).stem).strip("-_.")
            name = stem or "imported"
        elif not NAME_RE.match(name):
            self.err(where, "labels.name", f"{name!r} is not a valid policy name")
        if len(self.problems) > start:
            return None
        raw = {
            "apiVersion": API_VERSION,
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name},
            "specs": plain(node),
        }
        return Document(name, tuple(specs), source, where=str(where), raw=raw, warnings=tuple(self._warnings))

    def name(self, value: Any, where: Where, path: str) -> str | None:
        name = self.as_str(value, where, path)
        if name is not None and not NAME_RE.match(name):
            self.err(where, path, f"{name!r} is not a valid name (letters, digits, '-', '_', '.')")
            return None
        return name

    # --- spec and rules ----------------------------------------------------------------------

    def spec(self, value: Any, where: Where, path: str) -> Spec | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        start = len(self.problems)
        sections = ("ingress", "egress", "ingressDeny", "egressDeny")
        node = self.fields(
            node,
            path,
            ("endpointSelector", *sections, "description", "labels", "enableDefaultDeny",
             *(("nodeSelector",) if self.kubernetes else ())),
            {} if self.kubernetes else UNSUPPORTED_SPEC_FIELDS,
        )  # fmt: skip
        selector: EndpointSelector | None = None
        self.subject_init = False
        if "endpointSelector" in node and "nodeSelector" in node and self.kubernetes:
            self.err(node.where_of("nodeSelector"), _join(path, "nodeSelector"),
                     "give endpointSelector or nodeSelector, not both (as in Cilium)")  # fmt: skip
        elif "nodeSelector" in node and self.kubernetes:
            npath = _join(path, "nodeSelector")
            nsel = self.selector(node["nodeSelector"], node.where_of("nodeSelector"), npath)
            if nsel is not None:  # this node (Cilium's host endpoint) when its labels match
                selector = node_selectors(nsel, ("host",))[0]
        elif "endpointSelector" not in node:
            if "nodeSelector" not in node:  # that one has its own, clearer, error
                self.err(
                    node.where, _join(path, "endpointSelector"), "missing (use {} to select every endpoint)"
                )
        else:
            spath = _join(path, "endpointSelector")
            selector = self.selector(node["endpointSelector"], node.where_of("endpointSelector"), spath)
            if selector is not None:
                self.subject_init = any(r.key == "reserved:init" for r in selector.requirements)
                selector = self.scoped(selector, node.where_of("endpointSelector"), spath, subject=True)
        default_deny: tuple[bool | None, bool | None] = (None, None)
        if node.get("enableDefaultDeny") is not None:
            default_deny = self.default_deny(
                node["enableDefaultDeny"],
                node.where_of("enableDefaultDeny"),
                _join(path, "enableDefaultDeny"),
            )
        rules: list[Rule] = []
        for section in sections:
            if section not in node:
                continue
            direction = INGRESS if section.startswith(INGRESS) else EGRESS
            deny = section.endswith("Deny")
            if node[section] is None or node[section] == []:
                # `egress:` or `egress: []`: no rules, so (as in Cilium, which counts rules) this
                # spec does not put the endpoint in default deny; older Cilium docs said it did.
                self.warn(
                    node.where_of(section),
                    _join(path, section),
                    f"no rules: this does not turn on default deny for {direction} "
                    f"(write `{section}: [{{}}]` to deny everything)",
                )
                continue
            for item, iwhere, ipath in self.items(node, section, path):
                rule = self.rule(item, iwhere, ipath, direction, deny)
                if rule:
                    rules.append(rule)
        description = ""
        if "description" in node:
            description = (
                self.as_str(node["description"], node.where_of("description"), _join(path, "description"))
                or ""
            )
        labels: list[tuple[str, str]] = []
        if "labels" in node:
            for item, iwhere, ipath in self.items(node, "labels", path):
                label = self.rule_label(item, iwhere, ipath)
                if label:
                    labels.append(label)
        if len(self.problems) > start or selector is None:
            return None
        return Spec(selector, tuple(rules), description, tuple(labels), path, str(where), default_deny)

    def default_deny(self, value: Any, where: Where, path: str) -> tuple[bool | None, bool | None]:
        """``enableDefaultDeny: {ingress: bool, egress: bool}``; an absent direction is None."""
        node = self.as_map(value, where, path)
        if node is None:
            return None, None
        node = self.fields(node, path, ("ingress", "egress"))
        out: list[bool | None] = []
        for direction in (INGRESS, EGRESS):
            val = node.get(direction)
            if val is not None and not isinstance(val, bool):
                self.err(
                    node.where_of(direction),
                    _join(path, direction),
                    f"must be true or false, not {_typename(val)}",
                )
                val = None
            out.append(val)
        return out[0], out[1]

    def rule_label(self, value: Any, where: Where, path: str) -> tuple[str, str] | None:
        if isinstance(value, str):
            key, _, val = value.partition("=")
            return key.partition(":")[2] if ":" in key else key, val
        node = self.as_map(value, where, path, " (expected {key, value, source})")
        if node is None:
            return None
        node = self.fields(node, path, ("key", "value", "source"))
        if "key" not in node:
            self.err(node.where, _join(path, "key"), "missing")
            return None
        lkey = self.as_str(node["key"], node.where_of("key"), _join(path, "key"))
        lval = self.as_str(node.get("value", ""), node.where_of("value"), _join(path, "value"))
        if "source" in node:
            self.as_str(node["source"], node.where_of("source"), _join(path, "source"))
        if lkey is None or lval is None:
            return None
        return lkey, lval

    def selector(self, value: Any, where: Where, path: str) -> EndpointSelector | None:
        node = self.as_map(value, where, path, " (use {} to select every endpoint)")
        if node is None:
            return None
        start = len(self.problems)
        node = self.fields(node, path, ("matchLabels", "matchExpressions"))
        reqs: list[Requirement] = []
        if "matchLabels" in node and node["matchLabels"] is not None:
            mpath = _join(path, "matchLabels")
            ml = self.as_map(node["matchLabels"], node.where_of("matchLabels"), mpath)
            if ml is not None:
                for key, val in ml.items():
                    kpath = _join(mpath, key)
                    if isinstance(val, bool) or val is None:
                        self.err(
                            ml.where_of(key),
                            kpath,
                            f"label value must be a string, not {_typename(val)}"
                            + (" (quote it)" if isinstance(val, bool) else ""),
                        )
                        continue
                    sval = self.as_str(val, ml.where_of(key), kpath)
                    if self.label_key(key, ml.where_of(key), kpath) and sval is not None:
                        reqs.append(Requirement(key, "In", frozenset([sval])))
        if "matchExpressions" in node and node["matchExpressions"] is not None:
            for item, iwhere, ipath in self.items(node, "matchExpressions", path):
                req = self.requirement(item, iwhere, ipath)
                if req:
                    reqs.append(req)
        if len(self.problems) > start:
            return None
        return EndpointSelector(tuple(reqs))

    def label_key(self, key: str, where: Where, path: str) -> bool:
        if not key or key.startswith(":") or key.endswith(":"):
            self.err(where, path, f"{key!r} is not a label key")
            return False
        return True

    def requirement(self, value: Any, where: Where, path: str) -> Requirement | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        node = self.fields(node, path, ("key", "operator", "values"))
        key = op = None
        if "key" not in node:
            self.err(node.where, _join(path, "key"), "missing")
        else:
            key = self.as_str(node["key"], node.where_of("key"), _join(path, "key"))
            if key is not None and not self.label_key(key, node.where_of("key"), _join(path, "key")):
                key = None
        if "operator" not in node:
            self.err(node.where, _join(path, "operator"), f"missing (one of {', '.join(OPERATORS)})")
        elif node["operator"] not in OPERATORS:
            self.err(
                node.where_of("operator"),
                _join(path, "operator"),
                f"must be one of {', '.join(OPERATORS)}, not {node['operator']!r}",
            )
        else:
            op = str(node["operator"])
        values: list[str] = []
        if "values" in node and node["values"] is not None:
            for item, iwhere, ipath in self.items(node, "values", path):
                sval = self.as_str(item, iwhere, ipath)
                if sval is not None:
                    values.append(sval)
        if op in ("In", "NotIn") and not values:
            self.err(node.where_of("values"), _join(path, "values"), f"{op} needs at least one value")
            return None
        if op in ("Exists", "DoesNotExist") and values:
            self.err(node.where_of("values"), _join(path, "values"), f"{op} takes no values")
            return None
        if key is None or op is None:
            return None
        return Requirement(key, op, frozenset(values))

    def rule(self, value: Any, where: Where, path: str, direction: str, deny: bool) -> Rule | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        start = len(self.problems)
        side = "from" if direction == INGRESS else "to"
        l3_fields: tuple[str, ...] = (f"{side}Endpoints", f"{side}CIDR", f"{side}CIDRSet", f"{side}Entities")
        if self.kubernetes:
            l3_fields = (*l3_fields, f"{side}Nodes", *(("toServices",) if side == "to" else ()))
            unsupported = {k: v for k, v in UNSUPPORTED_RULE_FIELDS.items() if k not in NODE_RULE_FIELDS}
        else:
            unsupported = dict(UNSUPPORTED_RULE_FIELDS)
        node = self.fields(node, path, (*l3_fields, "toPorts"), unsupported)
        given = [f for f in l3_fields if node.get(f)]
        if len(given) > 1:
            self.err(
                where,
                path,
                f"combining {given[0]} and {given[1]} in one rule is not supported "
                "(as in Cilium); write one rule for each",
            )
        # Given as an empty list, an L3 field selects nothing (null is as if absent, as in Go).
        l3 = any(node.get(f) is not None for f in l3_fields)
        endpoints: list[EndpointSelector] = []
        cidrs: list[CIDRRule] = []
        entities: list[str] = []
        if node.get(l3_fields[0]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[0], path):
                sel = self.selector(item, iwhere, ipath)
                if sel is not None:
                    endpoints.append(self.scoped(sel, iwhere, ipath))
        if node.get(l3_fields[1]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[1], path):
                text = self.as_str(item, iwhere, ipath)
                net = self.cidr(text, iwhere, ipath) if text is not None else None
                if net is not None:
                    cidrs.append(CIDRRule(net))
        if node.get(l3_fields[2]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[2], path):
                rule = self.cidr_set(item, iwhere, ipath)
                if rule is not None:
                    cidrs.append(rule)
        if len(l3_fields) > 4 and node.get(l3_fields[4]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[4], path):
                sel = self.selector(item, iwhere, ipath)
                if sel is not None:  # nodes are entities: never namespace-scoped
                    endpoints.extend(node_selectors(sel, ("host", "remote-node")))
        services: list[ServiceSelector] = []
        if len(l3_fields) > 5 and node.get(l3_fields[5]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[5], path):
                svc = self.service(item, iwhere, ipath)
                if svc is not None:
                    services.append(svc)
        if node.get(l3_fields[3]) is not None:
            for item, iwhere, ipath in self.items(node, l3_fields[3], path):
                name = self.as_str(item, iwhere, ipath)
                if name is not None and name not in POLICY_ENTITIES:
                    self.err(iwhere, ipath, f"unknown entity {name!r} (known: {', '.join(POLICY_ENTITIES)})")
                elif name is not None:
                    entities.append(name)
        ports: list[PortRule] = []
        if node.get("toPorts"):
            for item, iwhere, ipath in self.items(node, "toPorts", path):
                pr = self.port_rule(item, iwhere, ipath, deny)
                if pr is not None:
                    ports.append(pr)
        if len(self.problems) > start:
            return None
        return Rule(
            direction,
            deny,
            tuple(endpoints),
            tuple(cidrs),
            tuple(ports),
            path,
            str(where),
            entities=tuple(entities),
            l3=l3,
            services=tuple(services),
        )

    def service(self, value: Any, where: Where, path: str) -> ServiceSelector | None:
        """A ``toServices`` entry: ``k8sService`` (serviceName, namespace) or ``k8sServiceSelector``
        (selector, namespace). The namespace defaults to the document's (any, for a clusterwide one)."""
        node = self.as_map(value, where, path)
        if node is None:
            return None
        node = self.fields(node, path, ("k8sService", "k8sServiceSelector"))
        if len(node) != 1:
            self.err(where, path, "give exactly one of k8sService, k8sServiceSelector")
            return None
        key = next(iter(node))
        kpath = _join(path, key)
        inner = self.as_map(node[key], node.where_of(key), kpath)
        if inner is None:
            return None
        if key == "k8sService":
            inner = self.fields(inner, kpath, ("serviceName", "namespace"))
            if "serviceName" not in inner:
                self.err(inner.where, _join(kpath, "serviceName"), "missing")
                return None
            spath, npath = _join(kpath, "serviceName"), _join(kpath, "namespace")
            name = self.as_str(inner["serviceName"], inner.where_of("serviceName"), spath)
            ns = self.as_str(inner.get("namespace") or "", inner.where_of("namespace"), npath)
            if name is None or ns is None:
                return None
            return ServiceSelector(ns or self.namespace, name=name)
        inner = self.fields(inner, kpath, ("selector", "namespace"))
        if "selector" not in inner:
            self.err(inner.where, _join(kpath, "selector"), "missing")
            return None
        sel = self.selector(inner["selector"], inner.where_of("selector"), _join(kpath, "selector"))
        ns = self.as_str(inner.get("namespace") or "", inner.where_of("namespace"), _join(kpath, "namespace"))
        if sel is None or ns is None:
            return None
        return ServiceSelector(ns or self.namespace, selector=sel)

    def scoped(
        self, sel: EndpointSelector, where: Where, path: str, subject: bool = False
    ) -> EndpointSelector:
        """``sel`` scoped to the document's namespace, as Cilium scopes a namespaced policy.

        A peer selector gets ``k8s:io.kubernetes.pod.namespace=<ns>`` unless it names the pod
        namespace key, a namespace label (``io.cilium.k8s.namespace.labels.*``) or a
        ``reserved:`` key, or the subject selects ``reserved:init`` (initializing pods have
        no labels). The ``endpointSelector`` (``subject``) is always in the document's own
        namespace: a requirement on another namespace is replaced, with a warning.
        """
        ns = self.namespace
        if ns is None:
            return sel
        scope = Requirement(POD_NAMESPACE_KEY, "In", frozenset([ns]))
        if subject:
            kept = tuple(r for r in sel.requirements if split_key(r.key)[1] != POD_NAMESPACE)
            if len(kept) != len(sel.requirements) and any(
                r not in kept and r != scope for r in sel.requirements
            ):
                self.warn(
                    where,
                    path,
                    f"a namespaced policy selects only endpoints of its own namespace ({ns}); "
                    "the endpointSelector's namespace requirement is replaced",
                )
            return EndpointSelector((*kept, scope))
        if self.subject_init or sel.names_reserved:
            return sel
        if sel.names(POD_NAMESPACE) or sel.names(NAMESPACE_LABELS, prefix=True):
            return sel
        return EndpointSelector((*sel.requirements, scope))

    def cidr(self, text: str, where: Where, path: str) -> IPNetwork | None:
        try:
            return parse_cidr(text)
        except ValueError as exc:
            self.err(where, path, str(exc))
            return None

    def cidr_set(self, value: Any, where: Where, path: str) -> CIDRRule | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        node = self.fields(node, path, ("cidr", "except"), UNSUPPORTED_CIDR_SET_FIELDS)
        if "cidr" not in node:
            if not any(k in node for k in UNSUPPORTED_CIDR_SET_FIELDS):
                self.err(node.where, _join(path, "cidr"), "missing")
            return None
        text = self.as_str(node["cidr"], node.where_of("cidr"), _join(path, "cidr"))
        net = self.cidr(text, node.where_of("cidr"), _join(path, "cidr")) if text is not None else None
        excepts: list[IPNetwork] = []
        if "except" in node and node["except"] is not None:
            for item, iwhere, ipath in self.items(node, "except", path):
                etext = self.as_str(item, iwhere, ipath)
                ex = self.cidr(etext, iwhere, ipath) if etext is not None else None
                if ex is None or net is None:
                    continue
                if ex.version != net.version or not ex.subnet_of(net):  # type: ignore[arg-type]
                    self.err(iwhere, ipath, f"{ex} is not inside {net}")
                    continue
                excepts.append(ex)
        if net is None:
            return None
        return CIDRRule(net, tuple(excepts))

    def port_rule(self, value: Any, where: Where, path: str, deny: bool) -> PortRule | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        start = len(self.problems)
        node = self.fields(node, path, ("ports", "rules", "serverNames"), UNSUPPORTED_PORT_RULE_FIELDS)
        ports: list[PortProtocol] = []
        if not node.get("ports"):
            # Cilium accepts a toPorts entry without ports; it names no port, so grants nothing.
            self.warn(
                node.where_of("ports") if "ports" in node else node.where,
                _join(path, "ports"),
                "no ports: this toPorts entry matches no connection (as in Cilium)",
            )
        else:
            for item, iwhere, ipath in self.items(node, "ports", path):
                pp = self.port(item, iwhere, ipath)
                if pp is not None:
                    ports.append(pp)
        l7: L7Rules | None = None
        if "rules" in node and node["rules"] is not None:
            rpath = _join(path, "rules")
            l7 = self.l7_rules(node["rules"], node.where_of("rules"), rpath, ports)
            if l7 is not None and deny:
                self.err(
                    node.where_of("rules"), rpath, "L7 rules are not allowed in deny rules (as in Cilium)"
                )
        names = self.server_names(node, path, deny, l7)
        if len(self.problems) > start:
            return None
        return PortRule(tuple(ports), l7, path, str(where), names)

    def server_names(self, node: LMap, path: str, deny: bool, l7: L7Rules | None) -> ServerNames | None:
        """``toPorts[].serverNames`` (docs/policy.md, "TLS server names"): None when absent or empty."""
        if node.get("serverNames") is None:
            return None
        spath = _join(path, "serverNames")
        at = node.where_of("serverNames")
        patterns: list[str] = []
        for item, iwhere, ipath in self.items(node, "serverNames", path):
            text = self.as_str(item, iwhere, ipath)
            if text is None:
                continue
            try:
                pattern = parse_pattern(text)
            except ValueError as exc:
                self.err(iwhere, ipath, str(exc))
                continue
            if pattern not in patterns:
                patterns.append(pattern)
        if not patterns:
            return None
        if deny:
            self.err(at, spath, "not allowed in deny rules (Cilium's deny port rules have no serverNames)")
        elif l7 is not None:
            self.err(
                at,
                spath,
                "not allowed with L7 rules or l7proto on the same port: that needs TLS termination, "
                "which proxyd does not do (Cilium rejects it too without terminatingTLS)",
            )
        return ServerNames.build(tuple(patterns))

    def port(self, value: Any, where: Where, path: str) -> PortProtocol | None:
        node = self.as_map(value, where, path)
        if node is None:
            return None
        start = len(self.problems)
        node = self.fields(node, path, ("port", "endPort", "protocol"))
        port: int | None = None
        if "port" not in node:
            self.err(node.where, _join(path, "port"), "missing (use 0 for all ports)")
        else:
            if self.kubernetes and isinstance(node["port"], str) and NAMED_PORT_RE.match(node["port"]):
                if "endPort" in node:
                    self.err(node.where_of("endPort"), _join(path, "endPort"), "not with a named port")
                    return None
                proto = str(node.get("protocol") or "ANY").upper()
                if proto not in PROTOCOLS:
                    self.err(node.where_of("protocol"), _join(path, "protocol"),
                             f"must be one of {', '.join(PROTOCOLS)}, not {proto!r}")  # fmt: skip
                    return None
                return PortProtocol(0, 0, proto, name=node["port"])
            port = self.port_number(node["port"], node.where_of("port"), _join(path, "port"))
        end = port
        if "endPort" in node:
            end = self.port_number(node["endPort"], node.where_of("endPort"), _join(path, "endPort"))
            if end is not None and port is not None and (port == 0 or end < port):
                self.err(
                    node.where_of("endPort"),
                    _join(path, "endPort"),
                    f"must be at least port ({port}), and port must not be 0",
                )
        protocol = "ANY"
        if "protocol" in node and node["protocol"] is not None:
            proto = node["protocol"]
            # Cilium parses the protocol upper-cased, and "" as ANY (ParseL4Proto).
            if isinstance(proto, str):
                proto = proto.upper() or "ANY"
            if proto not in PROTOCOLS:
                self.err(
                    node.where_of("protocol"),
                    _join(path, "protocol"),
                    f"must be one of {', '.join(PROTOCOLS)}, not {proto!r}",
                )
            else:
                protocol = str(proto)
                if protocol not in ("TCP", "ANY"):
                    self.warn(
                        node.where_of("protocol"),
                        _join(path, "protocol"),
                        f"{protocol} never matches: proxyd relays TCP only",
                    )
        if len(self.problems) > start or port is None or end is None:
            return None
        return PortProtocol(port, end, protocol)

    def port_number(self, value: Any, where: Where, path: str) -> int | None:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, str):
            why = "not a port name (IANA_SVC_NAME)" if self.kubernetes else NEEDS_KUBERNETES
            self.err(where, path, f"named port {value!r}: {why}; or use the number")
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            self.err(where, path, f"must be a port number 0-65535, not {_typename(value)}")
            return None
        return value

    def l7_rules(self, value: Any, where: Where, path: str, ports: Sequence[PortProtocol]) -> L7Rules | None:
        """``toPorts[].rules``: None for ``{}`` (L4 only), else the rules of one parser.

        Two forms name the parser: ``l7proto: X`` with key-value ``l7`` rules, and Cilium's own
        ``http`` list, which is the rule list of the parser registered as ``http``. Without
        rules (``l7proto: X`` alone, ``l7: []``, ``http: []``) the port is parsed by that
        parser and every request allowed: Cilium's "visibility" idiom.
        """
        node = self.as_map(value, where, path)
        if node is None:
            return None
        start = len(self.problems)
        node = self.fields(node, path, ("l7proto", "l7", HTTP, KAFKA), UNSUPPORTED_L7_FIELDS)
        for own in (HTTP, KAFKA):
            if own in node and node[own] is None:
                del node[own]  # `http: null` is as if absent, as Go reads it (then `rules: {}`)
        if len(self.problems) > start or not node:
            return None
        for own, entry in ((HTTP, self.http_rule), (KAFKA, self.kafka_rule)):
            if own not in node:
                continue
            if len([k for k in ("l7proto", HTTP, KAFKA) if k in node]) > 1 or "l7" in node:
                self.err(
                    node.where_of(own),
                    path,
                    "give one of http, kafka, or l7proto with l7 (as in Cilium: one L7 rule type per port)",
                )
                return None
            return self.rule_list(node, own, own, path, ports, entry)
        proto: str | None = None
        if "l7proto" not in node:
            self.err(node.where, _join(path, "l7proto"), "missing (the parser that enforces the l7 rules)")
        else:
            proto = self.as_str(node["l7proto"], node.where_of("l7proto"), _join(path, "l7proto"))
            if proto == HTTP:
                self.err(
                    node.where_of("l7proto"),
                    _join(path, "l7proto"),
                    "HTTP rules are written as Cilium writes them: `rules: {http: [{method: GET, "
                    "path: /}]}` (`http: [{}]` or `http: []` allows every request)",
                )
                return None
        if proto is None:
            return None
        return self.rule_list(node, "l7", proto, path, ports, self.l7_rule)

    def l7_rule(self, m: LMap, ipath: str) -> dict[str, Any]:
        """One generic ``l7`` entry: Cilium's ``map[string]string``."""
        rule: dict[str, Any] = {}
        for key, val in m.items():
            sval = self.as_str(val, m.where_of(key), _join(ipath, key))
            if sval is not None:
                rule[key] = sval
        return rule

    def http_rule(self, m: LMap, ipath: str) -> dict[str, Any]:
        """One ``http`` entry, as written (the http rule compiler validates the values)."""
        if self.fold:
            self.canon(m, ipath, HTTP_RULE_FIELDS)
            for key in ("headerMatches",):
                if isinstance(m.get(key), LList):
                    for item in m[key]:
                        if isinstance(item, LMap):
                            self.canon(item, _join(ipath, key), HTTP_HEADER_MATCH_FIELDS)
        return {str(k): plain(v) for k, v in m.items()}

    def kafka_rule(self, m: LMap, ipath: str) -> dict[str, Any]:
        """One ``kafka`` entry, as written (the kafka rule compiler checks the values)."""
        if self.fold:
            self.canon(m, ipath, KAFKA_RULE_FIELDS)
        return {str(k): plain(v) for k, v in m.items()}

    def rule_list(
        self,
        node: LMap,
        key: str,
        proto: str,
        path: str,
        ports: Sequence[PortProtocol],
        entry: Any,
    ) -> L7Rules | None:
        start = len(self.problems)
        rules: list[dict[str, Any]] = []
        wheres: list[tuple[LMap, str]] = []
        if node.get(key) is not None:
            hint = " of string keys and values" if key == "l7" else ""
            for item, iwhere, ipath in self.items(node, key, path):
                m = self.as_map(item, iwhere, ipath, hint)
                if m is None:
                    continue
                rules.append(entry(m, ipath))
                wheres.append((m, ipath))
        at = node.where_of(key) if key in (HTTP, KAFKA) else node.where_of("l7proto")
        if not rules and len(self.problems) == start:
            # Visibility: parse with the parser, allow every request (as `[{}]` does).
            rules.append({})
            wheres.append((node, _join(path, key)))
        if len(self.problems) > start:
            return None
        matchers: list[RuleMatcher] | None = None
        if proto in self.registry:
            factory = self.registry.get(proto)
            matchers = []
            for rule, (m, ipath) in zip(rules, wheres, strict=True):
                try:
                    matchers.append(factory.compile_rule(rule))
                except RuleError as exc:
                    bad = exc.key
                    at_key = m.where_of(bad) if bad is not None and bad in m else m.where
                    self.err(at_key, _join(ipath, bad) if bad else ipath, str(exc))
                except Exception as exc:
                    self.err(
                        m.where, ipath, f"l7proto {proto!r} rule compiler failed: {type(exc).__name__}: {exc}"
                    )
        else:
            port_text = ", ".join(str(p) for p in ports)
            what = (
                f"no {key} parser is registered"
                if key in (HTTP, KAFKA)
                else f"unknown l7proto {proto!r} (no parser of that name)"
            )
            self.warn(
                at,
                _join(path, key if key in (HTTP, KAFKA) else "l7proto"),
                f"{what}: port {port_text} denies every request",
            )
        if len(self.problems) > start:
            return None
        return L7Rules(
            proto,
            tuple(rules),
            tuple(matchers) if matchers is not None else None,
            str(at),
            key,
        )

    # --- whole load ----------------------------------------------------------------------------

    def check_names(self, docs: Sequence[Document], taken: Mapping[str, Document] | None = None) -> None:
        seen: dict[str, Document] = dict(taken or {})
        for doc in docs:
            other = seen.get(doc.name)
            if other is not None:
                self.err(
                    doc.where,
                    "metadata.name",
                    f"duplicate policy name {doc.name!r} (also in {other.where or other.source})",
                )
            else:
                seen[doc.name] = doc

    def finish(self) -> None:
        if self.problems:
            raise PolicyError(self.problems)


def node_selectors(sel: EndpointSelector, entities: Sequence[str]) -> list[EndpointSelector]:
    """A node selector (``fromNodes``, ``nodeSelector``) as endpoint selectors, one per entity.

    Node addresses carry their node's labels with source ``node:`` and the entity ``host`` or
    ``remote-node`` (docs/kubernetes.md); a key without a source, or with ``k8s:``, means the
    node label of that name.
    """
    reqs = []
    for r in sel.requirements:
        source, name = split_key(r.key)
        key = r.key if source == RESERVED_SOURCE else f"{NODE_SOURCE}:{name}"
        reqs.append(Requirement(key, r.operator, r.values))
    return [EndpointSelector((*reqs, Requirement(f"{RESERVED_SOURCE}:{e}", "Exists"))) for e in entities]


def policy_files(path: Path) -> list[Path]:
    """The files a policy path stands for: itself, or a directory's policy files, sorted."""
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
    return [path]


def load_paths(
    paths: Sequence[Path],
    registry: ParserLookup,
    *,
    taken: Mapping[str, Document] | None = None,
    kubernetes: bool = False,
) -> list[Document]:
    """Load every document of ``paths`` (files, or directories of ``*.yaml|*.yml|*.json``).

    ``taken`` holds documents from elsewhere (imported ones) whose names may not be reused.
    Raises :class:`PolicyError` with every problem of every file; nothing is partially loaded.
    ``kubernetes``: a cluster source is on, so node selectors are enforceable.
    """
    loader = _Loader(registry, kubernetes)
    docs: list[Document] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            loader.err(str(path), "", "no such file or directory (listed in policy.paths)")
            continue
        for file in policy_files(path):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                loader.err(f"{file}:0", "", f"cannot read: {exc}")
                continue
            docs.extend(loader.parse_source(text, str(file)))
    loader.check_names(docs, taken)
    loader.finish()
    return docs


def parse_text(
    text: str,
    source: str,
    registry: ParserLookup,
    *,
    taken: Mapping[str, Document] | None = None,
    kubernetes: bool = False,
) -> list[Document]:
    """Parse documents given as text (YAML, or JSON: CNP objects or a bare rule list).

    ``source`` names the text in messages (``source:line: path: problem``). Raises
    :class:`PolicyError` with every problem found.
    """
    loader = _Loader(registry, kubernetes)
    docs = loader.parse_source(text, source)
    loader.check_names(docs, taken)
    loader.finish()
    return docs


def warnings(docs: Iterable[Document]) -> list[str]:
    """Every warning of ``docs`` (unknown ``l7proto``, UDP/SCTP ports), for ``proxyd check``."""
    return [w for doc in docs for w in doc.warnings]


def selector_key_warnings(
    docs: Iterable[Document], identities: Iterable[tuple[str, Mapping[str, str]]]
) -> list[str]:
    """Selector keys (``In`` / ``Exists``) that no ``identities`` entry carries, for ``proxyd check``.

    Such a requirement can never hold, so its selector matches nothing: typically Cilium's
    namespace label (``k8s:io.kubernetes.pod.namespace``, also added to every selector of a
    namespaced document) on a config whose identities do not give it.
    """
    carried = [LabelSet(labels) for _, labels in identities]
    out: list[str] = []
    for doc in docs:
        seen: set[str] = set()
        for spec in doc.specs:
            places: list[tuple[str, str, EndpointSelector]] = [
                (spec.where, f"{spec.path}.endpointSelector", spec.endpoint_selector)
            ]
            places += [(r.where, r.path, sel) for r in spec.rules for sel in r.endpoints]
            for where, path, sel in places:
                for req in sel.requirements:
                    source, name = split_key(req.key)
                    if source == RESERVED_SOURCE or req.operator not in ("In", "Exists") or req.key in seen:
                        continue
                    if any(ls.values(source, name) for ls in carried):
                        continue
                    seen.add(req.key)
                    why = ""
                    if req.key == POD_NAMESPACE_KEY and doc.namespace is not None:
                        why = f" (every selector of a document in namespace {doc.namespace} requires it)"
                    out.append(
                        f"{where}: {path}: selector key {req.key!r}{why}: no identities entry carries "
                        "it, so this selector matches nothing"
                    )
    return out
