"""The reply framing checked against a real memcached (Debian package).

A fixture starts ``memcached`` on a free loopback port. Each test sends raw request bytes over a
plain socket (a sentinel request at the end tells when every reply is in), records the server's
real replies, and feeds requests and replies through the Harness: every reply must be framed
(no error, every byte forwarded, no request left pending). A second set of tests runs the
Harness as the proxy in front of the server, with a policy, so the server sees only what the
parser forwards (barriers included) and the client stream is checked as a whole.

Skips when memcached is missing, unless PROXYD_REQUIRE_BINARIES=1 (then it fails).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from proxyd.parsers.memcache import MemcacheFactory
from proxyd.parsers.memcache.text import DENIED_REPLY
from proxyd.testing import Harness

_PKT = struct.Struct(">BBHBBHIIQ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def memcached() -> Iterator[int]:
    binary = shutil.which("memcached")
    if binary is None and os.path.exists("/usr/bin/memcached"):
        binary = "/usr/bin/memcached"
    if binary is None:
        if os.environ.get("PROXYD_REQUIRE_BINARIES", "") not in ("", "0"):
            pytest.fail("memcached not installed (required: PROXYD_REQUIRE_BINARIES=1)")
        pytest.skip("memcached not installed")
    port = _free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [binary, *user, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1", "-m", "64"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memcached did not start: {proc.stderr.read()!r}") from None  # type: ignore[union-attr]
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def exchange(port: int, payload: bytes, sentinel_reply: bytes) -> bytes:
    """Send ``payload`` on a fresh connection; read until the replies end with the sentinel's."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        out = bytearray()
        while not out.endswith(sentinel_reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return bytes(out)


TEXT_SENTINEL = (b"mn\r\n", b"MN\r\n")
BIN_SENTINEL_REQ = _PKT.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 0x5EA, 0)
BIN_SENTINEL_RESP = _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0x5EA, 0)


def assert_framed(requests: bytes, replies: bytes) -> None:
    for split in (None, "bytes", "random"):
        h = Harness(MemcacheFactory())
        h.feed(requests, split=split)
        h.feed(replies, reply=True, split=split)
        assert h.error is None, (split, h.error)
        assert h.to_server == requests
        assert h.to_client == replies
        assert not h.engine.parser.pending()  # type: ignore[union-attr]


TEXT_REQUESTS = (
    b"set a 0 0 3\r\nabc\r\nget a b\r\ngets a\r\ngat 100 a\r\ngats 100 a b\r\nbget a\r\n"
    b"add a 0 0 1\r\nx\r\nreplace a 0 0 1\r\ny\r\nappend a 0 0 1\r\nz\r\nprepend a 0 0 1\r\nw\r\n"
    b"cas a 0 0 1 1\r\nq\r\ncas zz 0 0 1 1\r\nq\r\nincr n 1\r\nset n 0 0 1\r\n5\r\nincr n 3\r\ndecr n 1\r\n"
    b"incr a 1\r\ntouch a 10\r\ntouch zz 10\r\ndelete b\r\ndelete a\r\nget a\r\n"
    b"set k 0 0 1 noreply\r\nx\r\ndelete zz noreply\r\nincr zz 1 noreply\r\nset k 0 0 1\r\nxyz\r\n"
    b"set " + b"x" * 251 + b" 0 0 1\r\nversion\r\n"
    b"stats\r\nstats settings\r\nstats items\r\nstats slabs\r\nstats sizes\r\nstats conns\r\n"
    b"stats detail on\r\nstats detail dump\r\nstats detail off\r\nstats cachedump 1 1\r\nstats bogus\r\n"
    b"stats reset\r\nversion\r\nverbosity 0\r\nverbosity 0 noreply\r\nfoo bar\r\n\r\nGET a\r\n"
    b"lru_crawler metadump all\r\nlru_crawler crawl all\r\nlru_crawler bogus\r\ncache_memlimit 64\r\n"
    b"slabs automove 1\r\nslabs reassign 1 2\r\nlru mode flat\r\nshutdown\r\nmisbehave\r\n"
    b"get " + b" ".join(b"key%d" % i for i in range(300)) + b"\r\nflush_all 0\r\nflush_all noreply\r\n"
)

META_REQUESTS = (
    b"ms m 3 T0 F7\r\nabc\r\nmg m v s t f k c Oop1\r\nmg m\r\nmg m v q O1\r\nmg nokey v q O2\r\n"
    b"mg nokey v\r\n"
    b"ms m 1 q O3\r\nx\r\nms m 1 q MR O4\r\nx\r\nms nokey 1 q MR O5\r\nx\r\nms m 1 q C1 O6\r\nx\r\n"
    b"ms m 1 !\r\nx\r\nmd nokey q O7\r\nmd m q O8\r\nmd m O9\r\nma cnt N0 J5 v\r\nma cnt q O10\r\n"
    b"ma cnt MD v\r\nma nokey\r\nma nokey q O11\r\nmg m q k O12\r\nmg m q v q\r\n"
    b"me cnt\r\nme nokey\r\nms Zm9v 2 b\r\nhi\r\nmg Zm9v b v k\r\nmg Zm9v= b v\r\nmx\r\nmg\r\n"
)


def test_text_replies_framed(memcached: int) -> None:
    requests = TEXT_REQUESTS + TEXT_SENTINEL[0]
    replies = exchange(memcached, requests, TEXT_SENTINEL[1])
    assert replies.endswith(b"MN\r\n")
    assert b"VALUE a 0 3\r\nabc\r\n" in replies
    assert_framed(requests, replies)


def test_meta_replies_framed(memcached: int) -> None:
    requests = META_REQUESTS + TEXT_SENTINEL[0]
    replies = exchange(memcached, requests, TEXT_SENTINEL[1])
    assert b"VA 3 s3" in replies
    assert_framed(requests, replies)


def breq(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    body = extras + key + value
    return _PKT.pack(0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


SET_X = struct.pack(">II", 0, 0)
INCR_X = struct.pack(">QQI", 1, 5, 0)
TTL = struct.pack(">I", 100)

BINARY_REQUESTS = b"".join(
    [
        breq(0x01, b"a", SET_X, b"abc", 1), breq(0x00, b"a", opaque=2), breq(0x00, b"zz", opaque=3),
        breq(0x0C, b"a", opaque=4), breq(0x09, b"zz", opaque=5), breq(0x09, b"a", opaque=6),
        breq(0x0D, b"a", opaque=7), breq(0x0D, b"zz", opaque=8), breq(0x02, b"a", SET_X, b"x", 9),
        breq(0x12, b"a", SET_X, b"x", 10), breq(0x03, b"zz", SET_X, b"x", 11),
        breq(0x13, b"zz", SET_X, b"x", 12), breq(0x11, b"b", SET_X, b"y", 13),
        breq(0x0E, b"a", value=b"z", opaque=14), breq(0x19, b"a", value=b"z", opaque=15),
        breq(0x0F, b"a", value=b"z", opaque=16), breq(0x1A, b"zz", value=b"z", opaque=17),
        breq(0x05, b"n", INCR_X, opaque=18), breq(0x15, b"n", INCR_X, opaque=19),
        breq(0x06, b"n", INCR_X, opaque=20), breq(0x16, b"a", INCR_X, opaque=21),
        breq(0x1C, b"a", TTL, opaque=22), breq(0x1D, b"a", TTL, opaque=23), breq(0x1E, b"zz", TTL, opaque=24),
        breq(0x1E, b"a", TTL, opaque=25), breq(0x23, b"a", TTL, opaque=26), breq(0x24, b"a", TTL, opaque=27),
        breq(0x04, b"b", opaque=28), breq(0x14, b"zz", opaque=29), breq(0x0B, opaque=30),
        breq(0x10, opaque=31), breq(0x10, b"settings", opaque=32), breq(0x10, b"bogus", opaque=33),
        breq(0x0A, opaque=35), breq(0x08, opaque=38),
        breq(0x18, opaque=39), breq(0x00, b"a", opaque=40),
    ]
)  # fmt: skip


def test_binary_replies_framed(memcached: int) -> None:
    requests = BINARY_REQUESTS + BIN_SENTINEL_REQ
    replies = exchange(memcached, requests, BIN_SENTINEL_RESP)
    assert replies.endswith(BIN_SENTINEL_RESP)
    assert_framed(requests, replies)


def through_proxy(
    port: int, rules: list[dict[str, str]], requests: bytes, sentinel: tuple[bytes, bytes]
) -> Harness:
    """Run the Harness as the proxy: the server only sees what the parser forwarded."""
    h = Harness(MemcacheFactory(), rules=rules)
    h.feed(requests + sentinel[0], split="random")
    replies = exchange(port, h.to_server, sentinel[1])
    h.feed(replies, reply=True, split="random")
    assert h.error is None
    assert not h.engine.parser.pending()  # type: ignore[union-attr]
    return h


FLEET = [
    {"command": "get", "keyPrefix": "alliance/fleet/"},
    {"command": "writeGroup", "keyPrefix": "alliance/fleet/"},
    {"command": "meta", "keyPrefix": "alliance/fleet/"},
    {"command": "mn"},
    {"command": "noop"},
]


def test_text_policy_through_real_server(memcached: int) -> None:
    requests = (
        b"set alliance/fleet/x 0 0 2\r\nok\r\nset deathstar/plans 0 0 6\r\nsecret\r\n"
        b"set alliance/fleet/y 0 0 1 noreply\r\n1\r\nget deathstar/plans\r\n"
        b"get alliance/fleet/x alliance/fleet/y\r\nflush_all\r\ndelete deathstar/plans noreply\r\n"
        b"mg alliance/fleet/x v q\r\nmg deathstar/plans v q\r\nmg alliance/fleet/nope v q\r\n"
        b"ms deathstar/plans 1 q\r\nx\r\nmg alliance/fleet/y v\r\n"
    )
    h = through_proxy(memcached, FLEET, requests, TEXT_SENTINEL)
    assert b"deathstar" not in h.to_server
    assert h.to_client == (
        b"STORED\r\n" + DENIED_REPLY + DENIED_REPLY
        + b"VALUE alliance/fleet/x 0 2\r\nok\r\nVALUE alliance/fleet/y 0 1\r\n1\r\nEND\r\n" + DENIED_REPLY
        + b"VA 2\r\nok\r\n" + DENIED_REPLY + DENIED_REPLY + b"VA 1\r\n1\r\nMN\r\n"
    )


def test_binary_policy_through_real_server(memcached: int) -> None:
    from proxyd.parsers.memcache.binary import denied_response

    requests = b"".join(
        [
            breq(0x01, b"alliance/fleet/b", SET_X, b"v", 1),
            breq(0x11, b"deathstar/b", SET_X, b"v", 2),
            breq(0x09, b"alliance/fleet/nope", opaque=3),
            breq(0x09, b"deathstar/b", opaque=4),
            breq(0x0D, b"alliance/fleet/b", opaque=5),
            breq(0x08, opaque=6),
            breq(0x00, b"alliance/fleet/b", opaque=7),
        ]
    )
    h = through_proxy(memcached, FLEET, requests, (BIN_SENTINEL_REQ, BIN_SENTINEL_RESP))
    assert b"deathstar" not in h.to_server
    client = h.to_client
    d2, d4, d6 = denied_response(0x11, 2), denied_response(0x09, 4), denied_response(0x08, 6)
    assert client.count(d2) == 1
    assert client.count(d4) == 1
    assert client.count(d6) == 1
    assert client.index(d2) < client.index(d4) < client.index(d6) < len(client) - 24
    assert client.endswith(BIN_SENTINEL_RESP)


def test_binary_unknown_opcode_framed_as_memcached_reads_it(memcached: int) -> None:
    """For an opcode it does not implement, memcached reads header, extras and key, then skips
    ``bodylen`` more bytes: extras plus key past the packet. Framing by the header alone put
    proxyd 4 bytes behind memcached here, and the GET of ``deathstar/plans`` that memcached then
    read (from inside a NoOp's extras, which proxyd always allows) got its value out."""
    with socket.create_connection(("127.0.0.1", memcached), timeout=5) as s:
        s.sendall(b"set deathstar/plans 0 0 6\r\nsecret\r\n")
        assert s.recv(64) == b"STORED\r\n"
    key = b"deathstar/plans"
    verbosity = _PKT.pack(0x80, 0x1B, 0, 4, 0, 0, 8, 1, 0) + b"\0\0\0\1" + b"\0\0\0\0"
    # A NoOp whose header, read 4 bytes late, is a GET of `key`; its extras hold the key and
    # then the sentinel NoOp, which makes memcached flush its answers.
    noop = bytearray(_PKT.pack(0x80, 0x0A, 0, 0x80, 0, len(key), 0x80, len(key), 0) + b"\0" * 0x80)
    noop[28 : 28 + len(key)] = key
    noop[28 + len(key) : 52 + len(key)] = BIN_SENTINEL_REQ
    h = Harness(MemcacheFactory(), rules=[{"command": "verbosity"}])
    h.feed(verbosity + bytes(noop))
    replies = exchange(memcached, h.to_server, BIN_SENTINEL_RESP)
    h.feed(replies, reply=True)
    assert replies.endswith(BIN_SENTINEL_RESP)
    assert b"secret" not in replies
    assert b"secret" not in h.to_client
    assert [e.fields for e in h.log if e.verdict == "denied"] == [{"opcode": "get", "key": "deathstar/plans"}]
