"""Rule compilation for l7proto memcache: accepted shapes, matching, rejects."""

from __future__ import annotations

import pytest

from proxyd.errors import RuleError
from proxyd.parser import ALLOW_ALL
from proxyd.parsers.memcache import MemcacheFactory, MemcacheRequest

F = MemcacheFactory()


def req(command: str, *keys: bytes, key_error: bool = False) -> MemcacheRequest:
    return MemcacheRequest(command, tuple(keys), key_error)


MATCH_CASES = [
    ({}, req("set", b"x"), True),
    ({}, req("stats"), True),
    ({"command": "get"}, req("get", b"x"), True),
    ({"command": "get"}, req("gets", b"x"), True),
    ({"command": "get"}, req("gat", b"x"), False),
    ({"command": "get"}, req("mg", b"x"), False),
    ({"command": "gat"}, req("gats", b"x"), True),
    ({"command": "storage"}, req("cas", b"x"), True),
    ({"command": "storage"}, req("incr", b"x"), True),
    ({"command": "storage"}, req("delete", b"x"), False),
    ({"command": "writeGroup"}, req("delete", b"x"), True),
    ({"command": "writeGroup"}, req("touch", b"x"), True),
    ({"command": "writeGroup"}, req("get", b"x"), False),
    ({"command": "writeGroup"}, req("ms", b"x"), False),
    ({"command": "meta"}, req("mn"), True),
    ({"command": "meta", "keyPrefix": "a"}, req("mn"), False),
    ({"command": "meta", "keyPrefix": "a"}, req("ms", b"ab"), True),
    ({"command": "mg"}, req("mg", b"x"), True),
    ({"command": "ms"}, req("mg", b"x"), False),
    ({"command": "stats"}, req("stats"), True),
    ({"command": "flush_all"}, req("flush_all"), True),
    ({"command": "noop"}, req("noop"), True),
    ({"command": "get", "keyExact": "k"}, req("get", b"k"), True),
    ({"command": "get", "keyExact": "k"}, req("get", b"k2"), False),
    ({"command": "get", "keyExact": "k"}, req("get", b"k", b"k"), True),
    ({"command": "get", "keyExact": "k"}, req("get", b"k", b"j"), False),
    ({"command": "get", "keyPrefix": "alliance/fleet/"}, req("get", b"alliance/fleet/x"), True),
    ({"command": "get", "keyPrefix": "alliance/fleet/"}, req("get", b"alliance/fleetx"), False),
    ({"command": "get", "keyRegex": "^a+$"}, req("get", b"aaa"), True),
    ({"command": "get", "keyRegex": "^a+$"}, req("get", b"aab"), False),
    ({"command": "get", "keyRegex": "b"}, req("get", b"aab"), True),
    ({"command": "get", "keyPrefix": "a", "keyRegex": "z$"}, req("get", b"abz"), True),
    ({"command": "get", "keyPrefix": "a", "keyRegex": "z$"}, req("get", b"bbz"), False),
    ({"command": "get", "keyPrefix": "é"}, req("get", "é/x".encode()), True),
    ({"command": "get", "keyRegex": "^é.$"}, req("get", "éx".encode()), True),
    ({"command": "get", "keyRegex": "^.$"}, req("get", b"\xff"), True),
    ({"command": "get", "keyPrefix": "a"}, req("get", b"abc", key_error=True), False),
    ({"command": "get"}, req("get", b"abc", key_error=True), True),
    ({"command": "get", "keyPrefix": "a"}, req("get"), False),
    ({"command": "get"}, "not a request", False),
]


@pytest.mark.parametrize(("rule", "parsed", "expected"), MATCH_CASES)
def test_rule_matches(rule: dict[str, str], parsed: object, expected: bool) -> None:
    assert F.compile_rule(rule).matches(parsed) is expected


def test_empty_rule_allows_all() -> None:
    assert F.compile_rule({}) is ALLOW_ALL


REJECTS = [
    ({"cmd": "get"}, "cmd"),
    ({"command": "GET"}, "command"),
    ({"command": "nosuch"}, "command"),
    ({"command": ""}, "command"),
    ({"keyExact": "a"}, "keyExact"),
    ({"keyPrefix": "a"}, "keyPrefix"),
    ({"keyRegex": "a"}, "keyRegex"),
    ({"command": "get", "keyRegex": "("}, "keyRegex"),
    ({"command": "get", "keyExact": ""}, "keyExact"),
    ({"command": "stats", "keyPrefix": "a"}, "keyPrefix"),
    ({"command": "flush_all", "keyExact": "a"}, "keyExact"),
    ({"command": "version", "keyRegex": "a"}, "keyRegex"),
    ({"command": "get", "keyExact": "\udcff"}, "keyExact"),
    ({"command": 5}, "command"),
]


@pytest.mark.parametrize(("rule", "key"), REJECTS)
def test_rule_rejects(rule: dict[str, str], key: str) -> None:
    with pytest.raises(RuleError) as info:
        F.compile_rule(rule)
    assert info.value.key == key
    assert str(info.value)


def test_rule_keys_declared() -> None:
    assert F.rule_keys == ("command", "keyExact", "keyPrefix", "keyRegex")
    assert F.name == "memcache"
