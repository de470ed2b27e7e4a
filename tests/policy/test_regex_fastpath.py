"""RuleRegex's yes/no fast path (the compiled RE2 object's Match, bench/README.md) answers as
google-re2's search and fullmatch do, on text and on wire bytes read as Go reads them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.policy.regex import _subject, compile_rule_regex

PATTERNS = ["^a/[0-9]+$", "(?s)^.{8}[A-Za-z0-9.-]{8}", "x|^$", "\u00e9+", "^.$", "", "(?i)GET|put", "\ufffd"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATTERNS), st.one_of(st.binary(max_size=24), st.text(max_size=12)))
def test_fast_match_agrees_with_the_wrapper(pattern: str, subject: str | bytes) -> None:
    rx = compile_rule_regex(pattern, "keyRegex")
    s = _subject(subject)
    assert rx.search(subject) == (rx._compiled.search(s) is not None)
    assert rx.fullmatch(subject) == (rx._compiled.fullmatch(s) is not None)
