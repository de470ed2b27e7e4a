"""HTTP/1.x framing (RFC 9112): head lines, the body-length decision, chunk lines.

Pure functions and one small incremental reader; no policy, no verdicts. The parser
(:mod:`.parser`) drives them and turns their results and errors into ops.

Theory of operation
-------------------

A message head is a start line and field lines, each ended by CRLF, then an empty line
(RFC 9112 section 2.1). :class:`HeadReader` scans a head as its bytes arrive, validating each
line once, when its LF is in: work is linear in the head size however the bytes are cut, and the
outcome depends only on the bytes. Every line must end in CRLF (a bare LF or a bare CR is an
error), and the whole head, with its empty line, must fit in ``limit`` bytes (else 431): only
lines whose LF lies within the limit are looked at, so a head that is both over the limit and
malformed past it is answered the same whichever way it was segmented.

What proxyd cannot frame unambiguously is rejected, never guessed (:class:`FramingError`
carries the status to answer: 400, 431, or None for bytes that are not HTTP/1.x at all):

- request line: ``token SP request-target SP HTTP/1.0|HTTP/1.1``, single spaces, the target
  in one of the four forms of section 3.2 (origin, absolute, authority for CONNECT only,
  asterisk for OPTIONS only); absolute-form without userinfo, its Host equal to its authority;
- field lines: a token name directly followed by ``:`` (whitespace before the colon, an empty
  name, obs-fold are errors), a value of visible characters, SP, HTAB and obs-text (NUL, other
  controls and DEL are errors);
- body length (section 6): Transfer-Encoding together with Content-Length, a Transfer-Encoding
  whose last coding is not ``chunked`` (or that names ``chunked`` twice, or has an empty
  element), Transfer-Encoding in an HTTP/1.0 request, more than one Content-Length field, a
  Content-Length that is not 1 to 18 digits (``5, 5`` included), no Host or several Host fields
  in HTTP/1.1 (section 3.2), a body on CONNECT.

Responses are framed per section 6.3 by :func:`response_body`: the caller says what the request
was (HEAD, CONNECT, an upgrade), the status and fields say the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

CRLF: Final = b"\r\n"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN_RE: Final = re.compile(_TOKEN)
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?")
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A run of valid field lines, each with its CRLF: one C-level check of a whole header block.
_FIELD_LINES: Final = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
# In a validated block: the lines of the fields framing looks at (responses need no others).
_FRAMING_LINE: Final = re.compile(
    rb"(?mi)^((host|content-length|transfer-encoding|connection|upgrade|expect):([^\r]*))\r$"
)
_CONTENT_LENGTH: Final = re.compile(r"[0-9]{1,18}")
_QUOTED = r'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_TOKEN_S = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CODING: Final = re.compile(
    rf"({_TOKEN_S})((?:[ \t]*;[ \t]*{_TOKEN_S}[ \t]*=[ \t]*(?:{_TOKEN_S}|{_QUOTED}))*)"
)
# chunk = chunk-size [ chunk-ext ] CRLF (section 7.1); no whitespace after the size (below).
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb'|"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"))?[ \t]*)*)'
)
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_AUTHORITY: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+):[0-9]{1,5}")
_ABSOLUTE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)")


#: Fields a head may carry (kept ones: for a response, those framing looks at). A head is bounded
#: by ``max_header_bytes`` anyway; a response head that streams past it is not, and this bounds
#: what proxyd keeps of it.
MAX_FIELDS: Final = 10000

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FramingError(Exception):
    """A message proxyd cannot frame. ``status`` is the answer (400, 431) or None (not HTTP/1.x)."""

    def __init__(self, status: int | None, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


# A field line: (lower-case name, value without surrounding whitespace, the raw line without CRLF).
Field = tuple[str, str, bytes]


@dataclass(slots=True)
class HeadReader:
    """Scans one message head incrementally (see the module docstring).

    ``trailer`` heads (a chunked body's trailer section) have no start line. After
    :meth:`scan` returns the head's end, ``start`` and ``fields`` hold what was read.
    """

    trailer: bool = False
    framing_only: bool = False  # keep only the fields framing looks at (response heads)
    pos: int = 0  # where the next unscanned line starts, relative to the head's first byte
    start: bytes | None = None
    parsed_start: Any = None  # what ``check_start`` returned for the start line
    fields: list[Field] = field(default_factory=list)

    def reset(self, trailer: bool = False) -> None:
        self.trailer = trailer
        self.pos = 0
        self.start = None
        self.parsed_start = None
        self.fields = []

    def scan(
        self,
        data: bytes | bytearray,
        base: int,
        limit: int,
        check_start: Callable[[bytes], object] | None = None,
    ) -> int:
        """Scan ``data[base:]``; return the head's length (through its empty line), or -1.

        -1 means more bytes are needed. Raises :class:`FramingError` for a malformed line
        (400) or a head with no end within ``limit`` bytes (431). ``check_start`` validates the
        start line as soon as it is complete (raising), before any field line is looked at.
        """
        pos = base + self.pos
        stop = min(len(data), base + limit)
        find = data.find
        if pos == base and self.start is None and not self.trailer:
            # Fast path: the whole head is in. When every field line is valid (one regex over
            # the block), the line-by-line scan below would reach the same result.
            end = find(b"\r\n\r\n", base, stop)
            if end >= 0:
                first = find(b"\r\n", base, end + 2)
                head = bytes(data[first + 2 : end + 2])
                start = bytes(data[base:first])
                if (
                    first > base
                    and b"\r" not in start
                    and b"\n" not in start
                    and _FIELD_LINES.fullmatch(head) is not None
                ):
                    if check_start is not None:
                        self.parsed_start = check_start(start)
                    self.start = start
                    fields = self.fields
                    if self.framing_only:
                        for m in _FRAMING_LINE.finditer(head):
                            fields.append(
                                (
                                    m.group(2).decode("ascii").lower(),
                                    m.group(3).strip(b" \t").decode("latin-1"),
                                    m.group(1),
                                )
                            )
                        self.pos = end + 4 - base
                        return self.pos
                    for line in head.split(b"\r\n")[:-1]:
                        name, _, value = line.partition(b":")
                        fields.append(
                            (name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"), line)
                        )
                    self.pos = end + 4 - base
                    return self.pos
        while True:
            nl = find(b"\n", pos, stop)
            if nl < 0:
                break
            if nl == pos or data[nl - 1] != 13:
                raise FramingError(400, "bare LF (line not ended by CRLF)")
            if nl == pos + 1:  # the empty line ends the head
                if self.start is None and not self.trailer:
                    raise FramingError(400, "empty line where the start line was expected")
                self.pos = nl + 1 - base
                return nl + 1 - base
            line = bytes(data[pos : nl - 1])
            if b"\r" in line:
                raise FramingError(400, "bare CR in a line")
            if self.start is None and not self.trailer:
                if check_start is not None:
                    self.parsed_start = check_start(line)
                self.start = line
            else:
                f = parse_field_line(line)  # validated; a trailer section's fields are not kept
                if not self.trailer and (not self.framing_only or f[0] in _FRAMING_NAMES):
                    if len(self.fields) >= MAX_FIELDS:
                        raise FramingError(400, f"more than {MAX_FIELDS} fields")
                    self.fields.append(f)
            pos = nl + 1
        self.pos = pos - base
        if len(data) - base >= limit:
            raise FramingError(431, f"header block over {limit} bytes")
        return -1


def parse_field_line(line: bytes) -> Field:
    """Split and validate one field line (section 5); raises :class:`FramingError` (400)."""
    if line[:1] in (b" ", b"\t"):
        raise FramingError(400, "obs-fold (a field line starting with whitespace)")
    colon = line.find(b":")
    if colon < 0:
        raise FramingError(400, "field line without a colon")
    name = line[:colon]
    if TOKEN_RE.fullmatch(name) is None:
        if name[-1:] in (b" ", b"\t"):
            raise FramingError(400, "whitespace between field name and colon")
        raise FramingError(400, "invalid field name")
    value = line[colon + 1 :]
    if _FIELD_VALUE.fullmatch(value) is None:
        raise FramingError(400, "invalid character (control or NUL) in a field value")
    return (name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"), line)


#: The fields framing looks at; the others are only carried.
_FRAMING_NAMES: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect"}
)


def _index(fields: list[Field]) -> dict[str, list[str]]:
    """The values of the framing fields, by name, in order (one pass over the fields)."""
    idx: dict[str, list[str]] = {}
    for n, v, _ in fields:
        if n in _FRAMING_NAMES:
            idx.setdefault(n, []).append(v)
    return idx


def _tokens(vals: list[str]) -> set[str]:
    """The lower-cased elements of a comma-separated list field (``Connection``, ...)."""
    out: set[str] = set()
    for v in vals:
        for part in v.split(","):
            part = part.strip(" \t").lower()
            if part:
                out.add(part)
    return out


def _content_length(cls: list[str], what: str) -> int | None:
    if not cls:
        return None
    if len(cls) > 1:
        raise FramingError(400, f"more than one Content-Length in a {what}")
    if _CONTENT_LENGTH.fullmatch(cls[0]) is None:
        raise FramingError(400, f"malformed Content-Length {cls[0][:40]!r}")
    return int(cls[0])


def _chunked_last(vals: list[str]) -> bool:
    """Whether the Transfer-Encoding's last coding is chunked; raises for a malformed list."""
    codings: list[str] = []
    for v in vals:
        for part in v.split(","):
            part = part.strip(" \t")
            m = _CODING.fullmatch(part)
            if m is None:
                raise FramingError(400, f"malformed Transfer-Encoding element {part[:40]!r}")
            codings.append(m.group(1).lower() + ("" if not m.group(2) else ";"))
    if codings.count("chunked") + codings.count("chunked;") > 1:
        raise FramingError(400, "chunked applied more than once")
    return codings[-1] == "chunked"


# --- requests ---------------------------------------------------------------------------------

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_UNTIL_CLOSE: Final = 3  # responses only
BODY_TUNNEL: Final = 4  # responses only: 101, or 2xx to CONNECT


@dataclass(slots=True)
class RequestHead:
    """A framed, validated request head (what the parser and the policy need of it)."""

    method: str
    target: str
    version: str  # "1.0" | "1.1"
    fields: list[Field]
    path: str  # the target's path and query ("" for CONNECT and "*"... see parse_request)
    host: str  # Host value; CONNECT: the target authority
    body: int  # BODY_NONE | BODY_LENGTH | BODY_CHUNKED
    length: int  # Content-Length (BODY_LENGTH)
    keep_alive: bool
    upgrade: bool  # Connection: upgrade with an Upgrade field (HTTP/1.1)
    connect: bool
    expect_continue: bool
    prefix: str = ""  # absolute-form: the target's ``scheme://authority`` (``path`` follows it)


def parse_request_line(start: bytes) -> tuple[str, str, str]:
    """Method, target and version ("1.0" or "1.1") of a request line.

    Raises :class:`FramingError`: 400 for an invalid line or another version, None for the
    HTTP/2 connection preface.
    """
    m = _REQUEST_LINE.fullmatch(start)
    if m is None:
        raise FramingError(400, "invalid request line")
    major, minor = m.group(3), m.group(4)
    method = m.group(1).decode("ascii")
    target = m.group(2).decode("ascii")
    if major == b"2" and method == "PRI" and target == "*":
        raise FramingError(None, "HTTP/2 connection preface (not HTTP/1.x)")
    if major != b"1" or minor not in (b"0", b"1"):
        raise FramingError(400, f"unsupported HTTP version {major.decode()}.{minor.decode()}")
    return method, target, "1.1" if minor == b"1" else "1.0"


def parse_request(start: bytes | tuple[str, str, str], fields: list[Field]) -> RequestHead:
    """Validate a request head and decide its body length (RFC 9112 sections 3, 6, 7).

    Raises :class:`FramingError`: 400 for what cannot be framed unambiguously, None for an
    HTTP/2 connection preface.
    """
    method, target, version = start if isinstance(start, tuple) else parse_request_line(start)
    connect = method == "CONNECT"
    prefix = ""
    idx = _index(fields)
    hosts = idx.get("host", [])
    if len(hosts) > 1:
        raise FramingError(400, "more than one Host")
    if not hosts and version == "1.1":
        raise FramingError(400, "HTTP/1.1 request without Host")
    host = hosts[0] if hosts else ""
    if hosts and _HOST.fullmatch(host) is None:
        raise FramingError(400, "invalid Host")
    if connect:
        if _AUTHORITY.fullmatch(target) is None:
            raise FramingError(400, "CONNECT target is not authority-form (host:port)")
        path = ""
        host = target
    elif target.startswith("/"):
        path = target
    elif target == "*":
        if method != "OPTIONS":
            raise FramingError(400, "asterisk-form target outside OPTIONS")
        path = "*"
    else:
        am = _ABSOLUTE.fullmatch(target)
        if am is None:
            raise FramingError(400, "invalid request target")
        authority = am.group(2)
        if "@" in authority:
            raise FramingError(400, "userinfo in an absolute-form target")
        if not authority or _HOST.fullmatch(authority) is None:
            raise FramingError(400, "invalid authority in an absolute-form target")
        if hosts and host.lower() != authority.lower():
            raise FramingError(400, "Host differs from the absolute-form target's authority")
        host = authority
        path = am.group(3)
        prefix = target[: len(target) - len(path)]
        if not path.startswith("/"):
            path = "/" + path
    cl = _content_length(idx.get("content-length", []), "request")
    has_te = "transfer-encoding" in idx
    body, length = BODY_NONE, 0
    if has_te:
        if cl is not None:
            raise FramingError(400, "both Transfer-Encoding and Content-Length")
        if version == "1.0":
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if not _chunked_last(idx["transfer-encoding"]):
            raise FramingError(400, "Transfer-Encoding whose last coding is not chunked")
        body = BODY_CHUNKED
    elif cl is not None and cl > 0:
        body, length = BODY_LENGTH, cl
    if connect and body != BODY_NONE:
        raise FramingError(400, "a body on CONNECT")
    conn = _tokens(idx.get("connection", []))
    if version == "1.1":
        keep_alive = "close" not in conn
    else:
        keep_alive = "keep-alive" in conn and "close" not in conn
    upgrade = version == "1.1" and "upgrade" in conn and "upgrade" in idx
    expect = any(v.lower() == "100-continue" for v in idx.get("expect", ()))
    return RequestHead(
        method,
        target,
        version,
        fields,
        path,
        host,
        body,
        length,
        keep_alive,
        upgrade,
        connect,
        expect,
        prefix,
    )


# --- responses --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    version: str
    body: int  # BODY_NONE | BODY_LENGTH | BODY_CHUNKED | BODY_UNTIL_CLOSE | BODY_TUNNEL
    length: int
    interim: bool  # 1xx other than 101: the request's final response is still to come


def parse_status_line(start: bytes) -> tuple[int, str]:
    """Status code and version of a status line; raises :class:`FramingError` (status None)."""
    m = _STATUS_LINE.fullmatch(start)
    if m is None or m.group(1) != b"1" or m.group(2) not in (b"0", b"1"):
        raise FramingError(None, "invalid status line")
    status = int(m.group(3))
    if status < 100:
        raise FramingError(None, "invalid status code")
    return status, "1." + m.group(2).decode()


def response_body(
    start: bytes | tuple[int, str], fields: list[Field], *, head: bool, connect: bool, upgrade: bool
) -> ResponseHead:
    """Frame a response per RFC 9112 section 6.3 given what its request was.

    Raises :class:`FramingError` (status None: the server's bytes cannot be framed).
    """
    status, version = start if isinstance(start, tuple) else parse_status_line(start)
    # Length fields are checked on every response, even those that have no body, as llhttp
    # does: a response carrying contradictory lengths is not one to relay.
    idx = _index(fields)
    try:
        cl = _content_length(idx.get("content-length", []), "response")
    except FramingError as exc:
        raise FramingError(None, exc.reason) from None
    has_te = "transfer-encoding" in idx
    if has_te and cl is not None:
        raise FramingError(None, "response with both Transfer-Encoding and Content-Length")
    if 100 <= status < 200:
        if status == 101:
            if not upgrade:
                raise FramingError(None, "101 Switching Protocols to a request that asked no upgrade")
            return ResponseHead(status, version, BODY_TUNNEL, 0, False)
        return ResponseHead(status, version, BODY_NONE, 0, True)
    if connect and 200 <= status < 300:
        return ResponseHead(status, version, BODY_TUNNEL, 0, False)
    if head or status in (204, 304):
        return ResponseHead(status, version, BODY_NONE, 0, False)
    if has_te:
        try:
            chunked = _chunked_last(idx["transfer-encoding"])
        except FramingError as exc:
            raise FramingError(None, exc.reason) from None
        return ResponseHead(status, version, BODY_CHUNKED if chunked else BODY_UNTIL_CLOSE, 0, False)
    if cl is not None:
        return ResponseHead(status, version, BODY_LENGTH if cl else BODY_NONE, cl, False)
    return ResponseHead(status, version, BODY_UNTIL_CLOSE, 0, False)


# --- chunked coding ---------------------------------------------------------------------------


def parse_chunk_line(line: bytes) -> int:
    """The size of a chunk from its line (without CRLF); raises :class:`FramingError` (400).

    Extensions are validated and ignored. Whitespace between the size and ``;`` (BWS, which
    section 7.1.1 lets a recipient accept) is refused, as llhttp's strict mode does: servers
    disagree on it, and that disagreement is how chunk-size smuggling works.
    """
    m = _CHUNK_LINE.fullmatch(line)
    if m is None:
        raise FramingError(400, "malformed chunk-size line")
    return int(m.group(1), 16)
