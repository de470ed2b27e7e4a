"""proxyd.testing.Harness itself: splitting, result views, log entries and the three policy forms."""

from __future__ import annotations

from typing import Any

import pytest

from proxyd.context import L7Decision
from proxyd.ops import DROP, MORE, PASS
from proxyd.parser import Endpoint
from proxyd.parsers.r2d2 import R2d2Factory, R2d2Request
from proxyd.parsers.testparsers import LineParserFactory, PasserFactory
from proxyd.registry import UnknownParserError
from proxyd.testing import Harness, LogEntry, _segments, split_points

# --- splitting ---------------------------------------------------------------------------------


def test_split_none_is_one_segment() -> None:
    assert _segments(b"abc", None, 0) == [b"abc"]


def test_split_bytes() -> None:
    assert _segments(b"abc", "bytes", 0) == [b"a", b"b", b"c"]
    assert _segments(b"", "bytes", 0) == []


def test_split_list_of_sizes_and_the_rest() -> None:
    assert _segments(b"abcdef", [1, 2], 0) == [b"a", b"bc", b"def"]
    assert _segments(b"abc", [5], 0) == [b"abc"]


@pytest.mark.parametrize("seed", range(5))
def test_split_random_covers_the_data_and_is_reproducible(seed: int) -> None:
    data = bytes(range(200))
    segs = _segments(data, "random", seed)
    assert b"".join(segs) == data
    assert all(segs)
    assert segs == _segments(data, "random", seed)


def test_split_points() -> None:
    assert list(split_points(b"ab")) == [[b"", b"ab"], [b"a", b"b"], [b"ab", b""]]


def test_feed_with_each_split_gives_the_ops_of_that_call() -> None:
    h = Harness(PasserFactory())
    assert h.feed(b"abc", split="bytes") == [(PASS, 1)] * 3
    assert h.feed(b"defg", split=[3]) == [(PASS, 3), (PASS, 1)]
    assert h.feed(b"hi", split="random", seed=7) in ([(PASS, 2)], [(PASS, 1), (PASS, 1)])
    assert h.to_server == b"abcdefghi"


# --- result views ------------------------------------------------------------------------------


def test_forwarded_dropped_injected_and_the_two_streams() -> None:
    h = Harness("test.lineparser")  # by registered name
    h.feed(b"keep\nDROP me\nINJECT copy\nREPLY back\n")
    h.feed(b"answer\n", reply=True)
    assert h.forwarded == {False: b"keep\n", True: b"answer\n"}
    assert h.dropped == {False: b"DROP me\nINJECT copy\nREPLY back\n", True: b""}
    assert h.injected == {False: b"INJECT copy\n", True: b"back\n"}
    assert h.to_server == b"keep\nINJECT copy\n"  # forwarded and injected, in order
    assert h.to_client == b"back\nanswer\n"
    assert h.out == {False: bytearray(h.to_server), True: bytearray(h.to_client)}
    assert [r for r, _, _ in h.ops].count(True) == 1
    assert h.ops_of(True) == [(PASS, 7)]
    assert not h.closed
    assert h.error is None


def test_error_and_closed() -> None:
    h = Harness(LineParserFactory())
    h.feed(b"ERROR\n")
    assert h.closed
    assert h.error is not None
    assert h.error.kind == "parser_error"


def test_eof_records_unparsed_bytes() -> None:
    h = Harness(LineParserFactory())
    h.feed(b"half a line", reply=True, end_stream=True)
    assert h.unparsed_at_eof == {False: 0, True: len(b"half a line")}
    assert h.eof(False) == 0


def test_unknown_parser_name() -> None:
    with pytest.raises(UnknownParserError):
        Harness("no-such-parser")


def test_connection_facts_reach_the_parser() -> None:
    h = Harness(
        R2d2Factory(),
        src=Endpoint("10.1.0.5", 5555, {"app": "client"}),
        dst=Endpoint("10.2.0.9", 4444, {"app": "droid"}),
        direction="egress",
        listener="droids",
    )
    ctx = h.ctx
    assert (ctx.listener, ctx.direction, ctx.conn_id) == ("droids", "egress", 1)
    assert ctx.local.labels == {"app": "client"}  # egress: the local end is the source
    assert ctx.remote.labels == {"app": "droid"}
    assert str(ctx.dst) == "10.2.0.9:4444"
    assert h.factory.name == "r2d2"


def test_buffer_limit_is_passed_to_the_engine() -> None:
    h = Harness(LineParserFactory(), buffer_limit=8)
    h.feed(b"12345678")
    assert h.error is not None
    assert h.error.kind == "buffer_limit"


# --- log entries -------------------------------------------------------------------------------


def test_log_entries() -> None:
    h = Harness(R2d2Factory(), rules=[{"cmd": "READ"}])
    h.feed(b"READ /a\r\nHALT\r\n")
    assert h.log == [
        LogEntry("request", "forwarded", {"cmd": "READ", "file": "/a"}, "test"),
        LogEntry("request", "denied", {"cmd": "HALT", "file": ""}, "test"),
    ]


# --- the three forms of policy -----------------------------------------------------------------


def test_no_policy_allows_everything() -> None:
    h = Harness(R2d2Factory())
    h.feed(b"HALT\r\n")
    assert h.to_server == b"HALT\r\n"
    assert h.log[0].policy is None


def test_policy_as_rules_compiled_by_the_factory() -> None:
    h = Harness(R2d2Factory(), rules=[{"file": "^/ok"}])
    assert h.feed(b"READ /ok\r\nREAD /no\r\n") == [(PASS, 10), (DROP, 10)]


def test_policy_as_predicate() -> None:
    seen: list[Any] = []

    def pred(req: Any) -> bool:
        seen.append(req)
        return req.file != "/no"

    h = Harness(R2d2Factory(), policy=pred)
    h.feed(b"READ /ok\r\nREAD /no\r\n")
    assert seen == [R2d2Request("READ", "/ok"), R2d2Request("READ", "/no")]
    assert [e.verdict for e in h.log] == ["forwarded", "denied"]
    assert h.log[0].policy == "test"


class AuditPolicy:
    """An object with ``decide()``: the policy layer's per-connection view."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def decide(self, request: Any) -> L7Decision:
        self.requests.append(request)
        if request.cmd == "HALT":
            return L7Decision(False, "droid-policy", audit=True)  # denied, but audit mode
        if request.cmd == "RESET":
            return L7Decision(False, "droid-policy")
        return L7Decision(True, "droid-policy")


def test_policy_as_object_with_decide() -> None:
    pol = AuditPolicy()
    h = Harness(R2d2Factory(), policy=pol)
    assert h.feed(b"READ /a\r\nHALT\r\nRESET\r\n") == [(PASS, 9), (PASS, 6), (DROP, 7)]
    assert len(pol.requests) == 3
    assert h.to_server == b"READ /a\r\nHALT\r\n"  # the audited one is forwarded
    assert [(e.verdict, e.policy) for e in h.log] == [
        ("forwarded", "droid-policy"),
        ("audit", "droid-policy"),
        ("denied", "droid-policy"),
    ]


def test_bad_rules_raise_when_the_harness_is_built() -> None:
    from proxyd.errors import RuleError

    with pytest.raises(RuleError):
        Harness(R2d2Factory(), rules=[{"bogus": "1"}])


def test_more_is_reported() -> None:
    h = Harness(R2d2Factory())
    assert h.feed(b"RE") == [(MORE, 1)]
