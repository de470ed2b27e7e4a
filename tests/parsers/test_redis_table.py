"""The stored command table against the redis-server CI starts, and the parser's reading of
requests against the server's own (inline quoting, key positions)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from redis_fixture import start_redis

from proxyd.parsers.redis.resp import parse_request
from proxyd.parsers.redis.table import COMMANDS, REDIS_VERSION, key_positions, load_raw, lookup, normalize

redis = pytest.importorskip("redis")


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with start_redis() as port:
        yield port


def test_table_is_the_servers(server: int) -> None:
    r = redis.Redis(port=server, decode_responses=True, protocol=2)
    r.response_callbacks.pop("COMMAND", None)
    try:
        live = normalize(r.execute_command("COMMAND", "INFO"), r.execute_command("COMMAND", "DOCS"))
        version = r.info("server")["redis_version"]
    finally:
        r.close()
    stored = load_raw()
    assert version == REDIS_VERSION, "regenerate with tools/gen_redis_commands.py"
    # compare through JSON, as stored (tuples and lists alike)
    assert json.loads(json.dumps(live)) == stored["commands"]


def _getkeys(r: object, args: list[bytes]) -> list[bytes] | None:
    try:
        return list(r.execute_command("COMMAND", "GETKEYS", *args))  # type: ignore[attr-defined]
    except redis.ResponseError:
        return None


KEY_CASES = [
    [b"GET", b"k"],
    [b"SET", b"k", b"v", b"EX", b"10"],
    [b"MSET", b"a", b"1", b"b", b"2", b"c", b"3"],
    [b"DEL", b"a", b"b", b"c"],
    [b"XREAD", b"COUNT", b"2", b"STREAMS", b"s1", b"s2", b"0", b"0"],
    [b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"s1", b">"],
    [b"EVAL", b"return 1", b"2", b"k1", b"k2", b"a1"],
    [b"EVALSHA", b"abc", b"1", b"k1"],
    [b"FCALL", b"f", b"2", b"k1", b"k2"],
    [b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"],
    [b"ZINTERCARD", b"2", b"a", b"b", b"LIMIT", b"1"],
    [b"LMPOP", b"2", b"a", b"b", b"LEFT"],
    [b"BLMPOP", b"0", b"2", b"a", b"b", b"LEFT"],
    [b"GEORADIUS", b"g", b"0", b"0", b"1", b"km", b"STORE", b"d"],
    [b"SORT", b"k", b"LIMIT", b"0", b"1", b"STORE", b"d"],
    [b"SORT", b"k", b"ALPHA", b"STORE", b"d", b"STORE", b"e"],
    [b"MIGRATE", b"h", b"1", b"", b"0", b"1", b"COPY", b"AUTH", b"pw", b"KEYS", b"a", b"b"],
    [b"MIGRATE", b"h", b"1", b"k", b"0", b"1"],
    [b"OBJECT", b"ENCODING", b"k"],
    [b"XINFO", b"STREAM", b"s"],
    [b"MEMORY", b"USAGE", b"k"],
    [b"BITOP", b"AND", b"d", b"a", b"b"],
    [b"RENAME", b"a", b"b"],
    [b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"],
    [b"WATCH", b"a", b"b"],
]


@pytest.mark.parametrize("args", KEY_CASES, ids=lambda a: b" ".join(a[:2]).decode())
def test_key_positions_agree_with_command_getkeys(server: int, args: list[bytes]) -> None:
    r = redis.Redis(port=server, protocol=2)
    r.response_callbacks.pop("COMMAND", None)
    try:
        expect = _getkeys(r, args)
    finally:
        r.close()
    _, cmd = lookup(args[0], args[1] if len(args) > 1 else None)
    assert cmd is not None
    positions = key_positions(cmd, len(args), lambda i: args[i])
    assert positions is not None
    assert [args[p] for p in positions] == expect


INLINE = [
    b'ECHO "a b"',
    b'ECHO "\\x41\\x4a\\x4Z"',
    b"ECHO 'it\\'s'",
    b'ECHO "tab\\there" ',
    b"ECHO a\x0bb",
    b"ECHO \x0b\x0cx",
    b'ECHO a"b c"',
    b"ECHO '\\n'",
    b'ECHO "\\\\"',
    b"ECHO \xff\xfe",
]


@pytest.mark.parametrize("line", INLINE)
def test_inline_commands_split_as_the_server_splits(server: int, line: bytes) -> None:
    head = parse_request(bytearray(line + b"\r\n"), 0, 1 << 20)
    assert head is not None and head.inline
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        s.sendall(line + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
            if reply.startswith(b"-"):
                break
    if len(head.args) == 2:
        assert reply == b"$%d\r\n%s\r\n" % (len(head.args[1]), head.args[1])
    else:
        assert reply.startswith(b"-ERR wrong number of arguments")


def test_every_command_has_categories_and_known_key_specs() -> None:
    for cmd in COMMANDS.values():
        for c in (cmd, *cmd.subcommands.values()):
            assert c.categories or c.subcommands, c.name
