"""The http parser through the harness: every framing rule, fed at every segmentation."""

from __future__ import annotations

from typing import Any

import pytest
from http_helpers import BAD_REQUEST, DENIED, DENIED_CLOSE, TOO_LARGE, run, splits

from proxyd.ops import DROP, ERROR, INJECT, PASS
from proxyd.parsers.http import HttpFactory
from proxyd.testing import Harness

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def reference(h: Harness) -> Any:
    """The connection's reference HttpParser (on the native path, the one the twin hands states to)."""
    p = h.engine.parser
    return getattr(p, "reference", p)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
POST_CL = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
POST_CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b'5;name=val;q="x y"\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n'
)

# (name, client bytes, bytes the server must see)
FORWARDED = [
    ("simple GET", GET, GET),
    ("Content-Length body", POST_CL, POST_CL),
    (
        "Content-Length 0 and leading zeros",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\nabc",
    ),
    ("chunked with extensions and trailers", POST_CHUNKED, POST_CHUNKED),
    ("pipelined", GET + POST_CL + GET, GET + POST_CL + GET),
    ("empty lines before a request are dropped", b"\r\n\r\n" + GET, GET),
    ("HTTP/1.0 without Host", b"GET /x HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.0\r\n\r\n"),
    (
        "HTTP/1.0 without keep-alive: later bytes dropped",
        b"GET /x HTTP/1.0\r\n\r\n" + GET,
        b"GET /x HTTP/1.0\r\n\r\n",
    ),
    (
        "HTTP/1.0 keep-alive pipelined",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET,
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET,
    ),
    (
        "Connection: close: later bytes dropped",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ),
    (
        "absolute-form forwarded as sent",
        b"GET http://a/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
    ),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
    (
        "obs-text and tabs in a value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \xe9\tb \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \xe9\tb \r\n\r\n",
    ),
    (
        "Host with port and IPv6",
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("name", "wire", "expected"), FORWARDED, ids=[r[0] for r in FORWARDED])
def test_forwarded(name: str, wire: bytes, expected: bytes) -> None:
    for split in splits(wire):
        out = run(wire, split=split)
        assert (out.to_server, out.to_client, out.closed) == (expected, b"", False), (name, split)


# (name, client bytes, answer, reason logged): never forwarded, answered, closed.
H = b"GET / HTTP/1.1\r\nHost: a\r\n"
REJECTED = [
    (
        "CL.TE",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "both Transfer-Encoding and Content-Length",
    ),
    (
        "TE.CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        "both Transfer-Encoding and Content-Length",
    ),
    (
        "TE last coding not chunked",
        H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        "Transfer-Encoding whose last coding is not chunked",
    ),
    (
        "TE identity",
        H + b"Transfer-Encoding: identity\r\n\r\n",
        "Transfer-Encoding whose last coding is not chunked",
    ),
    (
        "TE chunked twice",
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        "chunked applied more than once",
    ),
    (
        "TE obfuscated xchunked",
        H + b"Transfer-Encoding: xchunked\r\n\r\n",
        "Transfer-Encoding whose last coding is not chunked",
    ),
    (
        "TE obfuscated with a vertical tab",
        H + b"Transfer-Encoding: chunked\x0b\r\n\r\n",
        "invalid character (control or NUL) in a field value",
    ),
    (
        "TE empty element",
        H + b"Transfer-Encoding: chunked,\r\n\r\n",
        "malformed Transfer-Encoding element ''",
    ),
    (
        "TE with a parameter on chunked",
        H + b"Transfer-Encoding: chunked;q=1\r\n\r\n",
        "Transfer-Encoding whose last coding is not chunked",
    ),
    (
        "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Transfer-Encoding in an HTTP/1.0 request",
    ),
    (
        "double Content-Length",
        H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "more than one Content-Length in a request",
    ),
    ("Content-Length list 5, 5", H + b"Content-Length: 5, 5\r\n\r\nhello", "malformed Content-Length '5, 5'"),
    ("Content-Length signed", H + b"Content-Length: +5\r\n\r\nhello", "malformed Content-Length '+5'"),
    ("Content-Length hex", H + b"Content-Length: 0x5\r\n\r\nhello", "malformed Content-Length '0x5'"),
    ("Content-Length empty", H + b"Content-Length: \r\n\r\n", "malformed Content-Length ''"),
    (
        "Content-Length 19 digits",
        H + b"Content-Length: 1000000000000000000\r\n\r\n",
        "malformed Content-Length '1000000000000000000'",
    ),
    ("obs-fold", H + b"X-A: a\r\n b\r\n\r\n", "obs-fold (a field line starting with whitespace)"),
    (
        "obs-fold hiding TE",
        H + b"X-A: a\r\n\tTransfer-Encoding: chunked\r\n\r\n",
        "obs-fold (a field line starting with whitespace)",
    ),
    (
        "whitespace before the colon",
        H + b"Transfer-Encoding : chunked\r\n\r\n",
        "whitespace between field name and colon",
    ),
    (
        "tab before the colon",
        H + b"Content-Length\t: 5\r\n\r\nhello",
        "whitespace between field name and colon",
    ),
    ("bare CR in a value", H + b"X-A: a\rb\r\n\r\n", "bare CR in a line"),
    ("bare CR line end", b"GET / HTTP/1.1\rHost: a\r\n\r\n", "bare CR in a line"),
    ("bare LF line end", b"GET / HTTP/1.1\nHost: a\n\n", "bare LF (line not ended by CRLF)"),
    ("bare LF after a header", H + b"X-A: a\n\r\n", "bare LF (line not ended by CRLF)"),
    ("NUL in a value", H + b"X-A: a\x00b\r\n\r\n", "invalid character (control or NUL) in a field value"),
    ("DEL in a value", H + b"X-A: a\x7fb\r\n\r\n", "invalid character (control or NUL) in a field value"),
    ("invalid field name", H + b"X(A): b\r\n\r\n", "invalid field name"),
    ("empty field name", H + b": b\r\n\r\n", "invalid field name"),
    ("field line without colon", H + b"X-A\r\n\r\n", "field line without a colon"),
    ("request line: two spaces", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
    ("request line: tab", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
    ("request line: trailing space", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "invalid request line"),
    ("request line: lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
    ("request line: HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", "unsupported HTTP version 1.2"),
    ("request line: HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "unsupported HTTP version 2.0"),
    ("request line: no version (HTTP/0.9)", b"GET /\r\n\r\n", "invalid request line"),
    ("request line: NUL in method", b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
    ("request line: non-ASCII target", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
    (
        "target: asterisk outside OPTIONS",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        "asterisk-form target outside OPTIONS",
    ),
    ("target: not a form", b"GET x HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request target"),
    ("target: authority outside CONNECT", b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request target"),
    (
        "target: CONNECT origin-form",
        b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n",
        "CONNECT target is not authority-form (host:port)",
    ),
    (
        "target: CONNECT with a body",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 2\r\n\r\nhi",
        "a body on CONNECT",
    ),
    (
        "target: absolute-form Host mismatch",
        b"GET http://evil/ HTTP/1.1\r\nHost: good\r\n\r\n",
        "Host differs from the absolute-form target's authority",
    ),
    (
        "target: userinfo",
        b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        "userinfo in an absolute-form target",
    ),
    ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host"),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
    ("invalid Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host"),
    ("Host with a slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host"),
]


@pytest.mark.parametrize(("name", "wire", "reason"), REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_with_400_and_close(name: str, wire: bytes, reason: str) -> None:
    for split in splits(wire, every_cut=len(wire) < 120):
        out = run(wire, split=split)
        assert out.to_server == b"", (name, split)
        assert out.to_client == BAD_REQUEST, (name, split)
        assert out.closed, (name, split)
        assert out.errors == (reason,), (name, split)


def test_400_waits_for_the_responses_before_it() -> None:
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx" + GET
    for split in splits(GET + bad, every_cut=False):
        out = run(GET + bad, [OK], split=split)
        assert out.to_server == GET
        assert out.to_client == OK + BAD_REQUEST
        assert out.closed


def test_header_block_over_the_limit_is_431() -> None:
    big = H + b"X-Big: " + b"a" * 300 + b"\r\n\r\n"
    for split in splits(big, every_cut=False):
        out = run(big, parser_config={"max_header_bytes": 256}, split=split)
        assert (out.to_server, out.to_client, out.closed) == (b"", TOO_LARGE, True)
    # exactly at the limit is fine
    exact = H + b"X-Big: " + b"a" * (256 - len(H) - 11) + b"\r\n\r\n"
    assert len(exact) == 256
    assert run(exact, parser_config={"max_header_bytes": 256}).to_server == exact
    # the default limit: 64 KiB
    huge = H + b"X-Big: " + b"a" * 65536 + b"\r\n\r\n"
    assert run(huge).to_client == TOO_LARGE


def test_the_limit_is_judged_on_the_same_bytes_however_they_arrive() -> None:
    # malformed past the limit: 431 whether it came in one piece or byte by byte
    wire = H + b"X: " + b"a" * 400 + b"\x00\r\n\r\n"
    for split in (None, "bytes", [300]):
        assert run(wire, parser_config={"max_header_bytes": 256}, split=split).to_client == TOO_LARGE


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ],
)
def test_not_http1_closes_with_a_logged_reason(name: str, wire: bytes) -> None:
    for split in splits(wire):
        out = run(wire, split=split)
        assert (out.to_server, out.to_client, out.closed) == (b"", b"", True)
        assert len(out.errors) == 1 and "not HTTP/1.x" in out.errors[0]


def test_a_bad_request_line_is_answered_before_the_head_ends() -> None:
    h = Harness(HttpFactory())
    assert h.feed(b"GET / HTTP/3.0\r\nHost: a\r\n") == [(ERROR, 16)]
    assert h.to_client == BAD_REQUEST


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("space after chunk size", b"5 \r\nhello\r\n0\r\n\r\n"),
        ("hex prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("negative size", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("size over 64 bits", b"10000000000000000\r\n"),
        ("no CRLF after data", b"5\r\nhelloX\r\n0\r\n\r\n"),
        ("bare LF after size", b"5\nhello\r\n0\r\n\r\n"),
        ("bare LF after data", b"5\r\nhello\n0\r\n\r\n"),
        ("bare CR in extension", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
        ("LF in extension", b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
        ("bad trailer", b"0\r\nX : y\r\n\r\n"),
        ("obs-fold in trailer", b"0\r\nX: y\r\n z\r\n\r\n"),
    ],
)
def test_chunked_body_errors_close_the_connection(name: str, body: bytes) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    for split in splits(head + body, every_cut=False):
        out = run(head + body, split=split)
        assert out.closed, (name, split)
        assert out.to_client == b""
        assert out.errors and out.errors[0].startswith("request body:")
        assert GET not in out.to_server


def test_chunk_line_length_is_bounded_by_max_header_bytes() -> None:
    # nginx bounds neither chunk extensions nor the line: up to max_header_bytes passes (issue 17:
    # a fixed 4 KiB closed connections nginx served), past it the connection closes
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    ok = head + b"5;e=" + b"a" * 60000 + b"\r\nhello\r\n0;f=" + b"b" * 60000 + b"\r\n\r\n"
    for split in (None, [1000] * 130):
        out = run(ok, split=split)
        assert (out.to_server, out.closed) == (ok, False)
    out = run(head + b"5;" + b"a" * 70000 + b"\r\n")
    assert out.closed and "over 65536" in out.errors[0]
    out = run(head + b"5;" + b"a" * 300 + b"\r\n", parser_config={"max_header_bytes": 256})
    assert out.closed and "over 256" in out.errors[0]


def test_a_chunk_line_trickling_in_is_searched_once() -> None:
    h = Harness(HttpFactory())
    h.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    h.feed(b"5;e=")
    for _ in range(2000):
        h.feed(b"a")
    assert h.engine.parser.r_seen == 2004  # type: ignore[attr-defined]  # the twin keeps its own
    h.feed(b"\r\nhello\r\n0\r\n\r\n" + GET)
    assert h.to_server.endswith(b"hello\r\n0\r\n\r\n" + GET) and not h.closed


# --- bodies stream past the buffer ---------------------------------------------------------------


def test_content_length_body_is_one_pass_reaching_past_the_buffer() -> None:
    h = Harness(HttpFactory(), buffer_limit=4096)
    head = b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
    assert h.feed(head + b"x" * 100) == [(PASS, len(head) + 1_000_000)]
    for k in (500_000, 499_899):
        assert h.feed(b"y" * k) == []  # passes without calling the parser
    assert h.feed(b"z" + GET) == [(PASS, len(GET))]
    assert h.to_server == head + b"x" * 100 + b"y" * 999_899 + b"z" + GET
    assert h.engine.buffered(False) == 0


def test_chunked_body_passes_each_chunk_past_the_buffer() -> None:
    h = Harness(HttpFactory(), buffer_limit=4096)
    head = b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert h.feed(head) == [(PASS, len(head))]
    assert h.feed(b"100000\r\n" + b"x" * 10) == [(PASS, 8 + 0x100000)]
    h.feed(b"x" * (0x100000 - 10))
    assert h.feed(b"\r\n0\r\n\r\n") == [(PASS, 5), (PASS, 2)]
    assert h.engine.buffered(False) == 0 and not h.closed


def test_denied_body_is_dropped_past_the_buffer() -> None:
    h = Harness(HttpFactory(), rules=[{"method": "GET"}], buffer_limit=4096)
    head = b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    assert h.feed(head + b"x" * 10) == [(DROP, len(head) + 100000)]
    h.feed(b"x" * 99990)
    h.feed(GET)
    assert h.to_server == GET and h.to_client == DENIED
    assert len(h.dropped[False]) == len(head) + 100000


# --- responses ----------------------------------------------------------------------------------


RESPONSES = [
    ("Content-Length", GET, [OK]),
    (
        "chunked with trailer",
        GET,
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"],
    ),
    (
        "HEAD has no body",
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n" + GET,
        [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", OK],
    ),
    ("204 has no body", GET + GET, [b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", OK]),
    ("304 has no body", GET + GET, [b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", OK]),
    (
        "100 Continue is interim",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab" + GET,
        [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", OK, OK],
    ),
    ("status line without reason", GET, [b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"]),
    ("HTTP/1.0 response", GET, [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"]),
]


@pytest.mark.parametrize(("name", "reqs", "resps"), RESPONSES, ids=[r[0] for r in RESPONSES])
def test_response_framing(name: str, reqs: bytes, resps: list[bytes]) -> None:
    wire = b"".join(resps)
    for split in splits(wire, every_cut=False):
        h = Harness(HttpFactory())
        h.feed(reqs)
        h.feed(wire, reply=True, split=split)
        assert h.to_client == wire and not h.closed, (name, split)
        assert not h.engine.parser.pending_requests(), (name, split)  # type: ignore[attr-defined]


def test_response_until_close() -> None:
    h = Harness(HttpFactory())
    h.feed(GET)
    h.feed(b"HTTP/1.1 200 OK\r\n\r\nstream", reply=True)
    h.feed(b"HTTP/1.1 200 more bytes of the same body", reply=True)
    assert h.to_client == b"HTTP/1.1 200 OK\r\n\r\nstreamHTTP/1.1 200 more bytes of the same body"
    assert not h.closed


def test_no_answer_is_put_inside_a_body_that_ends_at_close() -> None:
    h = Harness(HttpFactory(), rules=ALLOW_GET)
    h.feed(GET)
    h.feed(b"HTTP/1.1 200 OK\r\n\r\nstream", reply=True)
    h.feed(b"PUT / HTTP/1.1\r\nHost: a\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n")
    h.feed(b" goes on", reply=True)
    assert h.to_client == b"HTTP/1.1 200 OK\r\n\r\nstream goes on"
    assert h.to_server == GET


@pytest.mark.parametrize(
    ("name", "resp"),
    [
        ("TE and CL", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
        ("double CL", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
        ("bad status line", b"HTTP/1.1 2000 OK\r\n\r\n"),
        ("HTTP/2 status", b"HTTP/2.0 200 OK\r\n\r\n"),
        ("101 without upgrade", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
        ("bare LF", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"),
    ],
)
def test_unframeable_responses_close(name: str, resp: bytes) -> None:
    h = Harness(HttpFactory())
    h.feed(GET)
    h.feed(resp, reply=True)
    assert h.closed and h.to_client == b""


def test_unsolicited_response_is_forwarded_and_logged() -> None:
    # issue 17: a server's answer with no request pending (a 408 or 503 before it closes) is
    # what the client would get without proxyd: it passes, and its log line says so
    timeout = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    for split in splits(timeout + OK, every_cut=False):
        h = Harness(HttpFactory())
        h.feed(timeout + OK, reply=True, split=split)
        assert h.to_client == timeout + OK and not h.closed, split
        assert [(e.entry_type, e.fields) for e in h.log] == [
            ("response", {"status": 408, "note": "response with no request pending"}),
            ("response", {"status": 200, "note": "response with no request pending"}),
        ]
    # and the connection goes on in step: a request after it is answered by the next response
    h = Harness(HttpFactory())
    h.feed(timeout, reply=True)
    h.feed(GET)
    h.feed(OK, reply=True)
    assert (h.to_server, h.to_client) == (GET, timeout + OK)
    # bytes that are not a response, with nothing pending, still close
    assert run(b"", [b"garbage\r\n\r\n"]).closed


# --- a close proxyd decides delivers the responses already owed (issue 17) -----------------------


def test_malformed_chunk_behind_pipelined_requests_delivers_their_responses_first() -> None:
    bad = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"
    wire = GET + GET + bad + GET
    for split in splits(wire, every_cut=False):
        h = Harness(HttpFactory())
        h.feed(wire, split=split)
        assert not h.closed, split
        assert h.to_server == GET + GET + bad[: bad.index(b"5 ")], split  # never the bad chunk line
        h.feed(OK, reply=True)
        assert not h.closed
        h.feed(OK, reply=True)
        assert h.to_client == OK + OK and h.closed, split
        assert h.error is not None and h.error.code == 4


def test_not_http_behind_a_pipelined_request_delivers_its_response_first() -> None:
    h = Harness(HttpFactory())
    h.feed(GET + b"\x16\x03\x01\x00\x05hello")
    assert h.to_server == GET and not h.closed
    h.feed(OK, reply=True)
    assert h.to_client == OK and h.closed


def test_thousands_of_pipelined_requests_are_all_answered() -> None:
    # a count of 1024 outstanding requests used to close the connection (issue 17)
    n = 20000
    h = Harness(HttpFactory(), buffer_limit=1 << 24)
    h.feed(GET * n)
    assert h.to_server == GET * n and not h.closed
    h.feed(OK * n, reply=True)
    assert h.to_client == OK * n and not h.closed
    assert not h.engine.parser.pending_requests() and h.engine.parser.pending_bytes == 0  # type: ignore[attr-defined]


# --- denials in place -----------------------------------------------------------------------------

ALLOW_GET = [{"method": "GET"}]


def test_denial_takes_its_place_among_pipelined_responses() -> None:
    put = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    wire = GET + put + GET
    for split in splits(wire, every_cut=False):
        out = run(wire, [OK + OK], rules=ALLOW_GET, split=split)
        assert out.to_server == GET + GET
        assert out.to_client == OK + DENIED + OK
        assert not out.closed


def test_denial_with_nothing_pending_goes_out_at_once() -> None:
    h = Harness(HttpFactory(), rules=ALLOW_GET)
    put = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    assert h.feed(put) == [(DROP, len(put) + 3)]
    assert h.to_client == DENIED  # due once its headers are in, not after its body


def test_denials_in_a_row_after_a_response_split_anywhere() -> None:
    put = b"PUT /x HTTP/1.1\r\nHost: a\r\n\r\n"
    wire = GET + put + put + GET
    resp = OK + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    for split in splits(resp):
        out = run(wire, [resp], rules=ALLOW_GET, split=split)
        assert out.to_client == OK + DENIED + DENIED + resp[len(OK) :]


def test_inject_is_named_when_more_bytes_follow_the_completing_response() -> None:
    h = Harness(HttpFactory(), rules=ALLOW_GET)
    h.feed(GET + b"PUT / HTTP/1.1\r\nHost: a\r\n\r\n" + GET)
    assert h.feed(OK + OK, reply=True) == [(PASS, len(OK)), (INJECT, len(DENIED)), (PASS, len(OK))]


@pytest.mark.parametrize(
    ("name", "wire", "answer", "closed"),
    [
        (
            "HTTP/1.0 keep-alive: plain 403, stays open",
            b"PUT / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            DENIED,
            False,
        ),
        ("HTTP/1.0: 403 with close", b"PUT / HTTP/1.0\r\n\r\n", DENIED_CLOSE, True),
        (
            "Connection: close: 403 with close",
            b"PUT / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            DENIED_CLOSE,
            True,
        ),
        (
            "Expect: 100-continue with a body: 403 with close",
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            DENIED_CLOSE,
            True,
        ),
        (
            "Expect: 100-continue without a body: plain 403",
            b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            DENIED,
            False,
        ),
        (
            "HEAD: 403 without a body",
            b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
            DENIED[: DENIED.index(b"\r\n\r\n") + 4],
            False,
        ),
    ],
)
def test_denial_answers(name: str, wire: bytes, answer: bytes, closed: bool) -> None:
    rules = [{"method": "GET"}]
    for split in splits(wire, every_cut=False):
        out = run(wire, rules=rules, split=split)
        assert (out.to_server, out.to_client, out.closed) == (b"", answer, closed), (name, split)


def test_denial_with_close_behind_a_response_closes_after_it() -> None:
    wire = GET + b"PUT / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET
    h = Harness(HttpFactory(), rules=ALLOW_GET)
    h.feed(wire)
    assert h.to_server == GET
    h.feed(OK + b"HTTP/1.1", reply=True)  # anything after the answer: closed
    assert h.to_client == OK + DENIED_CLOSE and h.closed


def test_allowed_after_denied_chunked_body() -> None:
    put = b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    wire = put + GET
    for split in splits(wire, every_cut=False):
        out = run(wire, [OK], rules=ALLOW_GET, split=split)
        assert (out.to_server, out.to_client) == (GET, DENIED + OK)


# --- upgrade and CONNECT ----------------------------------------------------------------------------

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_then_passthrough() -> None:
    h = Harness(HttpFactory())
    h.feed(UPGRADE)
    h.feed(SWITCH + b"\x81\x02hi", reply=True)
    h.feed(b"\x81\x82\x00\x00\x00\x00hi garbage \x00\r\n")
    assert h.to_server == UPGRADE + b"\x81\x82\x00\x00\x00\x00hi garbage \x00\r\n"
    assert h.to_client == SWITCH + b"\x81\x02hi" and not h.closed


def test_refused_upgrade_goes_on_as_http() -> None:
    h = Harness(HttpFactory())
    h.feed(UPGRADE)
    h.feed(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", reply=True)
    h.feed(GET)
    assert h.to_server == UPGRADE + GET and not h.closed


def test_bytes_after_an_upgrade_request_wait_for_its_answer() -> None:
    h = Harness(HttpFactory())
    h.feed(UPGRADE + b"early")
    assert h.to_server == UPGRADE
    h.feed(SWITCH, reply=True)
    h.feed(b"!")
    assert h.to_server == UPGRADE + b"early!"


def test_connect_2xx_tunnels() -> None:
    req = b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    h = Harness(HttpFactory(), rules=[{"method": "CONNECT", "host": "db:5432"}])
    h.feed(req)
    h.feed(b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x01", reply=True)
    h.feed(b"\x16\x03\x01 tls")
    assert h.to_server == req + b"\x16\x03\x01 tls"
    assert h.to_client.endswith(b"\x16\x03\x01") and not h.closed


def test_denied_connect_stays_http() -> None:
    req = b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"
    out = run(req + GET, [OK], rules=[{"method": "GET"}])
    assert (out.to_server, out.to_client) == (GET, DENIED + OK)


# --- access log ----------------------------------------------------------------------------------


def test_access_log_fields() -> None:
    h = Harness(HttpFactory(), rules=[{"path": "/ok"}])
    h.feed(b"GET /ok HTTP/1.1\r\nHost: h:1\r\n\r\nPOST /no HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    h.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", reply=True)
    assert [(e.entry_type, e.verdict, e.fields) for e in h.log] == [
        ("request", "forwarded", {"method": "GET", "path": "/ok", "host": "h:1", "version": "HTTP/1.1"}),
        (
            "request",
            "denied",
            {"method": "POST", "path": "/no", "host": "", "version": "HTTP/1.0", "reason": "policy"},
        ),
        ("response", "forwarded", {"method": "GET", "path": "/ok", "host": "h:1", "status": 404}),
    ]


def test_log_responses_off() -> None:
    h = Harness(HttpFactory(), parser_config={"log_responses": False})
    h.feed(GET)
    h.feed(OK, reply=True)
    assert [e.entry_type for e in h.log] == ["request"]


def test_the_answers_are_the_documented_bytes() -> None:
    assert DENIED == (
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\nAccess denied\r\n"
    )
    assert DENIED_CLOSE == (
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n"
        b"connection: close\r\n\r\nAccess denied\r\n"
    )
    assert BAD_REQUEST.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close\r\n" in BAD_REQUEST
    assert TOO_LARGE.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_past_the_pending_budget_the_connection_ends_after_the_owed_responses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxyd.parsers.http import parser as P

    monkeypatch.setattr(P, "PENDING_BUDGET", 4 * P.ENTRY_COST)
    h = Harness(HttpFactory())
    h.feed(GET * 10)
    forwarded = h.to_server.count(GET)
    assert 0 < forwarded < 10 and not h.closed
    h.feed(OK * forwarded, reply=True)
    assert h.to_client == OK * forwarded and h.closed
    assert any(e.fields.get("reason") == "too many pipelined requests awaiting responses" for e in h.log)


def test_a_response_head_over_the_limit_streams() -> None:
    # curl takes response heads of 100 KiB and more: one over max_header_bytes passes (issue 17)
    big = b"".join(b"Set-Cookie: c%d=%s\r\n" % (i, b"v" * 900) for i in range(200))  # ~180 KiB
    resp = b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nhi"
    trailer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n" + big + b"\r\n"
    for split in (None, "random", [7000] * 100):
        h = Harness(HttpFactory(), buffer_limit=1 << 20)
        h.feed(GET + GET + GET)
        h.feed(resp + trailer + OK, reply=True, split=split)
        assert h.to_client == resp + trailer + OK and not h.closed, split
        assert h.engine.buffered(True) == 0
        assert len(reference(h).phr.fields) <= 2
    # a single line over the limit still closes, and so does a malformed line in a streamed head
    for bad in (b"X: " + b"v" * 70000 + b"\r\n", big + b"Bad Line\r\n"):
        h = Harness(HttpFactory())
        h.feed(GET)
        h.feed(b"HTTP/1.1 200 OK\r\n" + bad + b"\r\n", reply=True)
        assert h.closed


def test_a_request_trailer_section_over_the_limit_streams() -> None:
    # nginx takes trailer sections of any size; they are not judged, so they stream on
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
    trailer = b"".join(b"T-%d: %s\r\n" % (i, b"t" * 10) for i in range(12000)) + b"\r\n"
    for split in (None, "random"):
        out = run(head + trailer + GET, [OK, OK], split=split)
        assert (out.to_server, out.to_client, out.closed) == (head + trailer + GET, OK + OK, False)
    # a denied request's long trailer section is dropped the same way
    out = run(head.replace(b"POST", b"PUT") + trailer + GET, [OK], rules=[{"method": "GET"}])
    assert (out.to_server, out.to_client) == (GET, DENIED + OK)
