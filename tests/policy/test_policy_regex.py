"""RE2 rule regexes: syntax RE2 rejects is a rule error; matching is linear on hostile input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxyd.errors import RuleError
from proxyd.parsers.cassandra.rules import CassandraRequest
from proxyd.parsers.cassandra.rules import compile_rule as cassandra_rule
from proxyd.parsers.memcache.rules import MemcacheRequest
from proxyd.parsers.memcache.rules import compile_rule as memcache_rule
from proxyd.parsers.r2d2 import R2d2Factory, R2d2Request
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


# --- the parsers' rule regexes are RE2 ------------------------------------------------------------

EVIL = "^(a+)+$"


@pytest.mark.parametrize(
    ("compile_", "rule", "key"),
    [
        (R2d2Factory().compile_rule, {"file": r"(a)\1"}, "file"),
        (memcache_rule, {"command": "get", "keyRegex": "(?=x)"}, "keyRegex"),
        (cassandra_rule, {"query_table": r"(?<!a)b"}, "query_table"),
    ],
)
def test_parsers_reject_non_re2_patterns_at_their_key(
    compile_: Callable[[dict[str, str]], Any], rule: dict[str, str], key: str
) -> None:
    with pytest.raises(RuleError, match="RE2") as info:
        compile_(rule)
    assert info.value.key == key


def test_parsers_match_hostile_input_in_linear_time() -> None:
    hostile = "a" * 50_000 + "!"
    assert not R2d2Factory().compile_rule({"file": EVIL}).matches(R2d2Request("READ", hostile))
    mc = memcache_rule({"command": "get", "keyRegex": EVIL})
    assert not mc.matches(MemcacheRequest("get", (hostile.encode(),)))
    assert mc.matches(MemcacheRequest("get", (b"aaaa",)))
    cql = cassandra_rule({"query_table": EVIL})
    assert not cql.matches(CassandraRequest("select", hostile))


def test_wire_bytes_match_as_go_reads_them() -> None:
    # Go reads each invalid UTF-8 byte as one U+FFFD: "^.$" matches b"\xff", "^..$" matches
    # a truncated two-byte sequence, and valid UTF-8 is characters.
    assert compile_rule_regex("^.$", "k").search(b"\xff")
    assert compile_rule_regex("^..$", "k").search(b"\xe2\x82")
    assert compile_rule_regex("^.$", "k").search("é".encode())
    assert compile_rule_regex("^caf\u00e9$", "k").fullmatch("café".encode())
    assert not compile_rule_regex("^a$", "k").search(b"a\xff")


def test_answers_are_remembered_within_bounds() -> None:
    from proxyd.policy import regex

    rx = compile_rule_regex("^k[0-9]+$", "keyRegex")
    for i in range(regex.MEMO_SIZE + 10):
        assert rx.search(f"k{i}") and rx.search(f"k{i}".encode())
    assert not rx.search("k1x") and not rx.search("k1x")  # a remembered "no" stays "no"
    assert not rx.search("x" * (regex.MEMO_VALUE + 1))  # too long to remember: still answered
    assert len(rx._search) <= regex.MEMO_SIZE  # cleared when full, never grows past the bound
    assert all(len(k) <= regex.MEMO_VALUE for k in rx._search)
    assert rx.fullmatch("k12") and not rx.fullmatch("xk12")
