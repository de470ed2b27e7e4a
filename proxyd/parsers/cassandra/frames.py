"""CQL native protocol framing: v3/v4 frame headers, v5 segments, body readers, compression.

Wire formats (Apache Cassandra ``doc/native_protocol_v4.spec`` and ``native_protocol_v5.spec``):

- **Frame / envelope** (v3, v4, and the v5 "envelope")::

      version(1) flags(1) stream(2, signed) opcode(1) length(4) body(length)

  The top bit of ``version`` is the direction (1 = response); the rest is the protocol version.
  Flags: 0x01 compressed body (v3/v4 only), 0x02 tracing, 0x04 custom payload, 0x08 warning,
  0x10 use-beta. A request body starts with a ``[bytes map]`` custom payload when 0x04 is set;
  a response body starts with the tracing ``[uuid]`` (0x02), the ``[string list]`` warnings
  (0x08) and the custom payload (0x04), in that order.

- **Segment** (v5, after STARTUP/READY)::

      header (3 bytes LE: payload length 17 bits, self-contained flag bit 17)      uncompressed
      header (5 bytes LE: payload length 17, uncompressed length 17, flag bit 34)  compressed
      CRC24 of the header (3 bytes LE)
      payload (at most 128 KiB - 1)
      CRC32 of the payload (4 bytes LE, zlib CRC32 seeded with CRC32 of fa 2d 55 ca)

  A compressed header with an uncompressed length of 0 carries an uncompressed payload. A
  self-contained segment holds one or more whole envelopes; a large envelope is cut into
  a run of non-self-contained segments that hold nothing else.

- **Compression**: lz4 (v4: body = 4-byte big-endian uncompressed length + lz4 block; v5: the
  segment payload is the bare block, its length is in the header) and snappy (v4 only).

Everything here is pure functions over bytes; :class:`Reader` raises :class:`Short` (how many
bytes it needed) or :class:`Malformed` so the parser can ask for MORE or fail closed.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

HEADER_LEN: Final = 9
RESPONSE_BIT: Final = 0x80
VERSION_MASK: Final = 0x7F
SUPPORTED_VERSIONS: Final = frozenset({3, 4, 5})

FLAG_COMPRESSED: Final = 0x01
FLAG_TRACING: Final = 0x02
FLAG_CUSTOM_PAYLOAD: Final = 0x04
FLAG_WARNING: Final = 0x08

# Opcodes (spec section 2.4).
OP_ERROR: Final = 0x00
OP_STARTUP: Final = 0x01
OP_READY: Final = 0x02
OP_AUTHENTICATE: Final = 0x03
OP_OPTIONS: Final = 0x05
OP_SUPPORTED: Final = 0x06
OP_QUERY: Final = 0x07
OP_RESULT: Final = 0x08
OP_PREPARE: Final = 0x09
OP_EXECUTE: Final = 0x0A
OP_REGISTER: Final = 0x0B
OP_EVENT: Final = 0x0C
OP_BATCH: Final = 0x0D
OP_AUTH_CHALLENGE: Final = 0x0E
OP_AUTH_RESPONSE: Final = 0x0F
OP_AUTH_SUCCESS: Final = 0x10

OPCODE_NAMES: Final = {
    OP_ERROR: "error",
    OP_STARTUP: "startup",
    OP_READY: "ready",
    OP_AUTHENTICATE: "authenticate",
    OP_OPTIONS: "options",
    OP_SUPPORTED: "supported",
    OP_QUERY: "query",
    OP_RESULT: "result",
    OP_PREPARE: "prepare",
    OP_EXECUTE: "execute",
    OP_REGISTER: "register",
    OP_EVENT: "event",
    OP_BATCH: "batch",
    OP_AUTH_CHALLENGE: "auth_challenge",
    OP_AUTH_RESPONSE: "auth_response",
    OP_AUTH_SUCCESS: "auth_success",
}
REQUEST_OPCODES: Final = frozenset(
    {OP_STARTUP, OP_OPTIONS, OP_QUERY, OP_PREPARE, OP_EXECUTE, OP_REGISTER, OP_BATCH, OP_AUTH_RESPONSE}
)
RESPONSE_OPCODES: Final = frozenset(
    {
        OP_ERROR,
        OP_READY,
        OP_AUTHENTICATE,
        OP_SUPPORTED,
        OP_RESULT,
        OP_EVENT,
        OP_AUTH_CHALLENGE,
        OP_AUTH_SUCCESS,
    }
)

# RESULT kinds (section 4.2.5).
RESULT_VOID: Final = 1
RESULT_ROWS: Final = 2
RESULT_SET_KEYSPACE: Final = 3
RESULT_PREPARED: Final = 4
RESULT_SCHEMA_CHANGE: Final = 5

# Error codes (section 9).
ERR_PROTOCOL: Final = 0x000A
ERR_UNAUTHORIZED: Final = 0x2100
ERR_UNPREPARED: Final = 0x2500

# Query parameter flags (v4: one byte, v5: an int).
QF_VALUES: Final = 0x01
QF_PAGE_SIZE: Final = 0x04
QF_PAGING_STATE: Final = 0x08
QF_SERIAL_CONSISTENCY: Final = 0x10
QF_TIMESTAMP: Final = 0x20
QF_NAMES: Final = 0x40
QF_KEYSPACE: Final = 0x80  # v5
PREPARE_KEYSPACE: Final = 0x01  # v5 PREPARE flag

# v5 segments.
MAX_SEGMENT_PAYLOAD: Final = 128 * 1024 - 1
SEG_HEADER_PLAIN: Final = 3
SEG_HEADER_COMPRESSED: Final = 5
CRC24_LEN: Final = 3
CRC32_LEN: Final = 4
_CRC24_INIT: Final = 0x875060
_CRC24_POLY: Final = 0x1974F0B
_CRC32_SEED: Final = zlib.crc32(b"\xfa\x2d\x55\xca")

_HDR = struct.Struct(">BBhBI")


class Malformed(Exception):
    """The bytes break the protocol; the connection must close."""


class Short(Exception):
    """More bytes are needed: ``need`` is the total length (from the reader's start) required."""

    def __init__(self, need: int) -> None:
        self.need = need
        super().__init__(need)


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The 9-byte header of a frame (v3/v4) or an envelope (v5)."""

    version: int  # protocol version, direction bit removed
    response: bool
    flags: int
    stream: int
    opcode: int
    length: int  # body length

    @property
    def total(self) -> int:
        return HEADER_LEN + self.length


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> FrameHeader:
    """Decode a frame header at ``offset``; the caller ensures 9 bytes are there."""
    v, flags, stream, opcode, length = _HDR.unpack_from(data, offset)
    return FrameHeader(v & VERSION_MASK, bool(v & RESPONSE_BIT), flags, stream, opcode, length)


def build_frame(version: int, response: bool, stream: int, opcode: int, body: bytes, flags: int = 0) -> bytes:
    """Encode one uncompressed frame (v3/v4) or envelope (v5)."""
    v = (version & VERSION_MASK) | (RESPONSE_BIT if response else 0)
    return _HDR.pack(v, flags, stream, opcode, len(body)) + body


def error_body(code: int, message: str, extra: bytes = b"") -> bytes:
    """The body of an ERROR response: ``[int] code [string] message`` then code-specific data."""
    msg = message.encode()
    return struct.pack(">iH", code, len(msg)) + msg + extra


def unauthorized_frame(version: int, stream: int) -> bytes:
    """ERROR 0x2100 ``Request Unauthorized`` answering ``stream`` (as Cilium's proxylib does)."""
    return build_frame(version, True, stream, OP_ERROR, error_body(ERR_UNAUTHORIZED, "Request Unauthorized"))


def unprepared_frame(version: int, stream: int, prepared_id: bytes) -> bytes:
    """ERROR 0x2500 Unprepared with the unknown ``[short bytes]`` id, so the driver re-prepares."""
    extra = struct.pack(">H", len(prepared_id)) + prepared_id
    body = error_body(ERR_UNPREPARED, "Prepared query with ID not found (proxyd)", extra)
    return build_frame(version, True, stream, OP_ERROR, body)


def protocol_error_frame(version: int, stream: int, message: str) -> bytes:
    return build_frame(version, True, stream, OP_ERROR, error_body(ERR_PROTOCOL, message))


# --- body reader ------------------------------------------------------------------------------


class Reader:
    """Reads spec notations from a body; raises :class:`Short` past ``limit``.

    ``complete`` says whether ``data`` holds the whole body: if so, running out of bytes is
    :class:`Malformed` rather than :class:`Short`.
    """

    __slots__ = ("complete", "data", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, start: int, end: int, complete: bool) -> None:
        self.data = data
        self.pos = start
        self.end = end  # end of the body in ``data`` coordinates (may exceed len(data))
        self.complete = complete

    def _take(self, n: int) -> int:
        if n < 0:
            raise Malformed("negative length")
        p = self.pos
        if p + n > self.end:
            raise Malformed("field runs past the end of the body")
        if p + n > len(self.data):
            if self.complete:
                raise Malformed("truncated body")
            raise Short(p + n)
        self.pos = p + n
        return p

    def byte(self) -> int:
        p = self._take(1)
        return self.data[p]

    def short(self) -> int:
        p = self._take(2)
        return int.from_bytes(self.data[p : p + 2], "big")

    def int32(self) -> int:
        p = self._take(4)
        return int.from_bytes(self.data[p : p + 4], "big", signed=True)

    def raw(self, n: int) -> bytes:
        p = self._take(n)
        return bytes(self.data[p : p + n])

    def skip(self, n: int) -> None:
        self._take(n)

    def string(self) -> str:
        return self._decode(self.raw(self.short()))

    def long_string(self) -> str:
        n = self.int32()
        if n < 0:
            raise Malformed("negative [long string] length")
        return self._decode(self.raw(n))

    def short_bytes(self) -> bytes:
        return self.raw(self.short())

    def skip_bytes(self) -> None:
        """Skip a ``[bytes]`` or ``[value]`` (negative lengths are null / not set)."""
        n = self.int32()
        if n < -2:
            raise Malformed("bad [value] length")
        if n > 0:
            self.skip(n)

    def skip_string_list(self) -> None:
        for _ in range(self.short()):
            self.skip(self.short())

    def skip_bytes_map(self) -> None:
        for _ in range(self.short()):
            self.skip(self.short())
            self.skip_bytes()

    def string_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.short()):
            k = self.string()
            out[k] = self.string()
        return out

    @staticmethod
    def _decode(b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Malformed("invalid UTF-8") from exc


# --- compression -----------------------------------------------------------------------------


def available_compressions() -> frozenset[str]:
    """The STARTUP ``COMPRESSION`` values this process can decompress for inspection."""
    out = set()
    try:
        import lz4.block  # noqa: F401

        out.add("lz4")
    except ImportError:  # pragma: no cover - lz4 is a test dependency
        pass
    try:
        import snappy  # noqa: F401

        out.add("snappy")
    except ImportError:  # pragma: no cover
        pass
    return frozenset(out)


def lz4_block_decompress(block: bytes | bytearray | memoryview, size: int, cap: int) -> bytes:
    """Decompress a bare lz4 block of ``size`` bytes; refuses sizes over ``cap``."""
    if size > cap:
        raise Short(size)  # caller translates: too large to inspect
    import lz4.block

    try:
        out: bytes = lz4.block.decompress(bytes(block), uncompressed_size=size)
    except Exception as exc:  # the library raises LZ4BlockError and friends
        raise Malformed(f"lz4: {exc}") from exc
    if len(out) != size:
        raise Malformed("lz4: wrong uncompressed length")
    return out


def decompress_body(algo: str, body: bytes | bytearray | memoryview, cap: int) -> bytes:
    """Decompress a v3/v4 frame body compressed with ``algo`` (``lz4`` or ``snappy``).

    Raises :class:`Malformed` on corrupt input, :class:`Short` (with the uncompressed size)
    when the result would exceed ``cap`` bytes (the caller fails closed).
    """
    if algo == "lz4":
        if len(body) < 4:
            raise Malformed("lz4 body without its length")
        size = int.from_bytes(body[:4], "big", signed=True)
        if size < 0:
            raise Malformed("negative lz4 length")
        if size == 0:
            return b""
        return lz4_block_decompress(memoryview(body)[4:], size, cap)
    if algo == "snappy":
        size = _snappy_length(body)
        if size > cap:
            raise Short(size)
        import snappy

        try:
            out: bytes = snappy.decompress(bytes(body))
        except Exception as exc:
            raise Malformed(f"snappy: {exc}") from exc
        if len(out) != size:
            raise Malformed("snappy: wrong uncompressed length")
        return out
    raise Malformed(f"unsupported compression {algo!r}")


def _snappy_length(body: bytes | bytearray | memoryview) -> int:
    """The uncompressed length varint that starts a raw snappy block."""
    result = shift = 0
    for i in range(min(len(body), 5)):
        b = body[i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    raise Malformed("snappy: bad length varint")


# --- v5 segments -----------------------------------------------------------------------------


def _crc24_table() -> list[int]:
    table = []
    for b in range(256):
        crc = b << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= _CRC24_POLY
        table.append(crc & 0xFFFFFF)
    return table


_CRC24_TABLE: Final = _crc24_table()


def crc24(data: bytes | bytearray | memoryview) -> int:
    """CRC24 of a segment header, as the v5 spec (and every driver) computes it."""
    crc = _CRC24_INIT
    for b in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ _CRC24_TABLE[((crc >> 16) ^ b) & 0xFF]
    return crc


def crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data, _CRC32_SEED) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Segment:
    """One decoded v5 segment: its size on the wire and its (decompressed) payload."""

    wire_len: int
    payload: bytes
    self_contained: bool


def segment_header_len(compressed: bool) -> int:
    return (SEG_HEADER_COMPRESSED if compressed else SEG_HEADER_PLAIN) + CRC24_LEN


def peek_segment_len(data: bytes | bytearray | memoryview, offset: int, compressed: bool) -> int:
    """The wire length of the segment at ``offset`` (header, CRC24, payload, CRC32).

    The caller ensures the header and its CRC are buffered. Raises :class:`Malformed` on a
    header CRC mismatch.
    """
    hl = SEG_HEADER_COMPRESSED if compressed else SEG_HEADER_PLAIN
    hdr = data[offset : offset + hl]
    want = int.from_bytes(data[offset + hl : offset + hl + CRC24_LEN], "little")
    if crc24(hdr) != want:
        raise Malformed("segment header CRC24 mismatch")
    payload_len = int.from_bytes(hdr, "little") & MAX_SEGMENT_PAYLOAD
    return hl + CRC24_LEN + payload_len + CRC32_LEN


def decode_segment(
    data: bytes | bytearray | memoryview, offset: int, compressed: bool, cap: int = MAX_SEGMENT_PAYLOAD
) -> Segment:
    """Decode and check the whole segment at ``offset`` (the caller ensures it is buffered)."""
    hl = SEG_HEADER_COMPRESSED if compressed else SEG_HEADER_PLAIN
    wire_len = peek_segment_len(data, offset, compressed)
    h = int.from_bytes(data[offset : offset + hl], "little")
    payload_len = h & MAX_SEGMENT_PAYLOAD
    h >>= 17
    ulen = 0
    if compressed:
        ulen = h & MAX_SEGMENT_PAYLOAD
        h >>= 17
    self_contained = bool(h & 1)
    p = offset + hl + CRC24_LEN
    payload = bytes(data[p : p + payload_len])
    want = int.from_bytes(data[p + payload_len : p + payload_len + CRC32_LEN], "little")
    if crc32(payload) != want:
        raise Malformed("segment payload CRC32 mismatch")
    if compressed and ulen:
        try:
            payload = lz4_block_decompress(payload, ulen, cap)
        except Short as exc:  # cannot happen: ulen has 17 bits
            raise Malformed("segment too large") from exc
    return Segment(wire_len, payload, self_contained)


def encode_segment(payload: bytes, self_contained: bool = True, compressed: bool = False) -> bytes:
    """Encode ``payload`` as one segment, never compressing it.

    On a connection that negotiated lz4 the 5-byte header is used with an uncompressed length
    of 0, which the spec defines as "payload not compressed".
    """
    if len(payload) > MAX_SEGMENT_PAYLOAD:
        raise ValueError("segment payload too long")
    h = len(payload)
    flag_at = 17
    hl = SEG_HEADER_PLAIN
    if compressed:
        flag_at = 34
        hl = SEG_HEADER_COMPRESSED
    if self_contained:
        h |= 1 << flag_at
    hdr = h.to_bytes(hl, "little")
    return hdr + crc24(hdr).to_bytes(3, "little") + payload + crc32(payload).to_bytes(4, "little")


def encode_segments(payload: bytes, compressed: bool = False) -> bytes:
    """Encode a message as one self-contained segment or a run of non-self-contained ones."""
    if len(payload) <= MAX_SEGMENT_PAYLOAD:
        return encode_segment(payload, True, compressed)
    parts = [payload[i : i + MAX_SEGMENT_PAYLOAD] for i in range(0, len(payload), MAX_SEGMENT_PAYLOAD)]
    return b"".join(encode_segment(p, False, compressed) for p in parts)
