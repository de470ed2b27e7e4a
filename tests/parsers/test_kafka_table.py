"""The generated API table and the codec on it, against facts of the protocol and against an
independent implementation: kafka-python 3 reads every request the tests build and every
denial response the parser writes, for every key and version both know."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import warnings
from pathlib import Path
from typing import Any

from kafka_fixture import import_kafka_python
from kafka_wire import ID_SECRET, sample, sample_request

from proxyd.parsers.kafka.apis import APIS
from proxyd.parsers.kafka.denials import denial
from proxyd.parsers.kafka.requests import analyse, read_head
from proxyd.parsers.kafka.schema import (
    encode,
    flexible,
    layout,
    request_header_version,
    response_header_version,
)


def test_protocol_facts() -> None:
    assert APIS[0][0] == "Produce" and flexible(0, 9) and not flexible(0, 8)
    assert flexible(1, 12) and not flexible(1, 11)
    fetch13 = layout(1, 13, False)
    assert fetch13 is not None and fetch13.topics
    topics = next(f for f in fetch13.fields if f.name == "Topics")
    assert topics.children is not None
    assert [f.name for f in topics.children.fields if f.topic] == ["TopicId"]
    assert request_header_version(18, 3) == 2 and response_header_version(18, 3) == 0  # KIP-511
    assert request_header_version(3, 8) == 1 and request_header_version(3, 9) == 2
    assert response_header_version(3, 9) == 1
    # every API key today's clients send is in the table
    for key in (0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 25, 26, 28, 32, 36,
                42, 60, 68, 71, 72):  # fmt: skip
        assert key in APIS, key
    lay = layout(0, 9, False)
    assert lay is not None and not lay.fields[0].topic and lay.topics
    assert layout(0, 99, False) is None and layout(9999, 0, False) is None


def _kafka_python() -> dict[int, tuple[Any, Any]]:
    """kafka-python's (request class, response class) by API key."""
    kafka_protocol = import_kafka_python().protocol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for m in pkgutil.walk_packages(kafka_protocol.__path__, "kafka.protocol."):
            if ".old" in m.name or m.name.endswith("generate_stubs"):
                continue
            importlib.import_module(m.name)
        from kafka.protocol.api_header import ResponseClassRegistry
        from kafka.protocol.api_message import ApiMessage

    requests: dict[int, Any] = {}
    stack = list(ApiMessage.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "_class_version", None) is None and cls.is_request():
            requests[cls.API_KEY] = cls
    responses = ResponseClassRegistry._response_class_registry
    return {k: (requests.get(k), responses[k]) for k in responses}


def _decodes(cls: Any, version: int, body: bytes) -> bool:
    flex = cls.flexible_version_q(version)
    decode = cls._struct.compiled_decode_from(version, compact=flex, tagged=flex, data_class=cls[None])
    _, pos = decode(memoryview(body), 0)
    return bool(pos == len(body))


def test_kafka_python_reads_our_requests_and_denials() -> None:
    checked = 0
    for key, (req_cls, resp_cls) in sorted(_kafka_python().items()):
        if key not in APIS:
            continue
        _, lo, hi, first_flex, _, _ = APIS[key]
        for version in range(lo, min(hi, resp_cls.max_version) + 1):
            assert resp_cls.flexible_version_q(version) == (version >= first_flex), (key, version)
            skip = 8 + response_header_version(key, version)
            wire = sample_request(key, version, "secret", corr=7)
            head = read_head(wire, 0, len(wire))
            assert head is not None
            for body in (None, analyse(head, wire, 0, len(wire))):  # bare, and mirroring the request
                frame = denial(head, body, 29)
                assert frame is not None
                assert _decodes(resp_cls, version, frame[skip:]), (key, version, body)
            if req_cls is not None and version <= req_cls.max_version:
                lay = layout(key, version, False)
                assert lay is not None
                assert _decodes(req_cls, version, encode(lay, sample(lay, "secret", ID_SECRET))), (
                    key,
                    version,
                )
            checked += 1
    assert checked > 200


def _generator() -> Any:
    path = Path(__file__).resolve().parents[2] / "tools" / "gen_kafka_table.py"
    spec = importlib.util.spec_from_file_location("gen_kafka_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generator_reads_kafkas_json_forms() -> None:
    """Comment lines, version ranges, tagged and nullable fields, common structs, defaults,
    and only the APIs a broker serves (what tools/gen_kafka_table.py meets in Kafka's files)."""
    gen = _generator()
    request = """// Licensed to the Apache Software Foundation (ASF)
{
  "apiKey": 90, "type": "request", "listeners": ["broker"], "name": "WidgetRequest",
  "validVersions": "0-3", "flexibleVersions": "2+",
  "fields": [
    // a comment line inside
    { "name": "Topics", "type": "[]WidgetTopic", "versions": "0+", "nullableVersions": "1+", "fields": [
      { "name": "Name", "type": "string", "versions": "0+", "entityType": "topicName" },
      { "name": "Marks", "type": "[]Mark", "versions": "1-2" }
    ]},
    { "name": "Hint", "type": "int32", "versions": "3+", "taggedVersions": "3+", "tag": 0, "default": "-1" }
  ],
  "commonStructs": [{ "name": "Mark", "versions": "0+", "fields": [
    { "name": "At", "type": "int64", "versions": "0+", "default": 7 }
  ]}]
}"""
    response = """{ "apiKey": 90, "type": "response", "name": "WidgetResponse", "validVersions": "0-3",
      "flexibleVersions": "2+", "fields": [{ "name": "ErrorCode", "type": "int16", "versions": "0+" }] }"""
    controller = """{ "apiKey": 91, "type": "request", "listeners": ["controller"], "name": "InnerRequest",
      "validVersions": "0", "flexibleVersions": "none", "fields": [] }"""
    table = gen.build(
        {"WidgetRequest.json": request, "WidgetResponse.json": response, "InnerRequest.json": controller}
    )
    assert list(table) == [90]
    name, lo, hi, flex, req, resp = table[90]
    assert (name, lo, hi, flex) == ("Widget", 0, 3, 2)
    topics, hint = req
    assert topics[:4] == ("Topics", "[]", (0, 0x7FFF), (1, 0x7FFF))
    assert topics[8][0][6] == "topicName"
    marks = topics[8][1]
    assert marks[1] == "[]" and marks[2] == (1, 2) and marks[8][0][7] == 7  # common struct, bare default
    assert hint[4] == (3, 0x7FFF) and hint[5] == 0 and hint[7] == -1
    assert resp[0][:3] == ("ErrorCode", "int16", (0, 0x7FFF))
