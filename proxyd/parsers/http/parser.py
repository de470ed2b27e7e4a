"""The ``http`` parser: HTTP/1.1 and 1.0 requests judged by their heads, responses kept in step.

Theory of operation
-------------------

Client to server. A request head is scanned as it arrives (:class:`.framing.HeadReader`),
validated and framed (:func:`.framing.parse_request`), its path normalised
(:mod:`.normalize`: the rules judge the path the server will serve, as Envoy's do), and judged
by the policy on its head alone. A path that normalisation changed is sent as a new request
line with the rest of the head byte-exact (the original head dropped, the new one injected); one
it refuses or redirects is answered in place like a denial. Allowed: the head is passed (or,
when a ``headerMatches`` rule rewrites it, dropped and a rewritten head injected in its place)
and the body passed; denied: head and body are dropped and the 403 is put in the request's
place among the responses. A Content-Length body is one
PASS or DROP reaching past the buffered bytes; a chunked body is followed chunk line by chunk
line, each chunk's data passed or dropped past the buffer, then the trailer section. Bodies are
never held. A request proxyd cannot frame is answered 400 (431 for a head over
``max_header_bytes``) with ``connection: close``, never forwarded, and the connection closed;
bytes that are not HTTP/1.x (a TLS handshake, the HTTP/2 preface) close it without an answer.

Server to client. Every forwarded request has an entry in the pending queue; responses are
framed per RFC 9112 section 6.3 against the entry at its head (HEAD, 1xx, 204, 304, 2xx to
CONNECT, 101, Content-Length, chunked, read until close). Response bytes are passed as they
arrive, never reaching past the buffer, so the parser always knows where the response stream
stands: a denial queued behind a response is injected the moment that response's last byte is
passed, and a denial with nothing pending is injected at once. A denial that must close the
connection (the request asked to close, HTTP/1.0 without keep-alive, or a body the client may
or may not send after ``Expect: 100-continue``) or a 400 ends the connection with ERROR once
the answer is out; client bytes after it are dropped. Every other close proxyd decides (a
malformed chunk line, bytes that are not HTTP/1.x, too many requests awaiting answers) waits,
the same way, for the responses already owed: a sentinel entry with an empty answer closes the
connection when it reaches the head of the queue. A response with no request pending is
forwarded (framed as the answer to a GET), not swallowed.

After a ``101`` to an upgrade request, or a 2xx to CONNECT, both directions pass untouched.
While such a request waits for its answer, later client bytes are held (they may already be
the new protocol's), up to the engine's buffer, and looked at with the next client bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxyd.errors import ParserConfigError
from proxyd.ops import DROP, ERROR, ERROR_PROTOCOL, INJECT, MORE, NOP_VERDICT, PASS, Op, Verdict
from proxyd.parser import ConnectionContext, Data, EntryType, Parser

from . import framing as F
from . import normalize as N
from .rules import HeaderMatch, HttpRequest

KiB: Final = 1024

#: ERROR code for a close proxyd chose after an answer (a 403 that ends the connection, a 400).
ERROR_CLOSE_AFTER_ANSWER: Final = 16
#: Bytes of bookkeeping for requests awaiting their responses (each costs its method, path and
#: host plus :data:`ENTRY_COST`) before the client counts as broken. How many requests can be
#: outstanding is bounded by the socket buffers between proxyd and a server that answers them in
#: order; this bound is far above that for any real server (issue 17: a count of 1024 closed
#: connections nginx served fine) and only stops a server that reads without ever answering.
PENDING_BUDGET: Final = 16 * 1024 * KiB
ENTRY_COST: Final = 256  # about what an entry and its strings take in memory


def _answer(status: str, body: bytes, close: bool) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\ncontent-type: text/plain\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


DENIED: Final = _answer("403 Forbidden", b"Access denied\r\n", False)
DENIED_CLOSE: Final = _answer("403 Forbidden", b"Access denied\r\n", True)
BAD_REQUEST: Final = _answer("400 Bad Request", b"Bad Request\r\n", True)
#: A request framed fine whose path cannot be normalised: answered in place, like a denial.
BAD_PATH: Final = _answer("400 Bad Request", b"Bad Request\r\n", False)
BAD_PATH_CLOSE: Final = BAD_REQUEST


def redirect_answer(location: str, close: bool) -> bytes:
    """Envoy's answer to an escaped slash under ``UNESCAPE_AND_REDIRECT``: 307 to the new path."""
    head = f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode("latin-1")


TOO_LARGE: Final = _answer(
    "431 Request Header Fields Too Large", b"Request Header Fields Too Large\r\n", True
)


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The validated ``parser_config`` of an http listener."""

    max_header_bytes: int = 64 * KiB
    log_responses: bool = True
    normalize_path: bool = True
    merge_slashes: bool = True
    path_with_escaped_slashes_action: str = N.UNESCAPE_AND_REDIRECT


CONFIG_KEYS: Final = (
    "max_header_bytes",
    "log_responses",
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
)


def validate_config(config: Mapping[str, Any]) -> HttpConfig:
    """Build an :class:`HttpConfig`; raises :class:`ParserConfigError` naming the key."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key == "max_header_bytes":
            if isinstance(value, bool) or not isinstance(value, int) or not 256 <= value <= 1024 * KiB:
                raise ParserConfigError(f"must be an integer from 256 to 1048576, not {value!r}", key=key)
            values[key] = value
        elif key in ("log_responses", "normalize_path", "merge_slashes"):
            if not isinstance(value, bool):
                raise ParserConfigError(f"must be true or false, not {value!r}", key=key)
            values[key] = value
        elif key == "path_with_escaped_slashes_action":
            if value not in N.ESCAPED_SLASHES_ACTIONS:
                raise ParserConfigError(
                    f"must be one of {', '.join(N.ESCAPED_SLASHES_ACTIONS)}, not {value!r}", key=key
                )
            values[key] = value
        else:
            raise ParserConfigError(
                f"unknown key for parser 'http' (known: {', '.join(CONFIG_KEYS)})", key=str(key)
            )
    return HttpConfig(**values)


class _Pending:
    """A request awaiting its response, or a denial waiting for its place."""

    __slots__ = ("close", "connect", "head", "host", "method", "path", "payload", "upgrade")

    def __init__(
        self,
        method: str,
        path: str,
        host: str,
        *,
        payload: bytes | None = None,
        close: int = 0,
        upgrade: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.host = host
        self.head = method == "HEAD"
        self.connect = method == "CONNECT"
        self.upgrade = upgrade
        self.payload = payload  # set: a denial to inject once the responses before it are out
        self.close = close  # nonzero: end the connection after this answer, with this ERROR code


# Request-side states.
RS_HEAD, RS_CHUNK, RS_TRAILER, RS_WAIT, RS_TUNNEL, RS_DRAIN = range(6)
# Response-side states.
PS_HEAD, PS_LENGTH, PS_CHUNK, PS_CHUNK_DATA, PS_TRAILER, PS_UNTIL_CLOSE, PS_TUNNEL = range(7)


def path_options(config: HttpConfig) -> N.PathOptions:
    """The path normalisation ``config`` asks for."""
    return N.PathOptions(config.normalize_path, config.merge_slashes, config.path_with_escaped_slashes_action)


class HttpParser(Parser):
    """One connection's parser; see the module docstring."""

    def __init__(self, ctx: ConnectionContext, config: HttpConfig) -> None:
        self.ctx = ctx
        self.limit = config.max_header_bytes
        self.log_responses = config.log_responses
        self.paths = path_options(config)
        self.normalizing = self.paths.active
        self.pending: deque[_Pending] = deque()
        self.pending_bytes = 0  # what the entries of ``pending`` cost (see PENDING_BUDGET)
        self.closing = 0  # an answer that ends the connection is out: ERROR (this code) at the next call
        self.unsolicited = False  # the response being read answers no request
        # request side
        self.rs = RS_HEAD
        self.rq: deque[Verdict] = deque()
        self.rhr = F.HeadReader()
        self.r_op = PASS  # PASS or DROP for the current request's body
        self.r_crlf = False  # chunk data done: a CRLF must come first
        self.r_seen = 0  # bytes of the buffer already searched for a chunk line's LF
        self.r_keep = True  # the current request keeps the connection
        self.r_next = RS_HEAD  # state after the current request's body
        # response side
        self.ps = PS_HEAD
        self.pq: deque[Verdict] = deque()
        self.phr = F.HeadReader(framing_only=True)
        self.p_left = 0  # body bytes still to pass (PS_LENGTH, PS_CHUNK_DATA)
        self.p_crlf = False
        self.p_seen = 0

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        if reply:
            if self.pq:
                return self.pq.popleft()
            if not data:
                return NOP_VERDICT
            if self.closing:
                return ERROR, self.closing
            return self._response(data)
        if self.rq:
            return self.rq.popleft()
        if not data:
            return NOP_VERDICT
        if self.closing:
            return ERROR, self.closing
        return self._request(data)

    def pending_requests(self) -> list[tuple[str, str, str, bytes | None]]:
        """``(method, path, host, answer)`` per entry awaiting its place (tests compare the twins)."""
        return [(e.method, e.path, e.host, e.payload) for e in self.pending]

    # --- hand-over with the native twin ----------------------------------------------------

    def twin_export(
        self,
    ) -> tuple[tuple[tuple[str, str, str], ...], int, int, int, bool, int, bool, int] | None:
        """This parser's state when the native twin can carry it on, else None.

        The twin (``proxyd._native.Http``, ``proxyd/_native_src/http_parser.c``) handles the
        common states itself: between request heads (or draining after the last request),
        between response heads or inside a Content-Length or chunked body (between its chunk
        lines, inside a chunk, before its trailer section), with only forwarded, plain
        requests awaiting responses. Anything else (a partial head, a chunked body, an answer
        waiting for its place, an upgrade, a close decided) it hands to this parser with
        :meth:`twin_adopt` and takes back when this returns a state:
        ``((method, path, host) per pending request, rs, ps, p_left, p_crlf, r_op, r_crlf,
        r_next)``.
        """
        if (
            self.rq
            or self.pq
            or self.closing
            or self.unsolicited
            or self.rs not in (RS_HEAD, RS_DRAIN, RS_CHUNK, RS_TRAILER)
            or self.r_next not in (RS_HEAD, RS_DRAIN)
            or self.r_seen
            or self.rhr.trailer != (self.rs == RS_TRAILER)
            or self.ps not in (PS_HEAD, PS_LENGTH, PS_CHUNK, PS_CHUNK_DATA, PS_TRAILER)
            or self.p_seen
            or self.phr.trailer != (self.ps == PS_TRAILER)
            or self.rhr.pos
            or self.rhr.start is not None
            or self.phr.pos
            or self.phr.start is not None
        ):
            return None
        entries = []
        for e in self.pending:
            if e.payload is not None or e.upgrade:
                return None
            entries.append((e.method, e.path, e.host))
        r_op = int(self.r_op)
        return tuple(entries), self.rs, self.ps, self.p_left, self.p_crlf, r_op, self.r_crlf, self.r_next

    def twin_adopt(
        self,
        entries: tuple[tuple[str, str, str], ...],
        rs: int,
        ps: int,
        p_left: int,
        p_crlf: bool,
        r_op: int,
        r_crlf: bool,
        r_next: int,
    ) -> None:
        """Take over from the native twin in a state :meth:`twin_export` describes."""
        self.pending.clear()
        self.pending_bytes = 0
        for method, path, host in entries:
            self._push(_Pending(method, path, host))
        self.rs = rs
        self.ps = ps
        self.p_left = p_left
        self.p_crlf = bool(p_crlf)
        self.p_seen = 0
        self.phr.reset(trailer=ps == PS_TRAILER)
        self.r_op = Op(r_op)
        self.r_crlf = bool(r_crlf)
        self.r_next = r_next
        self.r_seen = 0
        self.rhr.reset(trailer=rs == RS_TRAILER)

    # --- requests ------------------------------------------------------------------------------

    def _request(self, data: Data) -> Verdict:
        rs = self.rs
        if rs == RS_HEAD:
            return self._request_head(data)
        if rs == RS_CHUNK:
            return self._request_chunk(data)
        if rs == RS_TRAILER:
            return self._request_trailer(data)
        if rs == RS_TUNNEL:
            return PASS, len(data)
        if rs == RS_DRAIN:
            return DROP, len(data)
        return NOP_VERDICT  # RS_WAIT: held until the upgrade or CONNECT is answered

    def _request_head(self, data: Data, judged: tuple[HttpRequest, bool] | None = None) -> Verdict:
        """Frame, normalise and judge a request head; forward, answer or refuse it.

        ``judged``: the native twin already asked the policy about this very head (the request
        it built, with any ``headerMatches`` actions, and the answer); the rest is done here,
        as if ``ctx.matches`` had answered that (see :meth:`twin_adopt`).
        """
        hr = self.rhr
        if hr.pos == 0:
            first = data[0]
            if first == 13:  # empty lines before a request line are ignored (RFC 9112 2.2)
                if len(data) < 2:
                    return MORE, 1
                if data[1] == 10:
                    return DROP, 2
            elif first == 0x16:
                return self._not_http("TLS handshake (not HTTP/1.x)", len(data))
        try:
            n = hr.scan(data, 0, self.limit, F.parse_request_line)  # a bad request line: at once
            if n < 0:
                return MORE, 1
            head = F.parse_request(hr.parsed_start or hr.start or b"", hr.fields)
        except F.FramingError as exc:
            return self._reject(exc, len(data))
        hr.reset()
        sent = head.path
        if self.normalizing and sent[:1] == "/" and N.SUSPECT.search(sent) is not None:
            norm = N.normalize(sent, self.paths)
            if norm.action == N.REJECT:
                self.ctx.log(
                    EntryType.DENIED,
                    {**_head_fields(head), "error": norm.reason, "status": 400},
                )
                return self._answer_in_place(head, n, len(data), BAD_PATH, BAD_PATH_CLOSE)
            head.path = norm.path
            if norm.action == N.REDIRECT:
                fields = _head_fields(head)
                fields.update(original_path=sent, reason="escaped slash in the path", status=307)
                self.ctx.log(EntryType.DENIED, fields)
                return self._answer_in_place(
                    head, n, len(data), redirect_answer(norm.path, False), redirect_answer(norm.path, True)
                )
        if judged is None:
            headers = tuple([(k, v) for k, v, _ in head.fields])
            req = HttpRequest(head.method, head.path, head.host, head.version, headers, [])
        else:
            req = judged[0]
        if self.pending_bytes > PENDING_BUDGET:
            self._log_denied(req, "too many pipelined requests awaiting responses", sent)
            return self._close_after_owed(ERROR_PROTOCOL, len(data))
        if self.ctx.matches(req) if judged is None else judged[1]:
            return self._forward(head, req, n, data, sent)
        self._log_denied(req, "policy", sent)
        return self._answer_in_place(head, n, len(data), DENIED, DENIED_CLOSE)

    def _after_body(self, head: F.RequestHead, denied: bool) -> int:
        if not head.keep_alive:
            return RS_DRAIN
        if (head.upgrade or head.connect) and not denied:
            return RS_WAIT
        return RS_HEAD

    def _forward(self, head: F.RequestHead, req: HttpRequest, n: int, data: Data, sent: str) -> Verdict:
        self._push(_Pending(head.method, head.path, head.host, upgrade=head.upgrade))
        log_extra: dict[str, str] = {}
        new_head: bytes | None = None
        if sent != head.path:
            # The server gets the path the rules judged: a new request line, the rest byte-exact.
            log_extra["original_path"] = sent
            line_end = len(head.method) + len(head.target) + 12  # METHOD SP target SP HTTP/x.y CRLF
            head.target = head.prefix + head.path
            new_head = _request_line(head) + bytes(data[line_end:n])
        if req.actions:
            new_head = _rewrite(head, req.actions, log_extra) or new_head
        self.ctx.log(EntryType.REQUEST, lambda: {**_request_fields(req), **log_extra})
        after = self._after_body(head, False)
        if new_head is None:
            if head.body == F.BODY_CHUNKED:
                self._start_chunked(PASS, after)
                return PASS, n
            self.rs = after
            return PASS, n + head.length
        self.ctx.inject(False, new_head)
        self.rq.append((DROP, n))
        if head.body == F.BODY_CHUNKED:
            self._start_chunked(PASS, after)
        else:
            self.rs = after
            if head.length:
                self.rq.append((PASS, head.length))
        return INJECT, len(new_head)

    def _answer_in_place(self, head: F.RequestHead, n: int, have: int, keep: bytes, close_: bytes) -> Verdict:
        """Answer a request proxyd does not forward (a denial, a 400 path, a 307), dropping it."""
        # After a final answer to ``Expect: 100-continue`` the client may or may not send the
        # body (RFC 9110 10.1.1): only a close keeps the two sides in step.
        close = not head.keep_alive or (head.expect_continue and head.body != F.BODY_NONE)
        payload = close_ if close else keep
        if head.method == "HEAD":
            payload = payload[: payload.index(b"\r\n\r\n") + 4]  # a HEAD response has no body
        entry = _Pending(
            head.method, head.path, head.host, payload=payload, close=ERROR_CLOSE_AFTER_ANSWER if close else 0
        )
        if self._place(entry):
            return ERROR, ERROR_CLOSE_AFTER_ANSWER
        if close:
            self.rs = RS_DRAIN
            return DROP, have
        after = self._after_body(head, True)
        if head.body == F.BODY_CHUNKED:
            self._start_chunked(DROP, after)
            return DROP, n
        self.rs = after
        return DROP, n + head.length

    def _push(self, entry: _Pending) -> None:
        self.pending.append(entry)
        self.pending_bytes += len(entry.method) + len(entry.path) + len(entry.host) + ENTRY_COST

    def _pop(self, where: int = 0) -> _Pending:
        entry = self.pending.popleft() if where == 0 else self.pending.pop()
        self.pending_bytes -= len(entry.method) + len(entry.path) + len(entry.host) + ENTRY_COST
        return entry

    def _place(self, entry: _Pending) -> bool:
        """Put an answer in its place; True when it went out now and the connection must close."""
        if self.pending:
            self._push(entry)
            return False
        assert entry.payload is not None
        self.ctx.inject(True, entry.payload)
        if entry.close:
            self.closing = entry.close
            return True
        return False

    def _reject(self, exc: F.FramingError, have: int) -> Verdict:
        """A request proxyd cannot frame: 400/431 and close, after the responses before it."""
        if exc.status is None:
            return self._not_http(exc.reason, have)
        self.ctx.log(EntryType.DENIED, {"error": exc.reason, "status": exc.status})
        payload = TOO_LARGE if exc.status == 431 else BAD_REQUEST
        self.rs = RS_DRAIN
        if self._place(_Pending("", "", "", payload=payload, close=ERROR_CLOSE_AFTER_ANSWER)):
            return ERROR, ERROR_CLOSE_AFTER_ANSWER
        return DROP, have

    def _not_http(self, reason: str, have: int) -> Verdict:
        self.ctx.log(EntryType.DENIED, {"error": reason})
        return self._close_after_owed(ERROR_PROTOCOL, have)

    def _close_after_owed(self, code: int, have: int) -> Verdict:
        """Close (with ERROR ``code``) once the responses already owed are delivered.

        A close proxyd decides must not throw away the answers to earlier pipelined requests
        the server has already run (issue 17): later client bytes are dropped, the responses
        before this point still pass, and the connection ends after the last of them.
        """
        self.rs = RS_DRAIN
        if not self.pending:
            return ERROR, code
        self._push(_Pending("", "", "", payload=b"", close=code))
        return DROP, have

    def _log_denied(self, req: HttpRequest, reason: str, sent: str) -> None:
        fields = _request_fields(req)
        if sent != req.path:
            fields["original_path"] = sent
        fields["reason"] = reason
        self.ctx.log(EntryType.DENIED, fields)

    # --- request bodies ----------------------------------------------------------------------

    def _start_chunked(self, op: Op, after: int) -> None:
        self.rs = RS_CHUNK
        self.r_op = op
        self.r_crlf = False
        self.r_next = after

    def _request_chunk(self, data: Data) -> Verdict:
        try:
            n, size = _chunk_line(data, self.r_crlf, self.limit, self.r_seen)
        except F.FramingError as exc:
            return self._body_error(exc.reason, len(data))
        if n < 0:
            self.r_seen = size
            return MORE, 1
        self.r_seen = 0
        if size == 0:
            self.rs = RS_TRAILER
            self.rhr.reset(trailer=True)
            return self.r_op, n
        self.r_crlf = True
        return self.r_op, n + size

    def _request_trailer(self, data: Data) -> Verdict:
        hr = self.rhr
        try:
            n = hr.scan(data, 0, self.limit)
        except F.FramingError as exc:
            if exc.status == 431 and hr.pos > 0:  # a long trailer section streams (see _stream_head)
                n, hr.pos = hr.pos, 0
                return self.r_op, n
            return self._body_error(exc.reason, len(data))
        if n < 0:
            return MORE, 1
        self.rhr.reset()
        self.rs = self.r_next
        return self.r_op, n

    def _body_error(self, reason: str, have: int) -> Verdict:
        # The head is already forwarded (or dropped): its own answer cannot be put in step, so
        # the connection ends after the responses owed to the requests before it.
        self.ctx.log(EntryType.DENIED, {"error": f"request body: {reason}"})
        pending = self.pending
        if pending and pending[-1].payload is None and (len(pending) > 1 or self.ps == PS_HEAD):
            self._pop(-1)  # this request's own entry: its response is not waited for
        return self._close_after_owed(ERROR_PROTOCOL, have)

    # --- responses -----------------------------------------------------------------------------

    def _response(self, data: Data) -> Verdict:
        ps = self.ps
        if ps == PS_HEAD:
            return self._response_head(data)
        if ps in (PS_LENGTH, PS_CHUNK_DATA):
            have = len(data)
            left = self.p_left
            if have < left:
                self.p_left = left - have
                return PASS, have
            self.p_left = 0
            if ps == PS_CHUNK_DATA:
                self.ps = PS_CHUNK
                self.p_crlf = True
                return PASS, left
            return self._complete(left, data)
        if ps == PS_CHUNK:
            try:
                n, size = _chunk_line(data, self.p_crlf, self.limit, self.p_seen)
            except F.FramingError as exc:
                return self._response_error(exc.reason)
            if n < 0:
                self.p_seen = size
                return MORE, 1
            self.p_seen = 0
            self.p_crlf = False
            if size == 0:
                self.ps = PS_TRAILER
                self.phr.reset(trailer=True)
                return PASS, n
            self.ps = PS_CHUNK_DATA
            self.p_left = size
            return PASS, n
        if ps == PS_TRAILER:
            try:
                n = self.phr.scan(data, 0, self.limit)
            except F.FramingError as exc:
                return self._stream_head(exc)
            if n < 0:
                return MORE, 1
            self.phr.reset()
            return self._complete(n, data)
        return PASS, len(data)  # PS_UNTIL_CLOSE, PS_TUNNEL

    def _response_head(self, data: Data) -> Verdict:
        if not self.pending:
            # A response nobody asked for (a server's 408 or 503 before it closes an idle or
            # surplus connection): the client would get it without proxyd, so it passes, framed
            # as the answer to a GET, and its log line says so.
            self._push(_Pending("", "", "", close=0))
            self.unsolicited = True
        entry = self.pending[0]
        hr = self.phr
        try:
            n = hr.scan(data, 0, self.limit, F.parse_status_line)
            if n < 0:
                return MORE, 1
            rh = F.response_body(
                hr.parsed_start or hr.start or b"",
                hr.fields,
                head=entry.head,
                connect=entry.connect,
                upgrade=entry.upgrade,
            )
        except F.FramingError as exc:
            return self._stream_head(exc)
        hr.reset()
        if self.unsolicited:
            self.unsolicited = False
            self.ctx.log(
                EntryType.RESPONSE, {"status": rh.status, "note": "response with no request pending"}
            )
        elif self.log_responses:
            status = rh.status
            self.ctx.log(
                EntryType.RESPONSE,
                lambda: {"method": entry.method, "path": entry.path, "host": entry.host, "status": status},
            )
        if rh.interim:
            return PASS, n
        body = rh.body
        if body == F.BODY_NONE:
            return self._complete(n, data)
        if body == F.BODY_LENGTH:
            total = n + rh.length
            if total <= len(data):
                return self._complete(total, data)
            self.ps = PS_LENGTH
            self.p_left = rh.length
            return PASS, n
        if body == F.BODY_CHUNKED:
            self.ps = PS_CHUNK
            self.p_crlf = False
            return PASS, n
        if body == F.BODY_TUNNEL:
            self._pop()
            self.ps = PS_TUNNEL
            self.rs = RS_TUNNEL
        else:
            # The entry stays until the close that ends this body: an answer queued behind it
            # (a denial, a 400) must never be put inside the body, and is never due.
            self.ps = PS_UNTIL_CLOSE
        return PASS, len(data)

    def _complete(self, n: int, data: Data) -> Verdict:
        """The head entry's response ends with the next ``n`` bytes: pass them, place denials."""
        have = len(data)
        pending = self.pending
        self._pop()
        self.ps = PS_HEAD
        if self.rs == RS_WAIT:
            self.rs = RS_HEAD  # the upgrade or CONNECT was refused: HTTP goes on
        answers: list[bytes] = []
        close = 0
        while pending and pending[0].payload is not None:
            entry = self._pop()
            assert entry.payload is not None
            answers.append(entry.payload)
            if entry.close:
                close = entry.close
                break
        if not answers:
            return PASS, n
        out = b"".join(answers)
        if not close:
            self.ctx.inject(True, out)
            if n < have:
                self.pq.append((INJECT, len(out)))
            return PASS, n
        self.closing = close
        if n < have:
            if out:
                self.ctx.inject(True, out)
                self.pq.append((INJECT, len(out)))
            self.pq.append((ERROR, close))
            return PASS, n
        # The response ends exactly at the buffer's end, and the engine calls a parser again
        # only while bytes remain: keep its last byte, send it ahead of the answer, then close.
        self.ctx.inject(True, bytes(data[n - 1 : n]) + out)
        self.pq.extend(((INJECT, len(out) + 1), (ERROR, close)))
        if n > 1:
            return PASS, n - 1
        return self.pq.popleft()

    def _stream_head(self, exc: F.FramingError) -> Verdict:
        """A response head (or trailer section) longer than ``max_header_bytes`` streams.

        Clients take larger heads than proxyd needs to hold (curl 100 KiB and more): once
        ``limit`` bytes are buffered without the head's end, the complete field lines among
        them, already validated, pass, and reading goes on from there; only the fields framing
        needs are kept. Where the passes fall depends only on the bytes (every window starts
        where the last pass ended), so the outcome does not depend on segmentation. A single
        line longer than the limit still closes the connection.
        """
        hr = self.phr
        if exc.status == 431 and hr.pos > 0 and (hr.start is not None or hr.trailer):
            n = hr.pos
            hr.pos = 0
            return PASS, n
        return self._response_error(exc.reason)

    def _response_error(self, reason: str) -> Verdict:
        self.ctx.log(EntryType.RESPONSE, {"error": reason})
        return ERROR, ERROR_PROTOCOL


def _chunk_line(data: Data, crlf: bool, limit: int, seen: int) -> tuple[int, int]:
    """Find a chunk-size line (after the CRLF that ends the previous chunk's data, if ``crlf``).

    Returns (bytes through the line's CRLF, chunk size), or (-1, bytes searched so far) when
    more bytes are needed; the caller passes that back as ``seen`` so a line trickling in byte
    by byte is searched once, not once per byte. The line, extensions included, may be up to
    ``limit`` bytes (``max_header_bytes``: nginx bounds neither extensions nor this line).
    Raises :class:`.framing.FramingError`.
    """
    pos = 0
    if crlf:
        if data[:2] != b"\r\n":
            if len(data) < 2 and data[:1] in (b"", b"\r"):
                return -1, 0
            raise F.FramingError(400, "chunk data not followed by CRLF")
        pos = 2
    nl = data.find(b"\n", max(pos, seen), pos + limit)
    if nl < 0:
        if len(data) - pos >= limit:
            raise F.FramingError(400, f"chunk-size line over {limit} bytes")
        return -1, len(data)
    if nl == pos or data[nl - 1] != 13:
        raise F.FramingError(400, "bare LF in a chunk-size line")
    return nl + 1, F.parse_chunk_line(bytes(data[pos : nl - 1]))


def _request_fields(req: HttpRequest) -> dict[str, Any]:
    return {"method": req.method, "path": req.path, "host": req.host, "version": "HTTP/" + req.version}


def _head_fields(head: F.RequestHead) -> dict[str, Any]:
    return {"method": head.method, "path": head.path, "host": head.host, "version": "HTTP/" + head.version}


def _request_line(head: F.RequestHead) -> bytes:
    return f"{head.method} {head.target} HTTP/{head.version}\r\n".encode("latin-1")


def _rewrite(head: F.RequestHead, actions: list[HeaderMatch], log: dict[str, str]) -> bytes | None:
    """The request head with ``headerMatches`` mismatch actions applied (None: unchanged)."""
    lines: list[tuple[str, bytes] | None] = [(k, raw) for k, _, raw in head.fields]
    changed = False
    logged: list[str] = []
    for hm in actions:
        mine = f"{hm.name}: {hm.value}".encode("latin-1")
        if hm.mismatch == "LOG":
            logged.append(hm.name)
            continue
        changed = True
        if hm.mismatch == "ADD":
            lines.append((hm.lname, mine))
        elif hm.mismatch == "DELETE":
            lines = [x for x in lines if x is not None and x[0] != hm.lname]
        else:  # REPLACE
            first = True
            for i, x in enumerate(lines):
                if x is not None and x[0] == hm.lname:
                    lines[i] = (hm.lname, mine) if first else None
                    first = False
            if first:
                lines.append((hm.lname, mine))
            lines = [x for x in lines if x is not None]
    if logged:
        log["header_mismatch"] = ",".join(logged)
    if not changed:
        return None
    return (
        _request_line(head)
        + b"".join(raw + b"\r\n" for x in lines if x is not None for raw in (x[1],))
        + b"\r\n"
    )
