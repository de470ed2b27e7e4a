"""Kafka message layouts per API version, and the reader and writer that follow them.

:mod:`.apis` holds Kafka's field trees with version ranges (generated from Kafka's own JSON
message definitions); :func:`layout` cuts the tree of one API key down to one version: the
fields present, which are nullable, which travel as tagged fields, and whether the version is
*flexible* (KIP-482: compact strings, arrays and bytes with unsigned-varint lengths plus one,
and a tagged-field section closing every struct).

The reader turns bytes into a tree of plain dicts (field name -> value; arrays as lists;
tagged fields kept raw under :data:`TAGS` so a re-encoded message keeps them byte for byte).
It raises :class:`Short` when the bytes end early and :class:`Malformed` when they cannot be
the message. ``Layout.topics_after`` tells :mod:`.requests` where no topic name can follow, so
the head of a large produce request is enough to decide it and its record batches stream.

The writer encodes such a tree back (a missing field takes its default), which is how denial
responses are made and how a Metadata response is rewritten.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .apis import APIS

TAGS = "\x00tags"  # a struct's raw tagged fields: list of (tag, bytes)

# field kinds
BOOL, INT8, INT16, INT32, INT64, UINT16, UINT32, FLOAT64, UUID, STRING, BYTES, RECORDS = range(12)
ARRAY = 12  # of scalars (``elem``)
STRUCTS = 13  # array of structs
STRUCT = 14

_KINDS = {
    "bool": BOOL, "int8": INT8, "int16": INT16, "int32": INT32, "int64": INT64, "uint16": UINT16,
    "uint32": UINT32, "float64": FLOAT64, "uuid": UUID, "string": STRING, "bytes": BYTES,
    "records": RECORDS,
}  # fmt: skip
_FIXED = {
    BOOL: struct.Struct(">?"), INT8: struct.Struct(">b"), INT16: struct.Struct(">h"),
    INT32: struct.Struct(">i"), INT64: struct.Struct(">q"), UINT16: struct.Struct(">H"),
    UINT32: struct.Struct(">I"), FLOAT64: struct.Struct(">d"),
}  # fmt: skip
_SIZES = {k: v.size for k, v in _FIXED.items()} | {UUID: 16}
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
NO_FLEX = 0x7FFF


class Records(int):
    """A ``records`` field as read: its length only (the batches stay on the wire)."""


class Short(Exception):
    """The bytes end before the message does."""


class Malformed(Exception):
    """The bytes cannot be this message (a length out of range, a bad varint)."""


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: int
    elem: int  # element kind of a scalar array
    nullable: bool
    topic: bool  # a topic name (or, for a uuid, a topic id), or an array of them
    group: bool  # a group id, or an array of them
    default: Any
    children: Layout | None


@dataclass(frozen=True, slots=True)
class Layout:
    """The fields of one struct at one version."""

    fields: tuple[Field, ...]
    tagged: dict[int, Field]
    flexible: bool
    topics: bool  # a topic can appear somewhere inside
    groups: bool
    topics_after: tuple[bool, ...]  # [i]: a topic can appear in a field after fields[i]


def _in(rng: tuple[int, int] | None, version: int) -> bool:
    return rng is not None and rng[0] <= version <= rng[1]


def _compile(tree: tuple[Any, ...], version: int, flexible: bool) -> Layout:
    fields: list[Field] = []
    tagged: dict[int, Field] = {}
    for name, ftype, vers, nullv, taggedv, tag, entity, default, children in tree:
        if not _in(vers, version):
            continue
        sub = _compile(children, version, flexible) if children is not None else None
        elem = -1
        if ftype == "[]":
            kind = STRUCTS
        elif ftype == "{}":
            kind = STRUCT
        elif ftype.startswith("[]"):
            kind = ARRAY
            elem = _KINDS[ftype[2:]]
        else:
            kind = _KINDS[ftype]
        topic = entity == "topicName" or (kind == UUID and name == "TopicId")
        f = Field(name, kind, elem, _in(nullv, version), topic, entity == "groupId", default, sub)
        if flexible and _in(taggedv, version):
            tagged[int(tag)] = f
        else:
            fields.append(f)
    has = [f.topic or (f.children is not None and f.children.topics) for f in fields]
    after = tuple(any(has[i + 1 :]) for i in range(len(fields)))
    return Layout(
        tuple(fields),
        tagged,
        flexible,
        any(has),
        any(f.group or (f.children is not None and f.children.groups) for f in fields),
        after,
    )


@lru_cache(maxsize=4096)
def layout(api_key: int, version: int, response: bool) -> Layout | None:
    """The layout of a request (or response) body, or None for an unknown key or version."""
    api = APIS.get(api_key)
    if api is None or not api[1] <= version <= api[2]:
        return None
    return _compile(api[5] if response else api[4], version, version >= api[3])


def flexible(api_key: int, version: int) -> bool:
    api = APIS.get(api_key)
    return api is not None and version >= api[3]


def request_header_version(api_key: int, version: int) -> int:
    if api_key == 7 and version == 0:  # ControlledShutdown v0 has no client id
        return 0
    return 2 if flexible(api_key, version) else 1


def response_header_version(api_key: int, version: int) -> int:
    if api_key == 18:  # ApiVersions answers with header v0 whatever its version (KIP-511)
        return 0
    return 1 if flexible(api_key, version) else 0


# --- reading ------------------------------------------------------------------------------


class Reader:
    """Reads one message from ``data[pos:end]``."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int) -> int:
        p = self.pos
        if p + n > self.end:
            raise Short
        self.pos = p + n
        return p

    def uvarint(self) -> int:
        value = shift = 0
        data = self.data
        while True:
            p = self.take(1)
            b = data[p]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise Malformed("varint longer than 5 bytes")

    def length(self, flexible: bool, wide: bool) -> int:
        """A length or count: -1 for null."""
        if flexible:
            return self.uvarint() - 1
        if wide:
            return int(_I32.unpack_from(self.data, self.take(4))[0])
        return int(_I16.unpack_from(self.data, self.take(2))[0])

    def scalar(self, kind: int, flexible: bool, nullable: bool) -> Any:
        fixed = _FIXED.get(kind)
        if fixed is not None:
            return fixed.unpack_from(self.data, self.take(fixed.size))[0]
        if kind == UUID:
            p = self.take(16)
            return bytes(self.data[p : p + 16])
        n = self.length(flexible, kind != STRING)
        if n < 0:
            if n == -1 and nullable:
                return None
            raise Malformed("negative length")
        p = self.take(n)
        if kind == RECORDS:
            return Records(n)  # record batches are never copied: policy does not read them
        raw = bytes(self.data[p : p + n])
        if kind == STRING:
            return raw.decode("utf-8", "surrogateescape")
        return raw

    def skip(self, lay: Layout) -> None:
        """Step over one struct without building it."""
        flex = lay.flexible
        for f in lay.fields:
            self.skip_field(f, flex)
        if flex:
            for _ in range(self.uvarint()):
                self.uvarint()
                self.take(self.uvarint())

    def skip_field(self, f: Field, flex: bool) -> None:
        kind = f.kind
        size = _SIZES.get(kind)
        if size is not None:
            self.take(size)
        elif kind <= RECORDS:
            n = self.length(flex, kind != STRING)
            if n > 0:
                self.take(n)
            elif n < -1 or (n == -1 and not f.nullable):
                raise Malformed(f"{f.name}: negative length")
        elif kind == STRUCT:
            assert f.children is not None
            if f.nullable:
                p = self.take(1)
                if self.data[p] == 0xFF:
                    return
            self.skip(f.children)
        else:
            n = self.length(flex, True)
            if n < 0:
                if n != -1 or not f.nullable:
                    raise Malformed(f"{f.name}: negative count")
                return
            if n > self.end - self.pos:
                raise Malformed(f"{f.name}: count {n} beyond the message")
            if kind == ARRAY:
                esize = _SIZES.get(f.elem)
                if esize is not None:
                    self.take(n * esize)
                    return
                for _ in range(n):
                    self.scalar(f.elem, flex, False)
            else:
                sub = f.children
                assert sub is not None
                for _ in range(n):
                    self.skip(sub)

    def tags(self) -> list[tuple[int, bytes]]:
        out = []
        for _ in range(self.uvarint()):
            tag = self.uvarint()
            size = self.uvarint()
            p = self.take(size)
            out.append((tag, bytes(self.data[p : p + size])))
        return out

    def struct(self, lay: Layout) -> dict[str, Any]:
        """One struct, as a dict of field name -> value."""
        out: dict[str, Any] = {}
        flex = lay.flexible
        for f in lay.fields:
            kind = f.kind
            if kind <= FLOAT64 or kind == UUID:
                out[f.name] = self.scalar(kind, flex, False)
            elif kind <= RECORDS:
                out[f.name] = self.scalar(kind, flex, f.nullable)
            elif kind == STRUCT:
                assert f.children is not None
                if f.nullable:
                    p = self.take(1)
                    if self.data[p] == 0xFF:
                        out[f.name] = None
                        continue
                out[f.name] = self.struct(f.children)
            else:
                n = self.length(flex, True)
                if n < 0:
                    if n != -1 or not f.nullable:
                        raise Malformed(f"{f.name}: negative count")
                    out[f.name] = None
                    continue
                if n > self.end - self.pos:
                    raise Malformed(f"{f.name}: count {n} beyond the message")
                if kind == ARRAY:
                    elem = f.elem
                    out[f.name] = [self.scalar(elem, flex, False) for _ in range(n)]
                else:
                    sub = f.children
                    assert sub is not None
                    out[f.name] = [self.struct(sub) for _ in range(n)]
        if flex:
            tags = self.tags()
            if tags:
                out[TAGS] = tags
        return out


# --- writing ------------------------------------------------------------------------------


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length(n: int, flexible: bool, wide: bool) -> bytes:
    if flexible:
        return _uvarint(n + 1)
    return _I32.pack(n) if wide else _I16.pack(n)


def _scalar(out: bytearray, kind: int, flexible: bool, value: Any) -> None:
    fixed = _FIXED.get(kind)
    if fixed is not None:
        out += fixed.pack(value)
        return
    if kind == UUID:
        out += value if value is not None else b"\0" * 16
        return
    if value is None:
        out += _length(-1, flexible, kind != STRING)
        return
    raw = value.encode("utf-8", "surrogateescape") if kind == STRING else bytes(value)
    out += _length(len(raw), flexible, kind != STRING)
    out += raw


def write_struct(out: bytearray, lay: Layout, value: dict[str, Any]) -> None:
    flex = lay.flexible
    for f in lay.fields:
        v = value.get(f.name, f.default)
        kind = f.kind
        if kind <= RECORDS:
            if v is None and not f.nullable and kind != UUID:
                v = "" if kind == STRING else b""
            _scalar(out, kind, flex, v)
        elif kind == STRUCT:
            assert f.children is not None
            if f.nullable:
                if v is None:
                    out.append(0xFF)
                    continue
                out.append(1)
            write_struct(out, f.children, v or {})
        else:
            if v is None:
                if f.nullable:
                    out += _length(-1, flex, True)
                    continue
                v = []
            out += _length(len(v), flex, True)
            if kind == ARRAY:
                for item in v:
                    _scalar(out, f.elem, flex, item)
            else:
                assert f.children is not None
                for item in v:
                    write_struct(out, f.children, item)
    if flex:
        tags = value.get(TAGS) or ()
        out += _uvarint(len(tags))
        for tag, raw in tags:
            out += _uvarint(tag)
            out += _uvarint(len(raw))
            out += raw


def encode(lay: Layout, value: dict[str, Any]) -> bytes:
    out = bytearray()
    write_struct(out, lay, value)
    return bytes(out)
