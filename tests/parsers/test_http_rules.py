"""rules.http: every field, compile errors, and headerMatches rewrites on the wire."""

from __future__ import annotations

from typing import Any

import pytest
from http_helpers import DENIED, run, splits

from proxyd.errors import RuleError
from proxyd.parsers.http.rules import HttpRequest, compile_rule, describe


def req(
    method: str = "GET", path: str = "/", host: str = "a", headers: tuple[tuple[str, str], ...] = ()
) -> HttpRequest:
    return HttpRequest(method, path, host, "1.1", headers)


# (rule, request, matches)
MATCHES: list[tuple[dict[str, Any], HttpRequest, bool]] = [
    ({}, req(), True),
    ({"method": "GET"}, req("GET"), True),
    ({"method": "GET"}, req("GETX"), False),  # full match, not search
    ({"method": "GET|HEAD"}, req("HEAD"), True),
    ({"method": "get"}, req("GET"), False),  # methods are case-sensitive
    ({"path": "/public/.*"}, req(path="/public/a?b=c"), True),
    ({"path": "/public/.*"}, req(path="/x/public/a"), False),
    ({"path": "/a"}, req(path="/a?x"), False),  # the query is part of the path matched
    ({"host": "a\\.example(:80)?"}, req(host="a.example:80"), True),
    ({"host": "a\\.example"}, req(host="a.example:80"), False),
    ({"headers": ["X-Token"]}, req(headers=(("x-token", ""),)), True),
    ({"headers": ["x-token"]}, req(headers=(("x-token", "v"),)), True),  # names case-insensitive
    ({"headers": ["X-Token"]}, req(), False),
    ({"headers": ["X-Team: blue"]}, req(headers=(("x-team", "blue"),)), True),
    ({"headers": ["X-Team: blue"]}, req(headers=(("x-team", "Blue"),)), False),  # values exact
    ({"headers": ["X-Team:blue"]}, req(headers=(("x-team", "red"), ("x-team", "blue"))), True),
    ({"headers": ["A", "B: 1"]}, req(headers=(("a", "x"),)), False),  # all must match
    ({"headerMatches": [{"name": "X-A", "value": "1"}]}, req(headers=(("x-a", "1"),)), True),
    ({"headerMatches": [{"name": "X-A", "value": "1"}]}, req(headers=(("x-a", "2"),)), False),
    ({"headerMatches": [{"name": "X-A"}]}, req(headers=(("x-a", "2"),)), True),  # no value: presence
    ({"headerMatches": [{"name": "X-A", "value": "1", "mismatch": "LOG"}]}, req(), True),
    ({"headerMatches": [{"name": "X-A", "value": "1", "mismatch": "ADD"}]}, req(), True),
    ({"method": "GET", "path": "/x", "host": "h", "headers": ["Y"]},
     req("GET", "/x", "h", (("y", ""),)), True),
    ({"method": "GET", "path": "/x", "host": "h", "headers": ["Y"]}, req("GET", "/x", "h"), False),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "request_", "expected"), MATCHES)
def test_rule_matches(rule: dict[str, Any], request_: HttpRequest, expected: bool) -> None:
    assert compile_rule(rule).matches(request_) is expected


@pytest.mark.parametrize(
    ("rule", "key", "message"),
    [
        ({"methods": "GET"}, "methods", "unknown rule key"),
        ({"method": "(a"}, "method", "bad regular expression"),
        ({"path": "(?=x)"}, "path", "RE2 syntax"),  # lookahead is not RE2
        ({"host": 5}, "host", "must be a string"),
        ({"headers": "X-A"}, "headers", "must be a list"),
        ({"headers": ["X A"]}, "headers", "not a valid header name"),
        ({"headers": ["X-A: a\r\nB: c"]}, "headers", "control characters"),
        ({"headerMatches": [{"name": "X", "secret": {"name": "s"}}]}, "headerMatches", "secret"),
        ({"headerMatches": [{"name": "X", "mismatch": "DROP"}]}, "headerMatches", "is not one of"),
        ({"headerMatches": [{"value": "1"}]}, "headerMatches", "name: missing"),
        ({"headerMatches": [{"name": "X", "colour": "1"}]}, "headerMatches", "unknown key"),
        (
            {"headerMatches": [{"name": "Content-Length", "value": "0", "mismatch": "REPLACE"}]},
            "headerMatches",
            "frames the request",
        ),
        (
            {"headerMatches": [{"name": "Transfer-Encoding", "mismatch": "DELETE"}]},
            "headerMatches",
            "frames the request",
        ),
        (
            {"headerMatches": [{"name": "X", "value": " padded", "mismatch": "ADD"}]},
            "headerMatches",
            "surrounding whitespace",
        ),
        ({"headerMatches": "X"}, "headerMatches", "must be a list"),
    ],
)
def test_compile_errors(rule: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(RuleError) as exc:
        compile_rule(rule)
    assert exc.value.key == key
    assert message in str(exc.value)


def test_describe_round_trips() -> None:
    rule = {
        "method": "GET",
        "headers": ["X-A: 1", "B"],
        "headerMatches": [{"name": "C", "value": "d", "mismatch": "LOG"}],
    }
    assert describe(compile_rule(rule)) == {
        "method": "GET",
        "headers": ["x-a: 1", "b"],
        "headerMatches": [{"name": "C", "value": "d", "mismatch": "LOG"}],
    }


# --- on the wire: denials and rewrites ----------------------------------------------------------

HEAD = b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: old\r\nx-b: older\r\n"


@pytest.mark.parametrize(
    ("name", "match", "sent"),
    [
        ("matching value: unchanged", {"name": "X-A", "value": "1", "mismatch": "REPLACE"}, HEAD + b"\r\n"),
        (
            "ADD goes last, rule's spelling",
            {"name": "X-New", "value": "v", "mismatch": "ADD"},
            HEAD + b"X-New: v\r\n\r\n",
        ),
        (
            "ADD when another value is present",
            {"name": "X-A", "value": "2", "mismatch": "ADD"},
            HEAD + b"X-A: 2\r\n\r\n",
        ),
        (
            "DELETE removes every field of the name",
            {"name": "X-B", "value": "new", "mismatch": "DELETE"},
            b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n",
        ),
        (
            "REPLACE rewrites the first in place, drops the others",
            {"name": "X-B", "value": "new", "mismatch": "REPLACE"},
            b"GET /p HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: new\r\n\r\n",
        ),
        (
            "REPLACE when absent adds last",
            {"name": "X-C", "value": "c", "mismatch": "REPLACE"},
            HEAD + b"X-C: c\r\n\r\n",
        ),
        ("LOG changes nothing", {"name": "X-C", "value": "c", "mismatch": "LOG"}, HEAD + b"\r\n"),
    ],
)
def test_header_matches_rewrite_the_head(name: str, match: dict[str, str], sent: bytes) -> None:
    body = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    wire = HEAD + b"\r\n" + body
    for split in splits(wire, every_cut=False):
        out = run(wire, rules=[{"method": "POST"}, {"headerMatches": [match]}], split=split)
        assert out.to_server == sent + body, (name, split)
        assert not out.closed


def test_rewrite_of_a_request_with_bodies() -> None:
    rules = [{"headerMatches": [{"name": "X-Audit", "value": "on", "mismatch": "ADD"}]}]
    cl = b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    chunked = b"PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for wire, head_len in ((cl, cl.index(b"\r\n\r\n")), (chunked, chunked.index(b"\r\n\r\n"))):
        for split in splits(wire, every_cut=False):
            out = run(wire, rules=rules, split=split)
            assert out.to_server == wire[:head_len] + b"\r\nX-Audit: on" + wire[head_len:], split


def test_log_mismatch_is_in_the_access_log() -> None:
    from proxyd.parsers.http import HttpFactory
    from proxyd.testing import Harness

    h = Harness(HttpFactory(), rules=[{"headerMatches": [{"name": "X-C", "value": "c", "mismatch": "LOG"}]}])
    h.feed(HEAD + b"\r\n")
    assert h.log[0].fields["header_mismatch"] == "X-C"


def test_denied_by_each_field() -> None:
    rules = [{"method": "GET", "path": "/p", "host": "h", "headers": ["X-A: 1"]}]
    ok = HEAD + b"\r\n"
    variants = [
        ok.replace(b"GET", b"PUT"),
        ok.replace(b"/p", b"/q"),
        ok.replace(b"Host: h", b"Host: i"),
        ok.replace(b"X-A: 1", b"X-A: 2"),
    ]
    assert run(ok, rules=rules).to_server == ok
    for wire in variants:
        out = run(wire, rules=rules)
        assert (out.to_server, out.to_client) == (b"", DENIED), wire


def test_absolute_form_and_connect_policy_values() -> None:
    rules = [{"host": "a:8080", "path": "/x\\?q"}]
    wire = b"GET http://a:8080/x?q HTTP/1.1\r\nHost: a:8080\r\n\r\n"
    assert run(wire, rules=rules).to_server == wire
    wire = b"GET http://a:8080?q HTTP/1.1\r\nHost: a:8080\r\n\r\n"  # empty path is "/"
    assert run(wire, rules=[{"path": "/\\?q"}]).to_server == wire
    connect = b"CONNECT db:5432 HTTP/1.1\r\nHost: other\r\n\r\n"  # CONNECT's host is its authority
    assert run(connect, rules=[{"host": "db:5432"}]).to_server == connect
