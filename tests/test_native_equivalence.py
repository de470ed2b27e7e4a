"""The native twin against the Python reference: same inputs, same segmentation, same outcome.

Hypothesis drives both implementations (``Harness(implementation="python" | "native")``) with
the same scripted parsers (engine) or the same memcache traffic and policy (parser), fed in the
same chunks, interleaved the same way between the two directions, and compares everything the
harness can see: every op, bytes forwarded / dropped / injected per direction, the two output
streams, log entries, the error (kind, message, code), bytes still buffered and dropped, bytes
left at end of stream, and the memcache pending queue.

Runs in every CI pass (native and ``PROXYD_PURE=1``: the twin is loaded here either way) and
under AddressSanitizer/UBSan in CI's sanitizer job.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_connection import Schedule, policy_doc, run_live

from proxyd.context import L7Decision
from proxyd.engine import native_module
from proxyd.ops import Op
from proxyd.parser import ConnectionContext, Data, Parser, ParserFactory
from proxyd.parsers.memcache import MemcacheFactory
from proxyd.policy import flat
from proxyd.policy.engine import ConnectionPolicy
from proxyd.testing import Harness, engine_class

if native_module() is None:  # pragma: no cover - CI always builds it
    if os.environ.get("PROXYD_REQUIRE_BINARIES", "") not in ("", "0"):
        pytest.fail("proxyd._native is not built (required: PROXYD_REQUIRE_BINARIES=1)", pytrace=False)
    pytest.skip("proxyd._native is not built", allow_module_level=True)

EXAMPLES = int(os.environ.get("PROXYD_EQUIV_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(h: Harness) -> dict[str, Any]:
    err = h.error
    return {
        "ops": [(r, int(op) if isinstance(op, int) else repr(op), repr(n)) for r, op, n in h.ops],
        "out": (h.to_server, h.to_client),
        "forwarded": h.forwarded,
        "dropped": h.dropped,
        "injected": h.injected,
        "log": [(e.entry_type, e.verdict, e.fields, e.policy) for e in h.log],
        "error": None if err is None else (err.kind, str(err), err.code),
        "buffered": (h.engine.buffered(False), h.engine.buffered(True)),
        "dropped_count": (h.engine.dropped(False), h.engine.dropped(True)),
        "unparsed": dict(h.unparsed_at_eof),
        "holds": list(h.holds),
        "held": (h.held(False), h.held(True)),
    }


@st.composite
def schedules(draw: st.DrawFn, client: bytes, server: bytes) -> Schedule:
    """Cut both streams into chunks and interleave them, keeping each direction's order."""

    def cut(data: bytes) -> list[bytes]:
        sizes = draw(st.lists(st.integers(1, 48), max_size=40))
        out, pos = [], 0
        for k in sizes:
            if pos >= len(data):
                break
            out.append(data[pos : pos + k])
            pos += k
        if pos < len(data):
            out.append(data[pos:])
        return out

    a, b = cut(client), cut(server)
    order = draw(st.lists(st.booleans(), min_size=len(a) + len(b), max_size=len(a) + len(b)))
    sched: Schedule = []
    for reply in order:
        src = b if reply else a
        if not src:
            src, reply = (a, False) if reply else (b, True)
        sched.append((reply, src.pop(0)))
    return sched


def run(h: Harness, sched: Schedule, eof: tuple[bool, bool]) -> dict[str, Any]:
    for reply, chunk in sched:
        h.engine.feed(reply, chunk)
    for reply in (False, True):
        if eof[reply]:
            h.eof(reply)
    return outcome(h)


# --- the engine, with scripted parsers -------------------------------------------------------

ODD_OPS: list[Any] = [0, 7, -1, 2.0, True, "PASS", None, 10**30]
ODD_NS: list[Any] = [0, -5, 10**20, 2**63, "3", 1.5, True, None, 1 << 21]


class Scripted(Parser):
    """Answers steps in order (then NOP): a verdict, an odd return value, injections, raises."""

    def __init__(self, ctx: ConnectionContext, steps: Sequence[Any]) -> None:
        self.ctx = ctx
        self.steps = list(steps)
        self.seen: list[tuple[bool, bool, bytes]] = []

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Any:
        self.seen.append((reply, end_stream, bytes(data)))
        if not self.steps:
            return (Op.NOP, 0)
        kind, a, b = self.steps.pop(0)
        if kind == "verdict":
            return (a, b)
        if kind == "inject":
            to_reply, payload = b
            self.ctx.inject(to_reply, payload)
            return a
        if kind == "raise":
            raise ValueError(f"scripted failure {a}")
        if kind == "list":
            return [a, b]
        if kind == "triple":
            return (a, b, b)
        return None


class ScriptedFactory(ParserFactory):
    name = "scripted"

    def __init__(self, steps: Sequence[Any]) -> None:
        self.steps = steps

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return Scripted(ctx, self.steps)


good_op = st.sampled_from([Op.MORE, Op.PASS, Op.DROP, Op.INJECT, Op.ERROR, Op.NOP])
good_n = st.integers(1, 60)
verdict = st.tuples(good_op, good_n)
step = st.one_of(
    st.tuples(st.just("verdict"), good_op, good_n),
    st.tuples(st.just("verdict"), good_op, good_n),
    st.tuples(st.just("verdict"), good_op, good_n),
    st.tuples(st.just("verdict"), st.one_of(good_op, st.sampled_from(ODD_OPS)),
              st.one_of(good_n, st.sampled_from(ODD_NS))),
    st.tuples(st.just("inject"), verdict, st.tuples(st.booleans(), st.binary(min_size=1, max_size=12))),
    st.tuples(st.just("raise"), st.integers(0, 9), st.none()),
    st.tuples(st.sampled_from(["list", "triple", "none"]), good_op, good_n),
)  # fmt: skip


@SETTINGS
@given(
    steps=st.lists(step, max_size=30),
    client=st.binary(max_size=200),
    server=st.binary(max_size=200),
    data=st.data(),
    eof=st.tuples(st.booleans(), st.booleans()),
    limit=st.sampled_from([1 << 20, 64, 200]),
    l4=st.booleans(),
)
def test_engine_equivalent(
    steps: list[Any], client: bytes, server: bytes, data: st.DataObject, eof: tuple[bool, bool], limit: int,
    l4: bool,
) -> None:
    sched = data.draw(schedules(client, server))
    results = []
    for impl in ("python", "native"):
        h = Harness(ScriptedFactory(steps), buffer_limit=limit, implementation=impl)
        if l4:
            h.engine.parser = None
        res = run(h, sched, eof)
        parser = h.engine.parser
        res["seen"] = parser.seen if isinstance(parser, Scripted) else None
        results.append(res)
    assert results[0] == results[1]


def test_engine_queue_inject_from_outside_a_round_is_equivalent() -> None:
    for impl in ("python", "native"):
        h = Harness(ScriptedFactory([("verdict", Op.PASS, 100)]), implementation=impl)
        h.feed(b"abc")  # PASS 100: 97 bytes still to pass, so an injection waits
        h.engine.queue_inject(True, b"to-client")
        h.engine.queue_inject(False, b"held")
        assert h.to_server == b"abc"
        h.feed(b"x" * 97)
        assert h.to_server == b"abc" + b"x" * 97 + b"held"
        assert h.to_client == b"to-client"


# --- the direct read path: the engine as the transports' reader and writer ---------------------


class _InjectCtx:
    engine: Any = None

    def inject(self, reply: bool, data: bytes) -> None:
        self.engine.queue_inject(reply, data)


class _Transport:
    """Logs writes and pauses in the shared log; after ``off_after`` writes it takes itself off
    the engine from inside write(), as the relay's pause_writing does."""

    def __init__(self, name: str, log: list[Any], engine: Any, off_after: int | None) -> None:
        self.name, self.log, self.engine, self.off_after = name, log, engine, off_after
        self.relays: list[Any] = [None, None]  # what the engine writes to now (set by the test)

    def write(self, data: bytes | bytearray) -> None:
        self.log.append(("write", self.name, bytes(data)))
        if self.off_after is not None:
            self.off_after -= 1
            if self.off_after <= 0:
                self.off_after = None
                self.relays[:] = [None if t is self else t for t in self.relays]
                self.engine.relay(*self.relays)

    def pause_reading(self) -> None:
        self.log.append(("pause", self.name))


@SETTINGS
@given(
    steps=st.lists(step, max_size=30),
    client=st.binary(max_size=200),
    server=st.binary(max_size=200),
    data=st.data(),
    limit=st.sampled_from([1 << 20, 64, 200]),
    l4=st.booleans(),
    off_after=st.tuples(st.none() | st.integers(1, 3), st.none() | st.integers(1, 3)),
)
def test_engine_direct_reads_equivalent(
    steps: list[Any], client: bytes, server: bytes, data: st.DataObject, limit: int, l4: bool,
    off_after: tuple[int | None, int | None],
) -> None:  # fmt: skip
    """read_client / read_server with the output relayed to transports (switched on and off
    between reads, and from inside a write): same writes, sends, pauses, counts and errors."""
    sched = data.draw(schedules(client, server))
    relays = data.draw(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=len(sched),
                                max_size=len(sched)))  # fmt: skip
    results = []
    for impl in ("python", "native"):
        log: list[Any] = []
        ctx = _InjectCtx()
        parser = None if l4 else Scripted(ctx, steps)  # type: ignore[arg-type]
        engine = engine_class(impl)(parser, lambda r, d, log=log: log.append(("send", r, bytes(d))),
                                    buffer_limit=limit,
                                    on_hold=lambda r, h, log=log: log.append(("hold", r, h)))  # fmt: skip
        ctx.engine = engine
        up = _Transport("upstream", log, engine, off_after[0])
        cl = _Transport("client", log, engine, off_after[1])
        up.relays = cl.relays  # one list: what the engine writes to now
        for (reply, chunk), (to_server, to_client) in zip(sched, relays, strict=True):
            up.relays[:] = [up if to_server else None, cl if to_client else None]
            engine.relay(*up.relays)
            (engine.read_server if reply else engine.read_client)(chunk)
        err = engine.error
        results.append({
            "log": log,
            "counts": [(engine.received(r), engine.sent(r)) for r in (False, True)],
            "error": None if err is None else (err.kind, str(err)),
            "seen": None if parser is None else parser.seen,
        })  # fmt: skip
    assert results[0] == results[1]
    # every byte written to a transport is counted, per direction
    log = results[0]["log"]
    for reply, name in ((False, "upstream"), (True, "client")):
        assert results[0]["counts"][reply][1] == sum(len(e[2]) for e in log if e[:2] == ("write", name))


# --- the engine's hold, with a gate parser ----------------------------------------------------


class Gate(Parser):
    """Holds client bytes (NOP) while no server byte has opened the gate: every server byte
    gives ``credit`` client bytes. Op choices come from a script, so the hold meets MORE, INJECT,
    DROP, ERROR and end of stream in every order."""

    def __init__(self, ctx: ConnectionContext, credit: int, script: Sequence[int]) -> None:
        self.ctx = ctx
        self.credit = credit
        self.open = 0
        self.script = list(script)
        self.seen: list[tuple[bool, bool, int]] = []

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Any:
        self.seen.append((reply, end_stream, len(data)))
        pick = self.script.pop(0) if self.script else 0
        if not data:
            return (Op.NOP, 0)
        if reply:
            if pick == 1:
                return (Op.MORE, 1) if len(data) < 2 else (Op.PASS, 2)
            if pick == 2:
                self.ctx.inject(False, b"!")
            if pick == 3:
                return (Op.ERROR, 9)
            self.open += self.credit
            return (Op.PASS, 1)
        if not self.open:
            return (Op.NOP, 0)
        k = min(self.open, len(data))
        self.open -= k
        if pick == 1:
            return (Op.DROP, k)
        if pick == 2:
            self.ctx.inject(True, b"?")
        return (Op.PASS, k)


class GateFactory(ParserFactory):
    name = "gate"

    def __init__(self, credit: int, script: Sequence[int]) -> None:
        self.credit = credit
        self.script = script

    def create(self, ctx: ConnectionContext, config: Any) -> Parser:
        return Gate(ctx, self.credit, self.script)


@SETTINGS
@given(
    credit=st.integers(1, 8),
    script=st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), max_size=60),
    client=st.binary(min_size=1, max_size=300),
    server=st.binary(max_size=60),
    data=st.data(),
    eof=st.tuples(st.booleans(), st.booleans()),
    limit=st.sampled_from([1 << 20, 16, 64]),
)
def test_engine_hold_equivalent(
    credit: int, script: list[int], client: bytes, server: bytes, data: st.DataObject,
    eof: tuple[bool, bool], limit: int,
) -> None:  # fmt: skip
    sched = data.draw(schedules(client, server))
    results = []
    for impl in ("python", "native"):
        h = Harness(GateFactory(credit, script), buffer_limit=limit, implementation=impl)
        res = run(h, sched, eof)
        parser = h.engine.parser
        assert isinstance(parser, Gate)
        res["seen"] = parser.seen
        results.append(res)
    assert results[0] == results[1]


# --- the memcache parser ----------------------------------------------------------------------

KEYS = [b"a/1", b"a/2", b"b/1", b"c/1", b"\xffx", b"a/\xed\xa0\x80", b"\xf0\x90\x80", b"a/" + b"k" * 250,
        "a/\u00e9".encode(), b"\x10\xb0x"]  # fmt: skip
KEY_B64 = [b"YS8x", b"Yi8x", b"YS8=", b"!!!!", b"YQ"]

TEXT_REQUESTS = [
    b"get {k}\r\n", b"gets {k} {k}\r\n", b"bget {k}\r\n", b"gat 10 {k} {k}\r\n", b"gats 1 {k}\r\n",
    b"set {k} 0 0 3\r\nabc\r\n", b"set {k} 0 0 1 noreply\r\nx\r\n", b"add {k} 1 -1 2\r\nxy\r\n",
    b"cas {k} 0 0 1 99\r\nx\r\n", b"cas {k} 0 0 1\r\n", b"set {k} 0 0\r\n", b"set {k} 0 0 x1\r\n",
    b"append {k} 0 0 0\r\n\r\n", b"delete {k}\r\n", b"delete {k} noreply\r\n", b"incr {k} 1\r\n",
    b"decr {k} 1 noreply\r\n", b"touch {k} 10\r\n", b"flush_all\r\n", b"flush_all 0 noreply\r\n",
    b"verbosity 1\r\n", b"version\r\n", b"stats\r\n", b"stats items\r\n", b"lru_crawler metadump all\r\n",
    b"lru crawl noreply\r\n", b"slabs automove 1 noreply\r\n", b"watch\r\n", b"quit\r\n", b"bogus {k}\r\n",
    b"\r\n", b"  get   {k}  \r\n", b"get {k}\n", b"get {k}\x00junk\r\n", b"mn\r\n", b"noop\r\n",
    b"mg {k} v\r\n", b"mg {k} v q\r\n", b"mg {k} v q O7\r\n", b"mg {k} k v q Oabc t\r\n",
    b"mg {b} b v\r\n", b"mg {b} b b\r\n", b"mg {k} q q\r\n", b"mg {k} N30 T-1 R5\r\n", b"mg {k} Nx\r\n",
    b"ms {k} 2\r\nxx\r\n", b"ms {k} 2 q\r\nxx\r\n", b"ms {k} 2 MA q\r\nxx\r\n", b"ms {k} 2 MZ\r\nxx\r\n",
    b"ms {k} x\r\n", b"ms {k}\r\n", b"ms {b} 1 b q O1\r\nz\r\n", b"md {k} q\r\n", b"md {k} q O99\r\n",
    b"ma {k} q MI\r\n", b"ma {k} M+ D5 J3\r\n", b"ma {k} q MX\r\n", b"me {k}\r\n", b"me {k} q\r\n",
    b"mg {k} " + b"O" + b"9" * 40 + b" q\r\n", b"get " + b"{k} " * 30 + b"\r\n",
    # lines memcached answers CLIENT_ERROR without reading the block, and sizes it reads oddly
    b"set {k} 0 blah 1\r\nX\r\n", b"cas {k} blah 0 0 0\r\n", b"set {k} 0 0 -1\r\n",
    b"set {k} 0 0 4294967295\r\n", b"set {k} 0 0 +2\r\nxy\r\n", b"set {k} 0 0 4294967296\r\n\r\n",
    b"set {k} -1 0 1\r\nx\r\n", b"set {k} 0 0 1 noreply x\r\n", b"set {k} 0 0 2x noreply\r\nab\r\n",
    b"ms {k} -1\r\n", b"ms {k} +1 q\r\nx\r\n", b"mg {k} T+5 q\r\n", b"mg {k} T99999999999 q\r\n",
    b"ma {k} D-1 q\r\n", b"mg {k} F18446744073709551616 q\r\n",
    # a storage command with no key token (the C twin once read a token past the last one)
    b"set\r\n", b"set\x00{k} 0 0 3\r\nabc\r\n", b"cas\r\n",
    # a long multi-key get (over 2048 bytes), and a long line memcached closes on
    b"get " + b"{k} " * 600 + b"\r\n", b"set " + b"x" * 2100 + b"\r\n",
]  # fmt: skip

TEXT_REPLIES = [
    b"VALUE {k} 0 3\r\nabc\r\n", b"VALUE {k} 0 3 7\r\nabc\r\n", b"END\r\n", b"STORED\r\n", b"NOT_STORED\r\n",
    b"DELETED\r\n", b"NOT_FOUND\r\n", b"TOUCHED\r\n", b"5\r\n", b"OK\r\n", b"VERSION 1.6.21\r\n",
    b"STAT pid 1\r\n", b"ITEM x\r\n", b"PREFIX p\r\n", b"key=a exp=1\r\n", b"mg a\r\n", b"EN\r\n",
    b"ERROR\r\n", b"CLIENT_ERROR bad\r\n", b"SERVER_ERROR oom\r\n", b"HD\r\n", b"HD O7\r\n", b"HD Oabc\r\n",
    b"VA 2 t\r\nxy\r\n", b"VA 1 O7\r\nz\r\n", b"NS\r\n", b"EX\r\n", b"NF\r\n", b"NF O99\r\n", b"MN\r\n",
    b"VALUE {k} 0\r\n", b"VALUE {k} 0 x\r\n", b"VA\r\n", b"ts=1 gid=2\n", b"\r\n", b"x" * 20 + b"\r\n",
    b"ERROR Too many open connections\r\n", b"VALUE {k} 0 60\r\n" + b"v" * 60 + b"\r\n",
]  # fmt: skip

RULE_CHOICES: list[Mapping[str, str]] = [
    {"command": "get", "keyPrefix": "a/"},
    {"command": "get", "keyRegex": "^a/[0-9]$"},
    {"command": "writeGroup", "keyPrefix": "a/"},
    {"command": "storage", "keyExact": "a/1"},
    {"command": "meta", "keyPrefix": "a/"},
    {"command": "mg"},
    {"command": "stats"},
    {"command": "version"},
    {"command": "gat"},
    {"command": "quit"},
    {},
]


def fill(template: bytes, draw: st.DrawFn) -> bytes:
    out = template
    while b"{k}" in out:
        out = out.replace(b"{k}", draw(st.sampled_from(KEYS)), 1)
    while b"{b}" in out:
        out = out.replace(b"{b}", draw(st.sampled_from(KEY_B64)), 1)
    return out


def mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Near-valid traffic: flip, drop or insert a few bytes."""
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        how = draw(st.integers(0, 2))
        if how == 0:
            b[i] = draw(st.sampled_from([0, 10, 13, 32, 48, 0x80, 0xFF, 61, 79, 113]))
        elif how == 1:
            del b[i]
        else:
            b.insert(i, draw(st.sampled_from([10, 32, 57])))
    return bytes(b)


@st.composite
def text_traffic(draw: st.DrawFn) -> tuple[bytes, bytes]:
    reqs = [fill(t, draw) for t in draw(st.lists(st.sampled_from(TEXT_REQUESTS), max_size=12))]
    reps = [fill(t, draw) for t in draw(st.lists(st.sampled_from(TEXT_REPLIES), max_size=14))]
    client, server = b"".join(reqs), b"".join(reps)
    kind = draw(st.integers(0, 5))
    if kind == 4:
        # a close decided while replies are owed: drain, then close
        client += draw(st.sampled_from([b"set " + b"y" * 2100, b"x" * 3000, b"gat 1 " + b"z" * 2100]))
        client += fill(draw(st.sampled_from(TEXT_REQUESTS)), draw)
    elif kind == 1:
        client = mutate(client, draw)
    elif kind == 2:
        server = mutate(server, draw)
    elif kind == 3:
        client = draw(st.binary(max_size=200)).replace(b"\xfe", b"\n")
        server = draw(st.binary(max_size=200)).replace(b"\xfe", b"\n")
    return client, server


_PKT = struct.Struct(">BBHBBHIIQ")
BIN_OPCODES = [0x00, 0x01, 0x04, 0x05, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x10, 0x11, 0x14, 0x17,
               0x18, 0x1C, 0x1E, 0x20, 0x32, 0x5F]  # fmt: skip


@st.composite
def binary_traffic(draw: st.DrawFn) -> tuple[bytes, bytes]:
    client = bytearray()
    server = bytearray()
    if draw(st.integers(0, 5)) == 0:
        server += b"ERROR Too many open connections\r\n"
    for i in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(BIN_OPCODES))
        key = draw(st.sampled_from([b"", *KEYS[:3], b"k" * 251, b"a/" * 140]))
        extras = b"\x00" * draw(st.sampled_from([0, 4, 8]))
        value = draw(st.binary(max_size=6))
        body = extras + key + value
        bodylen = max(0, len(body) - draw(st.sampled_from([0, 0, 0, 0, len(value) + 1])))
        magic = draw(st.sampled_from([0x80] * 12 + [0x90]))
        client += _PKT.pack(magic, op, len(key), len(extras), 0, 0, bodylen, i, 0) + body
        if draw(st.booleans()):
            status = draw(st.sampled_from([0, 0, 1, 0x81, 0x77]))
            rv = draw(st.binary(max_size=5))
            server += _PKT.pack(0x81, op if draw(st.booleans()) else 0x0A, 0, 0, 0, status, len(rv),
                                i if draw(st.booleans()) else 0xFFFFFFFF, 0) + rv  # fmt: skip
    c, s = bytes(client), bytes(server)
    if draw(st.booleans()):
        c = mutate(c, draw)
    if draw(st.booleans()):
        s = mutate(s, draw)
    return c, s


class FlatRulesPolicy:
    """A policy with a flat form, as the daemon's LiveConnectionPolicy has: the native parser
    evaluates it in C (proxyd.policy.flat); ``decide`` is the reference. ``opaque`` rules are
    wrapped in a matcher without a flat form, which the interface hands over as a call."""

    def __init__(self, rules: Sequence[tuple[Mapping[str, str], bool]], audit: bool = False) -> None:
        factory = MemcacheFactory()
        matchers: list[tuple[Any, L7Decision]] = []
        for rule, opaque in rules:
            m = factory.compile_rule(rule)
            matchers.append((_Opaque(m) if opaque else m, L7Decision(True, "test")))
        self.cp = ConnectionPolicy(True, "", always=None, matchers=tuple(matchers),
                                   denied=L7Decision(False, "test", audit=audit))  # fmt: skip
        self.cell: list[object] = [object()]
        self.flats = 0

    def decide(self, request: Any) -> L7Decision:
        return self.cp.decide(request)

    def flat(self) -> flat.FlatPolicy:
        self.flats += 1
        return flat.build(self.cp, self.cell[0], self.cell)


class _Opaque:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[Any] = []

    def matches(self, request: Any) -> bool:
        self.seen.append(request)
        return bool(self.inner.matches(request))


def run_memcache(impl: str, rules: list[Mapping[str, str]] | None, log_responses: bool, sched: Schedule,
                 eof: tuple[bool, bool], flat_form: list[bool] | None = None) -> dict[str, Any]:  # fmt: skip
    config = {"log_responses": log_responses}
    if flat_form is not None and rules is not None:
        policy = FlatRulesPolicy(list(zip(rules, flat_form + [False] * len(rules), strict=False)))
        h = Harness(MemcacheFactory(), policy=policy, parser_config=config, implementation=impl)
    else:
        h = Harness(MemcacheFactory(), rules=rules, parser_config=config, implementation=impl)
    res = run(h, sched, eof)
    res["pending"] = h.engine.parser.pending()  # type: ignore[attr-defined]
    return res


policies = st.one_of(st.none(), st.lists(st.sampled_from(RULE_CHOICES), max_size=4))


@SETTINGS
@given(traffic=st.one_of(text_traffic(), binary_traffic()), rules=policies, data=st.data(),
       log_responses=st.booleans(), eof=st.tuples(st.booleans(), st.booleans()),
       flat_form=st.none() | st.lists(st.booleans(), max_size=4))  # fmt: skip
def test_memcache_equivalent(
    traffic: tuple[bytes, bytes], rules: list[Mapping[str, str]] | None, data: st.DataObject,
    log_responses: bool, eof: tuple[bool, bool], flat_form: list[bool] | None,
) -> None:  # fmt: skip
    """``flat_form``: the policy has a flat form (evaluated in C, some rules as calls), or not
    (the native parser calls ``ctx.matches``)."""
    client, server = traffic
    sched = data.draw(schedules(client, server))
    py = run_memcache("python", rules, log_responses, sched, eof, flat_form)
    nat = run_memcache("native", rules, log_responses, sched, eof, flat_form)
    assert nat == py


@pytest.mark.parametrize(
    ("client", "server"),
    [
        (b"get a/1 b/1\r\nset a/1 0 0 1\r\nx\r\nmg a/1 q\r\ndelete b/1\r\n",
         b"END\r\nSTORED\r\nVERSION 1\r\n"),
        (b"ms a/1 2 q O5\r\nxx\r\nmd b/1\r\nmn\r\n", b"NS O5\r\nVERSION 1\r\nMN\r\n"),
        (b"watch\r\n", b"OK\r\nts=1 whatever\nmore\r\n"),
        (b"x" * 3000, b""),
        (b"get " + b"k " * 20000 + b"\r\n", b""),
        (b"", b"VALUE x 0 1\r\nx\r\nEND\r\n"),
        # drain then close: owed replies (a quiet one behind a barrier, a streaming value) first
        (b"get a/1\r\nmg a/2 v q\r\nget b/1\r\n" + b"x" * 3000 + b"\r\nget a/1\r\n",
         b"VALUE a/1 0 3\r\nabc\r\nEND\r\nVERSION 1\r\n"),
        (b"mg a/1 v\r\nset " + b"y" * 2100, b"VA 100\r\n" + b"v" * 100 + b"\r\n"),
        (b"mg a/1 v\r\nmg b/1 v\r\n", b"VA 100\r\n" + b"v" * 100 + b"\r\n"),
        # bad command lines: forwarded, block read as commands; unsolicited lines forwarded
        (b"set a/1 0 blah 1\r\nX\r\nset a/1 0 0 4294967296\r\n\r\nset b/1 0 0 -1\r\n",
         b"CLIENT_ERROR bad command line format\r\nERROR\r\nSTORED\r\n"),
        (b"", b"ERROR Too many open connections\r\n"),
        # binary: a key over 250 bytes is answered by the server, then the connection closes
        (_PKT.pack(0x80, 0x0A, 0, 0, 0, 0, 0, 1, 0) + _PKT.pack(0x80, 0, 300, 0, 0, 0, 300, 2, 0) + b"a" * 300
         + b"junk", _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 1, 0) + _PKT.pack(0x81, 0, 0, 0, 0, 4, 17, 2, 0)
         + b"Invalid arguments"),
        (_PKT.pack(0x80, 0x0D, 3, 0, 0, 0, 3, 1, 0) + b"a/1" + b"\x90" * 30,
         b"ERROR Too many open connections\r\n" + _PKT.pack(0x81, 0x0A, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0)),
    ],
)
def test_memcache_tables_equivalent(client: bytes, server: bytes) -> None:
    rules: list[Mapping[str, str]] = [
        {"command": "get", "keyPrefix": "a/"},
        {"command": "meta", "keyPrefix": "a/"},
        {"command": "storage", "keyPrefix": "a/"},
    ]
    for split in (None, 1, 7):
        sched: Schedule = []
        for reply, stream in ((False, client), (True, server)):
            step = split or max(1, len(stream))
            sched += [(reply, stream[i : i + step]) for i in range(0, len(stream), step)]
        assert run_memcache("native", rules, True, sched, (True, True)) == run_memcache(
            "python", rules, True, sched, (True, True)
        )


def test_the_native_parser_runs_on_the_native_engine() -> None:
    mod = native_module()
    h = Harness(MemcacheFactory(), implementation="native")
    assert type(h.engine) is mod.Engine
    assert type(h.engine.parser) is mod.Memcache
    h = Harness(MemcacheFactory(), implementation="python")
    assert type(h.engine.parser).__name__ == "MemcacheParser"


# --- the flattened-policy interface, as the native parser reads it -----------------------------

FLAT_TRAFFIC = b"get a/1\r\nget b/1\r\nget a/2 b/2\r\nstats\r\n"


class _Refusing(FlatRulesPolicy):
    """Fails the test if the parser asks ``decide`` (the flat form must answer)."""

    def decide(self, request: Any) -> L7Decision:
        raise AssertionError(f"decide({request!r}) called: the flat form was not used")


def flat_run(policy: Any, impl: str = "native") -> Harness:
    h = Harness(MemcacheFactory(), policy=policy, implementation=impl)
    h.feed(FLAT_TRAFFIC)
    return h


def test_the_native_parser_decides_through_the_flat_form() -> None:
    rules = [({"command": "get", "keyPrefix": "a/"}, False), ({"command": "stats"}, False)]
    h = flat_run(_Refusing(rules))
    assert h.out[False] == b"get a/1\r\nstats\r\n"
    assert [(e.verdict, e.fields["keys"]) for e in h.log] == [
        ("forwarded", ["a/1"]), ("denied", ["b/1"]), ("denied", ["a/2", "b/2"]), ("forwarded", [])
    ]
    py = flat_run(FlatRulesPolicy(rules), "python")
    assert (h.out, h.log) == (py.out, py.log)


def test_the_native_parser_follows_the_revision_cell() -> None:
    """Built once; rebuilt only when the cell no longer holds the copy's stamp (a reload)."""
    policy = _Refusing([({"command": "get", "keyPrefix": "a/"}, False)])
    h = Harness(MemcacheFactory(), policy=policy, implementation="native")
    h.feed(b"get a/1\r\nget a/2\r\nget b/1\r\n")
    assert policy.flats == 1
    policy.cp = ConnectionPolicy(True, "", always=L7Decision(False, "reloaded"))
    h.feed(b"get a/3\r\n")
    assert policy.flats == 1  # the cell did not move: the old copy still holds
    policy.cell[0] = object()
    h.feed(b"get a/4\r\n")
    assert policy.flats == 2
    assert h.out[False] == b"get a/1\r\nget a/2\r\nget a/3\r\n"
    assert (h.log[-1].verdict, h.log[-1].policy) == ("denied", "reloaded")


def test_rules_without_a_flat_form_are_called_with_the_request() -> None:
    from proxyd.parsers.memcache import MemcacheRequest

    policy = _Refusing([({"command": "get", "keyPrefix": "a/"}, True)])
    h = flat_run(policy)
    assert h.out[False] == b"get a/1\r\n"
    [(opaque, _)] = policy.cp.matchers
    assert isinstance(opaque, _Opaque)
    assert opaque.seen[:2] == [MemcacheRequest("get", (b"a/1",)), MemcacheRequest("get", (b"b/1",))]


class _UnknownForm(FlatRulesPolicy):
    """A flat form from a later version: the build must not guess, and asks ``decide``."""

    decided = 0

    def decide(self, request: Any) -> L7Decision:
        self.decided += 1
        return super().decide(request)

    def flat(self) -> flat.FlatPolicy:
        fp = super().flat()
        glob = flat.FlatRule((("key", "glob", b"a/*"),), fp.rules[0].then)
        return fp._replace(rules=(glob, *fp.rules))


class _NoFlat(FlatRulesPolicy):
    decided = 0

    def decide(self, request: Any) -> L7Decision:
        self.decided += 1
        return super().decide(request)

    flat = None  # type: ignore[assignment]


@pytest.mark.parametrize("cls", [_UnknownForm, _NoFlat])
def test_a_policy_the_build_cannot_read_is_asked_instead(cls: type[Any]) -> None:
    rules = [({"command": "get", "keyPrefix": "a/"}, False)]
    policy = cls(rules)
    h = flat_run(policy)
    assert policy.decided == 5  # once a key (a multi-key get asks per key), through ctx.matches
    assert h.out[False] == flat_run(FlatRulesPolicy(rules), "python").out[False] == b"get a/1\r\n"


# --- the daemon's own access log and counters (not the harness's list sink) -------------------


class _MixedPolicy:
    """Allows keys under a/, audits keys under b/ (denied but forwarded), denies the rest."""

    def decide(self, request: Any) -> Any:
        from proxyd.context import L7Decision

        keys = getattr(request, "keys", ())
        if keys and all(k.startswith(b"a/") for k in keys):
            return L7Decision(True, "allow-a")
        if keys and all(k.startswith(b"b/") for k in keys):
            return L7Decision(False, "audit-b", audit=True)
        return L7Decision(False, "deny")


def run_daemon_log(impl: str, mode: str, sched: Schedule, tmp: Any) -> tuple[Any, list[Any]]:
    import json

    from proxyd.accesslog import AccessLog
    from proxyd.context import ConnInfo, Context
    from proxyd.metrics import Metrics
    from proxyd.parser import Endpoint
    from proxyd.testing import engine_class

    path = tmp / f"{impl}-{mode}.log"
    metrics = Metrics()
    log = AccessLog(str(path), mode, metrics)
    out: list[tuple[bool, bytes]] = []
    eng = engine_class(impl)(None, lambda reply, data: out.append((reply, bytes(data))))
    info = ConnInfo(7, "mc", "ingress", Endpoint("10.0.0.1", 1), Endpoint("10.0.0.2", 2), "memcache")
    ctx = Context(info, eng, _MixedPolicy(), log)
    factory = MemcacheFactory()
    eng.parser = factory.create(ctx, factory.validate_config({}))
    for reply, chunk in sched:
        eng.feed(reply, chunk)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line.pop("timestamp")
    streams = (b"".join(d for r, d in out if r), b"".join(d for r, d in out if not r))
    return (dict(metrics.l7_counts), streams), lines


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None)
@given(traffic=text_traffic(), data=st.data(), mode=st.sampled_from(["all", "denied", "none"]))
def test_memcache_access_log_and_counts_equivalent(
    traffic: tuple[bytes, bytes], data: st.DataObject, mode: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    client, server = traffic
    sched = data.draw(schedules(client, server))
    tmp = tmp_path_factory.mktemp("log")
    assert run_daemon_log("native", mode, sched, tmp) == run_daemon_log("python", mode, sched, tmp)


# --- the daemon's live policy (the native parser flattens it) ----------------------------------

POLICY_RULES: list[str] = [
    '{command: get, keyPrefix: "a/"}',
    '{command: get, keyRegex: "^a/[0-9]$"}',
    '{command: writeGroup, keyRegex: "(?s)^.{2}[0-9]"}',
    '{command: storage, keyExact: "a/1"}',
    '{command: meta, keyRegex: "\\u00e9|\\ufffd"}',
    '{command: mg}',
    '{command: stats}',
    '{command: gat, keyPrefix: "b/"}',
    '{command: get, keyRegex: "^.x$"}',
    "{}",
]



def run_live_policy(impl: str, docs: list[str], audit: bool, sched: Schedule, tmp: Any) -> Any:
    return run_live(MemcacheFactory(), "memcache", "mc", 11211, impl, docs, audit, "denied", sched, tmp)[0]


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None)
@given(
    traffic=st.one_of(text_traffic(), binary_traffic()),
    data=st.data(),
    rules=st.lists(st.lists(st.sampled_from(POLICY_RULES), max_size=4), min_size=1, max_size=2),
    audit=st.booleans(),
)
def test_memcache_live_policy_equivalent(
    traffic: tuple[bytes, bytes], data: st.DataObject, rules: list[list[str]], audit: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    docs = [policy_doc("memcache", "mc", 11211, r) for r in rules]
    client, server = traffic
    sched = data.draw(schedules(client, server))
    tmp = tmp_path_factory.mktemp("live")
    native = run_live_policy("native", docs, audit, sched, tmp)
    assert native == run_live_policy("python", docs, audit, sched, tmp)
