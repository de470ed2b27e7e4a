"""The RESP codec alone: request framing as redis-server reads it, replies of every type."""

from __future__ import annotations

import pytest

from proxyd.parsers.redis.resp import (
    BAD,
    DONE,
    INLINE_MAX,
    PARTIAL,
    ReplyScanner,
    RequestError,
    parse_request,
    split_args,
    string2ll,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"0", 0), (b"1", 1), (b"-1", -1), (b"123", 123), (b"9223372036854775807", (1 << 63) - 1),
        (b"-9223372036854775808", -(1 << 63)), (b"", None), (b"01", None), (b"-0", None), (b"+1", None),
        (b" 1", None), (b"1 ", None), (b"9223372036854775808", None), (b"1" * 21, None), (b"-", None),
        (b"\xd9\xa1", None), (b"1e3", None),
    ],
)  # fmt: skip
def test_string2ll_is_redis(text: bytes, value: int | None) -> None:
    assert string2ll(text) == value


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"GET a", [b"GET", b"a"]),
        (b"  set   a  b  ", [b"set", b"a", b"b"]),
        (b'set "a b" c', [b"set", b"a b", b"c"]),
        (b'set "a\\x41\\n\\r\\t\\b\\a\\"\\\\" c', [b"set", b'aA\n\r\t\b\x07"\\', b"c"]),
        (b'set "\\xZZ"', [b"set", b"xZZ"]),
        (b"set 'a b' 'it\\'s' '\\n'", [b"set", b"a b", b"it's", b"\\n"]),
        (b'set a"b c"', [b"set", b"ab c"]),
        (b"a\vb", [b"a\vb"]),
        (b"\v\fa", [b"a"]),
        (b"", []),
        (b'set "a"b', None),
        (b"set 'a'b", None),
        (b'set "abc', None),
        (b"set 'abc", None),
        (b'""', [b""]),
    ],
)
def test_split_args_is_sdssplitargs(line: bytes, args: list[bytes] | None) -> None:
    assert split_args(line) == args


def parse(data: bytes, budget: int = 1 << 20) -> object:
    return parse_request(bytearray(data), 0, budget)


def test_multibulk_heads() -> None:
    h = parse(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    assert h.argc == 2 and h.args == [b"GET", b"a"] and h.complete and h.end == 20  # type: ignore[attr-defined]
    h = parse(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$10\r\nhel")
    assert h.args == [b"SET", b"a"] and h.need == 9 and h.rest == 1 and not h.complete  # type: ignore[attr-defined]
    h = parse(b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$100000\r\nhel", budget=1000)
    assert h.tail == 20 + 9 + 100002 and h.rest == 0 and not h.complete  # type: ignore[attr-defined]
    # redis skips the byte after '\r' and a bulk's two trailing bytes unchecked
    h = parse(b"*1\rX$4\r\nPINGxx")
    assert h.args == [b"PING"] and h.complete  # type: ignore[attr-defined]
    assert parse(b"*0\r\n").argc == 0  # type: ignore[attr-defined]
    assert parse(b"*-1\r\n").argc == 0  # type: ignore[attr-defined]
    assert parse(b"*2\r") is None
    assert parse(b"*2\0\r\n") is None  # strchr stops at the NUL: redis waits
    assert parse(b"PING") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*x\r\n", "Protocol error: invalid multibulk length"),
        (b"*01\r\n", "Protocol error: invalid multibulk length"),
        (b"*2147483648\r\n", "Protocol error: invalid multibulk length"),
        (b"*1\r\n+PING\r\n", "Protocol error: expected '$', got '+'"),
        (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$536870913\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$x\r\n", "Protocol error: invalid bulk length"),
        (b"*" + b"1" * (INLINE_MAX + 1), "Protocol error: too big mbulk count string"),
        (b"*1\r\n$" + b"1" * (INLINE_MAX + 1), "Protocol error: too big bulk count string"),
        (b"G" * (INLINE_MAX + 1), "Protocol error: too big inline request"),
        (b'SET "a\r\n', "Protocol error: unbalanced quotes in request"),
    ],
)
def test_request_errors_are_redis_messages(data: bytes, message: str) -> None:
    with pytest.raises(RequestError) as ei:
        parse(data)
    assert str(ei.value) == message


def test_bulk_len_limit_is_proto_max_bulk_len() -> None:
    assert parse_request(bytearray(b"*1\r\n$536870912\r\n"), 0, 1 << 20) is not None
    with pytest.raises(RequestError):
        parse_request(bytearray(b"*1\r\n$1025\r\n"), 0, 1 << 20, max_bulk=1024)


def test_inline() -> None:
    h = parse(b"set a 'b c'\r\nGET x\n")
    assert h.inline and h.args == [b"set", b"a", b"b c"] and h.end == 13  # type: ignore[attr-defined]
    h = parse_request(bytearray(b"set a 'b c'\r\nGET x\n"), 13, 1 << 20)
    assert h is not None and h.args == [b"GET", b"x"] and h.end == 19
    assert parse(b"\r\n").argc == 0  # type: ignore[attr-defined]


# --- replies ------------------------------------------------------------------------------

REPLIES = [
    b"+OK\r\n",
    b"-ERR unknown command\r\n",
    b":1000\r\n",
    b":-3\r\n",
    b"$5\r\nhello\r\n",
    b"$0\r\n\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
    b"_\r\n",
    b",3.14\r\n",
    b",-inf\r\n",
    b"#t\r\n",
    b"#f\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n",
    b"~3\r\n+a\r\n+b\r\n+c\r\n",
    b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n",
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.19\r\n$1\r\nb\r\n,0.54\r\n*2\r\n:2039123\r\n:9543892\r\n",
    b"*2\r\n|1\r\n+ttl\r\n:3600\r\n:1\r\n:2\r\n",
    b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n",
    b"*?\r\n:1\r\n:2\r\n:3\r\n.\r\n",
    b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n",
    b"~?\r\n*?\r\n.\r\n$?\r\n;0\r\n.\r\n",
    b"*3\r\n%0\r\n~0\r\n|0\r\n_\r\n",
]


def scan_all(data: bytes, seg: int | None = None) -> list[int]:
    """Frame ends found when ``data`` is fed ``seg`` bytes at a time, as the parser would."""
    sc = ReplyScanner()
    ends: list[int] = []
    buf = bytearray()
    consumed = 0  # bytes of data the scanner has read past
    skip = 0
    for i in range(0, len(data), seg or len(data)):
        chunk = data[i : i + (seg or len(data))]
        if skip:
            k = min(skip, len(chunk))
            skip -= k
            consumed += k
            chunk = chunk[k:]
        buf += chunk
        while buf:
            st, pos = sc.scan(buf, 0)
            assert st != BAD, sc.error
            if pos > len(buf):
                skip = pos - len(buf)
                consumed += len(buf)
                buf.clear()
                if st == DONE:
                    ends.append(consumed + skip)
                break
            consumed += pos
            del buf[:pos]
            if st == DONE:
                ends.append(consumed)
            elif pos == 0:
                break
    return ends


@pytest.mark.parametrize("reply", REPLIES)
def test_every_type_frames_whole_and_split(reply: bytes) -> None:
    stream = reply * 3
    expect = [len(reply), 2 * len(reply), 3 * len(reply)]
    assert scan_all(stream) == expect
    assert scan_all(stream, 1) == expect
    assert scan_all(stream, 7) == expect


def test_capture_for_classification() -> None:
    sc = ReplyScanner()
    data = bytearray(b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:4\r\n")
    assert sc.scan(data, 0) == (DONE, len(data))
    assert (sc.top, sc.first, sc.third) == (ord(">"), b"subscribe", 4)
    data = bytearray(b"-ERR x\r\n")
    assert sc.scan(data, 0) == (DONE, len(data)) and sc.head_line == b"ERR x"
    data = bytearray(b"|1\r\n+a\r\n+b\r\n*3\r\n+message\r\n+c\r\n:1\r\n")
    assert sc.scan(data, 0) == (DONE, len(data)) and sc.top == ord("*") and sc.first == b"message"


def test_big_bulk_is_passed_past_the_buffer() -> None:
    sc = ReplyScanner()
    head = bytearray(b"*2\r\n$16777216\r\nxx")
    st, pos = sc.scan(head, 0)
    assert st == PARTIAL and pos == 4 + 11 + (16 << 20) + 2
    st, pos = sc.scan(bytearray(b":1\r\n"), 0)
    assert (st, pos) == (DONE, 4)


@pytest.mark.parametrize(
    "data",
    [b"?x\r\n", b":x\r\n", b"$-2\r\n", b"*-2\r\n", b"%-1\r\n", b"#x\r\n", b"_x\r\n", b".\r\n",
     b"$?\r\n+x\r\n",
     b",\r\n"],
)  # fmt: skip
def test_bad_replies(data: bytes) -> None:
    sc = ReplyScanner()
    st, _ = sc.scan(bytearray(data), 0)
    assert st == BAD


@pytest.mark.parametrize("seg", [None, 1, 5, 997])
def test_deep_nesting_is_framed_in_constant_memory(seg: int | None) -> None:
    # What EVAL returns for a Lua table nested 8000 deep, and mixed shapes around it.
    deep = b"*1\r\n" * 8000 + b":1\r\n"
    mixed = b"*2\r\n" * 3000 + b":1\r\n" + b"$1\r\nx\r\n" * 3000
    odd = b"*1\r\n*2\r\n%1\r\n" * 500 + b"+k\r\n" + (b"_\r\n" + b"#t\r\n") * 500
    stream = deep + mixed + odd
    assert scan_all(stream, seg) == [len(deep), len(deep) + len(mixed), len(stream)]
    sc = ReplyScanner()
    st, _ = sc.scan(bytearray(b"*1\r\n" * 100000), 0)
    assert st == PARTIAL and len(sc.stack) == 1 and sc.depth == 100000


def test_distinct_nesting_is_bounded_by_memory_not_depth() -> None:
    # Levels of different shapes cannot share an entry: those are capped (by max_stack).
    data = bytearray(b"".join(b"*%d\r\n" % (2 + i % 2) for i in range(40)))
    sc = ReplyScanner(max_stack=32)
    st, _ = sc.scan(data, 0)
    assert st == BAD and "memory" in sc.error
    assert ReplyScanner(max_stack=64).scan(data, 0)[0] == PARTIAL


@pytest.mark.parametrize("seg", [None, 1, 64, 1000])
def test_long_simple_strings_and_errors_stream(seg: int | None) -> None:
    long_ok = b"+" + b"a" * 100_000 + b"\r\n"
    long_err = b"-ERR " + b"\rx" * 50_000 + b"\r\n"  # a lone CR is text, as Redis reads it
    nested = b"*2\r\n+" + b"b" * 500 + b"\r\n:1\r\n"
    stream = long_ok + long_err + nested + b"+OK\r\n"
    ends = [len(long_ok), len(long_ok) + len(long_err), len(stream) - 5, len(stream)]
    assert scan_all(stream, seg) == ends


def test_a_long_line_is_passed_keeping_a_final_cr_back() -> None:
    sc = ReplyScanner()
    data = bytearray(b"-" + b"e" * 100 + b"\r")
    assert sc.scan(data, 0) == (PARTIAL, len(data) - 1)
    assert sc.top == ord("-") and sc.head_line == b"e" * 64 and not sc.at_boundary
    assert sc.scan(bytearray(b"\r\n"), 0) == (DONE, 2)
