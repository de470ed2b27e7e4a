"""Harness tables for the memcache binary dialect: every opcode family, quiet ops, denials."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import pytest

from proxyd.ops import DROP, PASS
from proxyd.parsers.memcache import MemcacheFactory
from proxyd.parsers.memcache.binary import BARRIER_REQUEST, denied_response
from proxyd.testing import Harness, split_points

_PKT = struct.Struct(">BBHBBHIIQ")
NOOP_RESP = _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0)


def req(op: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0) -> bytes:
    body = extras + key + value
    return _PKT.pack(0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


def resp(op: int, status: int = 0, key: bytes = b"", extras: bytes = b"", value: bytes = b"",
         opaque: int = 0) -> bytes:
    body = extras + key + value
    return _PKT.pack(0x81, op, len(key), len(extras), 0, status, len(body), opaque, 0) + body


SET_EXTRAS = struct.pack(">II", 0, 0)
INCR_EXTRAS = struct.pack(">QQI", 1, 0, 0)
FLAGS = struct.pack(">I", 0)
FLEET = [
    {"command": "get", "keyPrefix": "a/"},
    {"command": "writeGroup", "keyPrefix": "a/"},
    {"command": "noop"},
]


def run(requests: bytes, replies: bytes, rules: Sequence[Mapping[str, str]] | None,
        req_split: object = None, rep_split: object = None) -> Harness:
    h = Harness(MemcacheFactory(), rules=rules)
    h.feed(requests, split=req_split)  # type: ignore[arg-type]
    if replies:
        h.feed(replies, reply=True, split=rep_split)  # type: ignore[arg-type]
    return h


def check_all_splits(requests: bytes, replies: bytes, rules: Sequence[Mapping[str, str]] | None,
                     to_server: bytes, to_client: bytes) -> None:
    ways: list[tuple[object, object]] = [(None, None), ("bytes", "bytes")]
    ways += [([len(a)], None) for a, _ in split_points(requests)]
    ways += [(None, [len(a)]) for a, _ in split_points(replies)]
    for req_split, rep_split in ways:
        h = run(requests, replies, rules, req_split, rep_split)
        where = f"req_split={req_split} rep_split={rep_split}"
        assert h.error is None, where
        assert h.to_server == to_server, where
        assert h.to_client == to_client, where
        assert not h.engine.parser.pending(), where  # type: ignore[union-attr]


ALLOWED_CASES = [
    ("get hit", req(0x00, b"k", opaque=1), resp(0x00, extras=FLAGS, value=b"abc", opaque=1)),
    ("get miss", req(0x00, b"k"), resp(0x00, 1, value=b"Not found")),
    ("getk", req(0x0C, b"k"), resp(0x0C, key=b"k", extras=FLAGS, value=b"v")),
    ("getq miss then noop", req(0x09, b"k", opaque=5) + req(0x0A, opaque=6), resp(0x0A, opaque=6)),
    ("getkq hit then noop", req(0x0D, b"k", opaque=5) + req(0x0A, opaque=6),
     resp(0x0D, key=b"k", extras=FLAGS, value=b"v", opaque=5) + resp(0x0A, opaque=6)),
    ("getq mixed", req(0x09, b"a", opaque=1) + req(0x09, b"b", opaque=2) + req(0x09, b"c", opaque=3)
     + req(0x0A, opaque=4), resp(0x09, extras=FLAGS, value=b"B", opaque=2) + resp(0x0A, opaque=4)),
    ("set", req(0x01, b"k", SET_EXTRAS, b"value"), resp(0x01)),
    ("setq then get", req(0x11, b"k", SET_EXTRAS, b"v") + req(0x00, b"k"),
     resp(0x00, extras=FLAGS, value=b"v")),
    ("setq error", req(0x11, b"k", SET_EXTRAS, b"v", opaque=9) + req(0x0A),
     resp(0x11, 5, value=b"Not stored", opaque=9) + resp(0x0A)),
    ("add replace append prepend", req(0x02, b"k", SET_EXTRAS, b"v") + req(0x03, b"k", SET_EXTRAS, b"v")
     + req(0x0E, b"k", value=b"v") + req(0x0F, b"k", value=b"v"),
     resp(0x02, 2) + resp(0x03) + resp(0x0E) + resp(0x0F)),
    ("quiet writes", req(0x12, b"k", SET_EXTRAS, b"v") + req(0x13, b"k", SET_EXTRAS, b"v")
     + req(0x19, b"k", value=b"v") + req(0x1A, b"k", value=b"v") + req(0x14, b"k")
     + req(0x15, b"k", INCR_EXTRAS) + req(0x16, b"k", INCR_EXTRAS) + req(0x18, extras=FLAGS) + req(0x0A),
     resp(0x0A)),
    ("delete", req(0x04, b"k"), resp(0x04, 1)),
    ("incr", req(0x05, b"k", INCR_EXTRAS), resp(0x05, value=struct.pack(">Q", 2))),
    ("decr", req(0x06, b"k", INCR_EXTRAS), resp(0x06, value=struct.pack(">Q", 0))),
    ("flush", req(0x08), resp(0x08)),
    ("version", req(0x0B), resp(0x0B, value=b"1.6.18")),
    ("verbosity", req(0x1B, extras=FLAGS), resp(0x1B)),
    ("stat", req(0x10), resp(0x10, key=b"pid", value=b"1") + resp(0x10, key=b"uptime", value=b"2")
     + resp(0x10)),
    ("stat group", req(0x10, b"settings"), resp(0x10, key=b"maxbytes", value=b"1") + resp(0x10)),
    ("stat error", req(0x10, b"bogus"), resp(0x10, 1, value=b"Not found")),
    ("touch gat gatk", req(0x1C, b"k", FLAGS) + req(0x1D, b"k", FLAGS) + req(0x23, b"k", FLAGS),
     resp(0x1C) + resp(0x1D, extras=FLAGS, value=b"v") + resp(0x23, key=b"k", extras=FLAGS, value=b"v")),
    ("gatq gatkq", req(0x1E, b"k", FLAGS, opaque=1) + req(0x24, b"j", FLAGS, opaque=2) + req(0x0A, opaque=3),
     resp(0x24, key=b"j", extras=FLAGS, value=b"v", opaque=2) + resp(0x0A, opaque=3)),
    ("sasl", req(0x20) + req(0x21, b"PLAIN", value=b"\x00u\x00p"), resp(0x20, value=b"PLAIN")
     + resp(0x21, 0x20, value=b"Auth failure")),
    ("unknown opcode", req(0x55, b"k", value=b"xyz"), resp(0x55, 0x81, value=b"Unknown command")),
    ("quit", req(0x07), resp(0x07)),
    ("quitq", req(0x17), b""),
]


@pytest.mark.parametrize(("name", "requests", "replies"), ALLOWED_CASES, ids=[c[0] for c in ALLOWED_CASES])
def test_allowed(name: str, requests: bytes, replies: bytes) -> None:
    check_all_splits(requests, replies, None, requests, replies)


DENIAL_CASES = [
    ("denied alone", req(0x00, b"b/1", opaque=7), b"", b"", denied_response(0x00, 7)),
    ("denied set drops value", req(0x01, b"b/1", SET_EXTRAS, b"secret", opaque=3), b"", b"",
     denied_response(0x01, 3)),
    ("denied between",
     req(0x00, b"a/1", opaque=1) + req(0x00, b"b/1", opaque=2) + req(0x0C, b"a/2", opaque=3),
     resp(0x00, 1, opaque=1) + resp(0x0C, 1, opaque=3),
     req(0x00, b"a/1", opaque=1) + req(0x0C, b"a/2", opaque=3),
     resp(0x00, 1, opaque=1) + denied_response(0x00, 2) + resp(0x0C, 1, opaque=3)),
    ("denied quiet after quiet uses noop barrier",
     req(0x09, b"a/1", opaque=1) + req(0x11, b"b/1", SET_EXTRAS, b"v", opaque=2) + req(0x0A, opaque=3),
     resp(0x09, extras=FLAGS, value=b"x", opaque=1) + NOOP_RESP + resp(0x0A, opaque=3),
     req(0x09, b"a/1", opaque=1) + BARRIER_REQUEST + req(0x0A, opaque=3),
     resp(0x09, extras=FLAGS, value=b"x", opaque=1) + denied_response(0x11, 2) + resp(0x0A, opaque=3)),
    ("denied after quiet miss", req(0x09, b"a/1", opaque=1) + req(0x00, b"b/1", opaque=2),
     NOOP_RESP, req(0x09, b"a/1", opaque=1) + BARRIER_REQUEST, denied_response(0x00, 2)),
    ("each denied quiet gets one denial", req(0x11, b"b/1", SET_EXTRAS, b"v", opaque=1)
     + req(0x11, b"b/2", SET_EXTRAS, b"v", opaque=2), b"", b"",
     denied_response(0x11, 1) + denied_response(0x11, 2)),
    ("denied stat", req(0x10) + req(0x0A), resp(0x0A), req(0x0A), denied_response(0x10, 0) + resp(0x0A)),
    ("denied version answered", req(0x0B, opaque=4), b"", b"", denied_response(0x0B, 4)),
    ("quitq is protocol control: always passes", req(0x17, opaque=5), b"", req(0x17, opaque=5), b""),
]


@pytest.mark.parametrize(
    ("name", "requests", "replies", "to_server", "to_client"), DENIAL_CASES, ids=[c[0] for c in DENIAL_CASES]
)
def test_denials(name: str, requests: bytes, replies: bytes, to_server: bytes, to_client: bytes) -> None:
    check_all_splits(requests, replies, FLEET, to_server, to_client)


def test_denied_response_layout() -> None:
    d = denied_response(0x0D, 0xDEADBEEF)
    assert d[0] == 0x81
    assert d[1] == 0x0D
    assert struct.unpack(">H", d[6:8])[0] == 0x0008
    assert struct.unpack(">I", d[8:12])[0] == 13
    assert d[12:16] == b"\xde\xad\xbe\xef"
    assert d[24:] == b"access denied"


def test_pass_as_soon_as_key_seen() -> None:
    h = Harness(MemcacheFactory())
    frame = req(0x01, b"k", SET_EXTRAS, b"v" * 100000)
    assert h.feed(frame[:40]) == [(PASS, len(frame))]
    assert h.engine.buffered(False) == 0


def test_drop_reaches_past_input() -> None:
    h = Harness(MemcacheFactory(), rules=FLEET)
    frame = req(0x01, b"b/1", SET_EXTRAS, b"v" * 1000)
    assert h.feed(frame[:40]) == [(DROP, len(frame))]
    h.feed(frame[40:] + req(0x0A))
    assert h.to_server == req(0x0A)


def test_log_fields() -> None:
    h = run(req(0x0D, b"a/1", opaque=1) + req(0x00, b"b/1"), b"", FLEET)
    assert [(e.verdict, e.fields) for e in h.log] == [
        ("forwarded", {"opcode": "getkq", "key": "a/1"}),
        ("denied", {"opcode": "get", "key": "b/1"}),
    ]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (_PKT.pack(0x80, 0, 0, 5, 0, 0, 1, 7, 0) + b"12345", 0x81),  # extras longer than the body
        (_PKT.pack(0x80, 0, 300, 0, 0, 0, 300, 7, 0) + b"k" * 300, 0x04),  # key over 250 bytes
        (_PKT.pack(0x80, 0x09, 300, 0, 0, 0, 300, 7, 0) + b"k" * 300, 0x04),  # quiet: answered too
    ],
)
@pytest.mark.parametrize("split", [None, "bytes"])
def test_bad_request_header_forwarded_answered_then_closed(
    head: bytes, status: int, split: str | None
) -> None:
    # memcached reads header, extras and key, answers the error, and closes the connection.
    h = Harness(MemcacheFactory())
    h.feed(req(0x0A, opaque=1) + head + b"more client bytes" + req(0x0A), split=split)
    assert h.error is None
    assert h.to_server == req(0x0A, opaque=1) + head
    text = b"Invalid arguments" if status == 4 else b"Unknown command"
    answer = resp(head[1], status, value=text, opaque=7)
    h.feed(resp(0x0A, opaque=1) + answer, reply=True, split=split)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.to_client == resp(0x0A, opaque=1) + answer


def test_bad_request_header_denied_answered_then_closed() -> None:
    bad = _PKT.pack(0x80, 0, 300, 0, 0, 0, 300, 7, 0) + b"k" * 300
    h = Harness(MemcacheFactory(), rules=[{"command": "noop"}])
    h.feed(bad)
    assert h.error is not None
    assert h.to_server == b""
    assert h.to_client == denied_response(0, 7)


def test_bad_request_magic_closes_after_owed_replies() -> None:
    h = Harness(MemcacheFactory())
    h.feed(req(0x0A, opaque=1) + b"\x90" + b"\x00" * 30)
    assert h.error is None
    assert h.to_server == req(0x0A, opaque=1)
    h.feed(resp(0x0A, opaque=1), reply=True)
    assert h.error is not None
    assert h.to_client == resp(0x0A, opaque=1)


def test_text_line_and_unexpected_responses_are_forwarded() -> None:
    line = b"ERROR Too many open connections\r\n"
    h = run(req(0x0A), line + resp(0x0A) + resp(0x0A, opaque=9), None)
    assert h.error is None
    assert h.to_client == line + resp(0x0A) + resp(0x0A, opaque=9)
    assert [e.fields.get("unsolicited") for e in h.log if e.entry_type == "response"] == [True, None, True]
    h = run(req(0x0A), b"\x80" + b"\x00" * 9000, None)
    assert h.error is not None
