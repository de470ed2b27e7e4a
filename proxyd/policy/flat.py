"""The flattened-policy interface: what a compiled parser may read of a connection's policy.

A native parser (``proxyd/_native_src/policy.c``) evaluates a connection's ``l7`` rules in C
instead of calling ``ctx.matches`` (five Python frames a request). It reads them from one
object, :class:`FlatPolicy`, which this module builds from the connection's
:class:`~proxyd.policy.engine.ConnectionPolicy` once per policy revision (not per request) and
which the connection's policy hands out through its public ``flat()`` method
(:meth:`proxyd.policy.store.LiveConnectionPolicy.flat`). Everything in it is plain data in
documented positions: tuples, sets, bytes, and callables for what only Python can answer. A
twin reads nothing else of the policy package by name; of the context it reads the public slots
``policy`` and ``last_decision`` (docs/native.md lists it all).

:func:`evaluate` is the reference of what a twin does with a :class:`FlatPolicy`; the policy
tests hold it equal to :meth:`ConnectionPolicy.decide` (tests/policy/test_policy_flat.py), and
the equivalence tests hold the C evaluator equal to the Python parser.

Changing a field, a form or their meaning means a new :data:`VERSION`, here and in
``native.h``'s ``FLAT_POLICY_VERSION``; the compiled module refuses a version it was not built
for. A parser calls :func:`hand_over` once, so it imports this interface and the parser API,
not the context or the policy internals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from proxyd.context import ALLOWED, Context, L7Decision
from proxyd.parser import ALLOW_ALL, RuleMatcher
from proxyd.policy.regex import ANCHOR_BOTH, UNANCHORED, RuleRegex

#: The interface version docs/native.md describes; the C side checks it (FLAT_POLICY_VERSION).
VERSION: Final = 2

# --- condition forms: (field, form, operand) ------------------------------------------------

#: ``operand`` is a set: the value is one of its members.
IN: Final = "in"
#: ``operand`` is bytes or str: the value equals it.
EXACT: Final = "exact"
#: ``operand`` is bytes or str: the value starts with it.
PREFIX: Final = "prefix"
#: ``operand`` is a :class:`Regex`: RE2 finds the pattern in the value (or matches all of it).
REGEX: Final = "regex"
#: ``operand`` is a callable taking the parser's whole request object; ``field`` is None. The
#: form for a matcher without flat conditions: a twin calls it as Python.
CALL: Final = "call"
#: ``field`` and ``operand`` are None: a rule only the full Python path may decide (an http
#: rule with ``headerMatches``, whose mismatch actions rewrite the request the parser forwards).
#: Once evaluation reaches such a rule (no earlier rule held), the twin asks ``ctx.matches``.
DEFER: Final = "defer"


class Deferred(Exception):
    """Raised by :func:`evaluate` on reaching a :data:`DEFER` condition: ``ctx.matches`` decides."""


class Regex(NamedTuple):
    """An RE2 test on a value, in a form a twin can run without the Python wrapper.

    ``test(value)`` is the reference answer (:meth:`RuleRegex.search` or ``fullmatch``).
    ``match(anchor, utf8, pos, endpos)`` is RE2's compiled ``Match`` and ``anchor`` the anchor
    ``test`` uses: a twin may call it on the value's UTF-8 bytes (wire bytes read as Go reads a
    string, each byte outside a valid sequence standing for U+FFFD) and take ``spans[0][0] !=
    -1`` as the answer, which is ``test``'s by construction (regex.py does exactly that).
    """

    test: Callable[[str | bytes], bool]
    match: Any
    anchor: Any


def search(rx: RuleRegex) -> Regex:
    """The :data:`REGEX` operand for ``rx`` searched anywhere in the value."""
    return Regex(rx.search, rx.re2_match, UNANCHORED)


def fullmatch(rx: RuleRegex) -> Regex:
    """The :data:`REGEX` operand for ``rx`` matched against the whole value."""
    return Regex(rx.fullmatch, rx.re2_match, ANCHOR_BOTH)


#: One condition of a rule. A condition holds when the request has at least one value for
#: ``field`` and every value passes (a memcache request's ``key`` field has one value per key,
#: and none when a key could not be decoded); which fields exist is the protocol's to say
#: (docs/native.md). A rule's conditions are ANDed; no conditions: the rule matches everything.
Condition = tuple[str | None, str, Any]


class FlatDecision(NamedTuple):
    """A decision and whether the request goes on (``allowed or audit``, as Context.matches)."""

    decision: L7Decision
    forwards: bool


class FlatRule(NamedTuple):
    """One ``(matcher, decision)`` of the connection's policy, as conditions."""

    conditions: tuple[Condition, ...]
    then: FlatDecision


class FlatPolicy(NamedTuple):
    """A connection's ``l7`` policy for one revision, flattened; fields in this order (C reads
    them by position).

    ``stamp`` is the revision it was built for, compared by identity; ``current`` is the
    store's revision cell, a one-item list whose item is the revision in force (shared by every
    connection of the store, replaced when a revision is committed): while ``current[0] is
    stamp`` the flat copy holds, else the twin asks the policy's ``flat()`` again.
    ``always`` is set when every request gets the same answer (allow-all or deny-all);
    otherwise the first of ``rules`` whose conditions hold decides, and ``otherwise`` when none.
    """

    stamp: object
    current: list[object]
    always: FlatDecision | None
    rules: tuple[FlatRule, ...]
    otherwise: FlatDecision


def flat_decision(decision: L7Decision) -> FlatDecision:
    """``decision`` with its forwarding answer precomputed."""
    return FlatDecision(decision, decision.allowed or decision.audit)


def conditions(matcher: RuleMatcher) -> tuple[Condition, ...]:
    """The conditions of one matcher: its own ``flat()`` when it has one, else one call."""
    if matcher is ALLOW_ALL:
        return ()
    own = getattr(matcher, "flat", None)
    if own is not None:
        return tuple(own())
    return ((None, CALL, matcher.matches),)


def build(policy: Any, stamp: object, current: list[object]) -> FlatPolicy:
    """Flatten ``policy`` (a :class:`~proxyd.policy.engine.ConnectionPolicy`) for ``stamp``."""
    always = policy.always
    return FlatPolicy(
        stamp,
        current,
        None if always is None else flat_decision(always),
        tuple(FlatRule(conditions(m), flat_decision(d)) for m, d in policy.matchers),
        flat_decision(policy.denied),
    )


# --- the reference evaluator ----------------------------------------------------------------


def _passes(form: str, operand: Any, value: Any) -> bool:
    if form == IN:
        return bool(value in operand)
    if form == EXACT:
        return bool(value == operand)
    if form == PREFIX:
        return bool(value.startswith(operand))
    if form == REGEX:
        return bool(operand.test(value))
    raise ValueError(f"unknown condition form {form!r}")


def holds(conds: tuple[Condition, ...], request: Any, values: Callable[[str], Sequence[Any]]) -> bool:
    """Whether every condition holds for ``request``; ``values(field)`` gives a field's values."""
    for field, form, operand in conds:
        if form == DEFER:
            raise Deferred
        if form == CALL:
            if not operand(request):
                return False
            continue
        assert field is not None
        vals = values(field)
        if not vals:
            return False
        for value in vals:
            if not _passes(form, operand, value):
                return False
    return True


def evaluate(flat: FlatPolicy, request: Any, values: Callable[[str], Sequence[Any]]) -> FlatDecision:
    """What a twin decides for ``request`` under ``flat``: the reference of policy.c.

    Raises :class:`Deferred` where the twin hands the request to ``ctx.matches`` instead.
    """
    if flat.always is not None:
        return flat.always
    for rule in flat.rules:
        if holds(rule.conditions, request, values):
            return rule.then
    return flat.otherwise


# --- handing the interface to the compiled module -------------------------------------------


def hand_over(native: Any) -> None:
    """Give the compiled module ``native`` what it checks a connection's objects against."""
    native.setup_policy(
        version=VERSION,
        # only a real Context is flattened: its ``policy`` and ``last_decision`` slots are read
        Context=Context,
        # the allowed, non-audit decision: such a request is counted, not logged
        ALLOWED=ALLOWED,
    )


__all__ = [
    "CALL",
    "DEFER",
    "EXACT",
    "IN",
    "PREFIX",
    "REGEX",
    "VERSION",
    "Condition",
    "Deferred",
    "FlatDecision",
    "FlatPolicy",
    "FlatRule",
    "Regex",
    "build",
    "conditions",
    "evaluate",
    "fullmatch",
    "hand_over",
    "holds",
    "search",
]
