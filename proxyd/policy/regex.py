"""RE2 regular expressions for policy rules: Cilium's syntax, linear-time matching.

Cilium compiles rule regexes with Go's ``regexp`` package, which is RE2: no backreferences, no
lookaround, and matching in time linear in the input. Rule regexes here are matched against
attacker-controlled bytes (keys, paths, table names), so a backtracking engine such as Python's
``re`` would let a client spin the event loop with a crafted key against a pattern like
``(a+)+$``. proxyd therefore compiles every rule regex with google-re2 (Google's own binding of
the C++ library Go's engine was modelled on), and a pattern RE2 rejects is a load error.

Matching is on text (``str``) or on wire bytes (``bytes``), which are read as Go reads a string:
UTF-8, each byte that is not part of a valid sequence standing for one U+FFFD (so ``^.$``
matches the one-byte key ``b"\xff"``, as in Cilium). Two entry points, because the parsers use
both of Cilium's forms:

- :meth:`RuleRegex.search` (unanchored, as memcache's ``keyRegex`` and r2d2's ``file``);
- :meth:`RuleRegex.fullmatch` (the whole value, as HTTP's ``method``/``path``/``host``, which
  Envoy matches as a full regex).
"""

from __future__ import annotations

import codecs
from typing import Any, Final

import re2

from proxyd.errors import RuleError

_GO_RUNES: Final = "proxyd.go-runes"


def _one_rune_error_per_byte(exc: UnicodeError) -> tuple[str, int]:
    # Go's utf8.DecodeRune: an invalid sequence decodes as (RuneError, width 1), byte by byte.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error(_GO_RUNES, _one_rune_error_per_byte)


def _subject(text: str | bytes) -> str | bytes:
    if isinstance(text, bytes) and not text.isascii():
        return text.decode("utf-8", _GO_RUNES)
    return text


_OPTIONS: Final[Any] = re2.Options()
_OPTIONS.log_errors = False  # errors are raised and reported at the rule's line, not on stderr
# The default RE2 memory budget (8 MiB) keeps a hostile pattern in a policy from taking more.


# The wrapper's search() builds a generator, offset maps and a Match object per call (most of a
# memcache request's policy cost, bench/README.md); a yes/no answer needs only the compiled
# RE2 object's Match() on the UTF-8 bytes the wrapper would pass it. Public because the
# flattened-policy interface (proxyd.policy.flat) hands them to the compiled twins.
#: The anchor of :meth:`RuleRegex.search`.
UNANCHORED: Final[Any] = re2._Anchor.UNANCHORED
#: The anchor of :meth:`RuleRegex.fullmatch`.
ANCHOR_BOTH: Final[Any] = re2._Anchor.ANCHOR_BOTH


def _utf8(subject: str | bytes) -> bytes:
    return subject.encode("utf-8") if isinstance(subject, str) else subject


#: Bound on each regex's remembered answers (the table is emptied when full) and on the length
#: of a subject worth remembering, so a client sending fresh keys cannot grow it without bound.
MEMO_SIZE: Final = 4096
MEMO_VALUE: Final = 256


class RuleRegex:
    """A compiled RE2 pattern and its source text (for explain and logs).

    Recent answers are remembered per subject: methods, hosts, paths and hot keys repeat, and
    RE2 through its Python binding costs microseconds a call where a dict lookup costs
    nanoseconds. The memo is per compiled rule, so it lives exactly as long as the policy
    revision that holds it.
    """

    __slots__ = ("_compiled", "_full", "_search", "pattern", "re2_match")

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._compiled = compiled
        #: RE2's compiled ``Match``: ``(anchor, utf-8 bytes, pos, endpos) -> spans``, where
        #: ``spans[0][0] == -1`` means no match (what search and fullmatch ask of it).
        self.re2_match = compiled._regexp.Match
        self._search: dict[str | bytes, bool] = {}
        self._full: dict[str | bytes, bool] = {}

    def _answer(self, memo: dict[str | bytes, bool], anchor: Any, text: str | bytes) -> bool:
        hit = memo.get(text)
        if hit is not None:
            return hit
        b = _utf8(_subject(text))
        start: int = self.re2_match(anchor, b, 0, len(b))[0][0]
        hit = start != -1
        if len(text) <= MEMO_VALUE:
            if len(memo) >= MEMO_SIZE:
                memo.clear()
            memo[text] = hit
        return hit

    def search(self, text: str | bytes) -> bool:
        """True when the pattern matches anywhere in ``text``."""
        return self._answer(self._search, UNANCHORED, text)

    def fullmatch(self, text: str | bytes) -> bool:
        """True when the pattern matches the whole of ``text``."""
        return self._answer(self._full, ANCHOR_BOTH, text)

    def __repr__(self) -> str:
        return f"RuleRegex({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuleRegex) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def compile_rule_regex(pattern: object, key: str) -> RuleRegex:
    """Compile ``pattern`` with RE2 for the rule key ``key``.

    Raises :class:`RuleError` naming ``key`` when the value is not a string or RE2 rejects it
    (backreferences, lookaround and other non-RE2 syntax included).
    """
    if not isinstance(pattern, str):
        raise RuleError(f"must be a string (an RE2 regular expression), not {pattern!r}", key)
    try:
        compiled = re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise RuleError(f"bad regular expression {pattern!r} (RE2 syntax): {detail}", key) from exc
    return RuleRegex(pattern, compiled)


__all__ = ["ANCHOR_BOTH", "UNANCHORED", "RuleRegex", "compile_rule_regex"]
