"""Reading a Kafka request: its frame, its header, and what policy needs from its body.

A request is ``int32 size`` then ``size`` bytes: the request header (v0: api key, api version,
correlation id; v1 adds the nullable client id; v2, used by flexible versions, adds a tagged-field
section) and the body laid out as :func:`.schema.layout` says for that key and version.

:func:`analyse` reads the body and gathers what the parser decides on: every topic name and
topic id the request carries (wherever the message definitions mark them: ``entityType:
topicName`` fields, ``TopicId`` uuids; forgotten topics of an incremental fetch are kept apart,
since forgetting grants nothing), the group ids, produce's ``acks``, and the decoded tree (a
denial response mirrors the request's topics and partitions from it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .schema import ARRAY, BYTES, RECORDS, STRUCT, STRUCTS, UUID, Layout, Malformed, Reader, Short, layout
from .schema import request_header_version as header_version

_HEAD = struct.Struct(">ihhi")  # size, api key, api version, correlation id
_I16 = struct.Struct(">h")
#: A request larger than this is refused (Kafka's socket.request.max.bytes default is 100 MiB).
MAX_REQUEST = 100 * 1024 * 1024
FORGOTTEN = "ForgottenTopicsData"


@dataclass(slots=True)
class Head:
    """A request's frame and header."""

    size: int  # bytes after the 4-byte length prefix
    api_key: int
    version: int
    corr: int
    client_id: str | None
    body: int  # offset of the body from the start of the frame (the length prefix)
    known: bool  # the table has this key and version


def read_head(data: bytes | bytearray, start: int, end: int) -> Head | None:
    """The head of the frame at ``start``, or None until its header is buffered."""
    if end - start < 12:
        if end - start >= 4 and not int.from_bytes(data[start : start + 4], "big", signed=True) >= 8:
            raise Malformed("request size below 8")
        return None
    size, key, version, corr = _HEAD.unpack_from(data, start)
    if size < 8 or size > MAX_REQUEST:
        raise Malformed(f"request size {size} out of range")
    hv = header_version(key, version)
    lay = layout(key, version, False)
    pos = start + 12
    client_id: str | None = None
    limit = min(end, start + 4 + size)
    if hv >= 1:
        if pos + 2 > limit:
            if limit == start + 4 + size:
                raise Malformed("header cut by the frame")
            return None
        n = _I16.unpack_from(data, pos)[0]
        pos += 2
        if n >= 0:
            if pos + n > limit:
                if limit == start + 4 + size:
                    raise Malformed("client id cut by the frame")
                return None
            client_id = bytes(data[pos : pos + n]).decode("utf-8", "surrogateescape")
            pos += n
        elif n != -1:
            raise Malformed("negative client id length")
    if hv >= 2 and lay is not None:
        r = Reader(data, pos, limit)
        try:
            r.tags()
        except Short:
            if limit == start + 4 + size:
                raise Malformed("header cut by the frame") from None
            return None
        pos = r.pos
    return Head(size, key, version, corr, client_id, pos - start, lay is not None)


@dataclass(slots=True)
class Body:
    """What policy and denials need from a request body."""

    tree: dict[str, Any]
    topics: list[str] = field(default_factory=list)
    topic_ids: list[bytes] = field(default_factory=list)
    forgotten: list[tuple[str | bytes, list[int]]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    complete: bool = True  # read to the end (False: stopped once the topics were read)


def analyse(head: Head, data: bytes | bytearray, start: int, end: int) -> Body:
    """Read the body of the request at ``data[start:]`` (buffered up to ``end``).

    With the whole frame buffered the body must fill it exactly; with less, reading stops once
    no topic can follow (the rest is record data): :class:`Short` if the topics go on past
    ``end``. Raises :class:`Malformed` for bytes that cannot be this request.
    """
    lay = layout(head.api_key, head.version, False)
    assert lay is not None
    frame_end = start + 4 + head.size
    tree: dict[str, Any]
    complete = True
    if end >= frame_end:
        r = Reader(data, start + head.body, frame_end)
        try:
            tree = r.struct(lay)
        except Short:
            raise Malformed("request body shorter than its fields") from None
        if r.pos != frame_end:
            raise Malformed(f"{frame_end - r.pos} bytes after the request body")
    else:
        tree = {}
        if not _fill(Reader(data, start + head.body, end), lay, tree, False):
            raise Short  # the body ended early, but the frame goes on: read the rest
        complete = False
    body = Body(tree, complete=complete)
    _collect(lay, tree, body, False)
    return body


def _fill(r: Reader, lay: Layout, out: dict[str, Any], tail: bool) -> bool:
    """Read the head of a struct of a request that goes on past the buffer: True when it
    reached a ``bytes``/``records`` field after which no topic can follow (the rest need not
    be held to decide), False at its end. Raises :class:`Short` when the buffer ends first."""
    flex = lay.flexible
    for i, f in enumerate(lay.fields):
        kind = f.kind
        later = tail or lay.topics_after[i]
        if kind <= RECORDS:
            if kind in (BYTES, RECORDS) and not later:
                return True
            out[f.name] = r.scalar(kind, flex, f.nullable)
        elif kind == STRUCT:
            assert f.children is not None
            sub: dict[str, Any] = {}
            out[f.name] = sub
            if _fill(r, f.children, sub, later):
                return True
        else:
            n = r.length(flex, True)
            if n < 0:
                out[f.name] = None
                continue
            if kind == ARRAY:
                out[f.name] = [r.scalar(f.elem, flex, False) for _ in range(n)]
                continue
            assert f.children is not None
            items: list[Any] = []
            out[f.name] = items
            for j in range(n):
                item: dict[str, Any] = {}
                items.append(item)
                if _fill(r, f.children, item, later or (j < n - 1 and f.children.topics)):
                    return True
    if flex:
        r.tags()
    return False


def _collect(lay: Layout, tree: dict[str, Any], body: Body, forgotten: bool) -> None:
    for f in lay.fields:
        if not (f.topic or f.group or (f.children is not None and (f.children.topics or f.children.groups))):
            continue
        v = tree.get(f.name)
        if v is None:
            continue
        if f.kind == STRUCTS:
            assert f.children is not None
            gone = forgotten or f.name == FORGOTTEN
            for item in v:
                if gone and f.children.topics:
                    key = item.get("Topic", item.get("TopicId"))
                    if key is not None:
                        body.forgotten.append((key, list(item.get("Partitions") or ())))
                    continue
                _collect(f.children, item, body, gone)
        elif f.kind == STRUCT:
            assert f.children is not None
            _collect(f.children, v, body, forgotten)
        elif f.topic:
            if forgotten:
                continue
            if f.kind == UUID:
                body.topic_ids.append(v)
            elif f.kind == ARRAY:
                body.topics.extend(t for t in v if t is not None)
            else:
                body.topics.append(v)
        elif f.group:
            if f.kind == ARRAY:
                body.groups.extend(g for g in v if g is not None)
            else:
                body.groups.append(v)
