"""The framework's own test parsers (test.passer, test.lineparser, test.blockparser) through the
harness, every input also split at every byte, plus segmentation properties for the line parser."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import ParserConfigError, RuleError
from proxyd.ops import DROP, ERROR_INVALID_FRAME_LENGTH, ERROR_INVALID_FRAME_TYPE, INJECT, MORE, PASS
from proxyd.parsers.testparsers import BlockParserFactory, LineParserFactory, PasserFactory
from proxyd.testing import Harness

Split = object


def splits(data: bytes) -> Iterator[Split]:
    yield None
    yield "bytes"
    yield "random"
    for i in range(1, len(data)):
        yield [i]


# --- test.passer -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"x", b"hello\r\n", bytes(range(256))])
@pytest.mark.parametrize("reply", [False, True])
def test_passer_passes_everything(data: bytes, reply: bool) -> None:
    for split in splits(data):
        h = Harness(PasserFactory())
        h.feed(data, reply, split=split)  # type: ignore[arg-type]
        assert h.out[reply] == data
        assert h.forwarded[reply] == data
        assert h.error is None
        assert all(op == PASS for op, _ in h.ops_of(reply))
    h = Harness(PasserFactory())
    assert h.feed(data, reply) == [(PASS, len(data))]
    assert h.eof(reply) == 0


# --- test.lineparser ---------------------------------------------------------------------------

# (client lines, server lines, to_server, to_client)
LINE_CASES = [
    (b"a\nb\n", b"", b"a\nb\n", b""),
    (b"a\nDROP x\nb\n", b"", b"a\nb\n", b""),
    (b"INJECT x\n", b"", b"INJECT x\n", b""),  # the original is dropped, its copy injected
    (b"REPLY hi\nq\n", b"", b"q\n", b"hi\n"),  # toward the other direction, at once
    (b"", b"r1\nDROP r2\nr3\n", b"", b"r1\nr3\n"),
    (b"", b"REPLY up\nr\n", b"up\n", b"r\n"),
    (b"", b"INJECT r\n", b"", b"INJECT r\n"),
]


@pytest.mark.parametrize(("client", "server", "to_server", "to_client"), LINE_CASES)
def test_line_parser_table_at_every_split(
    client: bytes, server: bytes, to_server: bytes, to_client: bytes
) -> None:
    ways = [(s, None) for s in splits(client)] + [(None, s) for s in splits(server)]
    for c_split, s_split in ways:
        h = Harness(LineParserFactory())
        h.feed(client, split=c_split)  # type: ignore[arg-type]
        h.feed(server, reply=True, split=s_split)  # type: ignore[arg-type]
        where = f"{c_split=} {s_split=}"
        assert h.error is None, where
        assert h.to_server == to_server, where
        assert h.to_client == to_client, where


def test_line_parser_ops() -> None:
    h = Harness(LineParserFactory())
    assert h.feed(b"a\nDROP\nINJECT z\nREPLY r\npart") == [
        (PASS, 2),
        (DROP, 5),
        (INJECT, 9),
        (DROP, 9),
        (DROP, 8),
        (MORE, 1),
    ]
    assert h.injected == {False: b"INJECT z\n", True: b"r\n"}
    assert h.dropped[False] == b"DROP\nINJECT z\nREPLY r\n"
    assert h.eof() == 4


@pytest.mark.parametrize(("line", "kind"), [(b"ERROR\n", "parser_error"), (b"BOOM\n", "exception")])
@pytest.mark.parametrize("reply", [False, True])
def test_line_parser_errors(line: bytes, kind: str, reply: bool) -> None:
    wire = b"ok\n" + line + b"never\n"
    for split in splits(wire):
        h = Harness(LineParserFactory())
        h.feed(wire, reply, split=split)  # type: ignore[arg-type]
        assert h.error is not None
        assert h.error.kind == kind
        assert h.out[reply] == b"ok\n"
    if kind == "exception":
        assert str(h.error) == "RuntimeError: test parser exploded on request"
    else:
        assert h.error.code == ERROR_INVALID_FRAME_TYPE


def test_line_parser_policy() -> None:
    h = Harness(LineParserFactory(), rules=[{"prefix": "get "}, {"line": "ping"}])
    h.feed(b"get a\nput b\nping\npingpong\n", split="bytes")
    h.feed(b"anything\n", reply=True)  # replies are not policy-checked
    assert h.to_server == b"get a\nping\n"
    assert h.to_client == b"DENIED\nDENIED\nanything\n"
    assert [(e.verdict, e.fields["line"]) for e in h.log] == [
        ("forwarded", "get a"),
        ("denied", "put b"),
        ("forwarded", "ping"),
        ("denied", "pingpong"),
    ]


def test_line_parser_rules_and_config() -> None:
    f = LineParserFactory()
    assert f.compile_rule({"line": "x"}).matches("x")
    assert not f.compile_rule({"line": "x"}).matches("xy")
    assert f.compile_rule({"prefix": "x"}).matches("xy")
    assert f.compile_rule({}).matches("anything")
    with pytest.raises(RuleError) as info:
        f.compile_rule({"regex": "x"})
    assert info.value.key == "regex"
    assert f.validate_config({"boom_on_create": True}) == {"boom_on_create": True}
    with pytest.raises(ParserConfigError) as cinfo:
        f.validate_config({"mode": "fast"})
    assert cinfo.value.key == "mode"
    with pytest.raises(RuntimeError, match="exploded on create"):
        Harness(f, parser_config={"boom_on_create": True})


# --- test.blockparser --------------------------------------------------------------------------


def block(flag: bytes, payload: bytes) -> bytes:
    """``<len>:<flag><payload>`` where len counts the whole block."""
    body = b":" + flag + payload
    n = len(body) + 1
    if len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def test_block_helper() -> None:
    assert block(b"P", b"abc") == b"6:Pabc"
    assert block(b"P", b"x" * 8) == b"12:P" + b"x" * 8


BLOCK_CASES = [
    # (client blocks, server blocks, to_server, to_client)
    (block(b"P", b"abc"), b"", block(b"P", b"abc"), b""),
    (block(b"D", b"abc") + block(b"P", b"z"), b"", block(b"P", b"z"), b""),
    (block(b"I", b"abcd"), b"", block(b"I", b"abcd"), b"ACK 7\n"),
    (b"", block(b"I", b"xy"), b"ACK 5\n", block(b"I", b"xy")),
    (block(b"P", b"p" * 300), block(b"D", b"d" * 50), block(b"P", b"p" * 300), b""),
]


@pytest.mark.parametrize(("client", "server", "to_server", "to_client"), BLOCK_CASES)
def test_block_parser_table_at_every_split(
    client: bytes, server: bytes, to_server: bytes, to_client: bytes
) -> None:
    ways = [(s, None) for s in splits(client)] + [(None, s) for s in splits(server)]
    for c_split, s_split in ways:
        h = Harness(BlockParserFactory())
        h.feed(client, split=c_split)  # type: ignore[arg-type]
        h.feed(server, reply=True, split=s_split)  # type: ignore[arg-type]
        where = f"{c_split=} {s_split=}"
        assert h.error is None, where
        assert h.to_server == to_server, where
        assert h.to_client == to_client, where


def test_block_parser_decides_from_the_header() -> None:
    h = Harness(BlockParserFactory())
    assert h.feed(b"1") == [(MORE, 1)]
    assert h.feed(b"00:") == [(MORE, 1)]
    assert h.feed(b"Pab") == [(PASS, 100)]  # reaches past the 7 bytes buffered
    assert h.feed(b"x" * 93) == []  # the rest of the block flows without a call
    assert h.feed(b"5:Dab6:Pxyz") == [(DROP, 5), (PASS, 6)]
    assert h.to_server == b"100:Pab" + b"x" * 93 + b"6:Pxyz"


def test_block_ack_waits_for_a_block_passing_the_other_way() -> None:
    h = Harness(BlockParserFactory())
    h.feed(b"20:Pserver", reply=True)  # 10 of 20 bytes toward the client
    h.feed(block(b"I", b"q"))  # its ACK goes toward the client: not inside that block
    assert h.to_client == b"20:Pserver"
    h.feed(b"0123456789", reply=True)
    assert h.to_client == b"20:Pserver0123456789ACK 4\n"


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"abc:Pxx", ERROR_INVALID_FRAME_LENGTH),  # length is not a number
        (b"1:P", ERROR_INVALID_FRAME_LENGTH),  # shorter than its own header
        (b"0123456789012", ERROR_INVALID_FRAME_LENGTH),  # no ':' in the first 12 bytes
        (b"5:Xab", ERROR_INVALID_FRAME_TYPE),  # unknown flag
    ],
)
def test_block_parser_errors(wire: bytes, code: int) -> None:
    for split in splits(wire):
        h = Harness(BlockParserFactory())
        h.feed(wire, split=split)  # type: ignore[arg-type]
        assert h.error is not None, split
        assert h.error.kind == "parser_error"
        assert h.error.code == code
        assert h.to_server == b""


# --- properties of the line parser -------------------------------------------------------------

WORDS = [b"a", b"DROP x", b"INJECT y", b"REPLY z", b"ERROR", b"BOOM", b"get k", b"", b"\xff"]
line_stream = st.lists(
    st.one_of(st.sampled_from(WORDS).map(lambda w: w + b"\n"), st.binary(max_size=5)), max_size=10
).map(b"".join)
cuts = st.lists(st.integers(min_value=1, max_value=12), max_size=30)


def run_lines(client: bytes, server: bytes, c_split: Split, s_split: Split, limit: int = 1 << 20) -> Harness:
    h = Harness(LineParserFactory(), rules=[{"prefix": "get "}, {"line": "a"}], buffer_limit=limit)
    h.feed(client, split=c_split)  # type: ignore[arg-type]
    h.feed(server, reply=True, split=s_split)  # type: ignore[arg-type]
    return h


def outcome(h: Harness) -> tuple[object, ...]:
    log = [(e.verdict, e.fields) for e in h.log]
    kind = h.error.kind if h.error else None
    return (h.forwarded, h.dropped, h.injected, h.to_server, h.to_client, kind, log)


@settings(max_examples=250, deadline=None)
@given(client=line_stream, server=line_stream, c_cut=cuts, s_cut=cuts)
def test_line_parser_any_segmentation_gives_the_same_result(
    client: bytes, server: bytes, c_cut: list[int], s_cut: list[int]
) -> None:
    whole = run_lines(client, server, None, None)
    assert outcome(run_lines(client, server, c_cut, s_cut)) == outcome(whole)
    assert outcome(run_lines(client, server, "bytes", "bytes")) == outcome(whole)


@settings(max_examples=250, deadline=None)
@given(data=st.binary(max_size=200), cut=cuts, limit=st.sampled_from([16, 1 << 20]), reply=st.booleans())
def test_line_parser_never_raises_unless_told_to(
    data: bytes, cut: list[int], limit: int, reply: bool
) -> None:
    h = Harness(LineParserFactory(), buffer_limit=limit)
    h.feed(data, reply, split=cut)
    h.eof(reply)
    if h.error is not None and h.error.kind == "exception":
        assert any(line.startswith(b"BOOM") for line in data.split(b"\n"))  # the one deliberate raise
    assert h.engine.buffered(reply) <= limit
