"""Bytes real clients exchanged with a real broker, replayed through the parser.

``kafka_recorded.json`` holds, per client (confluent-kafka 2.16 / librdkafka, kafka-python 3.0)
and per connection in the order they opened, the bytes each way between the client and tansu
0.6 while it produced to two topics and consumed both in a group (recorded by
``tools/record_kafka_traffic.py``). They cover what these clients send today: ApiVersions v3/v4,
Metadata v12, Produce v9/v10, Fetch v12 (fetch sessions) and v16 (topic ids), ListOffsets,
FindCoordinator, JoinGroup, SyncGroup, Heartbeat, OffsetFetch v8/v9 (groups array),
OffsetCommit, LeaveGroup, InitProducerId, GetTelemetrySubscriptions.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from proxyd.parsers.kafka.topicids import TOPIC_IDS
from proxyd.testing import Harness

RECORDED = json.loads((Path(__file__).parent / "kafka_recorded.json").read_text())


def _conns(client: str) -> list[tuple[bytes, bytes]]:
    return [(base64.b64decode(c["c2s"]), base64.b64decode(c["s2c"])) for c in RECORDED[client]]


@pytest.mark.parametrize("client", sorted(RECORDED))
@pytest.mark.parametrize("split", [None, "bytes", "random"])
def test_allow_all_is_byte_identical(client: str, split: Any) -> None:
    TOPIC_IDS.clear()
    seen = set()
    for c2s, s2c in _conns(client):
        h = Harness("kafka", rules=[{}])
        h.feed(c2s, split=split, seed=1)
        h.feed(s2c, reply=True, split=split, seed=2)
        assert h.to_server == c2s and h.to_client == s2c and h.error is None
        assert all(e.verdict == "forwarded" for e in h.log)
        seen |= {e.fields["api_key"] for e in h.log}
    assert {"produce", "fetch", "metadata", "joingroup", "syncgroup", "offsetcommit", "offsetfetch"} <= seen


@pytest.mark.parametrize("client", sorted(RECORDED))
def test_a_topic_policy_denies_exactly_the_requests_naming_other_topics(client: str) -> None:
    TOPIC_IDS.clear()
    for c2s, s2c in _conns(client):
        # learn the topic ids as the connection's Metadata responses pass
        h = Harness("kafka", rules=[{}])
        h.feed(c2s)
        h.feed(s2c, reply=True)
    denied = forwarded = 0
    for c2s, _ in _conns(client):
        h = Harness("kafka", rules=[{"topic": "rec"}])
        h.feed(c2s, split="bytes")
        assert h.error is None
        for e in h.log:
            topics = e.fields.get("topics", [])
            if e.fields.get("api_key") == "metadata":
                assert e.verdict == "forwarded"  # never denied whole: its response is filtered
            elif "rec2" in topics:
                assert e.verdict == "denied", e.fields
                denied += 1
            elif e.entry_type == "request" and "api_key" in e.fields:
                assert e.verdict == "forwarded", e.fields
                forwarded += 1
    assert denied and forwarded
