"""redis ``l7`` rules: compilation errors and matching."""

from __future__ import annotations

import pytest

from proxyd.errors import RuleError
from proxyd.parser import ALLOW_ALL
from proxyd.parsers.redis.rules import RedisRequest, compile_rule
from proxyd.parsers.redis.table import COMMANDS


def req(name: str, key: bytes | None = None) -> RedisRequest:
    base = name.split("|")[0]
    cmd = COMMANDS.get(base)
    if cmd is not None and "|" in name:
        cmd = cmd.subcommands[name.split("|")[1]]
    cats = cmd.categories if cmd is not None else frozenset()
    return RedisRequest(name, base, cats, cmd is not None, key)


def test_empty_rule_allows_everything() -> None:
    assert compile_rule({}) is ALLOW_ALL


@pytest.mark.parametrize(
    ("rule", "request_", "allowed"),
    [
        ({"command": "get"}, req("get", b"x"), True),
        ({"command": "GET"}, req("get", b"x"), True),
        ({"command": "get"}, req("set", b"x"), False),
        ({"command": "config"}, req("config|set"), True),
        ({"command": "config|get"}, req("config|get"), True),
        ({"command": "config|get"}, req("config|set"), False),
        ({"command": "@read"}, req("get", b"x"), True),
        ({"command": "@read"}, req("set", b"x"), False),
        ({"command": "@dangerous"}, req("flushall"), True),
        ({"command": "@admin"}, req("config|set"), True),
        ({"command": "@all"}, req("nosuchcommand"), True),
        ({"command": "get", "keyPrefix": "a:"}, req("get", b"a:1"), True),
        ({"command": "get", "keyPrefix": "a:"}, req("get", b"b:1"), False),
        ({"command": "get", "keyPrefix": "a:"}, req("get", None), False),
        ({"command": "get", "keyExact": "a"}, req("get", b"a"), True),
        ({"command": "get", "keyExact": "a"}, req("get", b"ab"), False),
        ({"command": "get", "keyRegex": "^a[0-9]+$"}, req("get", b"a12"), True),
        ({"command": "get", "keyRegex": "[0-9]"}, req("get", b"xx1xx"), True),
        ({"command": "get", "keyRegex": "^a[0-9]+$"}, req("get", b"a1b"), False),
        ({"command": "get", "keyPrefix": "a", "keyRegex": "z$"}, req("get", b"abz"), True),
        ({"command": "get", "keyPrefix": "a", "keyRegex": "z$"}, req("get", b"abc"), False),
        # as Go reads bytes: each byte of a truncated UTF-8 sequence is one U+FFFD, like memcache's
        ({"command": "get", "keyRegex": "^k\ufffd{2}$"}, req("get", b"k\xe2\x82"), True),
        ({"command": "get", "keyRegex": "^k.$"}, req("get", b"k\xe2\x82"), False),
        ({"keyPrefix": "a:"}, req("del", b"a:1"), True),
        ({"keyPrefix": "a:"}, req("dbsize"), False),
        ({"keyPrefix": "a:"}, req("nosuchcommand"), False),
        ({"command": "get", "keyRegex": "^\\xff"}, req("get", b"\xff"), False),
    ],
)
def test_matching(rule: dict[str, str], request_: RedisRequest, allowed: bool) -> None:
    assert compile_rule(rule).matches(request_) is allowed


@pytest.mark.parametrize(
    ("rule", "key", "message"),
    [
        ({"cmd": "get"}, "cmd", "unknown rule key"),
        ({"command": "nosuch"}, "command", "unknown redis command"),
        ({"command": "config|nosuch"}, "command", "unknown subcommand"),
        ({"command": "@nosuch"}, "command", "unknown ACL category"),
        ({"command": ""}, "command", "must not be empty"),
        ({"command": "ping", "keyPrefix": "a"}, "keyPrefix", "takes no key"),
        ({"command": "get", "keyRegex": "(a)\\1"}, "keyRegex", "RE2"),
        ({"command": "get", "keyExact": 3}, "keyExact", "must be a string"),
    ],
)
def test_rule_errors(rule: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(RuleError) as ei:
        compile_rule(rule)  # type: ignore[arg-type]
    assert message in str(ei.value) and ei.value.key == key
