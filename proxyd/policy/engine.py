"""Enforcement: from the loaded documents to a verdict per connection and per request.

Theory of operation (docs/policy.md, Cilium's semantics, failing closed):

1. A spec *selects* the local endpoint in a direction when its ``endpointSelector`` matches the
   local labels and it has at least one rule (allow or deny) in that direction (Cilium's
   ``len(Ingress) + len(IngressDeny) > 0``; ``enableDefaultDeny`` alone enforces nothing). No
   selecting spec: everything is allowed. Otherwise that direction is default-deny, unless
   every selecting spec turns it off (``enableDefaultDeny: {ingress: false}``): then what no
   rule matches is allowed, and only the deny rules and the ``l7`` rules of matching allow
   rules restrict.
2. A rule *matches* a connection when its L3 part matches the remote (endpoint selectors over
   endpoints' labels, CIDRs over world addresses, entities; see :mod:`proxyd.policy.model`;
   no L3 part: any remote, provided the rule has ``toPorts``; an empty list: no remote) and
   one of its ``toPorts`` entries names the destination port over TCP (no ``toPorts``: every
   port). Rules of every document are OR'ed.
3. A matching deny rule (``ingressDeny`` / ``egressDeny``) denies the connection, whatever allows
   it. Otherwise, in default deny, the connection needs a matching allow rule.
4. L7, per matching allow rule on that port: a rule without ``l7`` rules allows every request
   (Cilium merges an L4-only rule into the L7 rules of the same port as a wildcard for the
   remotes it selects, so that remote is not restricted by other rules' ``l7`` lists). A rule
   whose ``l7proto`` is the listener's contributes its compiled ``l7`` rules; a request is
   allowed when any of them matches (``l7: [{}]`` allows all). A rule whose ``l7proto`` differs
   from the listener's, or that no parser is registered for, lets the connection in but grants
   no request: the port is deny-all at L7. On a plain L4 listener (no ``l7proto``) proxyd cannot
   parse what such a rule restricts, so a rule with ``l7`` rules grants nothing there: unless an
   L4-only rule also matches, the connection is denied at accept (Cilium would redirect it to a
   proxy; proxyd has none for that listener).

Every rule can only add what it grants, so adding an allow rule to a selected direction never
denies what was allowed, and adding a deny rule never allows what was denied (tested as
properties in ``tests/policy``).

A :class:`PolicySet` is immutable and built once per policy revision. Per connection it
computes a :class:`ConnectionPolicy` (the specs selecting the local labels are cached); the
per-request :meth:`ConnectionPolicy.decide` is then a loop over precompiled matchers.

Built incrementally: each document's compiled part (its specs by direction, its compiled
``l7`` matchers) is kept per :class:`Document` object, and a set built with ``previous=`` reuses
the parts of every document it shares with the previous set, so a change to one document of
10,000 compiles one (``compiled`` counts them). Which specs select an endpoint is found through
an index by ``(label name, value)`` of each selector's ``In`` requirements, so a new local label
set costs a look at the few candidate specs, not a match against every spec.
In audit mode a denial is reported as ``audit`` and let through (docs/configuration.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from proxyd.context import ALLOWED, L7Decision
from proxyd.errors import PolicyError, RuleError
from proxyd.parser import RuleMatcher
from proxyd.policy.identity import parse_ip
from proxyd.policy.loader import ParserLookup
from proxyd.policy.model import DIRECTIONS, INGRESS, Document, L7Rules, PortRule, Rule, Spec
from proxyd.policy.selector import LabelSet, split_key

#: Bound on the cache of "which specs select these local labels" per PolicySet.
SELECT_CACHE_SIZE: Final = 4096


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    """The policy as it applies to one connection: its L3/L4 verdict and its L7 check.

    ``l4_allowed`` is False when the connection must be closed at accept; in audit mode it is
    True and ``audit_l4`` says it would have been denied. ``policy_name`` names the document
    that decided (None when no policy applies or by default deny). :meth:`decide` is the
    :class:`proxyd.context.L7Policy` of the connection.
    """

    l4_allowed: bool
    l4_reason: str
    policy_name: str | None = None
    audit_l4: bool = False
    #: When set, the answer to every request (allow-all, or deny-all).
    always: L7Decision | None = ALLOWED
    #: Otherwise: (matcher, decision when it matches), in policy order.
    matchers: tuple[tuple[RuleMatcher, L7Decision], ...] = ()
    #: And the answer when none matches.
    denied: L7Decision = field(default=L7Decision(False))
    #: A ``serverNames`` rule matches this remote and port (and no deny rule does): the
    #: verdict depends on the TLS ClientHello's SNI, which must be read before connecting.
    reads_hello: bool = False

    def decide(self, request: Any) -> L7Decision:
        """Whether the policy allows ``request``; exceptions of a matcher propagate."""
        always = self.always
        if always is not None:
            return always
        for matcher, decision in self.matchers:
            if matcher.matches(request):
                return decision
        return self.denied


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule (and the ``toPorts`` entry that matched the port, if any) with its document."""

    document: Document
    spec: Spec
    rule: Rule
    port_rule: PortRule | None = None

    @property
    def name(self) -> str:
        return self.document.name

    @property
    def path(self) -> str:
        return self.port_rule.path if self.port_rule is not None else self.rule.path

    @property
    def where(self) -> str:
        return self.port_rule.where if self.port_rule is not None else self.rule.where

    def __str__(self) -> str:
        return f"{self.name} {self.path} ({self.where})"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Everything the engine found for one connection (what ``explain`` prints)."""

    direction: str
    port: int
    l7proto: str | None
    selecting: tuple[tuple[Document, Spec], ...]
    deny: tuple[RuleRef, ...] = ()
    allow_l4: tuple[RuleRef, ...] = ()
    #: Matching rules whose l7 rules are in force, with their compiled matchers.
    allow_l7: tuple[tuple[RuleRef, tuple[RuleMatcher, ...]], ...] = ()
    #: Matching allow rules that grant the connection but no request (other/unknown l7proto).
    deny_all_l7: tuple[tuple[RuleRef, str], ...] = ()
    #: Matching allow rules that grant nothing on this listener, and why.
    ignored: tuple[tuple[RuleRef, str], ...] = ()
    #: Rules of the selecting specs that do not match, and why (only when traced).
    not_matching: tuple[tuple[RuleRef, str], ...] = ()
    policy: ConnectionPolicy = field(default=ConnectionPolicy(True, ""))
    #: Matching (remote and port) allow rules with ``serverNames``, whatever the SNI.
    sni_rules: tuple[RuleRef, ...] = ()
    #: The SNI the evaluation was made for (None: none, or no ClientHello).
    sni: str | None = None


_SpecEntry = tuple[Document, Spec, tuple[Rule, ...]]


_Pairs = tuple[tuple[str, str], ...] | None


def _index_pairs(spec: Spec) -> _Pairs:
    """The (label name, value) pairs under which a spec is indexed: those of its selector's
    first ``In`` requirement (a label set it selects has one of them); None: no such
    requirement, the spec is checked against every label set."""
    for req in spec.endpoint_selector.requirements:
        if req.operator == "In":
            name = split_key(req.key)[1]
            return tuple((name, value) for value in req.values)
    return None


@dataclass(frozen=True, slots=True)
class _Compiled:
    """One document, compiled: its selecting specs per direction (with their index pairs)
    and its ``l7`` matchers."""

    document: Document
    entries: Mapping[str, tuple[tuple[_SpecEntry, _Pairs], ...]]
    matchers: Mapping[int, tuple[RuleMatcher, ...] | None]


_Item = tuple[int, _SpecEntry]  # (the spec's number in its document, the entry)


class _SelectorIndex:
    """Which specs of one direction may select a label set: by (name, value) of an ``In``
    requirement, plus the specs without one (checked every time).

    Copied on write: a set built from a previous one shares the index lists no change touched
    (a change to one document of 10,000 copies a few lists, not the index)."""

    __slots__ = ("_owned", "by_pair", "scan")

    def __init__(self, by_pair: dict[tuple[str, str], list[_Item]] | None = None,
                 scan: list[_Item] | None = None) -> None:  # fmt: skip
        self.by_pair: dict[tuple[str, str], list[_Item]] = {} if by_pair is None else by_pair
        self.scan: list[_Item] = [] if scan is None else scan
        #: The pairs whose lists this index made (the others are shared with the index it was
        #: copied from, and copied before a change); _ALL: every list is its own.
        self._owned: set[tuple[str, str]] = _ALL if by_pair is None else set()

    def copy(self) -> _SelectorIndex:
        return _SelectorIndex(dict(self.by_pair), list(self.scan))

    def _own(self, pair: tuple[str, str]) -> list[_Item] | None:
        found = self.by_pair.get(pair)
        if found is not None and self._owned is not _ALL and pair not in self._owned:
            found = self.by_pair[pair] = list(found)
            self._owned.add(pair)
        return found

    def add(self, entries: tuple[tuple[_SpecEntry, _Pairs], ...]) -> None:
        for n, (entry, pairs) in enumerate(entries):
            item = (n, entry)
            if pairs is None:
                self.scan.append(item)
                continue
            for pair in pairs:
                found = self._own(pair)
                if found is None:
                    self.by_pair[pair] = [item]
                    if self._owned is not _ALL:
                        self._owned.add(pair)
                else:
                    found.append(item)

    def remove(self, entries: tuple[tuple[_SpecEntry, _Pairs], ...]) -> None:
        gone = {id(entry) for entry, _ in entries}
        pairs_touched = {pair for _, pairs in entries if pairs is not None for pair in pairs}
        if any(pairs is None for _, pairs in entries):
            self.scan = [item for item in self.scan if id(item[1]) not in gone]
        for pair in pairs_touched:
            found = self._own(pair)
            if found is not None:
                found[:] = [item for item in found if id(item[1]) not in gone]
                if not found:
                    del self.by_pair[pair]

    def candidates(self, labels: Mapping[str, str]) -> list[_Item]:
        found = {id(item[1]): item for item in self.scan}
        for key, value in labels.items():
            hit = self.by_pair.get((split_key(str(key))[1], str(value)))
            if hit:
                for item in hit:
                    found[id(item[1])] = item
        return list(found.values())


_ALL: set[tuple[str, str]] = set()  # marker: every list of this index is its own


class PolicySet:
    """All documents in force, compiled for enforcement. Immutable; one per revision."""

    __slots__ = ("_cache", "_compiled", "_conn_cache", "_index", "_matchers", "_order", "compiled",
                 "documents", "flat_cache", "revision")  # fmt: skip

    def __init__(
        self,
        documents: Sequence[Document],
        registry: ParserLookup | None = None,
        revision: int = 0,
        previous: PolicySet | None = None,
    ) -> None:
        """Compile ``documents``; ``registry`` decides which ``l7proto`` names are known.

        With ``previous``, a document object that set holds is not compiled again (``compiled``
        counts the documents that were). Raises :class:`PolicyError` when a rule left
        uncompiled at load (its parser was not registered then) fails to compile with
        ``registry``.
        """
        self.documents: tuple[Document, ...] = tuple(documents)
        self.revision = revision
        #: Flattened connection policies of this revision (proxyd.policy.store), by the id of
        #: the ConnectionPolicy they flatten (kept beside it): built once, not per connection.
        self.flat_cache: dict[int, tuple[ConnectionPolicy, Any]] = {}
        self.compiled = 0
        #: Each document's place, for policy order among the specs the index finds.
        self._order = {id(doc): i for i, doc in enumerate(self.documents)}
        problems: list[str] = []
        reuse = previous._compiled if previous is not None else {}
        added = [
            doc for doc in self.documents if (part := reuse.get(id(doc))) is None or part.document is not doc
        ]
        gone = [part for key, part in reuse.items() if key not in self._order]
        todo: Sequence[Document] = self.documents
        self._compiled: dict[int, _Compiled]
        self._matchers: dict[int, tuple[RuleMatcher, ...] | None]
        self._index: dict[str, _SelectorIndex]
        if previous is not None and len(added) + len(gone) <= len(self.documents) // 2:
            # Most documents are the previous set's: start from its tables, copied on write.
            self._compiled = dict(previous._compiled)
            self._matchers = dict(previous._matchers)
            self._index = {d: index.copy() for d, index in previous._index.items()}
            for part in gone:
                del self._compiled[id(part.document)]
                for key in part.matchers:
                    del self._matchers[key]
                for direction, entries in part.entries.items():
                    if entries:
                        self._index[direction].remove(entries)
            todo = added
        else:
            self._compiled = {}
            self._matchers = {}
            self._index = {d: _SelectorIndex() for d in DIRECTIONS}
        for doc in todo:
            part = reuse.get(id(doc))
            if part is None or part.document is not doc:
                part = self._compile_document(doc, registry, problems)
                self.compiled += 1
            self._compiled[id(doc)] = part
            if part.matchers:
                self._matchers.update(part.matchers)
            for direction, entries in part.entries.items():
                if entries:
                    self._index[direction].add(entries)
        if problems:
            raise PolicyError(problems)
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[_SpecEntry, ...]] = {}
        #: connection_policy() by its arguments: a set is immutable, and under connection churn
        #: the same client asks the same question for every connection (bench/README.md).
        self._conn_cache: dict[tuple[Any, ...], ConnectionPolicy] = {}

    @classmethod
    def _compile_document(
        cls, doc: Document, registry: ParserLookup | None, problems: list[str]
    ) -> _Compiled:
        entries: dict[str, list[tuple[_SpecEntry, _Pairs]]] = {d: [] for d in DIRECTIONS}
        matchers: dict[int, tuple[RuleMatcher, ...] | None] = {}
        for spec in doc.specs:
            pairs = _index_pairs(spec)
            for direction in DIRECTIONS:
                if spec.selects_direction(direction):
                    rules = tuple(r for r in spec.rules if r.direction == direction)
                    entries[direction].append(((doc, spec, rules), pairs))
            for rule in spec.rules:
                for pr in rule.to_ports:
                    if pr.l7 is not None:
                        matchers[id(pr.l7)] = cls._compile(pr.l7, pr, registry, problems)
        return _Compiled(doc, {d: tuple(v) for d, v in entries.items()}, matchers)

    @staticmethod
    def _compile(
        l7: L7Rules, pr: PortRule, registry: ParserLookup | None, problems: list[str]
    ) -> tuple[RuleMatcher, ...] | None:
        if registry is None:
            return l7.matchers
        if l7.l7proto not in registry:
            return None  # unknown l7proto: deny-all
        if l7.matchers is not None:
            return l7.matchers
        factory = registry.get(l7.l7proto)
        out: list[RuleMatcher] = []
        for i, rule in enumerate(l7.rules):
            try:
                out.append(factory.compile_rule(rule))
            except RuleError as exc:
                key = f".{exc.key}" if exc.key else ""
                problems.append(f"{pr.where}: {pr.path}.rules.{l7.key}[{i}]{key}: {exc}")
        return tuple(out)

    # --- lookups --------------------------------------------------------------------------------

    def selecting(self, direction: str, local_labels: Mapping[str, str]) -> tuple[_SpecEntry, ...]:
        """The (document, spec, rules of that direction) whose selector matches the local labels."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be ingress or egress, not {direction!r}")
        key = (direction, tuple(sorted((str(k), str(v)) for k, v in local_labels.items())))
        found = self._cache.get(key)
        if found is None:
            labels = LabelSet(local_labels)
            order = self._order
            items = sorted(
                self._index[direction].candidates(local_labels), key=lambda it: (order[id(it[1][0])], it[0])
            )
            found = tuple(entry for _, entry in items if entry[1].endpoint_selector.matches(labels))
            if len(self._cache) >= SELECT_CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = found
        return found

    def connection_policy(
        self,
        direction: str,
        local_labels: Mapping[str, str],
        remote_ip: str,
        remote_labels: Mapping[str, str],
        port: int,
        l7proto: str | None,
        audit: bool = False,
        sni: str | None = None,
    ) -> ConnectionPolicy:
        """The verdicts for one connection (see the module docstring for the semantics).

        ``sni`` is the server name of the connection's TLS ClientHello (None: no SNI, no
        ClientHello, or not read yet). Raises ValueError for a bad direction or remote address.
        """
        local, remote = tuple(sorted(local_labels.items())), tuple(sorted(remote_labels.items()))
        key = (direction, local, remote_ip, remote, port, l7proto, audit, sni)
        found = self._conn_cache.get(key)
        if found is None:
            ev = self.evaluate(
                direction, local_labels, remote_ip, remote_labels, port, l7proto, audit, sni=sni
            )
            found = ev.policy
            if len(self._conn_cache) >= SELECT_CACHE_SIZE:
                self._conn_cache.clear()
            self._conn_cache[key] = found
        return found

    def evaluate(
        self,
        direction: str,
        local_labels: Mapping[str, str],
        remote_ip: str,
        remote_labels: Mapping[str, str],
        port: int,
        l7proto: str | None,
        audit: bool = False,
        *,
        trace: bool = False,
        sni: str | None = None,
    ) -> Evaluation:
        """Like :meth:`connection_policy`, with what matched and why (``trace``: also what did not)."""
        specs = self.selecting(direction, local_labels)
        if not specs:
            policy = ConnectionPolicy(True, f"no policy selects the local endpoint for {direction}")
            return Evaluation(direction, port, l7proto, (), policy=policy)
        addr = parse_ip(remote_ip)
        remote = LabelSet.remote(remote_labels, addr.version == 6)
        deny: list[RuleRef] = []
        allow_l4: list[RuleRef] = []
        allow_l7: list[tuple[RuleRef, tuple[RuleMatcher, ...]]] = []
        deny_all: list[tuple[RuleRef, str]] = []
        ignored: list[tuple[RuleRef, str]] = []
        not_matching: list[tuple[RuleRef, str]] = []
        sni_rules: list[RuleRef] = []
        for doc, spec, rules in specs:
            for rule in rules:
                if not rule.matches_remote(addr, remote):
                    if trace:
                        not_matching.append((RuleRef(doc, spec, rule), "remote does not match"))
                    continue
                if not rule.to_ports:
                    (deny if rule.deny else allow_l4).append(RuleRef(doc, spec, rule))
                    continue
                for pr in rule.to_ports:
                    ref = RuleRef(doc, spec, rule, pr)
                    if not pr.matches(port, local_labels if direction == INGRESS else remote_labels):
                        if trace:
                            ports = ", ".join(str(p) for p in pr.ports)
                            not_matching.append((ref, f"port {port}/TCP is not in {ports}"))
                        continue
                    l7 = pr.l7
                    if rule.deny:
                        deny.append(ref)
                    elif pr.server_names is not None:
                        # Cilium: the port rule matches only connections whose SNI it allows.
                        sni_rules.append(ref)
                        if pr.server_names.matches(sni):
                            allow_l4.append(ref)
                        elif trace:
                            what = f"SNI {sni!r} is not" if sni else "no SNI: the connection's name must be"
                            not_matching.append((ref, f"{what} in serverNames {pr.server_names}"))
                    elif l7 is None:
                        allow_l4.append(ref)
                    elif l7proto is None:
                        ignored.append(
                            (ref, f"has l7proto {l7.l7proto} rules, which a plain L4 listener cannot enforce")
                        )
                    elif l7.l7proto != l7proto:
                        deny_all.append((ref, f"l7proto {l7.l7proto} is not the listener's ({l7proto})"))
                    else:
                        matchers = self._matchers.get(id(l7))
                        if matchers is None:
                            deny_all.append((ref, f"unknown l7proto {l7.l7proto}: no parser of that name"))
                        else:
                            allow_l7.append((ref, matchers))
        policy = _decide(direction, port, l7proto, audit, specs, deny, allow_l4, allow_l7, deny_all, ignored)
        if sni_rules and not deny:
            policy = replace(policy, reads_hello=True)
        return Evaluation(
            direction,
            port,
            l7proto,
            tuple((d, s) for d, s, _ in specs),
            tuple(deny),
            tuple(allow_l4),
            tuple(allow_l7),
            tuple(deny_all),
            tuple(ignored),
            tuple(not_matching),
            policy,
            tuple(sni_rules),
            sni,
        )


def _decide(
    direction: str,
    port: int,
    l7proto: str | None,
    audit: bool,
    specs: tuple[_SpecEntry, ...],
    deny: list[RuleRef],
    allow_l4: list[RuleRef],
    allow_l7: list[tuple[RuleRef, tuple[RuleMatcher, ...]]],
    deny_all: list[tuple[RuleRef, str]],
    ignored: list[tuple[RuleRef, str]],
) -> ConnectionPolicy:
    if deny:
        return _l4_denied(f"denied by {deny[0]} (deny rules win)", deny[0].name, audit)
    if allow_l4:
        first = allow_l4[0]
        return ConnectionPolicy(True, f"allowed by {first}", first.name, always=L7Decision(True, first.name))
    if l7proto is not None and (allow_l7 or deny_all):
        first = allow_l7[0][0] if allow_l7 else deny_all[0][0]
        denied = L7Decision(False, first.name, audit)
        matchers = tuple((m, L7Decision(True, ref.name)) for ref, ms in allow_l7 for m in ms)
        if allow_l7:
            reason = f"allowed by {first}; {l7proto} requests need a matching l7 rule"
        else:
            reason = f"allowed by {first}, but every request is denied: {deny_all[0][1]}"
        return ConnectionPolicy(
            True, reason, first.name, always=None if matchers else denied, matchers=matchers, denied=denied
        )
    if ignored:
        ref, why = ignored[0]
        return _l4_denied(f"denied: {ref} {why} (fail closed)", ref.name, audit)
    names = ", ".join(dict.fromkeys(d.name for d, _, _ in specs))
    if not any(spec.default_deny(direction) for _, spec, _ in specs):
        return ConnectionPolicy(
            True,
            f"no rule matches, and {names} turn(s) default deny off for {direction} (enableDefaultDeny)",
        )
    return _l4_denied(
        f"default deny: {names} select(s) the local endpoint for {direction} and no rule allows "
        f"this remote on port {port}/TCP",
        None,
        audit,
    )


def _l4_denied(reason: str, name: str | None, audit: bool) -> ConnectionPolicy:
    decision = L7Decision(False, name, audit)
    return ConnectionPolicy(audit, reason, name, audit, always=decision, denied=decision)
