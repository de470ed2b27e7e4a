"""r2d2 through the harness: allowed and denied requests, replies, malformed and over-long lines,
rule compilation, and hypothesis properties (segmentation does not change the outcome; no input
makes the parser raise or hold more than the buffer limit)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import RuleError
from proxyd.ops import DROP, ERROR, ERROR_INVALID_FRAME_TYPE, INJECT, MORE, PASS
from proxyd.parsers.r2d2 import DENIED_REPLY, MAX_LINE, R2d2Factory, R2d2Request, R2d2Rule
from proxyd.testing import Harness

Rules = Sequence[Mapping[str, str]] | None
Split = object


def run(requests: bytes, rules: Rules = None, *, split: Split = None, replies: bytes = b"",
        rep_split: Split = None, buffer_limit: int = 1 << 20) -> Harness:  # fmt: skip
    h = Harness(R2d2Factory(), rules=rules, buffer_limit=buffer_limit)
    h.feed(requests, split=split)  # type: ignore[arg-type]
    if replies:
        h.feed(replies, reply=True, split=rep_split)  # type: ignore[arg-type]
    return h


def splits(data: bytes) -> Iterator[Split]:
    """Unsplit, byte by byte, at random, and cut in two at every byte."""
    yield None
    yield "bytes"
    yield "random"
    for i in range(1, len(data)):
        yield [i]


def logged(h: Harness) -> list[tuple[str, str, dict[str, Any]]]:
    return [(e.entry_type, e.verdict, e.fields) for e in h.log]


# --- allowed and denied ------------------------------------------------------------------------

REQUESTS = [b"READ /public/a", b"WRITE /b", b"HALT", b"RESET", b"READ /secret"]
STREAM = b"".join(r + b"\r\n" for r in REQUESTS)

# (rules, which of REQUESTS are allowed)
POLICY_CASES: list[tuple[Rules, list[bool]]] = [
    (None, [True] * 5),
    ([{}], [True] * 5),
    ([], [False] * 5),
    ([{"cmd": "READ"}], [True, False, False, False, True]),
    ([{"file": "^/public/"}], [True, False, False, False, False]),
    ([{"cmd": "READ", "file": "^/public/"}, {"cmd": "HALT"}], [True, False, True, False, False]),
    ([{"file": "b$"}, {"cmd": "RESET"}], [False, True, False, True, False]),
    ([{"cmd": "WRITE", "file": "secret"}], [False] * 5),
]


def expected(allowed: list[bool]) -> tuple[bytes, bytes, bytes]:
    """What reaches the server, the server's replies (one per forwarded request), and what the
    client gets: each request's answer in its place, ERROR for the denied ones."""
    to_server = b"".join(r + b"\r\n" for r, ok in zip(REQUESTS, allowed, strict=True) if ok)
    replies = b"".join(b"OK %d\r\n" % i for i, ok in enumerate(allowed) if ok)
    to_client = b"".join(b"OK %d\r\n" % i if ok else DENIED_REPLY for i, ok in enumerate(allowed))
    return to_server, replies, to_client


@pytest.mark.parametrize(("rules", "allowed"), POLICY_CASES)
def test_policy_table_at_every_split(rules: Rules, allowed: list[bool]) -> None:
    to_server, replies, to_client = expected(allowed)
    ways = [(split, None) for split in splits(STREAM)] + [(None, split) for split in splits(replies)]
    for req_split, rep_split in ways:
        where = f"{req_split=} {rep_split=}"
        h = run(STREAM, rules, split=req_split, replies=replies, rep_split=rep_split)
        assert h.error is None, where
        assert h.to_server == to_server, where
        assert h.to_client == to_client, where
        denied = [r + b"\r\n" for r, ok in zip(REQUESTS, allowed, strict=True) if not ok]
        assert h.dropped[False] == b"".join(denied), where
        verdicts = [v for _, v, _ in logged(h)]
        assert verdicts == ["forwarded" if ok else "denied" for ok in allowed], where


def test_ops_table() -> None:
    h = Harness(R2d2Factory(), rules=[{"cmd": "READ"}])
    assert h.feed(b"READ /a\r\nHALT\r\nREAD /b") == [(PASS, 9), (DROP, 6), (MORE, 1)]
    assert h.feed(b"\r") == [(MORE, 1)]
    assert h.feed(b"\n") == [(PASS, 9)]
    assert h.to_server == b"READ /a\r\nREAD /b\r\n"
    assert h.to_client == b""  # HALT is answered in its place: after the reply to READ /a
    # Both replies in one piece: the ERROR goes out between them, by INJECT.
    assert h.feed(b"OK a\r\nOK b\r\n", reply=True) == [(PASS, 6), (INJECT, 7), (PASS, 6)]
    assert h.to_client == b"OK a\r\nERROR\r\nOK b\r\n"
    assert h.injected == {False: b"", True: DENIED_REPLY}


def test_denial_with_nothing_outstanding_is_answered_at_once() -> None:
    h = Harness(R2d2Factory(), rules=[{"cmd": "READ"}])
    h.feed(b"HALT\r\n")
    assert h.to_client == DENIED_REPLY  # the server never hears of it, the client still does
    h.feed(b"READ /a\r\n")
    h.feed(b"OK a\r\n", reply=True)
    h.feed(b"RESET\r\n")
    assert h.to_client == b"ERROR\r\nOK a\r\nERROR\r\n"


def test_pipelined_denials_wait_for_the_replies_before_them() -> None:
    h = Harness(R2d2Factory(), rules=[{"cmd": "READ"}])
    h.feed(b"READ a\r\nHALT\r\nRESET\r\nREAD b\r\nHALT\r\n")
    assert h.to_client == b""
    h.feed(b"OK a", reply=True)
    assert h.to_client == b"OK a"
    h.feed(b"\r", reply=True)
    assert h.to_client == b"OK a"  # a CR that may start the line end is held back
    h.feed(b"\n", reply=True)
    assert h.to_client == b"OK a\r\nERROR\r\nERROR\r\n"
    h.feed(b"OK b\r\n", reply=True)
    assert h.to_client == b"OK a\r\nERROR\r\nERROR\r\nOK b\r\nERROR\r\n"
    assert h.error is None


def test_log_entries_carry_cmd_and_file() -> None:
    h = run(b"READ /a\r\nHALT\r\n", [{"cmd": "READ"}])
    assert logged(h) == [
        ("request", "forwarded", {"cmd": "READ", "file": "/a"}),
        ("request", "denied", {"cmd": "HALT", "file": ""}),
    ]
    assert [e.policy for e in h.log] == ["test", "test"]


def test_policy_is_asked_per_request() -> None:
    seen: list[R2d2Request] = []

    def allow_reads(req: R2d2Request) -> bool:
        seen.append(req)
        return req.cmd == "READ"

    h = Harness(R2d2Factory(), policy=allow_reads)
    h.feed(b"READ x\r\nWRITE y\r\n", split="bytes")
    assert seen == [R2d2Request("READ", "x"), R2d2Request("WRITE", "y")]
    assert h.to_server == b"READ x\r\n"


# --- replies -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "replies", [b"OK\r\n", b"no line end", b"\x00\xff" * 100, b"ERROR\r\nFOO\r\n", b"a\rb\r\r\n\n"]
)
def test_replies_pass_unparsed(replies: bytes) -> None:
    for split in splits(replies):
        h = run(b"", [], replies=replies, rep_split=split)
        assert h.error is None
        assert h.to_client == replies
        assert h.log == []


def test_a_trailing_cr_in_a_reply_is_held_until_the_line_or_stream_ends() -> None:
    h = Harness(R2d2Factory())
    assert h.feed(b"abc\r", reply=True) == [(PASS, 3), (MORE, 1)]
    assert h.to_client == b"abc"
    assert h.eof(True) == 0
    assert h.to_client == b"abc\r"


def test_reply_ops_pass_what_arrived() -> None:
    h = Harness(R2d2Factory())
    assert h.feed(b"abc", reply=True) == [(PASS, 3)]
    assert h.feed(b"de", reply=True, split="bytes") == [(PASS, 1), (PASS, 1)]


# --- malformed and over-long -------------------------------------------------------------------

MALFORMED = [
    b"FOO /a\r\n",  # unknown command
    b"read /a\r\n",  # commands are upper case
    b"\r\n",  # empty line
    b"READ\r\n",  # READ needs a file
    b"WRITE\r\n",
    b"HALT now\r\n",  # HALT takes none
    b"RESET x\r\n",
    b"READ a b\r\n",  # one file only
    b"READ  a\r\n",  # exactly one space
    b"\x00\xff\r\n",
]


@pytest.mark.parametrize("bad", MALFORMED, ids=repr)
def test_malformed_request_is_an_error(bad: bytes) -> None:
    wire = b"READ /ok\r\n" + bad + b"READ /never\r\n"
    for split in splits(wire):
        h = run(wire, split=split)
        assert h.error is not None, split
        assert h.error.kind == "parser_error"
        assert h.error.code == ERROR_INVALID_FRAME_TYPE
        assert h.to_server == b"READ /ok\r\n", split  # what came before still went out
        assert h.to_client == b""


def test_unknown_command_is_logged() -> None:
    h = run(b"FLY away\r\n")
    assert logged(h) == [("request", "denied", {"cmd": "FLY", "error": "unknown command"})]


@pytest.mark.parametrize(
    ("line_len", "ok"),
    [(MAX_LINE - 2, True), (MAX_LINE - 1, False), (MAX_LINE, False), (3 * MAX_LINE, False)],
)
def test_line_length_limit_holds_however_bytes_arrive(line_len: int, ok: bool) -> None:
    # line_len counts the line without its CRLF; a line and its CRLF must fit in MAX_LINE.
    wire = b"READ " + b"a" * (line_len - 5) + b"\r\n"
    for split in (None, "bytes", "random", [line_len], [line_len + 1], [MAX_LINE - 1]):
        h = run(wire, split=split)
        assert (h.error is None) == ok, split
        assert h.to_server == (wire if ok else b"")
        if not ok:
            assert h.error is not None
            assert h.error.kind == "parser_error"


def test_partial_request_at_eof_is_not_forwarded() -> None:
    h = Harness(R2d2Factory())
    h.feed(b"READ /a\r\nREAD /b", end_stream=True)
    assert h.to_server == b"READ /a\r\n"
    assert h.unparsed_at_eof[False] == len(b"READ /b")
    assert h.error is None


# --- rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "req", "matches"),
    [
        ({}, R2d2Request("HALT", ""), True),
        ({"cmd": "READ"}, R2d2Request("READ", "x"), True),
        ({"cmd": "READ"}, R2d2Request("WRITE", "x"), False),
        ({"file": "^/tmp/"}, R2d2Request("WRITE", "/tmp/a"), True),
        ({"file": "^/tmp/"}, R2d2Request("WRITE", "/var/tmp/a"), False),
        ({"file": "tmp"}, R2d2Request("WRITE", "/var/tmp/a"), True),  # search, not match
        ({"cmd": "READ", "file": "x$"}, R2d2Request("READ", "ax"), True),
        ({"cmd": "READ", "file": "x$"}, R2d2Request("READ", "xa"), False),
        ({"cmd": "HALT", "file": ""}, R2d2Request("HALT", ""), True),
        ({}, "READ x", False),  # not an r2d2 request at all
    ],
)
def test_rule_matching(rule: dict[str, str], req: Any, matches: bool) -> None:
    matcher = R2d2Factory().compile_rule(rule)
    assert isinstance(matcher, R2d2Rule)
    assert matcher.matches(req) is matches


@pytest.mark.parametrize(
    ("rule", "key", "words"),
    [
        ({"cmd": "read"}, "cmd", "must be one of"),
        ({"cmd": "FLY"}, "cmd", "must be one of"),
        ({"cmd": ""}, "cmd", "must be one of"),
        ({"file": "("}, "file", "bad regular expression"),
        ({"file": "[a-"}, "file", "bad regular expression"),
        ({"path": "/a"}, "path", "unknown rule key"),
        # proxylib: "cmd 'HALT' is not compatible with 'file'"
        ({"cmd": "HALT", "file": "^/a"}, "file", "takes no file"),
        ({"cmd": "RESET", "file": "."}, "file", "takes no file"),
        ({"file": "(a)\\1"}, "file", "RE2"),
        ({"cmd": ["READ"]}, "cmd", "must be one of"),
        ({"cmd": "READ", "method": "GET"}, "method", "unknown rule key"),
    ],
)
def test_rule_compile_rejects(rule: dict[str, str], key: str, words: str) -> None:
    with pytest.raises(RuleError, match=words) as info:
        R2d2Factory().compile_rule(rule)
    assert info.value.key == key


def test_bad_rules_fail_when_the_harness_is_built() -> None:
    with pytest.raises(RuleError):
        Harness(R2d2Factory(), rules=[{"cmd": "READ"}, {"file": "("}])


def test_factory_describes_itself() -> None:
    f = R2d2Factory()
    assert f.name == "r2d2"
    assert f.rule_keys == ("cmd", "file")
    assert f.validate_config({}) is None


# --- properties --------------------------------------------------------------------------------

LINES = [b"READ /public/a", b"READ /secret", b"WRITE /b", b"HALT", b"RESET", b"FOO", b"READ", b""]
r2d2_stream = st.lists(
    st.one_of(st.sampled_from(LINES).map(lambda line: line + b"\r\n"), st.binary(max_size=6)),
    max_size=10,
).map(b"".join)
cuts = st.lists(st.integers(min_value=1, max_value=16), max_size=30)
RULESETS: list[Rules] = [None, [{"cmd": "READ", "file": "^/public/"}, {"cmd": "HALT"}], []]


def outcome(h: Harness) -> tuple[object, ...]:
    """What segmentation must not change (the op sequence may: MORE counts differ)."""
    return (h.forwarded, h.dropped, h.injected, h.to_server, h.to_client, h.error is None, logged(h))


@settings(max_examples=250, deadline=None)
@given(
    requests=r2d2_stream,
    replies=st.binary(max_size=40),
    req_cut=cuts,
    rep_cut=cuts,
    rules=st.sampled_from(RULESETS),
)
def test_any_segmentation_gives_the_same_result(
    requests: bytes, replies: bytes, req_cut: list[int], rep_cut: list[int], rules: Rules
) -> None:
    whole = run(requests, rules, replies=replies)
    cut = run(requests, rules, split=req_cut, replies=replies, rep_split=rep_cut)
    assert outcome(cut) == outcome(whole)
    one = run(requests, rules, split="bytes", replies=replies, rep_split="bytes")
    assert outcome(one) == outcome(whole)


@settings(max_examples=250, deadline=None)
@given(data=st.binary(max_size=300), cut=cuts, limit=st.sampled_from([16, 64, 1 << 20]))
def test_no_input_raises_or_overfills(data: bytes, cut: list[int], limit: int) -> None:
    for reply in (False, True):
        h = Harness(R2d2Factory(), rules=[{"cmd": "READ"}], buffer_limit=limit)
        h.feed(data, reply, split=cut)
        assert h.error is None or h.error.kind != "exception"
        assert h.engine.buffered(reply) <= limit
        h.eof(reply)
        assert h.error is None or h.error.kind != "exception"


@settings(max_examples=100, deadline=None)
@given(head=st.binary(max_size=64), tail=st.binary(max_size=64))
def test_no_crlf_in_a_full_line_is_an_error(head: bytes, tail: bytes) -> None:
    data = (head + b"a" * MAX_LINE + tail)[: MAX_LINE + 64].replace(b"\r\n", b"\r.")
    h = run(data)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.ops_of(False)[-1] == (ERROR, ERROR_INVALID_FRAME_TYPE)
