"""A small CQL server for tests: enough of protocol v4 and v5 for the real cassandra-driver.

It answers OPTIONS (SUPPORTED: CQL_VERSION, COMPRESSION lz4/snappy, PROTOCOL_VERSIONS), STARTUP and
REGISTER (READY), QUERY (rows for ``system.local``, empty rows for other system tables, rows of a
toy table ``ks.users (id int, name text)``, Void for writes and DDL, Set_keyspace for USE),
PREPARE/EXECUTE and BATCH. After STARTUP/READY on v5 both directions use segment framing; lz4
(v4 frames or v5 segments) and snappy (v4) are supported. Other protocol versions are refused
the way Cassandra refuses them, so a driver that negotiates downgrades.

Every statement it runs is recorded in :attr:`CqlResponder.statements` (a PREPARE-d statement is
recorded when EXECUTE-d), so tests can assert that a denied statement never reached the server.

The module also has the frame builders the parser tests use (``frame``, ``query_body``, ...).

Usage::

    responder = CqlResponder()
    await responder.start()
    cluster = Cluster(["127.0.0.1"], port=responder.port, protocol_version=4)
    ...
    await responder.stop()
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lz4.block

# --- wire helpers (also used by the parser tests) -----------------------------------------------

OP = {
    "ERROR": 0x00,
    "STARTUP": 0x01,
    "READY": 0x02,
    "AUTHENTICATE": 0x03,
    "OPTIONS": 0x05,
    "SUPPORTED": 0x06,
    "QUERY": 0x07,
    "RESULT": 0x08,
    "PREPARE": 0x09,
    "EXECUTE": 0x0A,
    "REGISTER": 0x0B,
    "EVENT": 0x0C,
    "BATCH": 0x0D,
    "AUTH_CHALLENGE": 0x0E,
    "AUTH_RESPONSE": 0x0F,
    "AUTH_SUCCESS": 0x10,
}


def frame(
    version: int, stream: int, opcode: int | str, body: bytes = b"", *, response: bool = False, flags: int = 0
) -> bytes:
    """One frame (v3/v4) or v5 envelope."""
    op = OP[opcode] if isinstance(opcode, str) else opcode
    v = version | (0x80 if response else 0)
    return struct.pack(">BBhBI", v, flags, stream, op, len(body)) + body


def string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def long_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">i", len(b)) + b


def short_bytes(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def bytes_(b: bytes | None) -> bytes:
    if b is None:
        return struct.pack(">i", -1)
    return struct.pack(">i", len(b)) + b


def string_map(m: dict[str, str]) -> bytes:
    return struct.pack(">H", len(m)) + b"".join(string(k) + string(v) for k, v in m.items())


def string_multimap(m: dict[str, list[str]]) -> bytes:
    out = struct.pack(">H", len(m))
    for k, vs in m.items():
        out += string(k) + struct.pack(">H", len(vs)) + b"".join(string(v) for v in vs)
    return out


def query_params(
    version: int, values: Sequence[bytes | None] = (), keyspace: str | None = None, consistency: int = 1
) -> bytes:
    flags = 0
    tail = b""
    if values:
        flags |= 0x01
        tail += struct.pack(">H", len(values)) + b"".join(bytes_(v) for v in values)
    if keyspace is not None:
        flags |= 0x80
        tail += string(keyspace)
    fl = struct.pack(">i", flags) if version >= 5 else struct.pack(">B", flags)
    return struct.pack(">H", consistency) + fl + tail


def query_body(
    q: str, version: int = 4, values: Sequence[bytes | None] = (), keyspace: str | None = None
) -> bytes:
    return long_string(q) + query_params(version, values, keyspace)


def prepare_body(q: str, version: int = 4, keyspace: str | None = None) -> bytes:
    if version < 5:
        return long_string(q)
    if keyspace is None:
        return long_string(q) + struct.pack(">i", 0)
    return long_string(q) + struct.pack(">i", 1) + string(keyspace)


def execute_body(
    pid: bytes, version: int = 4, values: Sequence[bytes | None] = (), result_metadata_id: bytes = b""
) -> bytes:
    head = short_bytes(pid)
    if version >= 5:
        head += short_bytes(result_metadata_id)
    return head + query_params(version, values)


def batch_body(
    members: Iterable[str | bytes], version: int = 4, keyspace: str | None = None, batch_type: int = 0
) -> bytes:
    ms = list(members)
    out = struct.pack(">BH", batch_type, len(ms))
    for m in ms:
        if isinstance(m, str):
            out += b"\x00" + long_string(m)
        else:
            out += b"\x01" + short_bytes(m)
        out += struct.pack(">H", 0)
    flags = 0x80 if keyspace is not None else 0
    out += struct.pack(">H", 1) + (struct.pack(">i", flags) if version >= 5 else struct.pack(">B", flags))
    if keyspace is not None:
        out += string(keyspace)
    return out


def startup_body(compression: str | None = None) -> bytes:
    opts = {"CQL_VERSION": "3.0.0"}
    if compression:
        opts["COMPRESSION"] = compression
    return string_map(opts)


def result_void() -> bytes:
    return struct.pack(">i", 1)


def result_set_keyspace(ks: str) -> bytes:
    return struct.pack(">i", 3) + string(ks)


def error_body(code: int, message: str) -> bytes:
    return struct.pack(">i", code) + string(message)


def lz4_frame_compress(body: bytes) -> bytes:
    """v4 lz4 body: big-endian uncompressed length, then the lz4 block."""
    return struct.pack(">I", len(body)) + lz4.block.compress(body, store_size=False)


def lz4_frame_decompress(body: bytes) -> bytes:
    (n,) = struct.unpack_from(">I", body)
    return lz4.block.decompress(body[4:], uncompressed_size=n) if n else b""


# v5 segments.
_CRC32_SEED = zlib.crc32(b"\xfa\x2d\x55\xca")
MAX_PAYLOAD = 128 * 1024 - 1


def _crc24(data: bytes) -> int:
    crc = 0x875060
    for b in data:
        crc ^= b << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1974F0B
    return crc


def segment(
    payload: bytes, self_contained: bool = True, lz4_codec: bool = False, compress: bool = True
) -> bytes:
    """One v5 segment; with ``lz4_codec`` the 5-byte header (payload compressed if smaller)."""
    ulen = 0
    body = payload
    if lz4_codec and compress:
        c = lz4.block.compress(payload, store_size=False)
        if len(c) < len(payload):
            body, ulen = c, len(payload)
    if lz4_codec:
        h = len(body) | (ulen << 17) | ((1 if self_contained else 0) << 34)
        hdr = h.to_bytes(5, "little")
    else:
        h = len(body) | ((1 if self_contained else 0) << 17)
        hdr = h.to_bytes(3, "little")
    crc = (zlib.crc32(body, _CRC32_SEED) & 0xFFFFFFFF).to_bytes(4, "little")
    return hdr + _crc24(hdr).to_bytes(3, "little") + body + crc


def segments(payload: bytes, lz4_codec: bool = False, size: int = MAX_PAYLOAD) -> bytes:
    """A message as one self-contained segment, or cut into non-self-contained ones."""
    if len(payload) <= size:
        return segment(payload, True, lz4_codec)
    return b"".join(segment(payload[i : i + size], False, lz4_codec) for i in range(0, len(payload), size))


class SegmentDecoder:
    """Incremental v5 segment decoder (checks both CRCs)."""

    def __init__(self, lz4_codec: bool) -> None:
        self.lz4 = lz4_codec
        self.buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        hl = 5 if self.lz4 else 3
        while len(self.buf) >= hl + 3:
            hdr = bytes(self.buf[:hl])
            if _crc24(hdr) != int.from_bytes(self.buf[hl : hl + 3], "little"):
                raise ValueError("bad header crc")
            h = int.from_bytes(hdr, "little")
            plen = h & MAX_PAYLOAD
            ulen = (h >> 17) & MAX_PAYLOAD if self.lz4 else 0
            total = hl + 3 + plen + 4
            if len(self.buf) < total:
                break
            body = bytes(self.buf[hl + 3 : hl + 3 + plen])
            if zlib.crc32(body, _CRC32_SEED) & 0xFFFFFFFF != int.from_bytes(
                self.buf[total - 4 : total], "little"
            ):
                raise ValueError("bad payload crc")
            out += lz4.block.decompress(body, uncompressed_size=ulen) if ulen else body
            del self.buf[:total]
        return bytes(out)


# --- result encoding --------------------------------------------------------------------------

T_BIGINT, T_BLOB, T_BOOLEAN, T_INT, T_TIMESTAMP, T_UUID, T_VARCHAR, T_INET = 2, 3, 4, 9, 11, 12, 13, 16
T_LIST, T_MAP, T_SET = 0x20, 0x21, 0x22


def _type(t: Any) -> bytes:
    if isinstance(t, tuple):
        return struct.pack(">H", t[0]) + b"".join(_type(x) for x in t[1:])
    return struct.pack(">H", t)


def _value(t: Any, v: Any) -> bytes | None:
    if v is None:
        return None
    if t == T_INT:
        return struct.pack(">i", v)
    if t in (T_BIGINT, T_TIMESTAMP):
        return struct.pack(">q", v)
    if t == T_BOOLEAN:
        return b"\x01" if v else b"\x00"
    if t == T_VARCHAR:
        return str(v).encode()
    if t == T_UUID:
        return uuid.UUID(str(v)).bytes
    if t == T_INET:
        import ipaddress

        return ipaddress.ip_address(v).packed
    if t == T_BLOB:
        return bytes(v)
    if isinstance(t, tuple) and t[0] in (T_SET, T_LIST):
        items = [_value(t[1], x) for x in v]
        return struct.pack(">i", len(items)) + b"".join(bytes_(x) for x in items)
    if isinstance(t, tuple) and t[0] == T_MAP:
        out = struct.pack(">i", len(v))
        for k, x in v.items():
            out += bytes_(_value(t[1], k)) + bytes_(_value(t[2], x))
        return out
    raise ValueError(f"type {t!r}")


def rows_body(
    ks: str, table: str, columns: Sequence[tuple[str, Any]], rows: Sequence[Sequence[Any]]
) -> bytes:
    out = struct.pack(">iii", 2, 0x0001, len(columns)) + string(ks) + string(table)
    for name, t in columns:
        out += string(name) + _type(t)
    out += struct.pack(">i", len(rows))
    for row in rows:
        for (_, t), v in zip(columns, row, strict=True):
            out += bytes_(_value(t, v))
    return out


def prepared_body(
    version: int,
    pid: bytes,
    ks: str,
    table: str,
    binds: Sequence[tuple[str, Any]],
    result: Sequence[tuple[str, Any]],
) -> bytes:
    out = struct.pack(">i", 4) + short_bytes(pid)
    if version >= 5:
        out += short_bytes(hashlib.md5(repr(result).encode()).digest())
    # prepared metadata: flags (global table spec), columns, pk count (0)
    flags = 0x0001 if binds else 0
    out += struct.pack(">iii", flags, len(binds), 0)
    if binds:
        out += string(ks) + string(table)
    for name, t in binds:
        out += string(name) + _type(t)
    # result metadata
    if result:
        out += struct.pack(">ii", 0x0001, len(result)) + string(ks) + string(table)
        for name, t in result:
            out += string(name) + _type(t)
    else:
        out += struct.pack(">ii", 0x0004, 0)  # no metadata
    return out


# --- the server -------------------------------------------------------------------------------

LOCAL_COLUMNS: list[tuple[str, Any]] = [
    ("key", T_VARCHAR),
    ("bootstrapped", T_VARCHAR),
    ("broadcast_address", T_INET),
    ("cluster_name", T_VARCHAR),
    ("cql_version", T_VARCHAR),
    ("data_center", T_VARCHAR),
    ("host_id", T_UUID),
    ("listen_address", T_INET),
    ("native_protocol_version", T_VARCHAR),
    ("partitioner", T_VARCHAR),
    ("rack", T_VARCHAR),
    ("release_version", T_VARCHAR),
    ("rpc_address", T_INET),
    ("schema_version", T_UUID),
    ("tokens", (T_SET, T_VARCHAR)),
]
USERS_COLUMNS: list[tuple[str, Any]] = [("id", T_INT), ("name", T_VARCHAR)]
_HOST_ID = "2b2c8a5e-6f5a-4c1f-9f0a-1d2e3f405162"
_SCHEMA_ID = "a1b2c3d4-0000-4000-8000-000000000001"

_FROM = re.compile(r'\bfrom\s+("?[\w]+"?)(?:\s*\.\s*("?[\w]+"?))?', re.I)
_USE = re.compile(r'^\s*use\s+"?(\w+)"?', re.I)
_INSERT = re.compile(r"^\s*insert\s+into\s+([\w.]+)\s*\(([^)]*)\)\s*values\s*\(([^)]*)\)", re.I)


@dataclass
class _Conn:
    version: int = 0
    compression: str | None = None
    segments: bool = False
    keyspace: str | None = None
    decoder: SegmentDecoder | None = None
    prepared: dict[bytes, str] = field(default_factory=dict)


class CqlResponder:
    """An asyncio CQL server; see the module docstring."""

    def __init__(self, versions: Sequence[int] = (4, 5)) -> None:
        self.versions = tuple(versions)
        self.statements: list[str] = []
        self.opcodes: list[str] = []
        self.users: dict[int, str] = {1: "alice", 2: "bob"}
        self.prepared: dict[bytes, str] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> CqlResponder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- connection loop ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = _Conn()
        frames = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if conn.decoder is not None:
                    frames += conn.decoder.feed(data)
                else:
                    frames += data
                while len(frames) >= 9:
                    v, flags, stream, opcode, length = struct.unpack_from(">BBhBI", frames)
                    if len(frames) < 9 + length:
                        break
                    body = bytes(frames[9 : 9 + length])
                    del frames[: 9 + length]
                    out = self._handle(conn, v & 0x7F, flags, stream, opcode, body)
                    for raw, switch in out:
                        writer.write(raw)
                        if switch:
                            conn.segments = True
                            conn.decoder = SegmentDecoder(conn.compression == "lz4")
                            rest = bytes(frames)
                            frames.clear()
                            frames += conn.decoder.feed(rest)
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _reply(self, conn: _Conn, stream: int, opcode: str, body: bytes) -> bytes:
        version = conn.version or 4
        flags = 0
        if conn.segments:
            return segments(frame(version, stream, opcode, body, response=True), conn.compression == "lz4")
        if conn.compression and opcode not in ("READY", "SUPPORTED", "ERROR") and body:
            if conn.compression == "lz4":
                body = lz4_frame_compress(body)
            else:
                import snappy

                body = snappy.compress(body)
            flags = 0x01
        return frame(version, stream, opcode, body, response=True, flags=flags)

    def _handle(
        self, conn: _Conn, version: int, flags: int, stream: int, opcode: int, body: bytes
    ) -> list[tuple[bytes, bool]]:
        if version not in self.versions:
            msg = (
                f"Invalid or unsupported protocol version ({version}); supported versions are "
                f"({', '.join(f'{v}/v{v}' for v in self.versions)})"
            )
            reply_v = max(v for v in self.versions if v <= max(self.versions))
            return [(frame(min(reply_v, 4), stream, "ERROR", error_body(0x000A, msg), response=True), False)]
        conn.version = version
        if flags & 0x01 and not conn.segments:
            if conn.compression == "lz4":
                body = lz4_frame_decompress(body)
            elif conn.compression == "snappy":
                import snappy

                body = snappy.decompress(body)
        pos = 0
        if flags & 0x04:  # custom payload
            (n,) = struct.unpack_from(">H", body, pos)
            pos += 2
            for _ in range(n):
                (k,) = struct.unpack_from(">H", body, pos)
                pos += 2 + k
                (vl,) = struct.unpack_from(">i", body, pos)
                pos += 4 + max(vl, 0)
        name = next(k for k, v in OP.items() if v == opcode)
        self.opcodes.append(name)
        if name == "OPTIONS":
            sup = {
                "CQL_VERSION": ["3.4.5"],
                "COMPRESSION": ["lz4", "snappy"],
                "PROTOCOL_VERSIONS": [f"{v}/v{v}" for v in self.versions],
            }
            return [(self._reply(conn, stream, "SUPPORTED", string_multimap(sup)), False)]
        if name == "STARTUP":
            opts = _read_string_map(body, pos)
            comp = opts.get("COMPRESSION")
            conn.compression = comp.lower() if comp else None
            ready = frame(version, stream, "READY", b"", response=True)
            return [(ready, version >= 5)]
        if name == "REGISTER":
            return [(self._reply(conn, stream, "READY", b""), False)]
        if name == "QUERY":
            (n,) = struct.unpack_from(">i", body, pos)
            q = body[pos + 4 : pos + 4 + n].decode()
            self.statements.append(q)
            return [(self._reply(conn, stream, "RESULT", self._run(conn, q, [])), False)]
        if name == "PREPARE":
            (n,) = struct.unpack_from(">i", body, pos)
            q = body[pos + 4 : pos + 4 + n].decode()
            pid = hashlib.md5(q.encode()).digest()
            self.prepared[pid] = q
            binds, result = self._prepared_meta(q)
            ks, table = self._table_of(conn, q)
            return [
                (
                    self._reply(
                        conn, stream, "RESULT", prepared_body(version, pid, ks, table, binds, result)
                    ),
                    False,
                )
            ]
        if name == "EXECUTE":
            (n,) = struct.unpack_from(">H", body, pos)
            pid = body[pos + 2 : pos + 2 + n]
            pos += 2 + n
            if version >= 5:
                (m,) = struct.unpack_from(">H", body, pos)
                pos += 2 + m
            q = self.prepared.get(pid)
            if q is None:
                err = error_body(0x2500, "Unprepared") + short_bytes(pid)
                return [(self._reply(conn, stream, "ERROR", err), False)]
            self.statements.append(q)
            values = _read_values(body, pos + 2, version)
            return [(self._reply(conn, stream, "RESULT", self._run(conn, q, values)), False)]
        if name == "BATCH":
            (n,) = struct.unpack_from(">H", body, pos + 1)
            pos += 3
            for _ in range(n):
                kind = body[pos]
                pos += 1
                if kind == 0:
                    (ql,) = struct.unpack_from(">i", body, pos)
                    q = body[pos + 4 : pos + 4 + ql].decode()
                    pos += 4 + ql
                else:
                    (il,) = struct.unpack_from(">H", body, pos)
                    pid = body[pos + 2 : pos + 2 + il]
                    pos += 2 + il
                    q = self.prepared.get(pid, "")
                (nv,) = struct.unpack_from(">H", body, pos)
                pos += 2
                vals: list[bytes | None] = []
                for _ in range(nv):
                    (vl,) = struct.unpack_from(">i", body, pos)
                    pos += 4
                    vals.append(body[pos : pos + vl] if vl >= 0 else None)
                    pos += max(vl, 0)
                self.statements.append(q)
                self._run(conn, q, vals)
            return [(self._reply(conn, stream, "RESULT", result_void()), False)]
        if name == "AUTH_RESPONSE":
            return [(self._reply(conn, stream, "AUTH_SUCCESS", bytes_(None)), False)]
        return [(self._reply(conn, stream, "ERROR", error_body(0x000A, f"unexpected {name}")), False)]

    # --- a toy CQL engine --------------------------------------------------------------------

    def _table_of(self, conn: _Conn, q: str) -> tuple[str, str]:
        m = _FROM.search(q) or re.search(r"(?:into|update)\s+([\w]+)(?:\.([\w]+))?", q, re.I)
        if not m:
            return conn.keyspace or "", ""
        a, b = m.group(1).strip('"'), m.group(2)
        if b:
            return a, b.strip('"')
        return conn.keyspace or "", a

    def _prepared_meta(self, q: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        n = q.count("?")
        types = dict(USERS_COLUMNS)
        names: list[str] = []
        m = _INSERT.match(q)
        if m:
            cols = [c.strip() for c in m.group(2).split(",")]
            vals = [v.strip() for v in m.group(3).split(",")]
            names = [c for c, v in zip(cols, vals, strict=False) if v == "?"]
        else:
            names = re.findall(r"(\w+)\s*(?:=|<|>|<=|>=)\s*\?", q)
        names = (names + ["name"] * n)[:n]
        binds = [(nm, types.get(nm, T_VARCHAR)) for nm in names]
        result = USERS_COLUMNS if q.strip().lower().startswith("select") else []
        return binds, result

    def _run(self, conn: _Conn, q: str, values: Sequence[bytes | None]) -> bytes:
        ql = q.strip().lower()
        mu = _USE.match(q)
        if mu:
            conn.keyspace = mu.group(1)
            return result_set_keyspace(conn.keyspace)
        if ql.startswith("select"):
            ks, table = self._table_of(conn, q)
            if ks == "system" and table == "local":
                row = [
                    "local",
                    "COMPLETED",
                    "127.0.0.1",
                    "Test Cluster",
                    "3.4.5",
                    "datacenter1",
                    _HOST_ID,
                    "127.0.0.1",
                    "4",
                    "org.apache.cassandra.dht.Murmur3Partitioner",
                    "rack1",
                    "4.0.11",
                    "127.0.0.1",
                    _SCHEMA_ID,
                    {"0"},
                ]
                return rows_body("system", "local", LOCAL_COLUMNS, [row])
            if table == "users":
                rows = sorted(self.users.items())
                m = re.search(r"\bid\s*=\s*(\d+|\?)", q, re.I)
                if m:
                    want = (
                        int(m.group(1))
                        if m.group(1) != "?"
                        else struct.unpack(">i", values[0] or b"\0\0\0\0")[0]
                    )
                    rows = [r for r in rows if r[0] == want]
                return rows_body(ks, table, USERS_COLUMNS, [list(r) for r in rows])
            # (drivers need at least one column in the metadata)
            return rows_body(ks or "system", table or "unknown", [("key", T_VARCHAR)], [])
        m = _INSERT.match(q)
        if m:
            cols = [c.strip().lower() for c in m.group(2).split(",")]
            vals = [v.strip() for v in m.group(3).split(",")]
            it = iter(values)
            row: dict[str, Any] = {}
            for c, v in zip(cols, vals, strict=False):
                if v == "?":
                    raw = next(it, None)
                    row[c] = struct.unpack(">i", raw)[0] if c == "id" and raw else (raw or b"").decode()
                else:
                    row[c] = int(v) if c == "id" else v.strip("'")
            if "id" in row:
                self.users[int(row["id"])] = str(row.get("name", ""))
        return result_void()


def _read_string_map(body: bytes, pos: int) -> dict[str, str]:
    (n,) = struct.unpack_from(">H", body, pos)
    pos += 2
    out = {}
    for _ in range(n):
        (kl,) = struct.unpack_from(">H", body, pos)
        k = body[pos + 2 : pos + 2 + kl].decode()
        pos += 2 + kl
        (vl,) = struct.unpack_from(">H", body, pos)
        out[k] = body[pos + 2 : pos + 2 + vl].decode()
        pos += 2 + vl
    return out


def _read_values(body: bytes, pos: int, version: int) -> list[bytes | None]:
    """Bound values of EXECUTE parameters (after the consistency)."""
    if version >= 5:
        (flags,) = struct.unpack_from(">i", body, pos)
        pos += 4
    else:
        flags = body[pos]
        pos += 1
    out: list[bytes | None] = []
    if flags & 0x01:
        (n,) = struct.unpack_from(">H", body, pos)
        pos += 2
        for _ in range(n):
            if flags & 0x40:
                (kl,) = struct.unpack_from(">H", body, pos)
                pos += 2 + kl
            (vl,) = struct.unpack_from(">i", body, pos)
            pos += 4
            out.append(body[pos : pos + vl] if vl >= 0 else None)
            pos += max(vl, 0)
    return out
