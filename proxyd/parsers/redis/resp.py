"""RESP framing: requests as redis-server reads them, replies of every RESP2/RESP3 type.

Requests (client to server) follow redis-server's ``processInputBuffer`` (``src/networking.c``):
a request starting with ``*`` is a multibulk (``*<argc>\\r\\n`` then ``$<len>\\r\\n<bytes>\\r\\n``
per argument), anything else is an *inline* command: one line up to ``\\n`` (a ``\\r`` before
it is dropped) split by ``sdssplitargs`` (``src/sds.c``: double quotes with ``\\xHH``, ``\\n``,
``\\r``, ``\\t``, ``\\b``, ``\\a`` escapes, single quotes with ``\\'``, a closing quote must be
followed by a space). The server's own quirks are mirrored, because a proxy that frames a
request differently from the server lets a client smuggle a command past the policy:

- lengths are read with ``string2ll`` (no ``+``, no leading zeros, at most 20 characters);
- the line ends at the first ``\\r`` and the byte after it is skipped whatever it is; a bulk's
  two trailing bytes are skipped unchecked; a NUL before the ``\\r`` (or the inline ``\\n``)
  hides it (``strchr``), so the request waits for more until the 64 KiB inline limit;
- ``*0`` and ``*-1`` are empty requests (ignored, no reply); so is an empty inline line.

Errors carry the text redis-server answers (``Protocol error: invalid bulk length``, ...).

Replies (server to client) are read by :class:`ReplyScanner`, an iterative reader with an
explicit stack (so a 16 MiB bulk is passed through, never held, and an aggregate of a million
elements costs nothing): one branch per type byte, aggregates by count, attributes (``|``) not
counting as values, streamed strings (``$?`` + ``;n`` chunks) and streamed aggregates (``*?``
... ``.``). It records what the parser needs to classify a frame: the top-level type, and for a
top-level array or push its first element (``message``, ``subscribe``, ``invalidate``, ...) and
third (a subscription count).

Memory is bounded, not depth: Redis nests script replies thousands deep (a Lua table in a
table, ~8000 levels before ``reached lua stack limit``), so the stack stores runs of levels of
the same shape (``*1`` in ``*1`` in ``*1``...) as one entry with a repeat count, and only the
number of *distinct* entries is capped (``max_stack``, from the parser's memory budget). A
simple string or error line longer than 64 bytes is passed on as it arrives (keeping a final
``\r`` back), so its length is bounded by nothing but the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: redis-server's ``PROTO_INLINE_MAX_SIZE``: longest inline request or length line.
INLINE_MAX = 64 * 1024
#: redis-server's default ``proto-max-bulk-len``.
PROTO_MAX_BULK_LEN = 512 * 1024 * 1024
_INT_MAX = (1 << 31) - 1


class RequestError(Exception):
    """A request redis-server refuses with ``-ERR <message>`` and then closes the connection."""


def string2ll(b: bytes | bytearray) -> int | None:
    """Redis's ``string2ll`` (``src/util.c``): the integer, or None if Redis rejects it."""
    n = len(b)
    if 0 < n < 19 and b.isdigit() and b[0] != 48:  # the common case: a plain positive number
        return int(b)
    if n == 0 or n > 20:
        return None
    if n == 1:
        c = b[0]
        return c - 48 if 48 <= c <= 57 else None
    neg = b[0] == 45
    first = b[1] if neg else b[0]
    if not 49 <= first <= 57:  # 1-9: no leading zero, no sign but '-'
        return None
    digits = b[1:] if neg else b
    if not digits.isdigit() or not digits.isascii():
        return None
    v = int(digits)
    if neg:
        v = -v
        return v if v >= -(1 << 63) else None
    return v if v < (1 << 63) else None


def _find_cr(data: bytes | bytearray, start: int, byte: bytes = b"\r") -> int:
    """Where ``strchr(data + start, byte)`` finds it, or -1 (not there, or a NUL first)."""
    i = data.find(byte, start)
    z = data.find(b"\0", start, i if i >= 0 else len(data))
    if z >= 0:
        return -1
    return i


@dataclass(slots=True)
class Head:
    """What :func:`parse_request` read of the request at the start of the buffer.

    ``args`` holds the arguments read whole, ``end`` the offset just after the last of them.
    If the next argument's header was read but its payload is not all buffered (or would pass
    ``budget``), ``tail`` is the offset where that argument ends (maybe past the buffer) and it
    is not in ``args``. ``rest`` counts the arguments after those, not read yet. ``need`` is
    how many more bytes would let the next argument be read (0: it would pass the budget, or
    everything is read).
    """

    argc: int
    args: list[bytes] = field(default_factory=list)
    end: int = 0
    tail: int = 0
    rest: int = 0
    need: int = 0
    inline: bool = False

    @property
    def complete(self) -> bool:
        """Every argument is in ``args`` (the request is all buffered)."""
        return self.tail == 0 and self.rest == 0


def parse_request(
    data: bytes | bytearray, base: int, budget: int, max_bulk: int = PROTO_MAX_BULK_LEN
) -> Head | None:
    """Read the request starting at ``data[base]``; None when not even its first line is here.

    Offsets in the returned :class:`Head` are absolute (into ``data``). Arguments are read
    while the request so far fits in ``budget`` bytes. Raises :class:`RequestError` where
    redis-server answers a protocol error.
    """
    if data[base] == 42:  # '*'
        return _multibulk(data, base, budget, max_bulk)
    return _inline(data, base)


def read_bulk_header(data: bytes | bytearray, pos: int, max_bulk: int) -> int:
    """The end offset (payload and CRLF included) of the argument whose ``$`` header starts at
    ``pos``; -1 when the header is not all buffered. Raises :class:`RequestError`."""
    cr = data.find(b"\r", pos)
    if cr < 0 or (cr - pos > 24 and data.find(b"\0", pos, cr) >= 0):
        cr = _find_cr(data, pos)  # a long or odd line: as strchr sees it
    elif cr - pos <= 24 and b"\0" in data[pos:cr]:
        cr = -1
    n = len(data)
    if cr < 0:
        if n - pos > INLINE_MAX:
            raise RequestError("Protocol error: too big bulk count string")
        return -1
    if cr > n - 2:
        return -1
    if data[pos] != 36:  # '$'
        raise RequestError(f"Protocol error: expected '$', got '{chr(data[pos])}'")
    ln = string2ll(data[pos + 1 : cr])
    if ln is None or ln < 0 or ln > max_bulk:
        raise RequestError("Protocol error: invalid bulk length")
    return cr + 2 + ln + 2


def _multibulk(data: bytes | bytearray, base: int, budget: int, max_bulk: int) -> Head | None:
    n = len(data)
    cr = data.find(b"\r", base, base + 12)
    if cr < 0 or not data[base + 1 : cr].isdigit():  # not a plain count: as strchr sees it
        cr = _find_cr(data, base)
    if cr < 0:
        if n - base > INLINE_MAX:
            raise RequestError("Protocol error: too big mbulk count string")
        return None
    if cr > n - 2:
        return None
    count = string2ll(data[base + 1 : cr])
    if count is None or count > _INT_MAX:
        raise RequestError("Protocol error: invalid multibulk length")
    pos = cr + 2
    if count <= 0:
        return Head(0, end=pos)
    head = Head(count, end=pos, rest=count)
    args = head.args
    limit = base + budget
    while head.rest:
        # Fast path: "$<plain digits>\r" (digits only, so no NUL can hide the '\r').
        cr = data.find(b"\r", pos, pos + 20)
        if cr > pos + 1 and cr <= n - 2 and data[pos] == 36:
            sz = data[pos + 1 : cr]
            if sz.isdigit() and (sz[0] != 48 or cr == pos + 2):
                ln = int(sz)
                if ln > max_bulk:
                    raise RequestError("Protocol error: invalid bulk length")
                start = cr + 2
                end = start + ln + 2
            else:
                end = read_bulk_header(data, pos, max_bulk)  # raises: not a valid length
                start = cr + 2
        else:
            end = read_bulk_header(data, pos, max_bulk)
            if end < 0:
                head.need = 1
                return head
            start = data.index(b"\r", pos) + 2
        if end > limit:
            head.tail = end
            head.rest -= 1
            return head
        if end > n:
            head.need = end - n
            return head
        args.append(bytes(data[start : end - 2]))
        head.rest -= 1
        pos = head.end = end
    return head


_SPACE = frozenset(b" \t\n\v\f\r")  # C isspace()
_TOKEN_END = frozenset(b" \n\r\t")
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_QUOTING = (b'"', b"'", b"\v", b"\f")


def _inline(data: bytes | bytearray, base: int) -> Head | None:
    nl = _find_cr(data, base, b"\n")
    if nl < 0:
        if len(data) - base > INLINE_MAX:
            raise RequestError("Protocol error: too big inline request")
        return None
    line = bytes(data[base : nl - 1 if nl > base and data[nl - 1] == 13 else nl])
    args = split_args(line)
    if args is None:
        raise RequestError("Protocol error: unbalanced quotes in request")
    return Head(len(args), args=args, end=nl + 1, inline=True)


def split_args(line: bytes) -> list[bytes] | None:
    """``sdssplitargs``: the arguments of an inline request, None for unbalanced quotes."""
    if not any(q in line for q in _QUOTING):
        return line.split()  # no quotes, no \\v or \\f: plain whitespace splitting agrees
    n = len(line)
    out: list[bytes] = []
    i = 0
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return out
        cur = bytearray()
        inq = insq = False
        while True:
            c = line[i] if i < n else 0
            nxt = line[i + 1] if i + 1 < n else 0
            done = False
            if inq:
                if c == 92 and nxt == 120 and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and nxt:
                    i += 1
                    cur.append(_ESCAPES.get(nxt, nxt))
                elif c == 34:
                    if nxt and nxt not in _SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif insq:
                if c == 92 and nxt == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    if nxt and nxt not in _SPACE:
                        return None
                    done = True
                elif not c:
                    return None
                else:
                    cur.append(c)
            elif c in _TOKEN_END or not c:
                done = True
            elif c == 34:
                inq = True
            elif c == 39:
                insq = True
            else:
                cur.append(c)
            if i < n:
                i += 1
            if done:
                break
        out.append(bytes(cur))


# --- replies ------------------------------------------------------------------------------

#: :meth:`ReplyScanner.scan` outcomes.
DONE = 0  # a top-level frame ended at the returned offset (which may lie past the buffer)
PARTIAL = 1  # the frame goes on: every byte up to the returned offset is read
BAD = 2  # not RESP

_NORMAL, _ATTR, _STREAM_AGG, _STREAM_STR = 0, 1, 2, 3
#: Distinct stack entries (runs of same-shaped levels) a reply may open by default: ~64 bytes
#: each, so 1 MiB. Real replies need one per differently shaped level.
MAX_STACK = 16384
#: A line with no CRLF yet and more than this many bytes buffered is streamed (the parser
#: classifies frames by lines of at most 64 bytes).
_LINE_STREAM = 67
_SCALARS = frozenset(b"+-:_,#(")
_BULKS = frozenset(b"$!=")
_AGGS = frozenset(b"*%~>|")
PUSH = 62  # '>'
ARRAY = 42  # '*'
MAP = 37  # '%'
ERRORS = frozenset(b"-!")


class ReplyScanner:
    """Reads the reply stream token by token, across calls; see the module docstring.

    After :data:`DONE`: ``top`` is the frame's type byte (after any attribute), ``first`` the
    first element of a top-level array or push when it is a short string, ``third`` the third
    when it is an integer, ``head_line`` the line of a simple string or error frame (at most
    64 bytes). ``error`` says what is wrong after :data:`BAD`.
    """

    __slots__ = (
        "depth", "error", "first", "fresh", "head_line", "in_line", "max_stack", "need", "stack", "third",
        "top",
    )  # fmt: skip

    def __init__(self, max_stack: int = MAX_STACK) -> None:
        #: [remaining, kind, total, repeat] per run of open aggregates of the same shape
        self.stack: list[list[int]] = []
        self.depth = 0  # open aggregates (the sum of the repeats)
        self.max_stack = max_stack
        self.in_line = False  # inside a long simple string or error line, passed as it comes
        self.fresh = True
        self.top = 0
        self.first: bytes | None = None
        self.third: int | None = None
        self.head_line = b""
        self.need = 1
        self.error = ""

    def reset(self) -> None:
        """Forget a frame read in part (the caller will read it again from its start)."""
        self.stack.clear()
        self.depth = 0
        self.in_line = False
        self.fresh = True

    @property
    def at_boundary(self) -> bool:
        """Whether the stream is between frames."""
        return self.fresh and not self.stack and not self.in_line

    def _done(self) -> bool:
        """A value ended: pop finished aggregates; True when the top-level frame ended."""
        stack = self.stack
        while stack:
            top = stack[-1]
            kind = top[1]
            if kind >= _STREAM_AGG:
                return False
            if top[0] > 1:
                if top[3] > 1:  # only the innermost level of the run moves on
                    top[3] -= 1
                    stack.append([top[0] - 1, kind, top[2], 1])
                else:
                    top[0] -= 1
                return False
            # Its last value ended: so does every level of the run (each one's last value is
            # the level inside it).
            stack.pop()
            self.depth -= top[3]
            if kind == _ATTR:
                return False  # the value the attribute describes is still to come
        self.fresh = True
        return True

    def _push(self, entry: list[int]) -> bool:
        """Open an aggregate; False when that would pass the memory bound."""
        stack = self.stack
        self.depth += 1
        if stack and entry[1] == _NORMAL:
            top = stack[-1]
            if top[1] == _NORMAL and top[0] == entry[0] and top[2] == entry[0]:
                top[3] += 1  # the same shape as the level around it, its first value: one run
                return True
        if len(stack) >= self.max_stack:
            return False
        stack.append(entry)
        return True

    def _begin(self) -> None:
        """The first token of a frame."""
        self.fresh = False
        self.top = 0
        self.first = None
        self.third = None
        self.head_line = b""

    def _bad(self, why: str) -> tuple[int, int]:
        self.error = why
        return BAD, 0

    def scan(self, data: bytes | bytearray, pos: int) -> tuple[int, int]:
        """Read from ``pos``; returns ``(DONE | PARTIAL | BAD, offset)``.

        With PARTIAL, ``offset`` is how far the frame is read: past the buffer when a bulk's
        payload is not all there (the caller passes it through), else ``need`` more bytes are
        required to go on.
        """
        n = len(data)
        stack = self.stack
        while True:
            if self.in_line:  # the rest of a long simple string or error
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self.need = 1
                    return PARTIAL, (n - 1 if n > pos and data[n - 1] == 13 else n)
                self.in_line = False
                pos = eol + 2
                if self._done():
                    return DONE, pos
                continue
            if pos >= n:
                self.need = 1
                return PARTIAL, pos
            t = data[pos]
            eol = data.find(b"\r\n", pos + 1)
            if eol < 0:
                in_chunks = bool(stack) and stack[-1][1] == _STREAM_STR
                if (t == 43 or t == 45) and n - pos > _LINE_STREAM and not in_chunks:
                    if self.fresh:
                        self._begin()
                    if not stack:
                        self.top = t
                        self.head_line = bytes(data[pos + 1 : pos + 65])
                    self.in_line = True
                    self.need = 1
                    return PARTIAL, (n - 1 if data[n - 1] == 13 else n)
                self.need = 1
                return PARTIAL, pos
            if self.fresh:
                self._begin()
            depth = self.depth
            if stack and stack[-1][1] == _STREAM_STR:
                if t != 59:  # ';'
                    return self._bad(f"expected ';' in a streamed string, got {chr(t)!r}")
                ln = string2ll(data[pos + 1 : eol])
                if ln is None or ln < 0:
                    return self._bad("bad streamed string chunk length")
                if ln == 0:
                    stack.pop()
                    self.depth -= 1
                    pos = eol + 2
                    if self._done():
                        return DONE, pos
                    continue
                pos = eol + 2 + ln + 2
                if pos > n:
                    return PARTIAL, pos
                continue
            if depth == 0 and t != 124:
                self.top = t
            capture = depth == 1 and self.top in (ARRAY, PUSH) and stack[0][1] == _NORMAL
            idx = stack[0][2] - stack[0][0] if capture else -1
            if t in _SCALARS:
                line = data[pos + 1 : eol]
                if t == 58:  # ':'
                    v = _int(line)
                    if v is None:
                        return self._bad("bad integer")
                    if idx == 2:
                        self.third = v
                elif t == 95 and line:  # '_'
                    return self._bad("bad null")
                elif t == 35 and line not in (b"t", b"f"):  # '#'
                    return self._bad("bad boolean")
                elif t in (44, 40) and not line:  # ',' '('
                    return self._bad("empty number")
                elif t == 43 and idx == 0 and len(line) <= 64:
                    self.first = bytes(line)
                if depth == 0 and t in (43, 45):
                    self.head_line = bytes(line[:64])
                pos = eol + 2
                if self._done():
                    return DONE, pos
                continue
            if t in _BULKS:
                sz = data[pos + 1 : eol]
                if sz == b"?" and t == 36:
                    if not self._push([0, _STREAM_STR, 0, 1]):
                        return self._bad("nesting beyond the memory bound")
                    pos = eol + 2
                    continue
                ln = string2ll(sz)
                if ln is None or ln < -1 or (ln == -1 and t != 36):
                    return self._bad("bad bulk length")
                pos = eol + 2
                if ln >= 0:
                    end = pos + ln + 2
                    if idx == 0 and ln <= 64 and end <= n:
                        self.first = bytes(data[pos : pos + ln])
                    if depth == 0 and t == 33 and end <= n:  # '!': a blob error's text
                        self.head_line = bytes(data[pos : pos + min(ln, 64)])
                    pos = end
                if self._done():
                    return DONE, pos
                if pos > n:
                    return PARTIAL, pos
                continue
            if t in _AGGS:
                sz = data[pos + 1 : eol]
                pos = eol + 2
                if sz == b"?":
                    if not self._push([0, _STREAM_AGG, 0, 1]):
                        return self._bad("nesting beyond the memory bound")
                    continue
                cnt = string2ll(sz)
                if cnt is None or cnt < -1 or (cnt == -1 and t != ARRAY):
                    return self._bad("bad aggregate length")
                if t == MAP or t == 124:
                    cnt *= 2
                if cnt <= 0:
                    if t == 124:
                        continue  # an empty attribute describes the next value
                    if self._done():
                        return DONE, pos
                    continue
                if not self._push([cnt, _ATTR if t == 124 else _NORMAL, cnt, 1]):
                    return self._bad("nesting beyond the memory bound")
                continue
            if t == 46:  # '.'
                if not stack or stack[-1][1] != _STREAM_AGG or eol != pos + 1:
                    return self._bad("unexpected end of streamed aggregate")
                stack.pop()
                self.depth -= 1
                pos = eol + 2
                if self._done():
                    return DONE, pos
                continue
            return self._bad(f"unknown type byte {t:#04x}")


def _int(line: bytes | bytearray) -> int | None:
    """A RESP integer line (an optional sign, then digits)."""
    s = line[1:] if line[:1] in (b"-", b"+") else line
    if not s or len(s) > 20 or not s.isdigit() or not s.isascii():
        return None
    return int(line)
