"""The verdict engine (docs/parser-api.md), op by op, through the harness and directly.

Parsers here are scripts: :class:`Script` answers a given verdict sequence (per direction), and a
step may be a function that queues injections or raises before answering. Tables read like
Cilium's proxylib tests: ``check(h, data, PASS, 2, DROP, 3, MORE, 1)`` feeds ``data`` and expects
exactly those verdicts from that feed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from proxyd.engine import Engine, EngineError
from proxyd.ops import DROP, ERROR, INJECT, MORE, NOP, PASS, Op, Verdict
from proxyd.parser import ConnectionContext, Data, Parser, ParserFactory
from proxyd.testing import Harness

Step = Verdict | Callable[[ConnectionContext, bool, bytes], Verdict] | tuple[Any, Any]


class Script(Parser):
    """Answers scripted verdicts, per direction, then NOP; records every call."""

    def __init__(self, ctx: ConnectionContext, steps: Mapping[bool, Sequence[Step]]) -> None:
        self.ctx = ctx
        self.steps = {reply: list(s) for reply, s in steps.items()}
        self.calls: list[tuple[bool, bool, bytes]] = []

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        self.calls.append((reply, end_stream, bytes(data)))
        steps = self.steps.get(reply, [])
        if not steps:
            return NOP, 0
        step = steps.pop(0)
        if callable(step):
            return step(self.ctx, reply, bytes(data))
        return step  # type: ignore[return-value]


class ScriptFactory(ParserFactory):
    name = "script"

    def __init__(self, steps: Sequence[Step] | Mapping[bool, Sequence[Step]]) -> None:
        self.steps = steps if isinstance(steps, Mapping) else {False: steps}

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return Script(ctx, self.steps)


def harness(steps: Sequence[Step] | Mapping[bool, Sequence[Step]], **kw: Any) -> Harness:
    return Harness(ScriptFactory(steps), **kw)


def script(h: Harness) -> Script:
    parser = h.engine.parser
    assert isinstance(parser, Script)
    return parser


def pairs(flat: Sequence[object]) -> list[tuple[object, object]]:
    assert len(flat) % 2 == 0, "ops come in (op, n) pairs"
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def check(h: Harness, data: bytes, *expected: object, reply: bool = False, end_stream: bool = False) -> None:
    """Feed ``data`` on one direction and expect exactly these verdicts from that feed."""
    got = h.feed(data, reply, end_stream=end_stream)
    assert got == pairs(expected)


def inject(reply: bool, data: bytes, then: Verdict) -> Callable[[ConnectionContext, bool, bytes], Verdict]:
    """A step that queues ``data`` toward ``reply`` and answers ``then``."""

    def step(ctx: ConnectionContext, _reply: bool, _data: bytes) -> Verdict:
        ctx.inject(reply, data)
        return then

    return step


def raises(exc: Exception) -> Callable[[ConnectionContext, bool, bytes], Verdict]:
    def step(ctx: ConnectionContext, reply: bool, data: bytes) -> Verdict:
        raise exc

    return step


# --- MORE --------------------------------------------------------------------------------------


def test_more_defers_the_call_until_enough_bytes() -> None:
    h = harness([(MORE, 3), (PASS, 4)])
    check(h, b"a", MORE, 3)
    check(h, b"b")  # 2 of the 3 more bytes: the parser is not called
    check(h, b"c")
    check(h, b"d", PASS, 4)
    assert script(h).calls == [(False, False, b"a"), (False, False, b"abcd")]
    assert h.forwarded[False] == b"abcd"
    assert h.engine.buffered(False) == 0


def test_more_holds_bytes_until_the_parser_decides() -> None:
    h = harness([(MORE, 10)])
    check(h, b"abc", MORE, 10)
    assert h.to_server == b""
    assert h.engine.buffered(False) == 3
    assert h.error is None


def test_more_up_to_the_buffer_limit_is_fine() -> None:
    h = harness([(MORE, 14)], buffer_limit=16)
    check(h, b"ab", MORE, 14)  # 2 + 14 == 16: at the limit, not beyond
    assert h.error is None


@pytest.mark.parametrize(
    ("steps", "data", "forwarded"),
    [
        ([(MORE, 15)], b"ab", b""),  # 2 + 15 > 16
        ([(PASS, 1), (MORE, 100)], b"ab", b"a"),  # the PASS before it still went out
        ([(MORE, 1 << 30)], b"x", b""),
    ],
)
def test_more_beyond_the_buffer_limit_is_an_error(steps: list[Step], data: bytes, forwarded: bytes) -> None:
    h = harness(steps, buffer_limit=16)
    h.feed(data)
    assert h.error is not None
    assert h.error.kind == "buffer_limit"
    assert h.forwarded[False] == forwarded
    assert h.engine.buffered(False) == 0  # released


def test_a_parser_asking_more_one_byte_at_a_time_hits_the_limit() -> None:
    h = harness([(MORE, 1)] * 100, buffer_limit=8)
    h.feed(b"0123456", split="bytes")
    assert h.error is None
    assert h.engine.buffered(False) == 7
    h.feed(b"7")  # 8 buffered, and the parser wants a ninth
    assert h.error is not None
    assert h.error.kind == "buffer_limit"


# --- PASS and DROP -----------------------------------------------------------------------------


def test_pass_and_drop_within_the_buffer() -> None:
    h = harness([(PASS, 2), (DROP, 3), (PASS, 1)])
    check(h, b"abcdef", PASS, 2, DROP, 3, PASS, 1)
    assert h.forwarded[False] == b"abf"
    assert h.dropped[False] == b"cde"
    assert h.to_server == b"abf"
    assert h.engine.dropped(False) == 3
    # The buffer is empty: the parser is not called with nothing (only end_stream does that).
    assert len(script(h).calls) == 3


def test_round_continues_after_a_pass_until_more() -> None:
    h = harness([(PASS, 2), (MORE, 1), (PASS, 3)])
    check(h, b"abcd", PASS, 2, MORE, 1)
    check(h, b"e", PASS, 3)
    assert script(h).calls == [(False, False, b"abcd"), (False, False, b"cd"), (False, False, b"cde")]
    assert h.to_server == b"abcde"


def test_pass_reaching_past_the_input_lets_later_bytes_flow() -> None:
    h = harness([(PASS, 10), (PASS, 1), (DROP, 1)])
    check(h, b"abcd", PASS, 10)  # the round stops here: no call for the rest of the script
    assert h.to_server == b"abcd"
    check(h, b"efgh")  # 8 of 10: the parser is not called
    assert h.to_server == b"abcdefgh"
    check(h, b"ijXY", PASS, 1, DROP, 1)  # "ij" ends the pass; the parser sees only "XY"
    assert h.to_server == b"abcdefghijX"
    assert h.dropped[False] == b"Y"
    assert script(h).calls == [(False, False, b"abcd"), (False, False, b"XY"), (False, False, b"Y")]


def test_drop_reaching_past_the_input_discards_later_bytes() -> None:
    h = harness([(PASS, 1), (DROP, 6), (PASS, 2)])
    check(h, b"abc", PASS, 1, DROP, 6)
    check(h, b"de")
    check(h, b"fgXY", PASS, 2)
    assert h.to_server == b"aXY"
    assert h.dropped[False] == b"bcdefg"
    assert h.engine.dropped(False) == 6


def test_pass_past_input_split_at_every_byte_is_byte_exact() -> None:
    payload = bytes(range(256)) * 4
    h = harness([(PASS, len(payload))])
    h.feed(payload[:3])
    h.feed(payload[3:], split="bytes")
    assert h.to_server == payload
    assert len(script(h).calls) == 1


def test_a_pass_on_one_direction_does_not_affect_the_other() -> None:
    h = harness({False: [(PASS, 100)], True: [(DROP, 2), (PASS, 2)]})
    check(h, b"abc", PASS, 100)
    check(h, b"wxyz", DROP, 2, PASS, 2, reply=True)
    assert h.to_client == b"yz"
    assert h.to_server == b"abc"


# --- INJECT ------------------------------------------------------------------------------------


def test_inject_sends_queued_bytes_at_that_point_of_the_stream() -> None:
    h = harness([inject(False, b"HELLO", (INJECT, 5)), (PASS, 3)])
    check(h, b"abc", INJECT, 5, PASS, 3)
    assert h.to_server == b"HELLOabc"
    assert h.injected[False] == b"HELLO"
    assert h.forwarded[False] == b"abc"


def test_inject_part_of_the_queue_and_the_rest_goes_at_the_end_of_the_round() -> None:
    h = harness([inject(False, b"HELLO", (INJECT, 2)), (PASS, 3)])
    check(h, b"abc", INJECT, 2, PASS, 3)
    assert h.to_server == b"HEabcLLO"


@pytest.mark.parametrize(
    ("queued", "n"),
    [(b"", 1), (b"abc", 4), (b"x", 1 << 20)],
)
def test_inject_more_than_queued_is_a_contract_error(queued: bytes, n: int) -> None:
    h = harness([(PASS, 1), inject(False, queued, (INJECT, n)) if queued else (INJECT, n), (PASS, 1)])
    check(h, b"ab", PASS, 1, INJECT, n)
    assert h.error is not None
    assert h.error.kind == "contract"
    assert h.forwarded[False] == b"a"


def test_injection_toward_the_other_direction_goes_out_promptly() -> None:
    # A denied request: dropped, and the client gets an answer though the server never speaks.
    h = harness([inject(True, b"DENIED\n", (DROP, 4)), (MORE, 1)])
    check(h, b"bad\nre", DROP, 4, MORE, 1)
    assert h.to_client == b"DENIED\n"
    assert h.to_server == b""


def test_injection_toward_the_other_direction_lands_at_its_frame_boundary() -> None:
    # The server side is in the middle of a 10-byte PASS that reached past its input when the
    # client side injects: the answer waits until those 10 bytes are through, then goes out at
    # once (before the next bytes of that direction reach the parser).
    h = harness({True: [(PASS, 10), (PASS, 2)], False: [inject(True, b"<X>", (DROP, 1))]})
    check(h, b"0123", PASS, 10, reply=True)
    check(h, b"q", DROP, 1)
    assert h.to_client == b"0123"  # not in the middle of the passed frame
    check(h, b"456", reply=True)
    assert h.to_client == b"0123456"
    check(h, b"789ab", PASS, 2, reply=True)
    assert h.to_client == b"0123456789<X>ab"


def test_injection_toward_a_direction_in_the_middle_of_a_drop_is_not_held() -> None:
    # Dropped bytes are never sent, so there is no frame on the wire to split.
    h = harness({True: [(DROP, 10)], False: [inject(True, b"<X>", (DROP, 1))]})
    check(h, b"0123", DROP, 10, reply=True)
    check(h, b"q", DROP, 1)
    assert h.to_client == b"<X>"


def test_injection_toward_the_own_direction_waits_for_a_pass_reaching_past() -> None:
    h = harness([inject(False, b"<X>", (PASS, 6))])
    check(h, b"abc", PASS, 6)
    assert h.to_server == b"abc"
    h.feed(b"defgh")
    assert h.to_server == b"abcdef<X>"  # "gh" went to the parser, which answered NOP
    assert h.engine.buffered(False) == 2


def test_queue_inject_from_outside_a_round() -> None:
    # The policy layer may inject without a parser call: out at once, unless mid-PASS.
    h = harness({True: [(PASS, 5)]})
    h.engine.queue_inject(True, b"now\n")
    assert h.to_client == b"now\n"
    check(h, b"ab", PASS, 5, reply=True)
    h.engine.queue_inject(True, b"later\n")
    assert h.to_client == b"now\nab"
    h.feed(b"cde", reply=True)
    assert h.to_client == b"now\nabcdelater\n"


def test_queueing_more_than_the_limit_is_an_error() -> None:
    h = harness([inject(True, b"x" * 17, (DROP, 1))], buffer_limit=16)
    h.feed(b"a")
    assert h.error is not None
    assert h.error.kind == "buffer_limit"
    assert h.to_client == b""


def test_overflowing_the_inject_queue_stops_the_round() -> None:
    h = harness([inject(True, b"x" * 17, (PASS, 1)), (PASS, 1)], buffer_limit=16)
    h.feed(b"ab")
    assert h.error is not None
    assert h.error.kind == "buffer_limit"
    assert len(script(h).calls) == 1  # not called again after the failure
    assert h.to_server == b""


def test_a_parser_injecting_in_a_loop_without_consuming_is_stopped() -> None:
    calls = 0

    def forever(ctx: ConnectionContext, reply: bool, data: bytes) -> Verdict:
        nonlocal calls
        calls += 1
        ctx.inject(reply, b"spam")
        return INJECT, 4

    h = harness([forever] * 1000, buffer_limit=64)
    h.feed(b"a")
    assert h.error is not None
    assert h.error.kind == "buffer_limit"
    assert calls == 17  # 16 * 4 bytes == the limit; the 17th INJECT goes over it
    assert len(h.injected[False]) <= 64 + 4


# --- ERROR -------------------------------------------------------------------------------------


def test_error_stops_the_round_at_once() -> None:
    h = harness([(PASS, 2), (ERROR, 7), (PASS, 1)])
    check(h, b"abcdef", PASS, 2, ERROR, 7)
    assert h.error is not None
    assert h.error.kind == "parser_error"
    assert h.error.code == 7
    assert h.forwarded[False] == b"ab"  # passed earlier in the round: forwarded
    assert h.closed


def test_after_an_error_input_is_ignored() -> None:
    h = harness({False: [(ERROR, 1), (PASS, 1)], True: [(PASS, 1)]})
    h.feed(b"a")
    check(h, b"more")
    check(h, b"reply", reply=True)
    assert h.to_server == b""
    assert h.to_client == b""
    assert h.eof(False) == 0
    h.engine.queue_inject(True, b"late")
    assert h.to_client == b""
    assert len(script(h).calls) == 1


def test_injection_queued_before_an_error_still_goes_out() -> None:
    # Unsplit or split, the client sees the same bytes: the answer was decided before the error.
    steps: list[Step] = [inject(True, b"DENIED\n", (DROP, 2)), (ERROR, 3)]
    for split in (None, "bytes"):
        h = harness(list(steps))
        h.feed(b"abcd", split=split)  # type: ignore[arg-type]
        assert h.to_client == b"DENIED\n", split
        assert h.error is not None
        assert h.error.code == 3


def test_on_error_callback_is_called_once() -> None:
    seen: list[EngineError] = []
    out: list[tuple[bool, bytes]] = []
    e = Engine(
        Script(_NoCtx(), {False: [(ERROR, 2)]}),
        lambda r, d: out.append((r, bytes(d))),
        on_error=seen.append,
    )
    e.feed(False, b"x")
    e.feed(False, b"y")
    e.feed(True, b"z")
    assert [err.code for err in seen] == [2]
    assert out == []


# --- NOP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 5])
def test_nop_waits_for_more_input(n: int) -> None:
    h = harness([(NOP, n), (PASS, 3)])
    check(h, b"ab", NOP, n)
    assert h.error is None
    assert h.engine.buffered(False) == 2
    check(h, b"c", PASS, 3)  # any new byte calls the parser again, with everything buffered
    assert script(h).calls[-1] == (False, False, b"abc")


# --- contract errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "verdict",
    [
        (PASS, 0),
        (DROP, 0),
        (MORE, 0),
        (INJECT, 0),
        (ERROR, 0),
        (PASS, -1),
        (MORE, -5),
        (PASS, 1.0),
        (PASS, "1"),
        (PASS, True),
        (DROP, None),
        (99, 1),
        ("PASS", 1),
    ],
    ids=repr,
)
def test_broken_verdicts_are_contract_errors(verdict: tuple[Any, Any]) -> None:
    h = harness([(PASS, 1), verdict, (PASS, 1)])
    h.feed(b"abc")
    assert h.error is not None
    assert h.error.kind == "contract"
    assert h.forwarded[False] == b"a"
    assert len(script(h).calls) == 2


def test_an_answer_that_is_not_a_verdict_closes_the_connection() -> None:
    h = harness([lambda ctx, reply, data: None])  # type: ignore[list-item,return-value,arg-type]
    h.feed(b"abc")
    assert h.error is not None
    assert h.error.kind == "exception"  # unpacking failed inside the sandbox
    assert "TypeError" in str(h.error)


def test_op_values_are_proxylib_codes() -> None:
    assert [int(op) for op in (MORE, PASS, DROP, INJECT, ERROR, NOP)] == [1, 2, 3, 4, 5, 6]
    assert Op(2) is PASS


# --- the sandbox -------------------------------------------------------------------------------


def test_parser_exception_is_an_error_naming_type_and_message() -> None:
    h = harness([(PASS, 1), raises(ValueError("bad byte 0x7f")), (PASS, 1)])
    h.feed(b"abc")
    assert h.error is not None
    assert h.error.kind == "exception"
    assert str(h.error) == "ValueError: bad byte 0x7f"
    assert h.forwarded[False] == b"a"
    h.feed(b"d")
    assert h.forwarded[False] == b"a"


def test_exception_on_the_reply_side_closes_the_connection_too() -> None:
    h = harness({True: [raises(KeyError("k"))], False: [(PASS, 1)]})
    h.feed(b"x", reply=True)
    assert h.error is not None
    assert h.error.kind == "exception"
    assert str(h.error).startswith("KeyError")
    h.feed(b"a")
    assert h.to_server == b""


# --- end of stream -----------------------------------------------------------------------------


def test_parser_sees_end_stream() -> None:
    h = harness([(MORE, 1), (PASS, 3)])
    h.feed(b"abc")
    assert h.eof() == 0
    assert script(h).calls == [(False, False, b"abc"), (False, True, b"abc")]
    assert h.to_server == b"abc"


def test_end_stream_with_nothing_buffered_still_calls_the_parser() -> None:
    h = harness([(PASS, 2)])
    h.feed(b"ab")
    assert h.eof() == 0
    assert script(h).calls[-1] == (False, True, b"")


def test_bytes_waiting_on_more_at_eof_are_not_forwarded() -> None:
    h = harness([(PASS, 2), (MORE, 5), (MORE, 5)])
    h.feed(b"abcde")
    assert h.eof() == 3
    assert h.to_server == b"ab"
    assert h.unparsed_at_eof[False] == 3
    assert h.engine.buffered(False) == 0
    assert h.error is None


def test_eof_through_feed_end_stream() -> None:
    h = harness([(MORE, 5), (MORE, 5)])
    h.feed(b"abc", end_stream=True)
    assert h.unparsed_at_eof == {False: 3, True: 0}


def test_eof_twice_calls_the_parser_once() -> None:
    h = harness([(MORE, 5), (MORE, 5)])
    h.feed(b"abc")
    assert h.eof() == 3
    assert h.eof() == 0
    assert len(script(h).calls) == 2


def test_eof_in_the_middle_of_a_pass_does_not_call_the_parser() -> None:
    h = harness([(PASS, 10)])
    h.feed(b"abc")
    assert h.eof() == 0
    assert len(script(h).calls) == 1


def test_eof_on_one_side_leaves_the_other_running() -> None:
    h = harness({False: [(MORE, 9), (MORE, 9)], True: [(PASS, 2)]})
    h.feed(b"abc")
    assert h.eof(False) == 3
    check(h, b"ok", PASS, 2, reply=True)
    assert h.to_client == b"ok"


# --- L4: no parser -----------------------------------------------------------------------------


def test_l4_passthrough_without_a_parser() -> None:
    out: list[tuple[bool, bytes]] = []
    e = Engine(None, lambda r, d: out.append((r, bytes(d))), buffer_limit=4)
    e.feed(False, b"hello, world")  # beyond the limit: nothing is held, so nothing is over it
    e.feed(True, b"hi")
    e.feed(False, b"")
    assert e.feed_eof(False) == 0
    assert e.feed_eof(True) == 0
    assert out == [(False, b"hello, world"), (True, b"hi")]
    assert e.error is None
    assert e.buffered(False) == 0


# --- a direct engine check of the order of sends -------------------------------------------------


class _NoCtx:
    """A context for parsers driven by a bare Engine; injection goes nowhere."""

    def inject(self, reply: bool, data: bytes) -> None:  # pragma: no cover - unused
        raise AssertionError("no injection in this test")


def test_one_send_per_round_in_order() -> None:
    out: list[tuple[bool, bytes]] = []
    parser = Script(_NoCtx(), {False: [(PASS, 1), (DROP, 1), (PASS, 2), (MORE, 1)]})  # type: ignore[arg-type]
    e = Engine(parser, lambda r, d: out.append((r, bytes(d))))
    e.feed(False, b"abcde")
    # The round's passed bytes are joined into one write.
    assert out == [(False, b"acd")]
    assert e.buffered(False) == 1


# --- hold: a direction that waits on the other one ----------------------------------------------


class Gate(Parser):
    """Client bytes pass one per server byte seen; with no credit the client side is held."""

    def __init__(self, ctx: ConnectionContext) -> None:
        self.ctx = ctx
        self.credit = 0
        self.calls: list[tuple[bool, bool, bytes]] = []

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        self.calls.append((reply, end_stream, bytes(data)))
        if not data:
            return NOP, 0
        if reply:
            self.credit += len(data)
            return PASS, len(data)
        if not self.credit:
            return NOP, 0
        k = min(self.credit, len(data))
        self.credit -= k
        return PASS, k


class GateFactory(ParserFactory):
    name = "gate"

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return Gate(ctx)


def test_nop_with_bytes_buffered_holds_and_the_other_direction_releases_it() -> None:
    h = Harness(GateFactory(), buffer_limit=8)
    h.feed(b"abcdefghijkl")  # over the 8-byte limit, but held: not an error
    assert h.held(False) and h.error is None and h.holds == [(False, True)]
    assert h.engine.buffered(False) == 12 and h.to_server == b""
    h.feed(b"xyz", reply=True)  # three credits: the held round runs again at once
    assert h.to_server == b"abc" and h.held(False) and h.holds == [(False, True)]
    h.feed(b"x" * 9, reply=True)
    assert h.to_server == b"abcdefghijkl" and not h.held(False)
    assert h.holds == [(False, True), (False, False)]
    assert h.error is None


def test_over_the_limit_without_a_hold_is_still_an_error() -> None:
    h = Harness(GateFactory(), buffer_limit=8)
    h.feed(b"x", reply=True)
    h.feed(b"abcdefghijkl")  # one byte passes, the rest is held
    assert h.held(False) and h.error is None
    h.feed(b"x" * 11, reply=True)  # all of it passes: the hold clears
    assert not h.held(False)
    h.engine.parser.credit = 0  # type: ignore[union-attr]
    h.feed(b"abc")  # held again, within the limit
    h.feed(b"x" * 20, reply=True)
    assert h.error is None and h.to_server == b"a" + b"bcdefghijkl" + b"abc"


def test_end_of_stream_behind_held_bytes_waits_for_them() -> None:
    h = Harness(GateFactory())
    h.feed(b"abcd")
    assert h.eof(False) == 0  # kept, not lost: the server has not answered yet
    assert h.held(False)
    h.feed(b"xx", reply=True)
    assert h.to_server == b"ab" and h.held(False)
    parser = h.engine.parser
    assert isinstance(parser, Gate) and parser.calls[-1] == (False, True, b"cd")  # end_stream kept
    h.feed(b"xx", reply=True)
    assert h.to_server == b"abcd" and not h.held(False)


def test_a_hold_the_other_direction_can_no_longer_release_is_let_go() -> None:
    h = Harness(GateFactory())
    h.feed(b"abcd")
    h.feed(b"x", reply=True)
    assert h.eof(True) == 0 and not h.held(False)  # the server is done: nothing can free it
    assert h.to_server == b"a" and h.holds == [(False, True), (False, False)]
    assert h.eof(False) == 3  # what is left is counted at the end, as for MORE


def test_existing_nop_answers_without_bytes_do_not_hold() -> None:
    h = harness({False: [(PASS, 3), (NOP, 0)]})
    h.feed(b"abc")
    assert not h.held(False) and h.holds == []


def test_on_hold_reports_each_change_to_the_driver() -> None:
    paused: list[tuple[bool, bool]] = []
    parser = Gate(_NoCtx())  # type: ignore[arg-type]
    e = Engine(parser, lambda r, d: None, buffer_limit=4, on_hold=lambda r, held: paused.append((r, held)))
    e.feed(False, b"abcdefgh")
    assert e.held(False) and not e.held(True) and paused == [(False, True)] and e.error is None
    e.feed(True, b"12345678")
    assert not e.held(False) and paused == [(False, True), (False, False)]


def test_the_http_parser_upgrade_wait_is_a_hold_released_by_the_answer() -> None:
    # The http parser answers NOP for client bytes behind an upgrade until it is answered: with
    # the hold they go out as soon as the answer arrives, not at the client's next send.
    req = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    for answer, after in [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
         b"\x81\x05hello"),
        (b"HTTP/1.1 400 Bad\r\ncontent-length: 0\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]:  # fmt: skip
        h = Harness("http")
        h.feed(req + after)
        assert h.to_server == req and h.held(False)
        h.feed(answer, reply=True)
        assert h.to_server == req + after and not h.held(False) and h.to_client == answer


# --- the direct read path: the engine as the transports' reader and writer (proxyd/relay.py) ------


class Wire:
    """A transport stand-in: writes and pauses go to one shared log, in order."""

    def __init__(self, name: str, log: list[Any]) -> None:
        self.name = name
        self.log = log
        self.on_write: Callable[[], None] | None = None

    def write(self, data: bytes | bytearray) -> None:
        self.log.append((self.name, bytes(data)))
        if self.on_write is not None:
            self.on_write()

    def pause_reading(self) -> None:
        self.log.append((self.name, "pause"))


def direct(steps: Mapping[bool, Sequence[Step]] | None) -> tuple[Any, list[Any], Wire, Wire]:
    log: list[Any] = []
    ctx = _InjectCtx()
    parser = None if steps is None else Script(ctx, steps)  # type: ignore[arg-type]
    e = Engine(parser, lambda r, d: log.append(("send", r, bytes(d))),
               on_hold=lambda r, h: log.append(("hold", r, h)))  # fmt: skip
    ctx.engine = e
    up, cl = Wire("upstream", log), Wire("client", log)
    e.relay(up, cl)
    return e, log, up, cl


class _InjectCtx:
    engine: Any = None

    def inject(self, reply: bool, data: bytes) -> None:
        self.engine.queue_inject(reply, data)


def deny(ctx: ConnectionContext, reply: bool, data: bytes) -> Verdict:
    ctx.inject(True, b"DENIED\r\n")
    return DROP, len(data)


def test_a_resolved_read_goes_straight_to_the_other_transport_and_is_counted() -> None:
    e, log, _, _ = direct({False: [(PASS, 4), deny], True: [(PASS, 3)]})
    e.read_client(b"get ")
    e.read_client(b"bad\r\n")
    e.read_server(b"END")
    # order kept: the pass, the denial (an injection toward the client), the reply
    assert log == [("upstream", b"get "), ("client", b"DENIED\r\n"), ("client", b"END")]
    assert (e.received(False), e.received(True)) == (9, 3)
    assert (e.sent(False), e.sent(True)) == (4, 11)
    assert e.dropped(False) == 5


def test_l4_reads_go_straight_through() -> None:
    e, log, _, _ = direct(None)
    e.read_client(b"ping")
    e.read_server(b"pong")
    assert log == [("upstream", b"ping"), ("client", b"pong")]
    assert (e.received(False), e.sent(False), e.received(True), e.sent(True)) == (4, 4, 4, 4)


def test_without_a_relay_transport_output_goes_through_send_in_order() -> None:
    e, log, up, _ = direct({False: [(PASS, 1)] * 6})
    e.relay(up, None)  # the client is full: replies through send (the relay bounds them)
    e.queue_inject(True, b"x")
    e.read_client(b"a")
    e.relay(None, None)  # closed: nothing is written to a transport any more
    e.read_client(b"b")
    e.relay(up, None)
    e.read_client(b"c")
    assert log == [("send", True, b"x"), ("upstream", b"a"), ("send", False, b"b"), ("upstream", b"c")]
    assert e.received(False) == 3 and e.sent(False) == 2 and e.sent(True) == 0


def test_a_transport_taken_off_inside_its_write_gets_nothing_more() -> None:
    """uvloop calls pause_writing from inside write(): the relay then takes the client off."""
    e, log, up, cl = direct({False: [(PASS, 2), (PASS, 2)], True: [(PASS, 1)] * 4})
    cl.on_write = lambda: e.relay(up, None)
    e.queue_inject(True, b"!")  # from outside a round: straight to the client, which goes off
    e.read_server(b"ab")
    assert log == [("client", b"!"), ("send", True, b"ab")]
    assert e.sent(True) == 1


def test_a_server_read_while_held_pauses_the_upstream_again() -> None:
    """The upstream may start reading while its direction is held: each read pauses it again."""
    e, log, _, _ = direct({True: [(NOP, 0)], False: [(PASS, 1)]})
    e.read_server(b"reply")  # NOP with bytes buffered: held
    assert e.held(True) and log == [("hold", True, True)]
    e.read_server(b"more")
    assert log == [("hold", True, True), ("upstream", "pause")]
    assert e.received(True) == 9 and e.buffered(True) == 9


def test_reads_after_an_error_are_counted_and_go_nowhere() -> None:
    e, log, _, _ = direct({False: [(ERROR, 7)]})
    e.read_client(b"x")
    e.read_client(b"yz")
    e.read_server(b"r")
    assert e.error is not None and e.error.code == 7
    assert log == [] and (e.received(False), e.received(True)) == (3, 1)
