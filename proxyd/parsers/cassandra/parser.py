"""The Cassandra (CQL native protocol v3, v4, v5) parser: table-level policy per statement.

Theory of operation
-------------------

Client to server (requests). Each frame's 9-byte header is read first. OPTIONS, REGISTER and
AUTH_RESPONSE pass at once (PASS of the whole frame, reaching past the buffered bytes when the
frame is large). STARTUP is read whole for its ``COMPRESSION`` option (a compression proxyd
cannot decompress is refused with a protocol ERROR frame). QUERY, PREPARE, EXECUTE and BATCH are
inspected: only the part of the body that decides is needed (the statement string, which is at
the body start; the prepared id; every batch member), so a 100 MiB INSERT needs only its first
bytes buffered before it is PASS-ed. A compressed body is decompressed whole, for inspection
only; the bytes forwarded are the client's own. When the deciding part would exceed
``max_inspect_bytes`` the request is denied (fail closed) and the connection stays up.

Each statement is classified by :mod:`.cql` into an action and a name; an unqualified table is
resolved against the connection's keyspace, learnt from ``USE`` (a request, pending until its
reply) and from ``RESULT Set_keyspace`` replies. While a ``USE`` is in flight both keyspaces are
possible and the statement must be allowed under each. Policy sees one
:class:`~.rules.CassandraRequest` per statement; a BATCH is allowed only if every member is.
PREPARE is learnt (not checked, unless ``check_prepare``): its reply's prepared id is mapped to
the classified statement (an LRU of ``max_prepared`` ids) and EXECUTE is checked against it. An
EXECUTE (or batch member) of an id proxyd has not seen prepared on this connection is answered
with ERROR 0x2500 Unprepared, so the driver prepares it again through proxyd.

A denied request is DROP-ped and answered on its stream id with ERROR 0x2100 ``Request
Unauthorized`` in the request's version, uncompressed (the frame's compression flag is clear;
v4 section 2.2 makes compression per frame, and drivers honour the flag).

Server to client (replies) pass frame by frame; only RESULT and ERROR replies to a PREPARE or
USE are read (the id, the keyspace). The reply to STARTUP decides the v5 switch.

Protocol v5. After the server's READY (or AUTHENTICATE) to a v5 STARTUP, both directions carry
segments (:mod:`.frames`). Segments are buffered whole (at most 128 KiB), their CRC24 and CRC32
checked, decompressed (lz4) for inspection and forwarded unchanged. A self-contained segment
holds whole envelopes: if every one is allowed the segment passes; if none, it is dropped; if
some are, the segment is dropped and a new uncompressed one holding the allowed envelopes is
injected in its place. A large envelope spans a run of non-self-contained segments; it is decided
on its first segments and the rest of the run is passed or dropped. An ERROR frame toward the
client is wrapped in its own segment, and held back while the reply stream is inside a
multi-segment envelope (drivers concatenate segment payloads, so a segment may not be put in
the middle of an envelope).

Closing without losing replies. A protocol error on the request side (a malformed frame, a bad
header) closes the connection, but first every reply already owed is delivered: the parser
counts the requests it forwarded per stream id until their reply frame (EVENT frames, stream
-1, are not replies and pass at any time), stops taking client bytes (dropped), keeps passing
replies, and once nothing is in flight logs the reason and returns ERROR. The engine calls the
parser only when bytes are buffered, so the last reply owed keeps its last byte back and it is
sent (injected) by the call that closes; a reply that empties the in-flight set while reaching
past the buffered bytes does the same, so a close decided while it streams waits for its end.
Reply frames have no size cap of their own (they pass without being buffered; the protocol's
length is 32 bits): only requests are bounded by ``max_frame_bytes``.

Not supported (fail closed): protocol v1/v2 and v6-beta (answered with the same "unsupported
protocol version" ERROR a server gives, so drivers downgrade), snappy compressed segments in v5
(the spec does not allow them).

Access log: ``query_action``, ``query_table``, ``stream``, ``opcode`` for each statement of a
QUERY, EXECUTE, BATCH (and PREPARE, with ``check_prepare``); ``error`` when proxyd refused a
request it could not judge.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxyd.errors import ParserConfigError
from proxyd.ops import (
    DROP,
    ERROR,
    ERROR_INVALID_FRAME_LENGTH,
    ERROR_INVALID_FRAME_TYPE,
    ERROR_PROTOCOL,
    INJECT,
    MORE,
    NOP_VERDICT,
    PASS,
    Verdict,
)
from proxyd.parser import ConnectionContext, Data, EntryType, Parser
from proxyd.parsers.cassandra import frames as F
from proxyd.parsers.cassandra.cql import INVALID, Statement, classify
from proxyd.parsers.cassandra.rules import CassandraRequest

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class CassandraConfig:
    """The validated ``parser_config`` of a cassandra listener."""

    max_frame_bytes: int = 256 * MiB  # a longer frame body is a protocol error
    max_inspect_bytes: int = MiB  # at most this much of a request is buffered to decide
    max_prepared: int = 10_000  # prepared ids remembered per connection (LRU)
    enforce_use: bool = False  # check USE against policy (Cilium always allows it)
    check_prepare: bool = False  # check PREPARE against policy too (EXECUTE always is)


_INT_KEYS = {
    "max_frame_bytes": (9, (1 << 31) - 1),  # the protocol's [int] length
    "max_inspect_bytes": (64, 256 * MiB),
    "max_prepared": (1, 10**7),
}
_BOOL_KEYS = ("enforce_use", "check_prepare")


def validate_config(config: Mapping[str, Any]) -> CassandraConfig:
    """Build a :class:`CassandraConfig`; raises :class:`ParserConfigError` naming the key."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        if key in _INT_KEYS:
            lo, hi = _INT_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ParserConfigError(f"must be an integer from {lo} to {hi}, not {value!r}", key=key)
            values[key] = value
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise ParserConfigError(f"must be true or false, not {value!r}", key=key)
            values[key] = value
        else:
            known = ", ".join([*_INT_KEYS, *_BOOL_KEYS])
            raise ParserConfigError(f"unknown key for parser 'cassandra' (known: {known})", key=str(key))
    return CassandraConfig(**values)


# Requests parsed from a body (pure data; side effects come after the decision).


@dataclass(frozen=True, slots=True)
class _Query:
    text: str
    keyspace: str | None  # v5 per-query keyspace


@dataclass(frozen=True, slots=True)
class _Execute:
    prepared_id: bytes


@dataclass(frozen=True, slots=True)
class _Batch:
    members: tuple[str | bytes, ...]  # statement text, or a prepared id
    keyspace: str | None


@dataclass(frozen=True, slots=True)
class _Member:
    """One statement resolved against the keyspace(s): candidate tables, first most likely."""

    action: str
    tables: tuple[str, ...]


_Prepared = tuple[_Member, ...]

_INSPECTED = frozenset({F.OP_QUERY, F.OP_PREPARE, F.OP_EXECUTE, F.OP_BATCH})
_MAX_HELD = 32768  # error frames held back for the client in v5: one per stream id in flight


class _TooLarge(Exception):
    pass


class CassandraParser(Parser):
    """One connection's parser; see the module docstring."""

    def __init__(self, ctx: ConnectionContext, config: CassandraConfig) -> None:
        self.ctx = ctx
        self.cfg = config
        self.version: int | None = None  # fixed by STARTUP
        self.compression: str | None = None
        self.startup_stream: int | None = None
        self.segments = False  # v5 segment framing in both directions
        self.seg_compressed = False
        self.keyspace: str | None = None
        self.pending_use: dict[int, str] = {}
        self.pending_prepare: dict[int, _Prepared] = {}
        self.prepared: OrderedDict[bytes, _Prepared] = OrderedDict()
        self._queued: tuple[list[Verdict], list[Verdict]] = ([], [])
        # v5 request side: decoded segments at the head of the buffer, and the envelope run.
        self._segcache: list[F.Segment] = []
        self._run_left = 0
        self._run_drop = False
        # v5 reply side: the envelope being reassembled.
        self._rx_hdr = bytearray()
        self._rx_head: F.FrameHeader | None = None
        self._rx_left = 0
        self._rx_body = bytearray()
        self._rx_keep = False
        self._held: list[bytes] = []
        # Requests forwarded and not yet answered, per stream id; a close waits for them.
        self._inflight: dict[int, int] = {}
        self._closing = 0  # the error code of a close waiting for replies owed
        self._close_reason = ""
        self._tail = False  # the last reply owed still has its last byte to send

    # --- entry point -------------------------------------------------------------------------

    def on_data(self, reply: bool, end_stream: bool, data: Data) -> Verdict:
        queued = self._queued[reply]
        if queued:
            return queued.pop(0)
        if not data:
            return NOP_VERDICT
        if reply:
            if self._tail:
                if self._closing:
                    return self._finish(bytes(data[:1]))
                self._tail = False
                if self._held:  # answers that waited for the end of that reply
                    held = b"".join(self._held)
                    self._held.clear()
                    self.ctx.inject(True, held)
                    if len(data) > 1:
                        self._queued[True].append((INJECT, len(held)))
                return PASS, 1
            try:
                return self._reply_segments(data) if self.segments else self._reply_frames(data)
            except F.Malformed:
                return ERROR, ERROR_PROTOCOL
        if self._closing:
            return self._closed_request(len(data))
        try:
            verdict = self._request_segments(data) if self.segments else self._request_frames(data)
        except F.Malformed as exc:
            return self._close(ERROR_PROTOCOL, f"malformed request: {exc}", len(data))
        if verdict[0] == ERROR:
            return self._close(verdict[1], f"protocol error {verdict[1]} in a request", len(data))
        return verdict

    # --- closing after the replies owed ------------------------------------------------------

    def _sent(self, stream: int) -> None:
        self._inflight[stream] = self._inflight.get(stream, 0) + 1

    def _answered(self, stream: int) -> None:
        n = self._inflight.get(stream)
        if n is not None:
            if n > 1:
                self._inflight[stream] = n - 1
            else:
                del self._inflight[stream]

    def _owed(self) -> bool:
        return bool(self._inflight) or self._tail or (self.segments and self._rx_in_envelope())

    def _close(self, code: int, reason: str, have: int) -> Verdict:
        """Close once every reply owed is delivered; client bytes are dropped meanwhile."""
        self._closing = code
        self._close_reason = reason
        return self._closed_request(have)

    def _closed_request(self, have: int) -> Verdict:
        if not self._owed():
            return self._finish(b"")
        return DROP, have

    def _finish(self, last: bytes) -> Verdict:
        out = last + b"".join(self._held)
        self._held.clear()
        self._tail = False
        if out:
            self.ctx.inject(True, out)
        self.ctx.log(EntryType.RESPONSE, {"error": self._close_reason})
        return ERROR, self._closing

    def _last_reply(self, n: int, have: int, data: Data) -> Verdict:
        """PASS a reply of ``n`` bytes; the last one owed keeps its last byte (see above)."""
        if not self._inflight and (self._closing or n > have):
            if n > 1:
                self._tail = True
                return PASS, n - 1
            if self._closing:
                return self._finish(bytes(data[:1]))
        return PASS, n

    # --- requests, v3/v4 framing -------------------------------------------------------------

    def _request_frames(self, data: Data) -> Verdict:
        hl = 8 if data[0] & F.VERSION_MASK in (1, 2) else F.HEADER_LEN
        if len(data) < hl:
            return MORE, hl - len(data)
        if hl == 8:
            return self._unsupported_version(data)
        h = F.parse_header(data)
        if h.version not in F.SUPPORTED_VERSIONS:
            return self._unsupported_version(data)
        if h.response or h.opcode not in F.REQUEST_OPCODES:
            return ERROR, ERROR_INVALID_FRAME_TYPE
        if h.length > self.cfg.max_frame_bytes:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        if self.version is not None and h.version != self.version:
            return ERROR, ERROR_PROTOCOL
        total = h.total
        if h.opcode == F.OP_STARTUP:
            if total > self.cfg.max_inspect_bytes:
                return ERROR, ERROR_INVALID_FRAME_LENGTH
            if len(data) < total:
                return MORE, total - len(data)
            verdict = self._startup(h, data)
            if verdict[0] == PASS:
                self._sent(h.stream)
            return verdict
        if h.opcode not in _INSPECTED:
            self._sent(h.stream)
            return PASS, total
        try:
            r = self._body(h, data)
            parsed = self._parse_request(h, r)
            if r.pos > self.cfg.max_inspect_bytes:  # judged the same however the bytes were cut
                raise _TooLarge
        except F.Short as short:
            need = short.need if not h.flags & F.FLAG_COMPRESSED else total
            if need > self.cfg.max_inspect_bytes:
                return self._deny_unjudged(h, total, "request too large to inspect")
            return MORE, need - len(data)
        except _TooLarge:
            return self._deny_unjudged(h, total, "request too large to inspect")
        allowed, answer = self._decide(h, parsed)
        if answer:
            self._send_client(answer)
        if allowed:
            self._sent(h.stream)
        return (PASS if allowed else DROP), total

    def _body(self, h: F.FrameHeader, data: Data) -> F.Reader:
        """A reader over the body of the frame at the head of ``data``, decompressed if need be."""
        start = F.HEADER_LEN
        end = start + h.length
        if h.flags & F.FLAG_COMPRESSED:
            if self.compression is None:
                raise F.Malformed("compressed frame without negotiated compression")
            if h.length > self.cfg.max_inspect_bytes:
                raise _TooLarge
            if len(data) < end:
                raise F.Short(end)
            try:
                out = F.decompress_body(
                    self.compression, memoryview(data)[start:end], self.cfg.max_inspect_bytes
                )
            except F.Short as exc:
                raise _TooLarge from exc
            return F.Reader(out, 0, len(out), True)
        return F.Reader(data, start, end, len(data) >= end)

    def _startup(self, h: F.FrameHeader, data: Data) -> Verdict:
        options = F.Reader(data, 9, h.total, True).string_map()
        algo = options.get("COMPRESSION")
        if algo is not None:
            algo = algo.lower()
            if algo not in F.available_compressions() or (h.version >= 5 and algo != "lz4"):
                msg = f"proxyd cannot inspect {algo!r} compression on protocol v{h.version}"
                self._send_client(F.protocol_error_frame(h.version, h.stream, msg))
                return DROP, h.total
        self.version = h.version
        self.compression = algo
        self.startup_stream = h.stream
        return PASS, h.total

    def _unsupported_version(self, data: Data) -> Verdict:
        """A frame of a protocol version proxyd cannot inspect, before STARTUP.

        Answered as a Cassandra server does, so drivers negotiating a version downgrade; once
        a version is set, a frame of another one is a protocol error.
        """
        v = data[0] & F.VERSION_MASK
        if self.version is not None or data[0] & F.RESPONSE_BIT:
            return ERROR, ERROR_PROTOCOL
        if v in (1, 2):
            stream = data[2]
            length = int.from_bytes(data[4:8], "big")
            total = 8 + length
        else:
            h = F.parse_header(data)
            stream, total = h.stream, h.total
            length = h.length
        if length > self.cfg.max_frame_bytes:
            return ERROR, ERROR_INVALID_FRAME_LENGTH
        msg = f"Invalid or unsupported protocol version ({v}); supported versions are (3/v3, 4/v4, 5/v5)"
        self._send_client(F.protocol_error_frame(4, stream, msg))
        return DROP, total

    # --- request bodies ----------------------------------------------------------------------

    def _parse_request(self, h: F.FrameHeader, r: F.Reader) -> _Query | _Execute | _Batch:
        """Read what decides a QUERY, PREPARE, EXECUTE or BATCH (raises Short or Malformed)."""
        if h.flags & F.FLAG_CUSTOM_PAYLOAD:
            r.skip_bytes_map()
        v5 = h.version >= 5
        if h.opcode in (F.OP_QUERY, F.OP_PREPARE):
            text = r.long_string()
            keyspace = None
            if v5:
                if h.opcode == F.OP_PREPARE:
                    if r.int32() & F.PREPARE_KEYSPACE:
                        keyspace = r.string()
                else:
                    keyspace = self._params_keyspace(r)
            return _Query(text, keyspace)
        if h.opcode == F.OP_EXECUTE:
            return _Execute(r.short_bytes())
        # BATCH: type, n, then n x (kind, query-or-id, values), then parameters.
        r.byte()
        members: list[str | bytes] = []
        for _ in range(r.short()):
            kind = r.byte()
            if kind == 0:
                members.append(r.long_string())
            elif kind == 1:
                members.append(r.short_bytes())
            else:
                raise F.Malformed("bad batch member kind")
            for _ in range(r.short()):
                r.skip_bytes()
        keyspace = None
        if v5:
            r.short()
            flags = r.int32()
            if flags & F.QF_SERIAL_CONSISTENCY:
                r.short()
            if flags & F.QF_TIMESTAMP:
                r.skip(8)
            if flags & F.QF_KEYSPACE:
                keyspace = r.string()
        return _Batch(tuple(members), keyspace)

    @staticmethod
    def _params_keyspace(r: F.Reader) -> str | None:
        """The v5 ``keyspace`` query parameter, reading no further than needed."""
        r.short()  # consistency
        flags = r.int32()
        if not flags & F.QF_KEYSPACE:
            return None
        if flags & F.QF_VALUES:
            for _ in range(r.short()):
                if flags & F.QF_NAMES:
                    r.skip(r.short())
                r.skip_bytes()
        if flags & F.QF_PAGE_SIZE:
            r.skip(4)
        if flags & F.QF_PAGING_STATE:
            r.skip_bytes()
        if flags & F.QF_SERIAL_CONSISTENCY:
            r.skip(2)
        if flags & F.QF_TIMESTAMP:
            r.skip(8)
        return r.string()

    # --- decisions ---------------------------------------------------------------------------

    def _keyspaces(self, explicit: str | None) -> tuple[str | None, ...]:
        if explicit is not None:
            return (explicit,)
        out: list[str | None] = list(dict.fromkeys(reversed(self.pending_use.values())))
        if self.keyspace not in out:
            out.append(self.keyspace)
        return tuple(out)

    def _resolve(self, st: Statement, explicit: str | None) -> _Member:
        if st.target is None or st.scope == "none":
            return _Member(st.action, ("",))
        if st.scope == "keyspace":
            return _Member(st.action, (st.target.name,))
        if st.target.keyspace is not None:
            return _Member(st.action, (f"{st.target.keyspace}.{st.target.name}",))
        name = st.target.name
        tables = tuple(f"{ks}.{name}" if ks else name for ks in self._keyspaces(explicit))
        return _Member(st.action, tables)

    def _members(self, text: str, explicit: str | None) -> _Prepared:
        return tuple(self._resolve(st, explicit) for st in classify(text))

    def _allowed(self, m: _Member, opcode: str, stream: int) -> bool:
        if m.action == "use" and not self.cfg.enforce_use:
            return True
        return all(self.ctx.matches(CassandraRequest(m.action, t, opcode, stream)) for t in m.tables)

    def _decide(self, h: F.FrameHeader, parsed: _Query | _Execute | _Batch) -> tuple[bool, bytes]:
        """Check policy, log, update state; returns (allowed, frame to send to the client)."""
        opcode = F.OPCODE_NAMES[h.opcode]
        stream = h.stream
        if isinstance(parsed, _Query):
            members = self._members(parsed.text, parsed.keyspace)
            if h.opcode == F.OP_PREPARE:
                if self.cfg.check_prepare and not self._check(members, opcode, stream):
                    return False, self._wrap(F.unauthorized_frame(h.version, stream))
                if not self.cfg.check_prepare:
                    self._log_all(EntryType.REQUEST, members, opcode, stream)
                self.pending_prepare[stream] = members
                return True, b""
            if not self._check(members, opcode, stream):
                return False, self._wrap(F.unauthorized_frame(h.version, stream))
            for m in members:
                if m.action == "use":
                    self.pending_use[stream] = m.tables[0]
            return True, b""
        ids = [parsed.prepared_id] if isinstance(parsed, _Execute) else parsed.members
        members_l: list[_Member] = []
        for item in ids:
            if isinstance(item, bytes):
                known = self.prepared.get(item)
                if known is None:
                    self.ctx.log(
                        EntryType.DENIED,
                        {"stream": stream, "opcode": opcode, "error": "unknown prepared id"},
                    )
                    return False, self._wrap(F.unprepared_frame(h.version, stream, item))
                self.prepared.move_to_end(item)
                members_l.extend(known)
            else:
                members_l.extend(self._members(item, parsed.keyspace if isinstance(parsed, _Batch) else None))
        if not self._check(tuple(members_l), opcode, stream):
            return False, self._wrap(F.unauthorized_frame(h.version, stream))
        for m in members_l:
            if m.action == "use":
                self.pending_use[stream] = m.tables[0]
        return True, b""

    def _check(self, members: _Prepared, opcode: str, stream: int) -> bool:
        """Allow only if every member is allowed; logs one entry per member either way."""
        if not all(self._allowed(m, opcode, stream) for m in members):
            # Each member is re-checked before its entry so the line names the policy that
            # decided that member (the context attaches the latest decision to the next line).
            for m in members:
                self._allowed(m, opcode, stream)
                self.ctx.log(EntryType.DENIED, self._fields(m, opcode, stream))
            return False
        for m in members:
            self._allowed(m, opcode, stream)  # re-evaluated so each entry carries its own audit flag
            self.ctx.log(EntryType.REQUEST, self._fields(m, opcode, stream))
        return True

    def _log_all(self, entry: EntryType, members: _Prepared, opcode: str, stream: int) -> None:
        for m in members:
            self.ctx.log(entry, self._fields(m, opcode, stream))

    @staticmethod
    def _fields(m: _Member, opcode: str, stream: int) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "query_action": m.action,
            "query_table": m.tables[0],
            "stream": stream,
            "opcode": opcode,
        }
        if m.action == INVALID:
            fields["error"] = "statement not understood"
        return fields

    def _deny_unjudged(self, h: F.FrameHeader, total: int, why: str) -> Verdict:
        self.ctx.log(EntryType.DENIED, {"stream": h.stream, "opcode": F.OPCODE_NAMES[h.opcode], "error": why})
        self._send_client(self._wrap(F.unauthorized_frame(h.version, h.stream)))
        return DROP, total

    def _wrap(self, frame: bytes) -> bytes:
        """An answer for the client, in segments on a v5 connection."""
        if self.segments:
            return F.encode_segment(frame, True, self.seg_compressed)
        return frame

    def _send_client(self, data: bytes) -> None:
        """Queue bytes for the client, holding them while a v5 reply envelope is half sent, or
        while the last byte of a reply is still to pass (see the module docstring)."""
        if self._tail or (self.segments and self._rx_in_envelope()):
            if len(self._held) >= _MAX_HELD:
                raise F.Malformed("too many answers held back")
            self._held.append(data)
        else:
            self.ctx.inject(True, data)

    # --- requests, v5 segments ---------------------------------------------------------------

    def _request_segments(self, data: Data) -> Verdict:
        cache = self._segcache
        off = sum(s.wire_len for s in cache)
        # Decode every whole segment buffered beyond those already decoded.
        while True:
            hl = F.segment_header_len(self.seg_compressed)
            if len(data) < off + hl:
                break
            wl = F.peek_segment_len(data, off, self.seg_compressed)
            if len(data) < off + wl:
                break
            seg = F.decode_segment(data, off, self.seg_compressed)
            if cache and seg.self_contained:
                break  # the end of a run is judged without what follows it
            cache.append(seg)
            off += wl
            if self._run_left or seg.self_contained:
                break  # one segment is all these cases look at
        if not cache:
            return MORE, self._seg_more(data, off)
        if self._run_left:
            seg = cache.pop(0)
            if seg.self_contained or len(seg.payload) > self._run_left:
                raise F.Malformed("segment does not continue the envelope")
            self._run_left -= len(seg.payload)
            return (DROP if self._run_drop else PASS), seg.wire_len
        if cache[0].self_contained:
            return self._self_contained(cache.pop(0))
        return self._run_start(data, off)

    def _seg_more(self, data: Data, off: int) -> int:
        hl = F.segment_header_len(self.seg_compressed)
        if len(data) < off + hl:
            return off + hl - len(data)
        return off + F.peek_segment_len(data, off, self.seg_compressed) - len(data)

    def _self_contained(self, seg: F.Segment) -> Verdict:
        payload = seg.payload
        envelopes: list[tuple[F.FrameHeader, int]] = []
        pos = 0
        while pos < len(payload):
            if len(payload) - pos < F.HEADER_LEN:
                raise F.Malformed("partial envelope in a self-contained segment")
            h = F.parse_header(payload, pos)
            self._check_envelope(h)
            if pos + h.total > len(payload):
                raise F.Malformed("envelope runs past its self-contained segment")
            envelopes.append((h, pos))
            pos += h.total
        keep: list[bytes] = []
        dropped = 0
        for h, p in envelopes:
            if self._envelope(h, payload, p):
                keep.append(payload[p : p + h.total])
            else:
                dropped += 1
        if not dropped:
            return PASS, seg.wire_len
        if not keep:
            return DROP, seg.wire_len
        rebuilt = F.encode_segment(b"".join(keep), True, self.seg_compressed)
        self.ctx.inject(False, rebuilt)
        self._queued[False].append((DROP, seg.wire_len))
        return INJECT, len(rebuilt)

    def _check_envelope(self, h: F.FrameHeader) -> None:
        if h.response or h.opcode not in F.REQUEST_OPCODES or h.version != self.version:
            raise F.Malformed("bad envelope")
        if h.length > self.cfg.max_frame_bytes:
            raise F.Malformed("envelope too long")

    def _envelope(self, h: F.FrameHeader, payload: bytes, pos: int) -> bool:
        """Judge one whole envelope of a self-contained segment; True to forward it."""
        if h.opcode not in _INSPECTED:
            self._sent(h.stream)
            return True
        parsed = self._parse_request(h, F.Reader(payload, pos + 9, pos + h.total, True))
        allowed, answer = self._decide(h, parsed)
        if answer:
            self._send_client(answer)
        if allowed:
            self._sent(h.stream)
        return allowed

    def _run_start(self, data: Data, off: int) -> Verdict:
        """The first segments of an envelope cut across non-self-contained segments."""
        cache = self._segcache
        if any(s.self_contained for s in cache):
            raise F.Malformed("self-contained segment inside an envelope run")
        wire = sum(s.wire_len for s in cache)
        body = b"".join(s.payload for s in cache)
        h: F.FrameHeader | None = None
        verdict_drop = False
        try:
            if len(body) < F.HEADER_LEN:
                raise F.Short(F.HEADER_LEN)
            h = F.parse_header(body)
            self._check_envelope(h)
            if len(body) > h.total:
                raise F.Malformed("more than one envelope in a segment run")
            if h.opcode in _INSPECTED:
                r = F.Reader(body, 9, h.total, len(body) >= h.total)
                parsed = self._parse_request(h, r)
                if self._run_wire(r.pos) > self.cfg.max_inspect_bytes:
                    raise _TooLarge  # needed more segments than may be buffered
                allowed, answer = self._decide(h, parsed)
                if answer:
                    self._send_client(answer)
                verdict_drop = not allowed
        except (F.Short, _TooLarge) as exc:
            if isinstance(exc, F.Short):
                more = self._seg_more(data, off)
                if more <= 0:
                    raise F.Malformed("envelope run ends early") from None
                if len(data) + more <= self.cfg.max_inspect_bytes:
                    return MORE, more
            if h is None:
                raise F.Malformed("envelope header spread too thin") from None
            self.ctx.log(
                EntryType.DENIED,
                {
                    "stream": h.stream,
                    "opcode": F.OPCODE_NAMES[h.opcode],
                    "error": "request too large to inspect",
                },
            )
            self._send_client(self._wrap(F.unauthorized_frame(h.version, h.stream)))
            verdict_drop = True
        assert h is not None
        cache.clear()
        if not verdict_drop:
            self._sent(h.stream)
        self._run_left = h.total - len(body)
        self._run_drop = verdict_drop
        return (DROP if verdict_drop else PASS), wire

    def _run_wire(self, payload_bytes: int) -> int:
        """Wire bytes of the cached run's segments holding its first ``payload_bytes``."""
        wire = got = 0
        for seg in self._segcache:
            if got >= payload_bytes:
                break
            wire += seg.wire_len
            got += len(seg.payload)
        return wire

    # --- replies, v3/v4 framing --------------------------------------------------------------

    def _reply_frames(self, data: Data) -> Verdict:
        if len(data) < F.HEADER_LEN:
            return MORE, F.HEADER_LEN - len(data)
        h = F.parse_header(data)
        if not h.response or h.opcode not in F.RESPONSE_OPCODES:
            return ERROR, ERROR_INVALID_FRAME_TYPE
        if self._interesting(h):
            try:
                self._learn(h, self._body(h, data))
            except F.Short as short:
                need = short.need if not h.flags & F.FLAG_COMPRESSED else h.total
                if need <= self.cfg.max_inspect_bytes:
                    return MORE, need - len(data)
                self._forget(h.stream)
            except _TooLarge:
                self._forget(h.stream)
        if h.stream == self.startup_stream and h.opcode in (F.OP_READY, F.OP_AUTHENTICATE, F.OP_ERROR):
            self.startup_stream = None
            if h.opcode != F.OP_ERROR and self.version is not None and self.version >= 5:
                self.segments = True
                self.seg_compressed = self.compression == "lz4"
        self._answered(h.stream)
        return self._last_reply(h.total, len(data), data)

    def _interesting(self, h: F.FrameHeader) -> bool:
        """A RESULT or ERROR answering a PREPARE or USE proxyd waits on."""
        return h.opcode in (F.OP_RESULT, F.OP_ERROR) and (
            h.stream in self.pending_prepare or h.stream in self.pending_use
        )

    def _learn(self, h: F.FrameHeader, r: F.Reader) -> None:
        """Read a reply's RESULT kind (Prepared id, Set_keyspace); raises Short for more."""
        stream = h.stream
        if h.opcode == F.OP_ERROR:
            self._forget(stream)
            return
        if h.flags & F.FLAG_TRACING:
            r.skip(16)
        if h.flags & F.FLAG_WARNING:
            r.skip_string_list()
        if h.flags & F.FLAG_CUSTOM_PAYLOAD:
            r.skip_bytes_map()
        kind = r.int32()
        pid = keyspace = None
        if kind == F.RESULT_PREPARED:
            pid = r.short_bytes()
        elif kind == F.RESULT_SET_KEYSPACE:
            keyspace = r.string()
        # Whether a reply is learnt must not depend on how its bytes were cut up.
        if r.pos <= self.cfg.max_inspect_bytes:
            members = self.pending_prepare.get(stream)
            if pid is not None and members is not None:
                self.prepared[pid] = members
                self.prepared.move_to_end(pid)
                while len(self.prepared) > self.cfg.max_prepared:
                    self.prepared.popitem(last=False)
            if keyspace is not None:
                self.keyspace = keyspace
        self._forget(stream)

    def _forget(self, stream: int) -> None:
        self.pending_prepare.pop(stream, None)
        self.pending_use.pop(stream, None)

    # --- replies, v5 segments ----------------------------------------------------------------

    def _rx_in_envelope(self) -> bool:
        return bool(self._rx_hdr) or self._rx_head is not None

    def _reply_segments(self, data: Data) -> Verdict:
        hl = F.segment_header_len(self.seg_compressed)
        if len(data) < hl:
            return MORE, hl - len(data)
        wl = F.peek_segment_len(data, 0, self.seg_compressed)
        if len(data) < wl:
            return MORE, wl - len(data)
        seg = F.decode_segment(data, 0, self.seg_compressed)
        self._rx_feed(seg.payload)
        if seg.self_contained and self._rx_in_envelope():
            raise F.Malformed("self-contained segment ends inside an envelope")
        if self._closing and not self._inflight and not self._rx_in_envelope():
            return self._last_reply(wl, len(data), data)
        if self._held and not self._rx_in_envelope():
            held = b"".join(self._held)
            self._held.clear()
            self.ctx.inject(True, held)
            if len(data) > wl:
                # The round goes on after this PASS: send the answer right behind the segment.
                self._queued[True].append((INJECT, len(held)))
            # else the round ends with this PASS and the engine sends it at the end.
        return PASS, wl

    def _rx_feed(self, payload: bytes) -> None:
        """Reassemble reply envelopes across segments, keeping only the prefixes we read."""
        pos = 0
        n = len(payload)
        while pos < n:
            if self._rx_head is None:
                take = min(F.HEADER_LEN - len(self._rx_hdr), n - pos)
                self._rx_hdr += payload[pos : pos + take]
                pos += take
                if len(self._rx_hdr) < F.HEADER_LEN:
                    return
                h = F.parse_header(self._rx_hdr)
                self._rx_hdr.clear()
                if not h.response or h.opcode not in F.RESPONSE_OPCODES:
                    raise F.Malformed("bad reply envelope")
                self._answered(h.stream)
                self._rx_head = h
                self._rx_left = h.length
                self._rx_body.clear()
                self._rx_keep = self._interesting(h)
            take = min(self._rx_left, n - pos)
            if self._rx_keep and len(self._rx_body) < 65536:
                self._rx_body += payload[pos : pos + min(take, 65536 - len(self._rx_body))]
            pos += take
            self._rx_left -= take
            if self._rx_left == 0:
                h = self._rx_head
                self._rx_head = None
                if self._rx_keep:
                    body = bytes(self._rx_body)
                    try:
                        self._learn(h, F.Reader(body, 0, h.length, len(body) == h.length))
                    except F.Short:
                        self._forget(h.stream)
                self._rx_body.clear()


__all__ = ["CassandraConfig", "CassandraParser", "validate_config"]
