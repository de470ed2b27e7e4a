"""The cassandra parser through the socket-free harness: frames of every opcode and version."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
import snappy
from cql_responder import (
    batch_body,
    error_body,
    execute_body,
    frame,
    lz4_frame_compress,
    prepare_body,
    query_body,
    result_set_keyspace,
    result_void,
    rows_body,
    segment,
    segments,
    startup_body,
    string,
    string_map,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.ops import DROP, ERROR, INJECT, MORE, PASS
from proxyd.parsers.cassandra import CassandraFactory
from proxyd.parsers.cassandra.frames import crc24, decode_segment, encode_segment
from proxyd.testing import Harness

ALLOW_SELECT = [{"query_action": "select"}]
USERS_RULES = [
    {"query_action": "select"},
    {"query_action": "insert", "query_table": "^ks\\.users$"},
]


def unauthorized(version: int, stream: int) -> bytes:
    return frame(version, stream, "ERROR", error_body(0x2100, "Request Unauthorized"), response=True)


def unprepared(version: int, stream: int, pid: bytes) -> bytes:
    body = error_body(0x2500, "Prepared query with ID not found (proxyd)") + struct.pack(">H", len(pid)) + pid
    return frame(version, stream, "ERROR", body, response=True)


def prepared_result(pid: bytes, version: int = 4) -> bytes:
    body = struct.pack(">i", 4) + struct.pack(">H", len(pid)) + pid
    if version >= 5:
        body += struct.pack(">H", 2) + b"md"
    return body + struct.pack(">iii", 0, 0, 0) + struct.pack(">ii", 4, 0)


def harness(rules: Sequence[dict[str, str]] | None = None, **kw: object) -> Harness:
    return Harness(CassandraFactory(), rules=rules, **kw)  # type: ignore[arg-type]


def handshake(h: Harness, v: int, compression: str | None = None) -> None:
    h.feed(frame(v, 0, "OPTIONS"))
    h.feed(frame(v, 0, "SUPPORTED", string_map({}), response=True), reply=True)
    h.feed(frame(v, 1, "STARTUP", startup_body(compression)))
    h.feed(frame(v, 1, "READY", response=True), reply=True)
    assert h.error is None


# --- every opcode, every version, split at every byte --------------------------------------------


def _request_stream(v: int) -> bytes:
    """Requests of every kind the policy ALLOW_SELECT allows, one per stream."""
    return b"".join(
        [
            frame(v, 2, "REGISTER", b"\x00\x01" + string("SCHEMA_CHANGE")),
            frame(v, 3, "QUERY", query_body("SELECT * FROM ks.users WHERE id = 1", v)),
            frame(v, 4, "PREPARE", prepare_body("SELECT * FROM ks.users WHERE id = ?", v)),
            frame(v, 5, "AUTH_RESPONSE", struct.pack(">i", 3) + b"abc"),
            frame(v, 6, "BATCH", batch_body([], v)),
        ]
    )


@pytest.mark.parametrize("v", [3, 4, 5])
def test_allowed_requests_pass_at_every_split(v: int) -> None:
    data = _request_stream(v)
    for cut in range(len(data) + 1):
        h = harness(ALLOW_SELECT)
        if v < 5:
            h.feed(frame(v, 1, "STARTUP", startup_body()))
            h.feed(data[:cut])
            h.feed(data[cut:])
            payload = data
        else:
            handshake(h, v)
            payload = segment(data)
            h.feed(payload[:cut])
            h.feed(payload[cut:])
        assert h.error is None, cut
        assert h.forwarded[False].endswith(payload), cut
        assert h.dropped[False] == b""
        assert h.to_client in (
            b"",
            frame(v, 0, "SUPPORTED", string_map({}), response=True) + frame(v, 1, "READY", response=True),
        )


@pytest.mark.parametrize("v", [3, 4, 5])
def test_denied_request_every_byte(v: int) -> None:
    h = harness(ALLOW_SELECT)
    if v < 5:
        h.feed(frame(v, 1, "STARTUP", startup_body()))
    else:
        handshake(h, v)
    req = frame(v, 7, "QUERY", query_body("INSERT INTO ks.users (id, name) VALUES (1, 'x')", v))
    ok = frame(v, 8, "QUERY", query_body("SELECT name FROM ks.users", v))
    wire = req + ok if v < 5 else segment(req) + segment(ok)
    before = len(h.to_client)
    h.feed(wire, split="bytes")
    assert h.error is None
    if v < 5:
        assert h.dropped[False] == req
        assert h.forwarded[False].endswith(ok)
        assert h.to_client[before:] == unauthorized(v, 7)
    else:
        assert h.dropped[False] == segment(req)
        assert h.forwarded[False].endswith(segment(ok))
        assert h.to_client[before:] == segment(unauthorized(v, 7))
    assert [e.verdict for e in h.log] == ["denied", "forwarded"]
    assert h.log[0].fields == {
        "query_action": "insert",
        "query_table": "ks.users",
        "stream": 7,
        "opcode": "query",
    }


def test_ops_table_v4() -> None:
    h = harness(ALLOW_SELECT)
    q = frame(4, 3, "QUERY", query_body("SELECT * FROM ks.t", 4))
    assert h.feed(q[:5]) == [(MORE, 4)]
    assert h.feed(q[5:12]) == [(MORE, 1)]
    assert h.feed(q[12:13]) == [(MORE, 18)]  # the statement's length is known now
    assert h.feed(q[13:]) == [(PASS, len(q))]
    d = frame(4, 4, "QUERY", query_body("DELETE FROM ks.t WHERE k = 1", 4))
    assert h.feed(d) == [(DROP, len(d))]
    assert h.injected[True] == unauthorized(4, 4)


def test_replies_pass_and_events() -> None:
    h = harness(ALLOW_SELECT)
    rows = frame(4, 3, "RESULT", rows_body("ks", "users", [("id", 9)], [[1], [2]]), response=True)
    event = frame(4, -1, "EVENT", string("SCHEMA_CHANGE") + string("CREATED"), response=True)
    h.feed(rows + event, reply=True, split="bytes")
    assert h.error is None
    assert h.forwarded[True] == rows + event


# --- prepared statements ------------------------------------------------------------------------


@pytest.mark.parametrize("v", [4, 5])
def test_prepare_execute(v: int) -> None:
    h = harness(USERS_RULES)
    handshake(h, v)
    wrap = (lambda b: segment(b)) if v >= 5 else (lambda b: b)
    pid_sel, pid_del = b"\x01" * 16, b"\x02" * 16
    h.feed(wrap(frame(v, 10, "PREPARE", prepare_body("SELECT * FROM ks.users WHERE id = ?", v))))
    h.feed(wrap(frame(v, 11, "PREPARE", prepare_body("DELETE FROM ks.users WHERE id = ?", v))))
    h.feed(wrap(frame(v, 10, "RESULT", prepared_result(pid_sel, v), response=True)), reply=True)
    h.feed(wrap(frame(v, 11, "RESULT", prepared_result(pid_del, v), response=True)), reply=True)
    base = len(h.to_client)
    ex_ok = wrap(frame(v, 12, "EXECUTE", execute_body(pid_sel, v, [b"\0\0\0\1"])))
    ex_bad = wrap(frame(v, 13, "EXECUTE", execute_body(pid_del, v, [b"\0\0\0\1"])))
    ex_unknown = wrap(frame(v, 14, "EXECUTE", execute_body(b"\x03" * 16, v)))
    h.feed(ex_ok + ex_bad + ex_unknown, split="bytes")
    assert h.error is None
    assert h.forwarded[False].endswith(ex_ok)
    assert h.dropped[False] == ex_bad + ex_unknown
    assert h.to_client[base:] == wrap(unauthorized(v, 13)) + wrap(unprepared(v, 14, b"\x03" * 16))
    execs = [e for e in h.log if e.fields.get("opcode") == "execute"]
    assert [(e.verdict, e.fields.get("query_action")) for e in execs] == [
        ("forwarded", "select"),
        ("denied", "delete"),
        ("denied", None),
    ]
    assert execs[2].fields["error"] == "unknown prepared id"


def test_prepare_error_reply_forgets_stream() -> None:
    h = harness(USERS_RULES)
    h.feed(frame(4, 10, "PREPARE", prepare_body("SELECT * FROM ks.users")))
    h.feed(frame(4, 10, "ERROR", error_body(0x2200, "bad"), response=True), reply=True)
    h.feed(frame(4, 10, "RESULT", prepared_result(b"x"), response=True), reply=True)
    h.feed(frame(4, 11, "EXECUTE", execute_body(b"x")))
    assert h.to_client.endswith(unprepared(4, 11, b"x"))


def test_prepared_ids_are_bounded() -> None:
    h = harness(USERS_RULES, parser_config={"max_prepared": 2})
    for i in range(3):
        h.feed(frame(4, i, "PREPARE", prepare_body("SELECT * FROM ks.users")))
        h.feed(frame(4, i, "RESULT", prepared_result(bytes([i])), response=True), reply=True)
    h.feed(frame(4, 9, "EXECUTE", execute_body(b"\x00")))  # evicted
    h.feed(frame(4, 9, "EXECUTE", execute_body(b"\x02")))
    assert h.to_client.endswith(unprepared(4, 9, b"\x00"))
    assert h.forwarded[False].endswith(frame(4, 9, "EXECUTE", execute_body(b"\x02")))


def test_check_prepare() -> None:
    h = harness(ALLOW_SELECT, parser_config={"check_prepare": True})
    p = frame(4, 3, "PREPARE", prepare_body("INSERT INTO ks.t (a) VALUES (?)"))
    h.feed(p)
    assert h.dropped[False] == p
    assert h.to_client == unauthorized(4, 3)
    h2 = harness(ALLOW_SELECT)
    h2.feed(p)
    assert h2.forwarded[False] == p  # learnt, judged at EXECUTE


# --- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [4, 5])
def test_batch_one_denied_member_denies_all(v: int) -> None:
    h = harness(USERS_RULES)
    handshake(h, v)
    wrap = (lambda b: segment(b)) if v >= 5 else (lambda b: b)
    pid = b"\x09" * 16
    h.feed(wrap(frame(v, 2, "PREPARE", prepare_body("INSERT INTO ks.users (id) VALUES (?)", v))))
    h.feed(wrap(frame(v, 2, "RESULT", prepared_result(pid, v), response=True)), reply=True)
    good = wrap(frame(v, 3, "BATCH", batch_body(["INSERT INTO ks.users (id) VALUES (1)", pid], v)))
    bad = wrap(
        frame(
            v,
            4,
            "BATCH",
            batch_body(
                ["INSERT INTO ks.users (id) VALUES (1)", pid, "INSERT INTO ks.admins (id) VALUES (1)"], v
            ),
        )
    )
    unknown = wrap(frame(v, 5, "BATCH", batch_body(["INSERT INTO ks.users (id) VALUES (1)", b"??"], v)))
    base = len(h.to_client)
    h.feed(good + bad + unknown, split="bytes")
    assert h.error is None
    assert h.forwarded[False].endswith(good)
    assert h.dropped[False] == bad + unknown
    assert h.to_client[base:] == wrap(unauthorized(v, 4)) + wrap(unprepared(v, 5, b"??"))
    denied = [e.fields["query_table"] for e in h.log if e.verdict == "denied" and "query_table" in e.fields]
    assert denied == ["ks.users", "ks.users", "ks.admins"]


def test_cql_batch_in_query() -> None:
    h = harness(USERS_RULES)
    ok = frame(4, 1, "QUERY", query_body("BEGIN BATCH INSERT INTO ks.users (id) VALUES (1); APPLY BATCH"))
    bad = frame(
        4,
        2,
        "QUERY",
        query_body(
            "BEGIN BATCH INSERT INTO ks.users (id) VALUES (1); DELETE FROM ks.users WHERE id = 2; APPLY BATCH"
        ),
    )
    h.feed(ok + bad)
    assert h.forwarded[False] == ok
    assert h.dropped[False] == bad


# --- keyspaces ----------------------------------------------------------------------------------


def test_use_then_unqualified_names() -> None:
    h = harness(USERS_RULES)
    sel = frame(4, 1, "QUERY", query_body("SELECT * FROM users"))
    ins = frame(4, 2, "QUERY", query_body("INSERT INTO users (id) VALUES (1)"))
    h.feed(ins)  # no keyspace yet: table "users" does not match ^ks\.users$
    assert h.dropped[False] == ins
    h.feed(frame(4, 3, "QUERY", query_body("USE ks")))
    h.feed(frame(4, 3, "RESULT", result_set_keyspace("ks"), response=True), reply=True)
    h.feed(sel + ins)
    assert h.forwarded[False].endswith(sel + ins)
    assert [e.fields["query_table"] for e in h.log[-2:]] == ["ks.users", "ks.users"]
    # A USE that fails leaves the keyspace as it was.
    h.feed(frame(4, 4, "QUERY", query_body('USE "Other"')))
    h.feed(frame(4, 4, "ERROR", error_body(0x2200, "no such keyspace"), response=True), reply=True)
    h.feed(ins)
    assert h.forwarded[False].endswith(ins)


def test_pending_use_must_allow_both_keyspaces() -> None:
    h = harness(USERS_RULES)
    h.feed(frame(4, 3, "QUERY", query_body("USE ks")))
    h.feed(frame(4, 3, "RESULT", result_set_keyspace("ks"), response=True), reply=True)
    h.feed(frame(4, 4, "QUERY", query_body("USE other")))  # in flight
    ins = frame(4, 5, "QUERY", query_body("INSERT INTO users (id) VALUES (1)"))
    h.feed(ins)
    assert h.dropped[False] == ins  # other.users is not allowed
    assert h.log[-1].fields["query_table"] == "other.users"
    h.feed(frame(4, 4, "RESULT", result_set_keyspace("other"), response=True), reply=True)
    h.feed(frame(4, 6, "QUERY", query_body("USE ks")))
    h.feed(frame(4, 6, "RESULT", result_set_keyspace("ks"), response=True), reply=True)
    h.feed(ins)
    assert h.forwarded[False].endswith(ins)


def test_use_enforcement_is_optional() -> None:
    use = frame(4, 3, "QUERY", query_body("USE secret"))
    h = harness(ALLOW_SELECT)
    h.feed(use)
    assert h.forwarded[False] == use
    assert h.log[-1].fields["query_action"] == "use"
    h = harness([{"query_action": "use", "query_table": "^ks$"}], parser_config={"enforce_use": True})
    h.feed(use)
    assert h.dropped[False] == use


def test_v5_keyspace_parameter() -> None:
    h = harness(USERS_RULES)
    handshake(h, 5)
    ins = segment(
        frame(5, 3, "QUERY", query_body("INSERT INTO users (id) VALUES (?)", 5, [b"\0\0\0\1"], "ks"))
    )
    bad = segment(frame(5, 4, "QUERY", query_body("INSERT INTO users (id) VALUES (1)", 5, keyspace="ks2")))
    h.feed(ins + bad)
    assert h.forwarded[False].endswith(ins)
    assert h.dropped[False] == bad


# --- compression --------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["lz4", "snappy"])
def test_v4_compressed_traffic(algo: str) -> None:
    def c(body: bytes) -> bytes:
        return lz4_frame_compress(body) if algo == "lz4" else snappy.compress(body)

    h = harness(USERS_RULES)
    h.feed(frame(4, 1, "STARTUP", startup_body(algo)))
    h.feed(frame(4, 1, "READY", response=True), reply=True)
    ok = frame(
        4, 2, "QUERY", c(query_body("SELECT * FROM ks.users WHERE name = '" + "x" * 200 + "'")), flags=1
    )
    bad = frame(4, 3, "QUERY", c(query_body("DELETE FROM ks.users WHERE id = 1")), flags=1)
    prep = frame(4, 4, "PREPARE", c(prepare_body("DELETE FROM ks.users WHERE id = ?")), flags=1)
    h.feed(ok + bad + prep, split="bytes")
    assert h.forwarded[False].endswith(ok + prep)  # forwarded unchanged
    assert h.dropped[False] == bad
    assert h.to_client.endswith(unauthorized(4, 3))  # uncompressed, flag clear
    h.feed(frame(4, 4, "RESULT", c(prepared_result(b"P")), response=True, flags=1), reply=True, split="bytes")
    ex = frame(4, 5, "EXECUTE", c(execute_body(b"P")), flags=1)
    h.feed(ex)
    assert h.dropped[False].endswith(ex)
    assert h.to_client.endswith(unauthorized(4, 5))
    assert h.error is None


def test_v5_lz4_segments() -> None:
    h = harness(USERS_RULES)
    handshake(h, 5, "lz4")
    ok = frame(5, 2, "QUERY", query_body("SELECT * FROM ks.users WHERE name = '" + "y" * 500 + "'", 5))
    bad = frame(5, 3, "QUERY", query_body("DELETE FROM ks.users WHERE id = 1", 5))
    seg_ok, seg_bad = segment(ok, lz4_codec=True), segment(bad, lz4_codec=True)
    assert len(seg_ok) < len(ok)  # really compressed
    h.feed(seg_ok + seg_bad, split="bytes")
    assert h.error is None
    assert h.forwarded[False].endswith(seg_ok)
    assert h.dropped[False] == seg_bad
    answer = h.to_client[-(len(unauthorized(5, 3)) + 12) :]
    assert decode_segment(answer, 0, True).payload == unauthorized(5, 3)


def test_unknown_compression_refused() -> None:
    h = harness(ALLOW_SELECT)
    s = frame(4, 1, "STARTUP", startup_body("zstd"))
    h.feed(s)
    assert h.dropped[False] == s
    assert h.to_client[9:13] == struct.pack(">i", 0x000A)
    h = harness(ALLOW_SELECT)
    h.feed(frame(5, 1, "STARTUP", startup_body("snappy")))  # not allowed in v5 segments
    assert h.to_client[4] == 0x00


def test_compressed_without_negotiation_is_an_error() -> None:
    h = harness(ALLOW_SELECT)
    h.feed(frame(4, 1, "QUERY", lz4_frame_compress(query_body("SELECT * FROM ks.t")), flags=1))
    assert h.error is not None
    assert h.error.kind == "parser_error"


# --- v5 segments ---------------------------------------------------------------------------------


def test_v5_mixed_segment_is_rebuilt() -> None:
    h = harness(ALLOW_SELECT)
    handshake(h, 5)
    a = frame(5, 2, "QUERY", query_body("SELECT * FROM ks.a", 5))
    b = frame(5, 3, "QUERY", query_body("DELETE FROM ks.a WHERE k = 1", 5))
    c = frame(5, 4, "OPTIONS")
    seg = segment(a + b + c)
    after = segment(frame(5, 5, "QUERY", query_body("SELECT * FROM ks.b", 5)))
    ops = h.feed(seg + after)
    assert ops[:3] == [(INJECT, len(segment(a + c))), (DROP, len(seg)), (PASS, len(after))]
    assert h.to_server.endswith(segment(a + c) + after)
    assert h.dropped[False] == seg
    assert h.to_client.endswith(segment(unauthorized(5, 3)))


def test_v5_large_envelope_across_segments() -> None:
    big = "SELECT * FROM ks.t WHERE v = '" + "z" * 300_000 + "'"
    for allowed in (True, False):
        h = harness(ALLOW_SELECT if allowed else [{"query_action": "insert"}])
        handshake(h, 5)
        env = frame(5, 9, "QUERY", query_body(big, 5))
        wire = segments(env)
        assert len(wire) > 2 * 131071  # three segments
        nxt = segment(frame(5, 10, "OPTIONS"))
        h.feed(wire + nxt, split="random", seed=3)
        assert h.error is None
        if allowed:
            assert h.forwarded[False].endswith(wire + nxt)
        else:
            assert h.dropped[False] == wire
            assert h.forwarded[False].endswith(nxt)
            assert h.to_client.endswith(segment(unauthorized(5, 9)))


def test_v5_answer_waits_for_reply_envelope_end() -> None:
    """An ERROR for the client is not put between segments of one large reply envelope."""
    h = harness(ALLOW_SELECT)
    handshake(h, 5)
    rows = frame(5, 3, "RESULT", rows_body("ks", "t", [("v", 13)], [["w" * 200_000]]), response=True)
    wire = segments(rows)
    first = decode_segment(wire, 0, False).wire_len
    h.feed(wire[:first], reply=True)
    h.feed(segment(frame(5, 4, "QUERY", query_body("DELETE FROM ks.t WHERE k = 1", 5))))
    assert h.to_client.endswith(wire[:first])  # held back
    h.feed(wire[first:] + segment(frame(5, 5, "RESULT", result_void(), response=True)), reply=True)
    assert h.error is None
    i = h.to_client.index(wire[first:])
    assert h.to_client[i + len(wire) - first :].startswith(segment(unauthorized(5, 4)))


def test_v5_bad_crc_is_an_error() -> None:
    h = harness(ALLOW_SELECT)
    handshake(h, 5)
    seg = bytearray(segment(frame(5, 2, "OPTIONS")))
    seg[-1] ^= 1
    h.feed(bytes(seg))
    assert h.error is not None
    assert h.error.kind == "parser_error"
    h = harness(ALLOW_SELECT)
    handshake(h, 5)
    seg = bytearray(segment(frame(5, 2, "OPTIONS")))
    seg[0] ^= 1
    h.feed(bytes(seg))
    assert h.error is not None


def test_segment_codec_roundtrip() -> None:
    for compressed in (False, True):
        s = encode_segment(b"hello", True, compressed)
        d = decode_segment(s, 0, compressed)
        assert (d.payload, d.self_contained, d.wire_len) == (b"hello", True, len(s))
    assert crc24(b"\x00\x00\x00") != crc24(b"\x00\x00\x01")


# --- limits, errors, versions ----------------------------------------------------------------------


def test_large_query_passes_without_buffering() -> None:
    h = harness(USERS_RULES, buffer_limit=4096)
    blob = b"\x00" * 2_000_000
    q = frame(
        4, 3, "QUERY", query_body("INSERT INTO ks.users (id, name) VALUES (?, ?)", 4, [b"\0\0\0\1", blob])
    )
    h.feed(q, split=[100, 1000] + [4000] * 600)
    assert h.error is None
    assert h.forwarded[False] == q
    qd = frame(4, 4, "QUERY", query_body("INSERT INTO ks.other (id) VALUES (?)", 4, [blob]))
    h.feed(qd, split=[100] + [4000] * 600)
    assert h.dropped[False] == qd
    assert h.to_client == unauthorized(4, 4)


def test_too_large_to_inspect_is_denied() -> None:
    h = harness(USERS_RULES, parser_config={"max_inspect_bytes": 1024})
    members = ["INSERT INTO ks.users (id, name) VALUES (1, '" + "n" * 100 + "')"] * 20
    b = frame(4, 3, "BATCH", batch_body(members))
    h.feed(b)
    assert h.error is None
    assert h.dropped[False] == b
    assert h.log[-1].fields["error"] == "request too large to inspect"
    assert h.to_client == unauthorized(4, 3)


def test_frame_over_max_is_an_error() -> None:
    h = harness(ALLOW_SELECT, parser_config={"max_frame_bytes": 100})
    h.feed(frame(4, 1, "OPTIONS")[:5] + struct.pack(">I", 101))
    assert h.error is not None
    assert h.error.code == 2


@pytest.mark.parametrize(
    "data",
    [
        frame(4, 1, "RESULT", b""),  # a response opcode from the client
        frame(4, 1, "QUERY", b"", response=True),  # direction bit set
        frame(4, 1, 0x04, b""),  # no such opcode
        frame(4, 1, "QUERY", b"\x00\x00\x00\x10abc"),  # statement runs past the body
        frame(4, 1, "QUERY", b"\xff\xff\xff\xffabc"),  # negative length
        frame(4, 1, "QUERY", struct.pack(">i", 2) + b"\xff\xfe"),  # not UTF-8
        frame(4, 1, "BATCH", b"\x00\x00\x01\x07"),  # bad member kind
    ],
)
def test_malformed_requests_are_errors(data: bytes) -> None:
    h = harness(ALLOW_SELECT)
    h.feed(data)
    assert h.error is not None
    assert h.error.kind == "parser_error"


def test_version_change_is_an_error() -> None:
    h = harness(ALLOW_SELECT)
    h.feed(frame(4, 1, "STARTUP", startup_body()))
    h.feed(frame(3, 2, "OPTIONS"))
    assert h.error is None  # the STARTUP's answer is owed first
    h.feed(frame(4, 1, "READY", response=True), reply=True)
    assert h.error is not None
    assert h.to_client == frame(4, 1, "READY", response=True)


@pytest.mark.parametrize("split", [None, "bytes"])
@pytest.mark.parametrize("v", [4, 5])
def test_protocol_error_closes_after_the_replies_owed(v: int, split: str | None) -> None:
    """A malformed request closes the connection, after the replies to earlier requests."""
    h = harness(ALLOW_SELECT)
    handshake(h, v)
    q1 = frame(v, 2, "QUERY", query_body("SELECT * FROM ks.t", version=v))
    q2 = frame(v, 3, "QUERY", query_body("SELECT * FROM ks.u", version=v))
    bad = frame(v, 4, "RESULT", b"")  # a response opcode from the client
    wire = (lambda b: segments(b)) if v == 5 else (lambda b: b)
    sent_before = len(h.to_server)
    h.feed(wire(q1 + q2) + wire(bad) + wire(frame(v, 5, "OPTIONS")), split=split)
    assert h.error is None
    assert h.to_server[sent_before:] == wire(q1 + q2)
    event = frame(v, -1, "EVENT", b"\x00\x0dSCHEMA_CHANGE", response=True)  # not a reply
    r1 = frame(v, 2, "RESULT", result_void(), response=True)
    r2 = frame(v, 3, "RESULT", rows_body("ks", "u", [("v", 13)], [["w" * 3000]]), response=True)
    before = len(h.to_client)
    h.feed(wire(r1) + wire(event), reply=True, split=split)
    assert h.error is None
    h.feed(wire(r2), reply=True, split=split)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.to_client[before:] == wire(r1) + wire(event) + wire(r2)
    assert h.log[-1].fields["error"] in ("protocol error 1 in a request", "malformed request: bad envelope")


def test_reply_frames_have_no_size_cap() -> None:
    """The protocol's length is 32 bits; replies pass unbuffered, so proxyd adds no cap."""
    h = harness(ALLOW_SELECT, parser_config={"max_frame_bytes": 100})
    handshake(h, 4)
    h.feed(frame(4, 2, "OPTIONS"))
    head = frame(4, 2, "SUPPORTED", response=True)[:5] + struct.pack(">I", 300 << 20)
    h.feed(head + b"x" * 1000, reply=True)
    assert h.error is None
    assert h.to_client.endswith(head + b"x" * 1000)


def test_denial_waits_for_the_end_of_a_streaming_reply() -> None:
    h = harness(ALLOW_SELECT)
    handshake(h, 4)
    h.feed(frame(4, 2, "QUERY", query_body("SELECT * FROM ks.t")))
    rows = frame(4, 2, "RESULT", rows_body("ks", "t", [("v", 13)], [["w" * 5000]]), response=True)
    h.feed(rows[:100], reply=True)
    h.feed(frame(4, 3, "QUERY", query_body("DELETE FROM ks.t WHERE k = 1")))
    h.feed(rows[100:-1], reply=True)
    h.feed(rows[-1:], reply=True)
    assert h.to_client.endswith(rows + unauthorized(4, 3))


@pytest.mark.parametrize(
    "first",
    [
        bytes([0x42, 0, 0, 0, 5, 0, 0, 0, 0]),
        bytes([0x06, 0, 0, 1, 5, 0, 0, 0, 0]),
        bytes([0x02, 0, 7, 5, 0, 0, 0, 0]),
    ],
)
def test_unsupported_version_answered_like_a_server(first: bytes) -> None:
    h = harness(ALLOW_SELECT)
    h.feed(first)
    assert h.error is None
    assert h.dropped[False] == first
    assert b"unsupported protocol version" in h.to_client
    assert h.to_client[0] == 0x84


def test_v4_response_stream_with_interleaved_answers() -> None:
    """An answer for a denied request goes at a reply frame boundary, not inside a passing frame."""
    h = harness(ALLOW_SELECT)
    rows = frame(4, 3, "RESULT", rows_body("ks", "t", [("v", 13)], [["w" * 5000]]), response=True)
    h.feed(rows[:100], reply=True)
    h.feed(frame(4, 4, "QUERY", query_body("DELETE FROM ks.t WHERE k = 1")))
    h.feed(rows[100:], reply=True)
    assert h.to_client in (rows + unauthorized(4, 4), unauthorized(4, 4) + rows)


# --- hypothesis ----------------------------------------------------------------------------------


def _session_v4() -> list[tuple[bool, bytes]]:
    return [
        (False, frame(4, 1, "STARTUP", startup_body("lz4"))),
        (True, frame(4, 1, "READY", response=True)),
        (
            False,
            frame(4, 2, "QUERY", query_body("USE ks"))
            + frame(4, 3, "PREPARE", prepare_body("SELECT * FROM t")),
        ),
        (
            True,
            frame(4, 2, "RESULT", result_set_keyspace("ks"), response=True)
            + frame(4, 3, "RESULT", lz4_frame_compress(prepared_result(b"id")), response=True, flags=1),
        ),
        (
            False,
            frame(4, 4, "EXECUTE", execute_body(b"id"))
            + frame(4, 5, "QUERY", query_body("DELETE FROM t"))
            + frame(4, 6, "EXECUTE", execute_body(b"nope"))
            + frame(
                4,
                7,
                "BATCH",
                lz4_frame_compress(batch_body(["INSERT INTO users (id) VALUES (1)", b"id"])),
                flags=1,
            ),
        ),
    ]


def _session_v5() -> list[tuple[bool, bytes]]:
    return [
        (False, frame(5, 1, "STARTUP", startup_body("lz4"))),
        (True, frame(5, 1, "READY", response=True)),
        (False, segment(frame(5, 2, "PREPARE", prepare_body("SELECT * FROM ks.t", 5)), lz4_codec=True)),
        (True, segment(frame(5, 2, "RESULT", prepared_result(b"id", 5), response=True), lz4_codec=True)),
        (
            False,
            segment(
                frame(5, 4, "EXECUTE", execute_body(b"id", 5))
                + frame(5, 5, "QUERY", query_body("DELETE FROM ks.t", 5)),
                lz4_codec=True,
            )
            + segments(
                frame(
                    5, 6, "QUERY", query_body("INSERT INTO ks.users (id) VALUES (1) -- " + "p" * 140_000, 5)
                ),
                lz4_codec=True,
            ),
        ),
    ]


def _run(session: list[tuple[bool, bytes]], cuts: dict[int, list[int]]) -> tuple[object, ...]:
    h = harness(USERS_RULES)
    for i, (reply, data) in enumerate(session):
        h.feed(data, reply=reply, split=cuts.get(i))
    return (h.forwarded, h.dropped, h.injected, h.to_client, h.to_server, h.error is None)


@pytest.mark.parametrize("make", [_session_v4, _session_v5])
def test_segmentation_invariance(make: object) -> None:
    session = make()  # type: ignore[operator]
    reference = _run(session, {})
    assert reference[-1] is True

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.lists(st.integers(1, 9000), max_size=30), min_size=len(session), max_size=len(session))
    )
    def check(splits: list[list[int]]) -> None:
        assert _run(session, dict(enumerate(splits))) == reference

    check()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_raise(req: bytes, rep: bytes, v5: bool) -> None:
    h = harness(USERS_RULES)
    if v5:
        handshake(h, 5)
    h.feed(req, split="random")
    h.feed(rep, reply=True, split="random")
    h.eof(False)
    h.eof(True)
    assert h.error is None or h.error.kind != "exception", h.error


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from([0, 1, 2, 3, 4, 5, 6]), st.binary(max_size=60)), max_size=8
    )
)
def test_fuzzed_frames_never_raise(items: list[tuple[bool, int, bytes]]) -> None:
    """Well-framed but random bodies (more likely to reach deep parsing than random bytes)."""
    ops = ["QUERY", "PREPARE", "EXECUTE", "BATCH", "STARTUP", "RESULT", "ERROR"]
    h = harness(USERS_RULES)
    for reply, op, body in items:
        h.feed(frame(4, 1, ops[op], body, response=reply), reply=reply)
    assert h.error is None or h.error.kind != "exception", h.error


def test_no_injection_ops_misuse() -> None:
    """INJECT is only answered with bytes queued (the engine checks; a contract error would show)."""
    h = harness(ALLOW_SELECT)
    handshake(h, 5)
    seg = segment(
        frame(5, 2, "QUERY", query_body("SELECT * FROM ks.a", 5))
        + frame(5, 3, "QUERY", query_body("DELETE FROM ks.a", 5))
    )
    h.feed(seg, split="bytes")
    assert h.error is None
    assert (ERROR, 0) not in h.ops_of(False)
