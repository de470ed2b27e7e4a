"""Property tests: segmentation invariance, no exception escapes, bounded buffering."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.parsers.memcache import MemcacheFactory
from proxyd.parsers.memcache.common import MAX_BUFFERED
from proxyd.parsers.memcache.text import DENIED_REPLY
from proxyd.testing import Harness

RULES = [
    {"command": "get", "keyPrefix": "a/"},
    {"command": "writeGroup", "keyPrefix": "a/"},
    {"command": "meta", "keyPrefix": "a/"},
    {"command": "mn"},
]
KEYS = [b"a/1", b"a/2", b"b/1"]

# (request template, reply if forwarded, silent when denied); {k} is a key.
TEXT_PAIRS = [
    (b"get {k}\r\n", b"VALUE {k} 0 3\r\nE\r\n\r\nEND\r\n", False),
    (b"get {k}\r\n", b"END\r\n", False),
    (b"gets {k} {k}\r\n", b"END\r\n", False),
    (b"set {k} 0 0 5\r\nEND\r\n\r\n", b"STORED\r\n", False),
    (b"set {k} 0 0 1 noreply\r\nx\r\n", b"", True),
    (b"delete {k}\r\n", b"DELETED\r\n", False),
    (b"delete {k} noreply\r\n", b"", True),
    (b"incr {k} 1\r\n", b"2\r\n", False),
    (b"touch {k} 1\r\n", b"TOUCHED\r\n", False),
    (b"mg {k} v\r\n", b"VA 2\r\nHD\r\n", False),
    (b"mg {k} v q O7\r\n", b"", False),
    (b"mg {k} v q O8\r\n", b"VA 1 O8\r\nx\r\n", False),
    (b"ms {k} 2 q\r\nxx\r\n", b"", False),
    (b"ms {k} 2\r\nxx\r\n", b"HD\r\n", False),
    (b"md {k} q\r\n", b"", False),
    (b"ma {k} v\r\n", b"VA 1\r\n3\r\n", False),
    (b"stats\r\n", b"STAT pid 1\r\nEND\r\n", False),
    (b"mn\r\n", b"MN\r\n", False),
]

text_stream = st.lists(
    st.tuples(st.integers(0, len(TEXT_PAIRS) - 1), st.sampled_from(KEYS)), min_size=1, max_size=12
)
cuts = st.lists(st.integers(1, 40), max_size=30)


def build_text(choices: list[tuple[int, bytes]]) -> tuple[list[bytes], list[bytes], list[bool]]:
    reqs, reps, silent = [], [], []
    for i, k in choices:
        rq, rp, sl = TEXT_PAIRS[i]
        reqs.append(rq.replace(b"{k}", k))
        reps.append(rp.replace(b"{k}", k))
        silent.append(sl)
    return reqs, reps, silent


def server_replies(reqs: list[bytes], reps: list[bytes], to_server: bytes, barrier: bytes,
                   barrier_reply: bytes) -> bytes:
    """What a server answering from the table sends for the bytes the parser forwarded."""
    out, pos = [], 0
    for rq, rp in zip(reqs, reps, strict=True):
        if to_server.startswith(rq, pos):
            out.append(rp)
            pos += len(rq)
        elif to_server.startswith(barrier, pos):
            out.append(barrier_reply)
            pos += len(barrier)
    assert pos == len(to_server)
    return b"".join(out)


def drive(reqs: bytes, reps_for: object, req_cuts: list[int] | None, rep_cuts: list[int] | None,
          barrier: bytes, barrier_reply: bytes, reqlist: list[bytes], replist: list[bytes]) -> Harness:
    h = Harness(MemcacheFactory(), rules=RULES)
    h.feed(reqs, split=req_cuts)
    replies = server_replies(reqlist, replist, h.to_server, barrier, barrier_reply)
    h.feed(replies, reply=True, split=rep_cuts)
    return h


@settings(max_examples=200, deadline=None)
@given(text_stream, cuts, cuts)
def test_text_streams_segmentation_invariant_and_exact(
    choices: list[tuple[int, bytes]], req_cuts: list[int], rep_cuts: list[int]
) -> None:
    reqlist, replist, silent = build_text(choices)
    reqs = b"".join(reqlist)
    whole = drive(reqs, None, None, None, b"version\r\n", b"VERSION 1\r\n", reqlist, replist)
    split = drive(reqs, None, req_cuts, rep_cuts, b"version\r\n", b"VERSION 1\r\n", reqlist, replist)
    assert whole.error is None
    for h in (whole, split):
        assert h.error is None
        # Only quiet requests that were answered with silence may be left.
        assert all(h.engine.parser.pending())  # type: ignore[union-attr]
    assert split.to_server == whole.to_server
    assert split.to_client == whole.to_client
    assert split.dropped == whole.dropped
    # The client sees each request's reply, or the denial, in order.
    expected = []
    for rq, rp, sl in zip(reqlist, replist, silent, strict=True):
        toks = rq.split(b"\r")[0].split(b" ")
        key = toks[1] if len(toks) > 1 else b""
        allowed = key.startswith(b"a/") and not rq.startswith(b"stats")
        expected.append(rp if allowed else (b"" if sl else DENIED_REPLY))
    if all(not rq.startswith(b"mn") for rq in reqlist):
        assert whole.to_client == b"".join(expected)


_PKT = struct.Struct(">BBHBBHIIQ")


def breq(op: int, key: bytes, value: bytes, opaque: int) -> bytes:
    extras = b"\x00" * 8 if op in (0x01, 0x11) else b""
    body = extras + key + value
    return _PKT.pack(0x80, op, len(key), len(extras), 0, 0, len(body), opaque, 0) + body


def bresp(op: int, status: int, value: bytes, opaque: int) -> bytes:
    return _PKT.pack(0x81, op, 0, 0, 0, status, len(value), opaque, 0) + value


BIN_OPS = [(0x00, b"hit!", False), (0x09, b"", True), (0x09, b"hit", False), (0x01, b"", False),
           (0x11, b"", True), (0x0D, b"v", False), (0x0A, b"", False)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(BIN_OPS) - 1), st.sampled_from(KEYS)), min_size=1, max_size=10),
       cuts, cuts)
def test_binary_streams_segmentation_invariant(
    choices: list[tuple[int, bytes]], req_cuts: list[int], rep_cuts: list[int]
) -> None:
    reqlist, replist = [], []
    for n, (i, k) in enumerate(choices):
        op, value, silent = BIN_OPS[i]
        key = b"" if op == 0x0A else k
        reqlist.append(breq(op, key, b"val" if op in (0x01, 0x11) else b"", n))
        replist.append(b"" if silent else bresp(op, 0, value, n))
    reqs = b"".join(reqlist)
    barrier = _PKT.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0)
    barrier_reply = _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0)
    whole = drive(reqs, None, None, None, barrier, barrier_reply, reqlist, replist)
    split = drive(reqs, None, req_cuts, rep_cuts, barrier, barrier_reply, reqlist, replist)
    for h in (whole, split):
        assert h.error is None
        # Only quiet requests that were answered with silence may be left.
        assert all(h.engine.parser.pending())  # type: ignore[union-attr]
    assert split.to_server == whole.to_server
    assert split.to_client == whole.to_client


def run_raw(req: bytes, rep: bytes, req_cuts: list[int] | None, rep_cuts: list[int] | None) -> Harness:
    h = Harness(MemcacheFactory(), rules=RULES)
    h.feed(req, split=req_cuts)
    h.feed(rep, reply=True, split=rep_cuts)
    for reply in (False, True):
        assert h.engine.buffered(reply) <= MAX_BUFFERED
    return h


raw_text = st.binary(max_size=300).map(lambda b: b.replace(b"\xff", b"\n"))
raw_any = st.one_of(st.binary(max_size=300), raw_text, st.binary(max_size=200).map(lambda b: b"\x80" + b))


@settings(max_examples=200, deadline=None)
@given(raw_any, raw_any, cuts, cuts)
def test_arbitrary_input_no_exception_and_invariant(req: bytes, rep: bytes, req_cuts: list[int],
                                                    rep_cuts: list[int]) -> None:
    whole = run_raw(req, rep, None, None)
    split = run_raw(req, rep, req_cuts, rep_cuts)
    for h in (whole, split):
        assert h.error is None or h.error.kind != "exception", h.error
    assert (whole.error is None) == (split.error is None)
    if whole.error is None:
        assert split.forwarded == whole.forwarded
        assert split.dropped == whole.dropped
        assert split.injected == whole.injected


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 3), st.integers(1, 200))
def test_buffer_bounded_for_endless_lines(kind: int, chunk: int) -> None:
    # A multi-key get line is held whole, as memcached holds it: up to the engine's limit.
    starts = [b"get ", b"set ", b"mg ", b""]
    h = Harness(MemcacheFactory(), buffer_limit=20000)
    h.feed(starts[kind])
    for _ in range(30000 // chunk + 2):
        h.feed(b"x" * chunk)
        assert h.engine.buffered(False) <= (20000 if kind == 0 else MAX_BUFFERED)
        if h.error is not None:
            break
    assert h.error is not None
    assert h.error.kind == ("buffer_limit" if kind == 0 else "parser_error")
