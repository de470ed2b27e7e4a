"""RE2 rule regexes: syntax RE2 rejects is a rule error; matching is linear on hostile input."""

from __future__ import annotations

import pytest

from proxyd.errors import RuleError
from proxyd.policy.regex import compile_rule_regex


def test_search_and_fullmatch() -> None:
    rx = compile_rule_regex("fleet/[a-z]+", "keyRegex")
    assert rx.search("alliance/fleet/xwing")
    assert not rx.fullmatch("alliance/fleet/xwing")
    assert compile_rule_regex("alliance/fleet/[a-z]+", "path").fullmatch("alliance/fleet/xwing")
    assert not rx.search("alliance/FLEET/x")
    assert compile_rule_regex("(?i)fleet", "k").search("FLEET")


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a)\1",  # backreference
        r"(?<=a)b",  # lookbehind
        r"a(?=b)",  # lookahead
        "(unclosed",
        "[z-a]",
    ],
)
def test_non_re2_syntax_is_a_rule_error(pattern: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule_regex(pattern, "keyRegex")
    assert info.value.key == "keyRegex"
    assert "RE2" in str(info.value)


def test_non_string_is_a_rule_error() -> None:
    with pytest.raises(RuleError, match="must be a string"):
        compile_rule_regex(5, "file")


def test_catastrophic_pattern_is_linear() -> None:
    # With Python's re this takes longer than the age of the universe; RE2 answers at once.
    rx = compile_rule_regex("^(a+)+$", "keyRegex")
    assert not rx.search("a" * 100_000 + "!")
