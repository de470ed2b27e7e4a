"""A sans-IO reader for the TLS ClientHello: enough to decide a connection, nothing more.

Theory of operation. A TLS client speaks first: its first flight is a ClientHello handshake
message carried in one or more plaintext handshake records (RFC 8446 §5.1, RFC 5246 §6.2).
proxyd reads that message, up to a bound, before it connects upstream, decides on the SNI it
carries (``toPorts[].serverNames``, docs/policy.md), and then relays every byte it read, and
all that follow, untouched. It never terminates TLS, so only the ClientHello is ever parsed.

Wire format::

    record:     type(1)=22 version(2)=03 0x length(2) fragment      (fragment <= 2^14 bytes)
    handshake:  msg_type(1)=1 length(3) body                         (may span several records)
    body:       legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
                compression_methods<1..2^8-1> [extensions<0..2^16-1>]
    extension:  type(2) length(2) data
      server_name (0):              list<1..> of name_type(1) name<1..2^16-1>; host_name = 0
      alpn (16):                    list<2..> of protocol_name<1..2^8-1>
      supported_versions (43):      versions<2..254> of uint16

The reader is the same three-outcome machine as h11's readers (an event, a protocol error, or
"need more data"), plus "this is not TLS at all":

- :data:`NEED_MORE`: every byte so far is consistent with a ClientHello still arriving;
- :data:`HELLO`: a complete ClientHello (:class:`ClientHello`: SNI, ALPN, versions);
- :data:`NOT_TLS`: the stream does not start with a TLS handshake record (plain text, an
  SSLv2-format hello, anything else): the caller closes without an answer;
- :data:`MALFORMED`: it starts like TLS but breaks the framing, is not a ClientHello, or grows
  past the bound: no SNI can be trusted from it.

What it accepts: record versions 3.0-3.4 (TLS 1.0-1.3 clients put 3.1 or 3.3 there), a
ClientHello split over any number of handshake records and any number of reads, extensions
in any order, GREASE (RFC 8701) and unknown extensions and name types skipped, ECH outer
hellos (the SNI read is the outer, public name). What it refuses: another content type or a
zero-length record before the hello is complete, a record over 2^14 bytes, a first handshake
message that is not a ClientHello, length fields that disagree, a duplicated extension, two
host names, an empty host name or ALPN list, a hello larger than the bound.

No asyncio, no sockets, no clock: it is fed bytes and answers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

HANDSHAKE: Final = 22
ALERT: Final = 21
CLIENT_HELLO: Final = 1
RECORD_HEADER: Final = 5
MAX_FRAGMENT: Final = 1 << 14
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43
HOST_NAME: Final = 0
#: alert level fatal, description access_denied (RFC 8446 §6).
ACCESS_DENIED: Final = 49


class Kind(enum.Enum):
    NEED_MORE = "need_more"
    HELLO = "hello"
    NOT_TLS = "not_tls"
    MALFORMED = "malformed"


NEED_MORE: Final = Kind.NEED_MORE
HELLO: Final = Kind.HELLO
NOT_TLS: Final = Kind.NOT_TLS
MALFORMED: Final = Kind.MALFORMED


def is_grease(value: int) -> bool:
    """RFC 8701 values (0x0a0a, 0x1a1a, ... 0xfafa): sent to keep servers tolerant, meaning nothing."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What proxyd uses of a ClientHello.

    ``sni`` is the host_name of the server_name extension as sent (bytes; None when the
    client sent none). ``versions`` are the offered protocol versions: supported_versions
    without GREASE, or the legacy version when that extension is absent (0x0303 = TLS 1.2).
    """

    record_version: int
    legacy_version: int
    sni: bytes | None
    alpn: tuple[bytes, ...]
    versions: tuple[int, ...]
    size: int  # bytes of the handshake message, header included


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    hello: ClientHello | None = None
    #: Why NOT_TLS or MALFORMED (for the log); empty otherwise.
    reason: str = ""
    #: The version of the first record when the stream started with a handshake record
    #: (what the access_denied alert is sent with), else None.
    record_version: int | None = None
    #: At NEED_MORE: at least this many more bytes are needed.
    need: int = 0


class _Malformed(Exception):
    pass


class ClientHelloReader:
    """Reads one ClientHello from the first bytes a client sends; see the module docstring.

    :meth:`feed` takes the next bytes (any segmentation) and answers an :class:`Outcome`;
    after the first outcome that is not NEED_MORE, the answer is final and later input is
    ignored. ``limit`` bounds the bytes held (``limits.buffer_bytes``); :attr:`data` is every
    byte fed until the decision, to be forwarded byte-exact once allowed.
    """

    __slots__ = ("_done", "_hs", "_pos", "_record_version", "data", "limit")

    def __init__(self, limit: int) -> None:
        if limit < RECORD_HEADER + 4:
            raise ValueError(f"limit must be at least {RECORD_HEADER + 4} bytes")
        self.limit = limit
        self.data = bytearray()
        self._pos = 0  # raw bytes consumed as whole records
        self._hs = bytearray()  # handshake bytes gathered from those records
        self._record_version: int | None = None
        self._done: Outcome | None = None

    @property
    def outcome(self) -> Outcome | None:
        """The final outcome, once there is one."""
        return self._done

    def feed(self, chunk: bytes | bytearray) -> Outcome:
        if self._done is not None:
            return self._done
        self.data += chunk
        out = self._step()
        if out.kind is not NEED_MORE:
            self._done = out
        elif len(self.data) > self.limit:
            self._done = out = self._bad(f"ClientHello larger than the limit ({self.limit} bytes)")
        return out

    def _bad(self, why: str) -> Outcome:
        return Outcome(MALFORMED, reason=why, record_version=self._record_version)

    def _step(self) -> Outcome:
        data = self.data
        if self._record_version is None:
            if not data:
                return Outcome(NEED_MORE, need=1)
            # Decide "is this TLS at all" on as few bytes as possible: plain text and SSLv2
            # hellos (first byte 0x80..) fail on the first byte, a non-3.x version on the third.
            if data[0] != HANDSHAKE:
                return Outcome(NOT_TLS, reason="does not start with a TLS handshake record")
            if len(data) >= 2 and data[1] != 3:
                return Outcome(NOT_TLS, reason="not a TLS record version")
            if len(data) >= 3 and data[2] > 4:
                return Outcome(NOT_TLS, reason="not a TLS record version")
            if len(data) < RECORD_HEADER:
                return Outcome(NEED_MORE, need=RECORD_HEADER - len(data))
            self._record_version = (data[1] << 8) | data[2]
        try:
            while True:
                hello = self._hello()
                if hello is not None:
                    return Outcome(HELLO, hello, record_version=self._record_version)
                pos = self._pos
                if len(data) - pos < RECORD_HEADER:
                    return Outcome(
                        NEED_MORE, record_version=self._record_version, need=RECORD_HEADER - (len(data) - pos)
                    )
                ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
                length = (data[pos + 3] << 8) | data[pos + 4]
                if ctype != HANDSHAKE:
                    raise _Malformed(f"record of content type {ctype} before the ClientHello is complete")
                if major != 3 or minor > 4:
                    raise _Malformed(f"record version {major}.{minor}")
                if length == 0:
                    raise _Malformed("empty handshake record")
                if length > MAX_FRAGMENT:
                    raise _Malformed(f"record of {length} bytes (more than 2^14)")
                end = pos + RECORD_HEADER + length
                if end > len(data):
                    if len(self._hs) < 4:
                        # Judge the handshake header without waiting for the whole record.
                        start = pos + RECORD_HEADER
                        self._header(self._hs + data[start : start + 4 - len(self._hs)])
                    return Outcome(NEED_MORE, record_version=self._record_version, need=end - len(data))
                self._hs += data[pos + RECORD_HEADER : end]
                self._pos = end
        except _Malformed as exc:
            return self._bad(str(exc))

    def _hello(self) -> ClientHello | None:
        """The ClientHello once its handshake bytes are all in, else None (raises _Malformed)."""
        hs = self._hs
        length = self._header(hs)
        if length is None or len(hs) < 4 + length:
            return None
        assert self._record_version is not None
        return parse_body(memoryview(hs)[4 : 4 + length], self._record_version)

    def _header(self, hs: bytes | bytearray) -> int | None:
        """The ClientHello's length from its handshake header, None before 4 bytes (raises _Malformed)."""
        if len(hs) < 1:
            return None
        if hs[0] != CLIENT_HELLO:
            raise _Malformed(f"first handshake message is type {hs[0]}, not a ClientHello")
        if len(hs) < 4:
            return None
        length = (hs[1] << 16) | (hs[2] << 8) | hs[3]
        if 4 + length > self.limit:
            raise _Malformed(f"ClientHello of {length} bytes, larger than the limit ({self.limit} bytes)")
        return length


class _Cursor:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise _Malformed(f"{what}: length {n} runs past its container")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return (b[0] << 8) | b[1]

    def vec(self, width: int, what: str) -> memoryview:
        n = self.u8(what) if width == 1 else self.u16(what)
        return self.take(n, what)


def parse_body(body: memoryview, record_version: int) -> ClientHello:
    """Parse a ClientHello body (after the 4-byte handshake header); raises _Malformed."""
    c = _Cursor(body)
    legacy_version = c.u16("legacy_version")
    c.take(32, "random")
    if len(c.vec(1, "session_id")) > 32:
        raise _Malformed("session_id longer than 32 bytes")
    suites = c.vec(2, "cipher_suites")
    if len(suites) < 2 or len(suites) % 2:
        raise _Malformed("cipher_suites length must be even and non-zero")
    if len(c.vec(1, "compression_methods")) < 1:
        raise _Malformed("no compression method")
    sni: bytes | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] = ()
    if c.left():
        exts = c.vec(2, "extensions")
        if c.left():
            raise _Malformed(f"{c.left()} bytes after the extensions")
        # A plain index walk: a browser's hello has 15-20 extensions, most of them skipped.
        buf = bytes(exts)
        pos, end = 0, len(buf)
        seen: set[int] = set()
        while pos < end:
            if end - pos < 4:
                raise _Malformed("extension header runs past the extensions")
            etype = (buf[pos] << 8) | buf[pos + 1]
            size = (buf[pos + 2] << 8) | buf[pos + 3]
            pos += 4
            if pos + size > end:
                raise _Malformed(f"extension {etype}: length {size} runs past the extensions")
            if etype in seen:
                raise _Malformed(f"extension {etype} given twice")
            seen.add(etype)
            if etype == EXT_SERVER_NAME:
                sni = _server_name(exts[pos : pos + size])
            elif etype == EXT_ALPN:
                alpn = _alpn(exts[pos : pos + size])
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _versions(exts[pos : pos + size])
            # anything else (GREASE, padding, key_share, ECH, ...) says nothing about the name
            pos += size
    return ClientHello(
        record_version, legacy_version, sni, alpn, versions or (legacy_version,), len(body) + 4
    )


def _server_name(data: memoryview) -> bytes:
    c = _Cursor(data)
    names = _Cursor(c.vec(2, "server_name list"))
    if c.left() or not names.left():
        raise _Malformed("server_name list length")
    host: bytes | None = None
    while names.left():
        name_type = names.u8("server_name type")
        name = names.vec(2, "server_name")
        if name_type != HOST_NAME:
            continue  # RFC 6066: other name types are not defined; skip them
        if host is not None:
            raise _Malformed("two host names in server_name")
        if not len(name):
            raise _Malformed("empty host name in server_name")
        host = bytes(name)
    if host is None:
        raise _Malformed("server_name without a host name")
    return host


def _alpn(data: memoryview) -> tuple[bytes, ...]:
    c = _Cursor(data)
    lst = _Cursor(c.vec(2, "alpn list"))
    if c.left() or not lst.left():
        raise _Malformed("alpn list length")
    out: list[bytes] = []
    while lst.left():
        proto = lst.vec(1, "alpn protocol")
        if not len(proto):
            raise _Malformed("empty alpn protocol name")
        out.append(bytes(proto))
    return tuple(out)


def _versions(data: memoryview) -> tuple[int, ...]:
    c = _Cursor(data)
    lst = c.vec(1, "supported_versions")
    if c.left() or len(lst) < 2 or len(lst) % 2:
        raise _Malformed("supported_versions length")
    vals = [(lst[i] << 8) | lst[i + 1] for i in range(0, len(lst), 2)]
    return tuple(v for v in vals if not is_grease(v))


def access_denied_alert(record_version: int) -> bytes:
    """The fatal ``access_denied`` alert, in a plaintext record of the client's record version."""
    return bytes((ALERT, record_version >> 8, record_version & 0xFF, 0, 2, 2, ACCESS_DENIED))


def version_name(version: int) -> str:
    """``TLSv1.2`` for 0x0303, ..., or the hex value for anything else."""
    names = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
    return names.get(version, f"0x{version:04x}")
