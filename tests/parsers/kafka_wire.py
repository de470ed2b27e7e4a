"""Kafka frames for the parser's tests: requests and responses of any API key and version.

Built from the parser's own layouts (whose correctness against Kafka's definitions another
implementation, kafka-python's, checks in test_kafka_table.py) with sample values: one element
in every array, the given topic in every topic field, the given id in every topic-id field.
"""

from __future__ import annotations

import struct
from typing import Any

from proxyd.parsers.kafka.schema import (
    ARRAY,
    INT32,
    STRING,
    STRUCT,
    STRUCTS,
    UUID,
    Layout,
    encode,
    layout,
    request_header_version,
    response_header_version,
)

ID_OK = bytes(range(1, 17))
ID_SECRET = bytes(range(101, 117))
HARNESS_UPSTREAM = "10.0.0.2:80"  # the harness's destination: topic ids are learnt per upstream


def sample(lay: Layout, topic: str, topic_id: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in lay.fields:
        if f.kind == STRUCTS:
            assert f.children is not None
            out[f.name] = [sample(f.children, topic, topic_id)]
        elif f.kind == STRUCT:
            assert f.children is not None
            out[f.name] = sample(f.children, topic, topic_id)
        elif f.kind == ARRAY:
            if f.topic:
                out[f.name] = [topic]
            elif f.elem == INT32 and "partition" in f.name.lower():
                out[f.name] = [0]
            else:
                out[f.name] = []
        elif f.topic and f.kind == STRING:
            out[f.name] = topic
        elif f.topic and f.kind == UUID:
            out[f.name] = topic_id
        elif f.name == "Acks" or f.name == "SessionEpoch":
            out[f.name] = -1
    return out


def request(
    key: int, version: int, tree: dict[str, Any], corr: int = 1, client: bytes | None = b"cli"
) -> bytes:
    hv = request_header_version(key, version)
    hdr = struct.pack(">hhi", key, version, corr)
    if hv >= 1:
        hdr += struct.pack(">h", -1) if client is None else struct.pack(">h", len(client)) + client
    if hv >= 2:
        hdr += b"\x00"
    lay = layout(key, version, False)
    assert lay is not None
    body = encode(lay, tree)
    return struct.pack(">i", len(hdr) + len(body)) + hdr + body


def sample_request(key: int, version: int, topic: str = "ok", corr: int = 1, **fields: Any) -> bytes:
    lay = layout(key, version, False)
    assert lay is not None
    tree = sample(lay, topic, ID_OK if topic == "ok" else ID_SECRET)
    tree.update(fields)
    return request(key, version, tree, corr)


def response(key: int, version: int, tree: dict[str, Any], corr: int = 1) -> bytes:
    hdr = struct.pack(">i", corr) + (b"\x00" if response_header_version(key, version) else b"")
    lay = layout(key, version, True)
    assert lay is not None
    body = encode(lay, tree)
    return struct.pack(">i", len(hdr) + len(body)) + hdr + body


def sample_response(key: int, version: int, topic: str = "ok", corr: int = 1) -> bytes:
    lay = layout(key, version, True)
    assert lay is not None
    return response(key, version, sample(lay, topic, ID_OK), corr)


def decode_response(key: int, version: int, frame: bytes) -> tuple[int, dict[str, Any]]:
    """(correlation id, body tree) of one whole response frame."""
    from proxyd.parsers.kafka.schema import Reader

    (size, corr) = struct.unpack_from(">ii", frame)
    assert size == len(frame) - 4
    r = Reader(frame, 8, len(frame))
    if response_header_version(key, version):
        r.tags()
    lay = layout(key, version, True)
    assert lay is not None
    tree = r.struct(lay)
    assert r.pos == len(frame)
    return corr, tree


def error_codes(tree: Any) -> list[int]:
    """Every ``...ErrorCode`` value in a decoded tree."""
    out: list[int] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k.lower().endswith("errorcode") and isinstance(v, int):
                out.append(v)
            else:
                out.extend(error_codes(v))
    elif isinstance(tree, list):
        for v in tree:
            out.extend(error_codes(v))
    return out
