"""Denial responses: a well-formed response to a request's API key and version, every error set.

A client fails at once with an authorization error only if the answer is one it can read: the
response layout of that key and version (flexible versions included), the request's
correlation id, and, where the response lists topics, partitions or groups, the ones the
request named, each with the error. :func:`build` fills the response tree from the request
tree by these rules, the same for every API key:

- every ``int16`` field whose name ends in ``ErrorCode`` gets the code; every other field its
  default from Kafka's definitions (``-1`` offsets, null messages, ...);
- an identifying field (topic name or id, partition index, group id, key, resource) takes the
  value of the matching request field;
- a response array takes its elements from the request array of the same name, or else from
  the request array holding the same kind of thing (topics, partitions, groups), element by
  element; a request array of plain values (``[]string`` group names, ``[]int32`` partition
  indexes) gives one element each, keyed by that value.

Codes (docs/parsers/kafka.md): ``TOPIC_AUTHORIZATION_FAILED`` (29) for a request naming topics,
``GROUP_AUTHORIZATION_FAILED`` (30) for a group request (one carrying a group id, or
FindCoordinator for a group), ``CLUSTER_AUTHORIZATION_FAILED`` (31) otherwise.
"""

from __future__ import annotations

import struct
from typing import Any

from .requests import Body, Head
from .schema import (
    ARRAY,
    INT16,
    INT32,
    STRING,
    STRUCT,
    STRUCTS,
    UUID,
    Field,
    Layout,
    encode,
    layout,
    response_header_version,
)

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
FIND_COORDINATOR = 10

_PARTITION = frozenset({"partition", "partitionindex", "index", "partitionid"})
_TOPIC_NAME = frozenset({"name", "topic", "topicname"})
_COPY = frozenset({"groupid", "key", "resourcetype", "resourcename", "transactionalid", "memberid",
                   "groupinstanceid", "topicid"})  # fmt: skip
#: Response arrays whose request side has another name and holds plain values.
_ALIASES = {"coordinators": "coordinatorkeys"}
_I32 = struct.Struct(">i")


def code_for(head: Head, body: Body | None) -> int:
    if body is not None and (body.topics or body.topic_ids):
        return TOPIC_AUTHORIZATION_FAILED
    if head.api_key == FIND_COORDINATOR:
        key_type = body.tree.get("KeyType", 0) if body is not None else 0
        return GROUP_AUTHORIZATION_FAILED if key_type == 0 else CLUSTER_AUTHORIZATION_FAILED
    lay = layout(head.api_key, head.version, False)
    if lay is not None and lay.groups:
        return GROUP_AUTHORIZATION_FAILED
    return TOPIC_AUTHORIZATION_FAILED if lay is not None and lay.topics else CLUSTER_AUTHORIZATION_FAILED


def response_frame(head: Head, body: bytes) -> bytes:
    """Length prefix, response header (correlation id, tags in v1) and ``body``."""
    hdr = _I32.pack(head.corr) + (b"\x00" if response_header_version(head.api_key, head.version) else b"")
    return _I32.pack(len(hdr) + len(body)) + hdr + body


def denial(head: Head, body: Body | None, code: int) -> bytes | None:
    """The whole response frame answering a denied request, or None for an unknown version."""
    resp = layout(head.api_key, head.version, True)
    req = layout(head.api_key, head.version, False)
    if resp is None or req is None:
        return None
    tree = build(resp, req, body.tree if body is not None else {}, code)
    return response_frame(head, encode(resp, tree))


def _topic_key(lay: Layout) -> bool:
    return any(f.topic for f in lay.fields)


def _partition_key(lay: Layout) -> bool:
    return any(f.name.lower() in _PARTITION and f.kind == INT32 for f in lay.fields)


def _group_key(lay: Layout) -> bool:
    return any(f.group for f in lay.fields)


def _source_array(f: Field, req: Layout | None, tree: dict[str, Any]) -> tuple[Field, list[Any]] | None:
    """The request array a response array mirrors, with its items."""
    if req is None:
        return None
    elem = f.children
    assert elem is not None
    lname = _ALIASES.get(f.name.lower(), f.name.lower())
    candidates = [g for g in req.fields if g.kind in (STRUCTS, ARRAY)]
    pick: Field | None = None
    for g in candidates:
        if g.name.lower() == lname:
            pick = g
            break
    if pick is None and _topic_key(elem):
        pick = next((g for g in candidates if (g.children is not None and _topic_key(g.children))
                     or (g.kind == ARRAY and g.topic)), None)  # fmt: skip
    if pick is None and _partition_key(elem):
        pick = next((g for g in candidates if (g.children is not None and _partition_key(g.children))
                     or (g.kind == ARRAY and g.elem == INT32 and "partition" in g.name.lower())),
                    None)  # fmt: skip
    if pick is None and _group_key(elem):
        pick = next((g for g in candidates if (g.children is not None and _group_key(g.children))
                     or (g.kind == ARRAY and g.group)), None)  # fmt: skip
    if pick is None:
        # one level down: AlterReplicaLogDirs lists topics per log dir, its response per topic
        for g in candidates:
            if g.kind == STRUCTS and g.children is not None and tree.get(g.name):
                inner = [_source_array(f, g.children, item) for item in tree[g.name]]
                found = [x for x in inner if x is not None]
                if found:
                    return found[0][0], [i for _, items in found for i in items]
        return None
    items = tree.get(pick.name)
    if not items:
        return None
    return pick, items


def _key_field(elem: Layout, value: Any) -> Field | None:
    """The response element field a plain request value (a name, an index) fills."""
    for f in elem.fields:
        if isinstance(value, int) and f.kind == INT32 and f.name.lower() in _PARTITION:
            return f
        if (
            isinstance(value, str)
            and f.kind == STRING
            and (f.topic or f.group or f.name.lower() in ("key", "name"))
        ):
            return f
    return None


def _copy(f: Field, req: Layout | None, tree: dict[str, Any]) -> tuple[bool, Any]:
    if req is None:
        return False, None
    lname = f.name.lower()
    for g in req.fields:
        gname = g.name.lower()
        if g.kind != f.kind and not (f.kind == STRING and g.kind == STRING):
            continue
        if gname == lname and (lname in _COPY or lname in _PARTITION or lname in _TOPIC_NAME):
            return g.name in tree, tree.get(g.name)
        if lname in _PARTITION and gname in _PARTITION:
            return g.name in tree, tree.get(g.name)
        if f.topic and g.topic and f.kind == STRING == g.kind:
            return g.name in tree, tree.get(g.name)
    return False, None


def build(resp: Layout, req: Layout | None, tree: dict[str, Any], code: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in resp.fields:
        kind = f.kind
        if kind == INT16 and f.name.lower().endswith("errorcode"):
            out[f.name] = code
        elif kind == STRUCTS:
            src = _source_array(f, req, tree)
            elem = f.children
            assert elem is not None
            if src is None:
                out[f.name] = [] if not f.nullable or f.default is not None else None
                continue
            g, items = src
            rows = []
            for item in items:
                if isinstance(item, dict):
                    rows.append(build(elem, g.children, item, code))
                else:
                    row = build(elem, None, {}, code)
                    key = _key_field(elem, item)
                    if key is not None:
                        row[key.name] = item
                    rows.append(row)
            out[f.name] = rows
        elif kind == STRUCT:
            assert f.children is not None
            out[f.name] = None if f.nullable else build(f.children, None, {}, code)
        elif kind == ARRAY:
            out[f.name] = None if f.nullable else []
        else:
            found, value = _copy(f, req, tree)
            if found and (value is not None or f.nullable):
                out[f.name] = value
            elif kind == UUID:
                out[f.name] = b"\0" * 16
    return out
