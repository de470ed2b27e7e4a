"""Harness tables for the memcache text and meta dialects: requests, replies, denials, splits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from proxyd.ops import DROP, ERROR, INJECT, MORE, PASS
from proxyd.parsers.memcache import MemcacheFactory
from proxyd.parsers.memcache.text import DENIED_REPLY
from proxyd.testing import Harness, split_points

DENIED = DENIED_REPLY
FLEET = [
    {"command": "get", "keyPrefix": "a/"},
    {"command": "writeGroup", "keyPrefix": "a/"},
    {"command": "meta", "keyPrefix": "a/"},
    {"command": "mn"},
    {"command": "version"},
]


def run(
    requests: bytes,
    replies: bytes,
    rules: Sequence[Mapping[str, str]] | None = None,
    *,
    req_split: object = None,
    rep_split: object = None,
) -> Harness:
    h = Harness(MemcacheFactory(), rules=rules)
    h.feed(requests, split=req_split)  # type: ignore[arg-type]
    if replies:
        h.feed(replies, reply=True, split=rep_split)  # type: ignore[arg-type]
    return h


def pending(h: Harness) -> int:
    return len(h.engine.parser.pending())  # type: ignore[attr-defined]


def check_all_splits(requests: bytes, replies: bytes, rules: Sequence[Mapping[str, str]] | None,
                     to_server: bytes, to_client: bytes) -> None:
    """Unsplit, byte by byte, and cut in two at every byte (each direction): same streams."""
    ways: list[tuple[object, object]] = [(None, None), ("bytes", "bytes")]
    ways += [([len(a)], None) for a, _ in split_points(requests)]
    ways += [(None, [len(a)]) for a, _ in split_points(replies)]
    for req_split, rep_split in ways:
        h = run(requests, replies, rules, req_split=req_split, rep_split=rep_split)
        where = f"req_split={req_split} rep_split={rep_split}"
        assert h.error is None, where
        assert h.to_server == to_server, where
        assert h.to_client == to_client, where
        assert pending(h) == 0, where


# (name, requests, server replies) with an allow-all policy: everything passes both ways.
ALLOWED_CASES = [
    ("get hit", b"get k\r\n", b"VALUE k 0 3\r\nabc\r\nEND\r\n"),
    ("get miss", b"get k\r\n", b"END\r\n"),
    ("multi get", b"get a b c\r\n", b"VALUE a 0 1\r\nx\r\nVALUE c 5 2\r\nyy\r\nEND\r\n"),
    ("gets", b"gets k\r\n", b"VALUE k 0 3 55\r\nabc\r\nEND\r\n"),
    ("bget", b"bget k\r\n", b"END\r\n"),
    ("gat", b"gat 100 k j\r\n", b"VALUE k 0 3\r\nabc\r\nEND\r\n"),
    ("gats", b"gats 100 k\r\n", b"VALUE k 0 3 7\r\nabc\r\nEND\r\n"),
    ("value with CRLF inside", b"get k\r\n", b"VALUE k 0 7\r\nEND\r\nx\r\nEND\r\n"),
    ("set", b"set k 0 0 3\r\nabc\r\n", b"STORED\r\n"),
    ("set binary data", b"set k 1 -1 9\r\nget x\r\n\x00\r\n", b"STORED\r\n"),
    ("add", b"add k 0 0 1\r\nx\r\n", b"NOT_STORED\r\n"),
    ("replace", b"replace k 0 0 1\r\nx\r\n", b"NOT_STORED\r\n"),
    ("append", b"append k 0 0 1\r\nx\r\n", b"STORED\r\n"),
    ("prepend", b"prepend k 0 0 0\r\n\r\n", b"STORED\r\n"),
    ("cas exists", b"cas k 0 0 1 99\r\nx\r\n", b"EXISTS\r\n"),
    ("cas not found", b"cas k 0 0 1 99\r\nx\r\n", b"NOT_FOUND\r\n"),
    ("bad data chunk", b"set k 0 0 1\r\nxyz\r\n", b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
    ("delete", b"delete k\r\n", b"DELETED\r\n"),
    ("delete 0", b"delete k 0\r\n", b"NOT_FOUND\r\n"),
    ("incr", b"incr k 5\r\n", b"15\r\n"),
    ("decr", b"decr k 5\r\n", b"NOT_FOUND\r\n"),
    ("incr non numeric", b"incr k 1\r\n",
     b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("touch", b"touch k 10\r\n", b"TOUCHED\r\n"),
    ("flush_all", b"flush_all\r\n", b"OK\r\n"),
    ("flush_all delay", b"flush_all 10\r\n", b"OK\r\n"),
    ("version", b"version\r\n", b"VERSION 1.6.18\r\n"),
    ("verbosity", b"verbosity 1\r\n", b"OK\r\n"),
    ("stats", b"stats\r\n", b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"),
    ("stats reset", b"stats reset\r\n", b"RESET\r\n"),
    ("stats detail dump", b"stats detail dump\r\n", b"PREFIX a get 1 hit 0 set 0 del 0\r\nEND\r\n"),
    ("stats cachedump", b"stats cachedump 1 1\r\n", b"ITEM k [3 b; 0 s]\r\nEND\r\n"),
    ("stats bad", b"stats nonsense\r\n", b"ERROR\r\n"),
    ("metadump", b"lru_crawler metadump all\r\n",
     b"key=k exp=-1 la=1 cas=2 fetch=no cls=1 size=63\r\nEND\r\n"),
    ("metadump busy", b"lru_crawler metadump all\r\n", b"BUSY currently processing crawler request\r\n"),
    ("mgdump", b"lru_crawler mgdump 1\r\n", b"mg k\r\nmg j\r\nEN\r\n"),
    ("crawl", b"lru_crawler crawl all\r\n", b"OK\r\n"),
    ("slabs", b"slabs automove 1\r\n", b"OK\r\n"),
    ("slabs reassign", b"slabs reassign 1 2\r\n", b"NOSPARE source class has no spare pages\r\n"),
    ("lru", b"lru mode flat\r\n", b"OK\r\n"),
    ("cache_memlimit", b"cache_memlimit 100\r\n", b"OK\r\n"),
    ("shutdown", b"shutdown\r\n", b"ERROR: shutdown not enabled\r\n"),
    ("misbehave", b"misbehave\r\n", b"ERROR\r\n"),
    ("unknown", b"frobnicate x\r\n", b"ERROR\r\n"),
    ("empty line", b"\r\n", b"ERROR\r\n"),
    ("bare LF", b"get k\nget j\n", b"END\r\nEND\r\n"),
    ("quit", b"quit\r\n", b""),
    ("noreply set then get", b"set k 0 0 1 noreply\r\nx\r\nget k\r\n", b"VALUE k 0 1\r\nx\r\nEND\r\n"),
    ("noreply everything", b"delete k noreply\r\nincr k 1 noreply\r\ntouch k 1 noreply\r\n"
     b"flush_all noreply\r\nverbosity 1 noreply\r\nmn\r\n", b"MN\r\n"),
    ("noreply errors are suppressed", b"set k 0 0 1 noreply\r\nxyz\r\nincr k 1 noreply\r\nmn\r\n",
     b"ERROR\r\nMN\r\n"),
    ("noreply ignored on a bad token count", b"delete k 0 0 noreply\r\nmn\r\n", b"ERROR\r\nMN\r\n"),
    ("slabs reassign has no noreply", b"slabs reassign 1 2 noreply\r\n", b"BUSY\r\n"),
    ("mg quiet invalid flag answered", b"mg k v q v\r\nmn\r\n", b"CLIENT_ERROR duplicate flag\r\nMN\r\n"),
    ("mg quiet then error of next", b"mg k v q\r\nincr j 1\r\nmn\r\n",
     b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\nMN\r\n"),
    ("watch", b"watch\r\n", b"OK\r\nts=1.0 gid=1 type=item_get key=k status=not_found\r\n"),
    ("mg hit", b"mg k v\r\n", b"VA 3\r\nabc\r\n"),
    ("mg hit flags", b"mg k s v t f Oab k\r\n", b"VA 3 s3 t-1 f0 Oab kk\r\nabc\r\n"),
    ("mg hd", b"mg k\r\n", b"HD\r\n"),
    ("mg miss", b"mg k v\r\n", b"EN\r\n"),
    ("mg quiet miss", b"mg k v q\r\nmg j v q\r\nmn\r\n", b"VA 1\r\nx\r\nMN\r\n"),
    ("mg base64", b"mg Zm9v b v\r\n", b"VA 1 b\r\nx\r\n"),
    ("ms", b"ms k 3 T0 F5\r\nabc\r\n", b"HD\r\n"),
    ("ms quiet", b"ms k 3 q\r\nabc\r\nmn\r\n", b"MN\r\n"),
    ("ms quiet exists", b"ms k 3 q C1\r\nabc\r\nmn\r\n", b"EX\r\nMN\r\n"),
    ("ms bad flag", b"ms k 1 !\r\nx\r\n", b"CLIENT_ERROR invalid flag\r\n"),
    ("md", b"md k\r\n", b"HD\r\n"),
    ("md quiet", b"md k q\r\nmd j q\r\nmn\r\n", b"NF\r\nMN\r\n"),
    ("ma", b"ma k v\r\n", b"VA 1\r\n6\r\n"),
    ("ma nf", b"ma k\r\n", b"NF\r\n"),
    ("me", b"me k\r\n", b"ME k exp=-1 la=3 cas=2 fetch=no cls=1 size=63\r\n"),
    ("me miss", b"me k\r\n", b"EN\r\n"),
    ("mn", b"mn\r\n", b"MN\r\n"),
    ("mx unknown meta", b"mx k\r\n", b"ERROR\r\n"),
    ("pipelined mix", b"set a 0 0 1\r\n1\r\nget a b\r\nmg a v\r\ndelete b\r\nincr a 1\r\nstats\r\n",
     b"STORED\r\nVALUE a 0 1\r\n1\r\nEND\r\nVA 1\r\n1\r\nNOT_FOUND\r\n2\r\nSTAT pid 1\r\nEND\r\n"),
]


@pytest.mark.parametrize(("name", "requests", "replies"), ALLOWED_CASES, ids=[c[0] for c in ALLOWED_CASES])
def test_allowed_requests_and_replies(name: str, requests: bytes, replies: bytes) -> None:
    check_all_splits(requests, replies, None, requests, replies)


def test_get_hit_ops() -> None:
    h = run(b"get k\r\n", b"VALUE k 0 3\r\nabc\r\nEND\r\n")
    assert h.ops_of(False) == [(PASS, 7)]
    assert h.ops_of(True) == [(PASS, 18), (PASS, 5)]
    assert [(e.entry_type, e.fields) for e in h.log] == [
        ("request", {"command": "get", "keys": ["k"]}),
        ("response", {"command": "get", "status": "END"}),
    ]


def test_data_block_passed_past_input_not_buffered() -> None:
    h = Harness(MemcacheFactory())
    assert h.feed(b"set k 0 0 100000\r\n" + b"x" * 10) == [(PASS, 18 + 100002)]
    assert h.engine.buffered(False) == 0
    h.feed(b"x" * 99990 + b"\r\nget k\r\n")
    assert h.to_server.endswith(b"\r\nget k\r\n")
    assert h.error is None


def test_value_reply_passed_past_input() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"get k\r\n")
    assert h.feed(b"VALUE k 0 50000\r\nabc", reply=True) == [(PASS, 17 + 50002)]
    h.feed(b"x" * 49997 + b"\r\nEND\r\n", reply=True)
    assert h.error is None
    assert pending(h) == 0


# (name, rules, requests, server replies to the forwarded requests, to_server, to_client)
DENIAL_CASES = [
    ("denied alone", FLEET, b"get b/1\r\n", b"", b"", DENIED),
    ("denied storage drops data", FLEET, b"set b/1 0 0 5\r\nhello\r\n", b"", b"", DENIED),
    ("denied between", FLEET,
     b"get a/1\r\nget b/1\r\nset a/2 0 0 1\r\nx\r\nset b/2 0 0 1\r\ny\r\ndelete b/3 noreply\r\n"
     b"get a/1 a/2\r\n",
     b"END\r\nSTORED\r\nVALUE a/2 0 1\r\nx\r\nEND\r\n",
     b"get a/1\r\nset a/2 0 0 1\r\nx\r\nget a/1 a/2\r\n",
     b"END\r\n" + DENIED + b"STORED\r\n" + DENIED + b"VALUE a/2 0 1\r\nx\r\nEND\r\n"),
    ("multi get one key denied", FLEET, b"get a/1 b/1\r\nget a/1\r\n", b"END\r\n",
     b"get a/1\r\n", DENIED + b"END\r\n"),
    ("denied noreply is silent", FLEET, b"set b/1 0 0 1 noreply\r\nx\r\nmn\r\n", b"MN\r\n",
     b"mn\r\n", b"MN\r\n"),
    ("denied after noreply", FLEET, b"set a/1 0 0 1 noreply\r\nx\r\nget b/1\r\nmn\r\n",
     b"MN\r\n", b"set a/1 0 0 1 noreply\r\nx\r\nmn\r\n", DENIED + b"MN\r\n"),
    ("denied after quiet uses barrier", FLEET, b"md a/1 q\r\nget b/1\r\nmn\r\n",
     b"VERSION 1.6.18\r\nMN\r\n", b"md a/1 q\r\nversion\r\nmn\r\n", DENIED + b"MN\r\n"),
    ("quiet miss then denied", FLEET, b"mg a/1 v q\r\nmg b/1 v q\r\nmg a/2 v q\r\nmn\r\n",
     b"VERSION 1.6.18\r\nVA 1\r\nz\r\nMN\r\n",
     b"mg a/1 v q\r\nversion\r\nmg a/2 v q\r\nmn\r\n", DENIED + b"VA 1\r\nz\r\nMN\r\n"),
    ("quiet hit then denied", FLEET, b"mg a/1 v q\r\nmg b/1 v q\r\nmn\r\n",
     b"VA 1\r\nx\r\nVERSION 1.6.18\r\nMN\r\n",
     b"mg a/1 v q\r\nversion\r\nmn\r\n", b"VA 1\r\nx\r\n" + DENIED + b"MN\r\n"),
    ("two denials after quiet", FLEET, b"ms a/1 1 q\r\nx\r\nms b/1 1 q\r\ny\r\nmd b/2\r\nmn\r\n",
     b"VERSION 1\r\nMN\r\n", b"ms a/1 1 q\r\nx\r\nversion\r\nmn\r\n",
     DENIED + DENIED + b"MN\r\n"),
    ("denied after retrieval", FLEET, b"get a/1\r\nstats\r\nflush_all\r\nget a/2\r\n",
     b"VALUE a/1 0 1\r\nx\r\nEND\r\nEND\r\n", b"get a/1\r\nget a/2\r\n",
     b"VALUE a/1 0 1\r\nx\r\nEND\r\n" + DENIED + DENIED + b"END\r\n"),
    ("meta base64 key", FLEET, b"mg YS8x b v\r\nmg Yi8x b v\r\n", b"EN\r\n",
     b"mg YS8x b v\r\n", b"EN\r\n" + DENIED),
    ("meta bad base64 denied", FLEET, b"mg YS8x= b v\r\n", b"", b"", DENIED),
    ("unknown command denied", FLEET, b"frob a/1\r\nmn\r\n", b"MN\r\n", b"mn\r\n", DENIED + b"MN\r\n"),
    ("denied flush_all", FLEET, b"get a/1\r\nflush_all\r\n", b"END\r\n", b"get a/1\r\n", b"END\r\n" + DENIED),
    ("quit is protocol control: always passes", FLEET, b"quit\r\n", b"", b"quit\r\n", b""),
    ("long key set reads data as command", [{"command": "writeGroup", "keyPrefix": "x"}],
     b"set " + b"x" * 251 + b" 0 0 11\r\nflush_all\r\n\r\n", b"CLIENT_ERROR bad command line format\r\n",
     b"set " + b"x" * 251 + b" 0 0 11\r\n", b"CLIENT_ERROR bad command line format\r\n" + DENIED + DENIED),
    ("wrong token count reads data as command", [{"command": "writeGroup"}],
     b"set k 0 0\r\nflush_all\r\n", b"ERROR\r\n", b"set k 0 0\r\n", b"ERROR\r\n" + DENIED),
    ("NUL ends the command", [{"command": "get", "keyExact": "a"}],
     b"get a\x00 secret\r\n", b"END\r\n", b"get a\x00 secret\r\n", b"END\r\n"),
]


@pytest.mark.parametrize(
    ("name", "rules", "requests", "replies", "to_server", "to_client"),
    DENIAL_CASES,
    ids=[c[0] for c in DENIAL_CASES],
)
def test_denials_in_place(
    name: str,
    rules: list[dict[str, str]],
    requests: bytes,
    replies: bytes,
    to_server: bytes,
    to_client: bytes,
) -> None:
    check_all_splits(requests, replies, rules, to_server, to_client)


def test_denied_ops_and_log() -> None:
    h = run(b"get a/1\r\nset b/1 0 0 3\r\nabc\r\n", b"END\r\n", FLEET)
    assert h.ops_of(False) == [(PASS, 9), (DROP, 20)]
    assert h.ops_of(True) == [(PASS, 5), (INJECT, len(DENIED))] or h.ops_of(True) == [(PASS, 5)]
    assert h.to_client == b"END\r\n" + DENIED
    assert [(e.entry_type, e.verdict, e.fields) for e in h.log if e.entry_type == "request"] == [
        ("request", "forwarded", {"command": "get", "keys": ["a/1"]}),
        ("request", "denied", {"command": "set", "keys": ["b/1"]}),
    ]


def test_denied_with_nothing_pending_is_answered_at_once() -> None:
    h = Harness(MemcacheFactory(), rules=FLEET)
    h.feed(b"get b/1\r\n")
    assert h.to_client == DENIED
    assert h.to_server == b""


def test_denial_waits_for_earlier_replies_then_flushes_without_more_input() -> None:
    h = Harness(MemcacheFactory(), rules=FLEET)
    h.feed(b"get a/1\r\nget b/1\r\n")
    assert h.to_client == b""
    h.feed(b"END\r\n", reply=True)
    assert h.to_client == b"END\r\n" + DENIED


def test_denial_after_value_passed_past_input_lands_after_it() -> None:
    h = Harness(MemcacheFactory(), rules=FLEET)
    h.feed(b"mg a/1 v\r\nmg b/1 v\r\n")
    h.feed(b"VA 10\r\n01234", reply=True)
    assert h.to_client == b"VA 10\r\n01234"
    h.feed(b"56789\r\n", reply=True)
    assert h.to_client == b"VA 10\r\n0123456789\r\n" + DENIED


def test_reply_with_nothing_pending_is_forwarded_and_logged() -> None:
    # memcached sends "ERROR Too many open connections" unasked at its connection limit.
    h = Harness(MemcacheFactory())
    h.feed(b"get k\r\n")
    h.feed(b"END\r\nSTORED\r\n", reply=True)
    assert h.error is None
    assert h.to_client == b"END\r\nSTORED\r\n"
    assert h.log[-1].fields == {"status": "STORED", "unsolicited": True}
    h2 = Harness(MemcacheFactory())
    h2.feed(b"ERROR Too many open connections\r\n", reply=True, split="bytes")
    assert h2.error is None
    assert h2.to_client == b"ERROR Too many open connections\r\n"
    assert h2.log[-1].fields == {"status": "ERROR", "unsolicited": True}


@pytest.mark.parametrize(
    ("requests", "line"),
    [
        (b"set k 0 blah 1\r\nX\r\n", b"set k 0 blah 1\r\n"),
        (b"cas bad blah 0 0 0\r\n\r\n", b"cas bad blah 0 0 0\r\n"),
        (b"set k 0 0 -1\r\n", b"set k 0 0 -1\r\n"),
        (b"set k 0 0 4294967295\r\nabc\r\n", b"set k 0 0 4294967295\r\n"),
        (b"set k 0 0 2147483646\r\nab\r\n", b"set k 0 0 2147483646\r\n"),
        (b"set k x 0 1\r\na\r\n", b"set k x 0 1\r\n"),
        (b"set k -1 0 1\r\na\r\n", b"set k -1 0 1\r\n"),
        (b"set k 0 0 5x\r\nabcde\r\n", b"set k 0 0 5x\r\n"),
        (b"cas k 0 0 1 z\r\na\r\n", b"cas k 0 0 1 z\r\n"),
        (b"ms k x\r\na\r\n", b"ms k x\r\n"),
        (b"ms k -2\r\na\r\n", b"ms k -2\r\n"),
    ],
)
def test_bad_command_line_is_forwarded_and_block_read_as_commands(requests: bytes, line: bytes) -> None:
    # memcached answers CLIENT_ERROR bad command line format and does not read the block.
    h = Harness(MemcacheFactory())
    h.feed(requests)
    assert h.error is None
    assert h.to_server == requests
    assert h.ops_of(False)[0] == (PASS, len(line))
    rest = requests[len(line) :]
    h.feed(b"CLIENT_ERROR bad command line format\r\n" + b"ERROR\r\n" * rest.count(b"\n"), reply=True)
    assert h.error is None
    assert not h.engine.parser.pending()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("requests", "size"),
    [
        (b"set k 0 0 +5\r\nabcde\r\n", 5),
        (b"set k 0 0 4294967296\r\n\r\n", 0),
        (b"set k 0 0 4294967301\r\nabcde\r\n", 5),
        (b"set k 0 0 05\r\nabcde\r\n", 5),
        (b"set k 0 0 \t5\r\nabcde\r\n", 5),
        (b"set k 18446744073709551615 -9 1\r\na\r\n", 1),
        (b"ms k +1 T+5\r\na\r\n", 1),
    ],
)
def test_data_length_read_as_memcached_reads_it(requests: bytes, size: int) -> None:
    h = Harness(MemcacheFactory())
    h.feed(requests)
    assert h.error is None
    assert h.ops_of(False) == [(PASS, len(requests))]
    assert len(requests) - requests.index(b"\n") - 1 == size + 2  # line and block: one request


def test_line_limits() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"set " + b"k" * 3000)
    assert h.error is not None
    assert h.log[-1].fields["error"] == "request line over 2048 bytes that is not a multi-key get"
    h = Harness(MemcacheFactory())
    keys = b" ".join(b"key%d" % i for i in range(30000))  # 228 KB, as memcached's own suite sends
    h.feed(b"get " + keys + b"\r\n", split="random")
    assert h.error is None
    assert h.to_server == b"get " + keys + b"\r\n"
    h = Harness(MemcacheFactory(), buffer_limit=100000)
    h.feed(b"get " + b"k" * 70000)
    assert h.error is None
    h.feed(b"k" * 40000)
    assert h.error is not None
    assert h.error.kind == "buffer_limit"
    h = Harness(MemcacheFactory())
    h.feed(b"get k\r\n")
    h.feed(b"STAT " + b"x" * 9000, reply=True)
    assert h.error is not None


def test_close_delivers_owed_replies_first() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"get a\r\nmg b v q\r\nset " + b"k" * 3000)
    assert h.error is None
    # the quiet mg may stay silent: a barrier tells when the server is done
    assert h.to_server == b"get a\r\nmg b v q\r\nversion\r\n"
    h.feed(b"more client bytes\r\n")
    assert h.to_server == b"get a\r\nmg b v q\r\nversion\r\n"
    h.feed(b"VALUE a 0 1\r\nx\r\nEND\r\n", reply=True, split="bytes")
    assert h.error is None
    h.feed(b"VERSION 1.6.18\r\n", reply=True)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.to_client == b"VALUE a 0 1\r\nx\r\nEND\r\n"


def test_close_waits_for_a_streaming_value() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"mg a v\r\n")
    h.feed(b"VA 10\r\n01234", reply=True)
    h.feed(b"x" * 3000)
    assert h.error is None
    h.feed(b"56789\r\n", reply=True)
    assert h.error is not None
    assert h.to_client == b"VA 10\r\n0123456789\r\n"


def test_partial_line_asks_for_more() -> None:
    h = Harness(MemcacheFactory())
    assert h.feed(b"get k") == [(MORE, 1)]
    assert h.feed(b"\r\n") == [(PASS, 7)]


def test_pending_queue_is_bounded() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"mn\r\n" * 10001)
    assert h.error is None  # the 10000 owed replies are delivered first
    assert h.to_server == b"mn\r\n" * 10000
    h.feed(b"MN\r\n" * 10000, reply=True)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.ops_of(True)[-1] == (ERROR, 4)
    assert h.to_client == b"MN\r\n" * 10000


def test_noreply_flood_does_not_fill_the_queue() -> None:
    h = Harness(MemcacheFactory())
    h.feed(b"mg k v q\r\n" * 12000)
    assert h.error is None
    assert pending(h) <= 10000


def test_watch_streams_replies() -> None:
    h = run(b"watch mutations\r\n", b"OK\r\n")
    h.feed(b"ts=1 gid=2 type=item_store key=k\r\npartial", reply=True)
    assert h.error is None
    assert h.to_client.endswith(b"partial")


def test_log_responses_off() -> None:
    h = Harness(MemcacheFactory(), parser_config={"log_responses": False})
    h.feed(b"get k\r\n")
    h.feed(b"END\r\n", reply=True)
    assert [e.entry_type for e in h.log] == ["request"]


def test_parser_config_rejects_unknown() -> None:
    from proxyd.errors import ParserConfigError

    with pytest.raises(ParserConfigError):
        MemcacheFactory().validate_config({"nope": 1})
    with pytest.raises(ParserConfigError):
        MemcacheFactory().validate_config({"log_responses": "yes"})


def test_registry_name() -> None:
    from proxyd.registry import Registry

    assert isinstance(Registry.load(entry_point_plugins=False).get("memcache"), MemcacheFactory)
