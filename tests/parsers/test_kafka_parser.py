"""The kafka parser through the harness: every API key and version (whole, byte by byte, split
anywhere), denials in response order, Metadata rewriting, topic ids, fetch sessions, large
produce requests streamed, protocol errors, and the split/fuzz properties."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka_wire import (
    HARNESS_UPSTREAM,
    ID_OK,
    ID_SECRET,
    decode_response,
    error_codes,
    request,
    response,
    sample,
    sample_request,
    sample_response,
)

from proxyd.ops import DROP, ERROR, PASS
from proxyd.parsers.kafka.apis import APIS
from proxyd.parsers.kafka.parser import ALWAYS_ALLOWED
from proxyd.parsers.kafka.rules import METADATA, PRODUCE
from proxyd.parsers.kafka.schema import layout
from proxyd.parsers.kafka.topicids import TOPIC_IDS
from proxyd.testing import Harness

TOPIC_RULES = [{"topic": "ok"}]  # any API key, but only the topic "ok" where a request names topics
ALL_VERSIONS = [(k, v) for k, api in sorted(APIS.items()) for v in range(api[1], api[2] + 1)]
SPLITS: list[Any] = [None, "bytes", "random"]


@pytest.fixture(autouse=True)
def _ids() -> None:
    TOPIC_IDS.learn(HARNESS_UPSTREAM, ID_OK, "ok")
    TOPIC_IDS.learn(HARNESS_UPSTREAM, ID_SECRET, "secret")


def harness(rules: list[dict[str, str]] | None = None, **kw: Any) -> Harness:
    return Harness("kafka", rules=TOPIC_RULES if rules is None else rules, **kw)


def topic_type(key: int, version: int) -> bool:
    lay = layout(key, version, False)
    return lay is not None and lay.topics


@pytest.mark.parametrize(("key", "version"), ALL_VERSIONS)
def test_every_version_allowed_passes_unchanged(key: int, version: int) -> None:
    wire = sample_request(key, version, "ok", corr=7)
    for split in SPLITS:
        h = harness()
        h.feed(wire, split=split, seed=version)
        assert h.to_server == wire and h.to_client == b"" and h.error is None
        assert h.log[-1].verdict == "forwarded"
        assert h.log[-1].fields["correlation_id"] == 7


@pytest.mark.parametrize(("key", "version"), ALL_VERSIONS)
def test_every_version_denied_gets_its_own_response(key: int, version: int) -> None:
    if key in ALWAYS_ALLOWED or key == METADATA:
        return  # never denied (test_always_allowed, the Metadata tests)
    named = topic_type(key, version)
    rules = TOPIC_RULES if named else [{"apiKey": "listgroups" if key != 16 else "produce"}]
    wire = sample_request(key, version, "secret", corr=0x01020304)
    outs = set()
    for split in SPLITS:
        h = harness(rules)
        h.feed(wire, split=split, seed=key)
        assert h.to_server == b"" and h.error is None, (split, h.error)
        assert h.log[-1].verdict == "denied"
        outs.add(h.to_client)
    assert len(outs) == 1
    frame = outs.pop()
    corr, tree = decode_response(key, version, frame)
    assert corr == 0x01020304
    codes = set(error_codes(tree))
    if key == 35 and version < 3:
        assert codes == set()  # DescribeLogDirs v0-2 has no error field outside its log dirs
    elif named:
        assert codes == {29}
    elif (
        key in (10, 11, 12, 13, 14, 15, 42, 69, 77, 68, 76, 79, 78, 25) or layout(key, version, False).groups
    ):  # type: ignore[union-attr]
        assert codes <= {30}
    else:
        assert codes <= {31}
    if key == PRODUCE:  # the partitions of the request, each with the error
        (topic,) = tree["Responses"]
        assert topic.get("Name", "secret") == "secret"
        assert [p["ErrorCode"] for p in topic["PartitionResponses"]] == [29]


def test_byte_split_everywhere_for_a_pipeline() -> None:
    """An allowed produce, a denied one, an allowed fetch; cut in two at every byte."""
    a = sample_request(PRODUCE, 9, "ok", corr=1)
    b = sample_request(PRODUCE, 9, "secret", corr=2)
    c = sample_request(1, 12, "ok", corr=3)
    wire = a + b + c
    ra, rc = sample_response(PRODUCE, 9, corr=1), sample_response(1, 12, corr=3)
    expect_client = None
    for cut in range(1, len(wire)):
        h = harness()
        h.feed(wire, split=[cut])
        assert h.to_server == a + c
        h.feed(ra + rc, reply=True, split=[cut % len(ra) or 1])
        if expect_client is None:
            expect_client = h.to_client
        assert h.to_client == expect_client
    assert expect_client is not None
    assert expect_client.startswith(ra) and expect_client.endswith(rc)
    corr, _ = decode_response(PRODUCE, 9, expect_client[len(ra) : -len(rc)])
    assert corr == 2


def test_denial_waits_for_the_responses_before_it() -> None:
    h = harness()
    h.feed(sample_request(PRODUCE, 7, "ok", corr=1) + sample_request(PRODUCE, 7, "secret", corr=2))
    assert h.to_client == b""  # the denial of 2 must follow the response to 1
    r1 = sample_response(PRODUCE, 7, corr=1)
    h.feed(r1[:5], reply=True)
    assert h.to_client == b""
    h.feed(r1[5:], reply=True)
    assert h.to_client.startswith(r1)
    assert decode_response(PRODUCE, 7, h.to_client[len(r1) :])[0] == 2
    # nothing pending: the next denial goes out at once
    before = len(h.to_client)
    h.feed(sample_request(PRODUCE, 7, "secret", corr=3))
    assert decode_response(PRODUCE, 7, h.to_client[before:])[0] == 3


def test_acks_zero_produce_gets_nothing() -> None:
    h = harness()
    allowed = sample_request(PRODUCE, 9, "ok", corr=1, Acks=0)
    denied = sample_request(PRODUCE, 9, "secret", corr=2, Acks=0)
    nxt = sample_request(PRODUCE, 9, "ok", corr=3)
    h.feed(allowed + denied + nxt)
    assert h.to_server == allowed + nxt and h.to_client == b""
    r3 = sample_response(PRODUCE, 9, corr=3)
    h.feed(r3, reply=True)  # no response to 1 is expected: 3's answers 3
    assert h.to_client == r3 and h.error is None
    assert [e.verdict for e in h.log] == ["forwarded", "denied", "forwarded"]


def test_always_allowed_and_sasl_never_logged() -> None:
    h = harness([{"apiKey": "produce", "topic": "nothing"}])
    wire = (
        sample_request(18, 3, corr=1)
        + request(17, 1, {"Mechanism": "PLAIN"}, corr=2)
        + request(36, 2, {"AuthBytes": b"\0user\0secret-password"}, corr=3)
    )
    h.feed(wire)
    assert h.to_server == wire
    assert [e.fields["api_key"] for e in h.log] == ["apiversions", "saslhandshake", "saslauthenticate"]
    assert "secret-password" not in repr([e.fields for e in h.log])


def test_unknown_version_forwarded_when_allowed_closed_when_denied() -> None:
    wire = struct.pack(">ihhih", 10, 0, 99, 5, -1)
    h = harness([{}])
    h.feed(wire)
    assert h.to_server == wire and h.log[-1].fields["api_version"] == 99
    h = harness()  # topic rules: a request whose topics cannot be read is denied, and closes
    h.feed(wire)
    assert h.to_server == b"" and h.error is not None and h.error.kind == "parser_error"


def _metadata(version: int, topics: list[tuple[str, bytes]], corr: int) -> bytes:
    lay = layout(METADATA, version, True)
    assert lay is not None
    tree = sample(lay, "x", ID_OK)
    tree["Topics"] = [
        {"ErrorCode": 0, "Name": name, "TopicId": tid, "IsInternal": False,
         "Partitions": [{"ErrorCode": 0, "PartitionIndex": 0, "LeaderId": 1, "ReplicaNodes": [1],
                         "IsrNodes": [1]}]}
        for name, tid in topics
    ]  # fmt: skip
    return response(METADATA, version, tree, corr)


@pytest.mark.parametrize("version", range(0, 13))
def test_metadata_named_topics_refused_with_29(version: int) -> None:
    TOPIC_IDS.clear()
    h = harness()
    req = request(
        METADATA,
        version,
        {"Topics": [{"Name": "ok"}, {"Name": "secret"}], "AllowAutoTopicCreation": False},
        corr=4,
    )
    h.feed(req)
    assert h.to_server == req
    resp = _metadata(version, [("ok", ID_OK), ("secret", ID_SECRET)], 4)
    for split in SPLITS:
        h = harness()
        h.feed(req)
        h.feed(resp, reply=True, split=split, seed=version)
        corr, tree = decode_response(METADATA, version, h.to_client)
        assert corr == 4
        ok, secret = tree["Topics"]
        assert ok["Name"] == "ok" and ok["ErrorCode"] == 0 and len(ok["Partitions"]) == 1
        assert secret["Name"] == "secret" and secret["ErrorCode"] == 29 and secret["Partitions"] == []
        assert h.log[-1].fields["topics_refused"] == ["secret"]
    if version >= 10:  # the ids were learnt from the response (both: the map is not a secret)
        assert TOPIC_IDS.name(HARNESS_UPSTREAM, ID_SECRET) == "secret"


@pytest.mark.parametrize("version", [0, 1, 4, 9, 12])
def test_metadata_all_topics_leaves_the_refused_out(version: int) -> None:
    h = harness()
    req = request(METADATA, version, {"Topics": [] if version == 0 else None, "AllowAutoTopicCreation": True})
    h.feed(req)
    h.feed(_metadata(version, [("secret", ID_SECRET), ("ok", ID_OK), ("secret2", ID_SECRET)], 1), reply=True)
    _, tree = decode_response(METADATA, version, h.to_client)
    assert [t["Name"] for t in tree["Topics"]] == ["ok"]


def test_metadata_all_allowed_is_byte_identical() -> None:
    h = harness([{}])
    req = request(METADATA, 12, {"Topics": None})
    resp = _metadata(12, [("secret", ID_SECRET), ("ok", ID_OK)], 1)
    h.feed(req)
    h.feed(resp, reply=True, split="bytes")
    assert h.to_client == resp


def test_topic_ids_resolved_else_denied() -> None:
    h = harness()
    ok = sample_request(1, 13, "ok", corr=1)
    secret = sample_request(1, 13, "secret", corr=2)
    h.feed(ok + secret)
    assert h.to_server == ok
    assert h.log[0].fields["topics"] == ["ok"] and h.log[1].fields["topics"] == ["secret"]
    unknown = request(1, 13, {"Topics": [{"TopicId": b"\x77" * 16, "Partitions": [{"Partition": 0}]}],
                              "SessionEpoch": -1}, corr=3)  # fmt: skip
    h.feed(unknown)
    assert h.log[-1].verdict == "denied" and "topic id" in h.log[-1].fields["reason"]


def _fetch(corr: int, sid: int, epoch: int, topics: list[str], forgotten: list[str] | None = None) -> bytes:
    return request(1, 12, {
        "SessionId": sid, "SessionEpoch": epoch,
        "Topics": [{"Topic": t, "Partitions": [{"Partition": 0}]} for t in topics],
        "ForgottenTopicsData": [{"Topic": t, "Partitions": [0]} for t in forgotten or []],
    }, corr)  # fmt: skip


def _fetch_response(corr: int, sid: int) -> bytes:
    return response(1, 12, {"SessionId": sid, "Responses": []}, corr)


def test_fetch_sessions_judged_by_every_partition_they_hold() -> None:
    allowed = {"ok", "ok2"}
    h = Harness("kafka", policy=lambda r: r.topic is None or r.topic in allowed)
    h.feed(_fetch(1, 0, 0, ["ok", "ok2"]))
    h.feed(_fetch_response(1, 55), reply=True)
    h.feed(_fetch(2, 55, 1, []))  # incremental, nothing new: reads ok and ok2
    assert h.log[-1].verdict == "forwarded" and h.log[-1].fields["topics"] == ["ok", "ok2"]
    h.feed(_fetch_response(2, 55), reply=True)
    h.feed(_fetch(3, 55, 2, [], forgotten=["ok2"]))
    assert h.log[-1].fields["topics"] == ["ok"]
    h.feed(_fetch_response(3, 55), reply=True)
    allowed.discard("ok")  # a policy change applies to the session's partitions
    before = len(h.to_client)
    h.feed(_fetch(4, 55, 3, []))
    assert h.log[-1].verdict == "denied" and h.log[-1].fields["topics"] == ["ok"]
    assert decode_response(1, 12, h.to_client[before:])[0] == 4
    # a session this connection never saw opened: FETCH_SESSION_ID_NOT_FOUND (70)
    before = len(h.to_client)
    h.feed(_fetch(5, 99, 4, []))
    corr, tree = decode_response(1, 12, h.to_client[before:])
    assert corr == 5 and tree["ErrorCode"] == 70


def test_large_produce_streams_past_the_buffer() -> None:
    records = b"R" * 20000
    lay = layout(PRODUCE, 9, False)
    assert lay is not None
    tree = sample(lay, "ok", ID_OK)
    tree["TopicData"][0]["PartitionData"][0]["Records"] = records
    ok = request(PRODUCE, 9, tree, corr=1)
    tree["TopicData"][0]["Name"] = "secret"
    secret = request(PRODUCE, 9, tree, corr=2)
    for split in [None, [100] * 400, "random"]:
        h = harness(parser_config={"max_inspect_bytes": 4096}, buffer_limit=8192)
        h.feed(ok + secret, split=split, seed=3)
        assert h.to_server == ok and h.error is None
        assert h.engine.buffered(False) == 0
        assert [e.verdict for e in h.log] == ["forwarded", "denied"]


def test_two_topic_produce_held_until_both_names_are_read() -> None:
    lay = layout(PRODUCE, 9, False)
    assert lay is not None
    tree = sample(lay, "ok", ID_OK)
    first = tree["TopicData"][0]
    first["PartitionData"][0]["Records"] = b"R" * 3000
    tree["TopicData"] = [first, {"Name": "secret", "PartitionData": [{"Index": 1, "Records": b"S"}]}]
    wire = request(PRODUCE, 9, tree, corr=9)
    h = harness(parser_config={"max_inspect_bytes": 4096})
    h.feed(wire, split="random", seed=1)
    assert h.to_server == b"" and h.log[-1].fields["topics"] == ["ok", "secret"]
    _, resp = decode_response(PRODUCE, 9, h.to_client)
    assert [(t["Name"], [p["Index"] for p in t["PartitionResponses"]]) for t in resp["Responses"]] == [
        ("ok", [0]),
        ("secret", [1]),
    ]
    # topics beyond max_inspect_bytes: denied with the reason
    first["PartitionData"][0]["Records"] = b"R" * 6000
    h = harness(parser_config={"max_inspect_bytes": 4096})
    h.feed(request(PRODUCE, 9, tree, corr=10), split=[1000] * 10)
    assert h.log[-1].verdict == "denied" and "max_inspect_bytes" in h.log[-1].fields["reason"]


def test_malformed_request_closes_after_what_is_owed() -> None:
    h = harness()
    ok = sample_request(PRODUCE, 9, "ok", corr=1)
    h.feed(ok + struct.pack(">i", 3) + b"abc")
    assert h.to_server == ok and h.error is None
    r1 = sample_response(PRODUCE, 9, corr=1)
    h.feed(r1, reply=True)
    assert h.to_client == r1 and h.error is not None
    h = harness()
    body = struct.pack(">hhih", 0, 9, 1, 0) + b"\x00\xff\xff"
    h.feed(struct.pack(">i", len(body)) + body)
    assert h.error is not None and h.to_server == b""


def test_response_with_the_wrong_correlation_id_closes() -> None:
    h = harness()
    h.feed(sample_request(PRODUCE, 9, "ok", corr=1))
    h.feed(sample_response(PRODUCE, 9, corr=2), reply=True)
    assert h.error is not None and "correlation" in h.log[-1].fields["error"]


def test_header_versions_and_null_client_id() -> None:
    h = harness([{"clientID": "me"}])
    wire = request(3, 12, {"Topics": None}, corr=1, client=None) + request(
        12, 4, {"GroupId": "g"}, corr=2, client=b"me"
    )
    h.feed(wire)
    assert h.log[0].fields["client_id"] is None and h.log[1].fields["client_id"] == "me"
    assert h.to_server == wire  # Metadata is never denied whole; Heartbeat from "me" allowed


FRAMES = [
    sample_request(PRODUCE, 9, "ok", corr=1),
    sample_request(PRODUCE, 3, "secret", corr=2),
    sample_request(1, 12, "ok", corr=3),
    sample_request(1, 16, "secret", corr=4),
    sample_request(11, 9, corr=5),
    sample_request(8, 9, "secret", corr=6),
    sample_request(PRODUCE, 9, "ok", corr=7, Acks=0),
    request(METADATA, 12, {"Topics": None}, corr=8),
]


@settings(max_examples=100, deadline=None)
@given(
    picks=st.lists(st.sampled_from(range(len(FRAMES))), min_size=1, max_size=6),
    cut=st.lists(st.integers(1, 40), max_size=30),
)
def test_any_segmentation_gives_the_same_result(picks: list[int], cut: list[int]) -> None:
    wire = b"".join(FRAMES[i] for i in picks)

    def run(split: Any) -> tuple[Any, ...]:
        h = harness()
        h.feed(wire, split=split)
        return h.to_server, h.to_client, h.dropped, h.error and h.error.kind, [e.fields for e in h.log]

    assert run(cut) == run(None) == run("bytes")


@settings(max_examples=150, deadline=None)
@given(
    data=st.lists(
        st.one_of(st.sampled_from(FRAMES), st.binary(max_size=30),
                  st.sampled_from(FRAMES).map(lambda f: f[: len(f) // 2])),
        max_size=6,
    ).map(b"".join),
    reply=st.binary(max_size=60),
)  # fmt: skip
def test_never_raises_and_stays_bounded(data: bytes, reply: bytes) -> None:
    h = harness(buffer_limit=256, parser_config={"max_inspect_bytes": 4096})
    h.feed(data, split="random", seed=len(data))
    h.feed(reply, reply=True, split="bytes")
    assert h.error is None or h.error.kind != "exception", h.error
    assert h.engine.buffered(False) <= 256 and h.engine.buffered(True) <= 256


def test_random_frames_fuzz() -> None:
    """Random bodies under valid headers of every key: each is passed, denied or closes the
    connection; none raises."""
    import random

    rnd = random.Random(7)
    for key, version in ALL_VERSIONS:
        for _ in range(3):
            body = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 40)))
            hdr = (
                struct.pack(">hhih", key, version, 1, 1)
                + b"c"
                + (b"\x00" if version >= APIS[key][3] else b"")
            )
            h = harness()
            h.feed(struct.pack(">i", len(hdr) + len(body)) + hdr + body, split="random", seed=key)
            assert h.error is None or h.error.kind == "parser_error", (key, version, h.error)
    assert ERROR and DROP and PASS  # the ops these outcomes are made of


def test_sasl_handshake_v0_then_unframed_tokens_closes() -> None:
    h = harness()
    hs = request(17, 0, {"Mechanism": "PLAIN"}, corr=1)
    h.feed(hs)
    assert h.to_server == hs and h.error is None
    h.feed(struct.pack(">i", 5) + b"\0u\0pw")  # a raw SASL token, no request header
    r = response(17, 0, {"ErrorCode": 0, "Mechanisms": ["PLAIN"]}, corr=1)
    h.feed(r, reply=True)
    assert h.to_client == r and h.error is not None  # answered what was owed, then closed
    assert "SaslHandshake v0" in h.log[-1].fields["error"]


def test_repeated_metadata_bodies_are_judged_by_the_policy_in_force() -> None:
    allowed = {"ok", "secret"}
    h = Harness("kafka", policy=lambda r: r.topic is None or r.topic in allowed)
    body = [("ok", ID_OK), ("secret", ID_SECRET)]
    for corr in (1, 2, 3):
        h.feed(request(METADATA, 12, {"Topics": None}, corr=corr))
        before = len(h.to_client)
        resp = _metadata(12, body, corr)
        h.feed(resp, reply=True)
        _, tree = decode_response(METADATA, 12, h.to_client[before:])
        names = [t["Name"] for t in tree["Topics"]]
        if corr < 3:
            assert h.to_client[before:] == resp and names == ["ok", "secret"]
        else:
            assert names == ["ok"]
        if corr == 2:
            allowed.discard("secret")  # a policy change: the same body, judged again


#: (request, the server's response or None when none comes) pairs for the reply-side property.
EXCHANGES = [
    (sample_request(PRODUCE, 9, "ok", corr=11), sample_response(PRODUCE, 9, corr=11)),
    (sample_request(PRODUCE, 9, "secret", corr=12), None),
    (sample_request(1, 12, "ok", corr=13), sample_response(1, 12, corr=13)),
    (
        request(METADATA, 12, {"Topics": None}, corr=14),
        _metadata(12, [("ok", ID_OK), ("secret", ID_SECRET)], 14),
    ),
    (
        request(METADATA, 4, {"Topics": [{"Name": "secret"}]}, corr=15),
        _metadata(4, [("secret", ID_SECRET)], 15),
    ),
    (sample_request(11, 9, corr=16), sample_response(11, 9, corr=16)),
    (sample_request(PRODUCE, 9, "ok", corr=17, Acks=0), None),
]


@settings(max_examples=100, deadline=None)
@given(
    picks=st.lists(st.sampled_from(range(len(EXCHANGES))), min_size=1, max_size=6),
    cut=st.lists(st.integers(1, 60), max_size=40),
)
def test_responses_any_segmentation_gives_the_same_result(picks: list[int], cut: list[int]) -> None:
    reqs, resps = [], []
    for i in picks:
        req, resp = EXCHANGES[i]
        reqs.append(req)
        if resp is not None:
            resps.append(resp)
    wire, answers = b"".join(reqs), b"".join(resps)

    def run(split: Any) -> tuple[Any, ...]:
        h = harness()
        h.feed(wire, split=split)
        h.feed(answers, reply=True, split=split)
        return h.to_server, h.to_client, h.error and h.error.kind, [e.fields for e in h.log]

    whole = run(None)
    assert run(cut) == whole == run("bytes")
    if len(set(picks)) == len(picks):  # distinct correlation ids: a well-formed conversation
        assert whole[2] is None


@settings(max_examples=200, deadline=None)
@given(
    frame=st.sampled_from(FRAMES),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_mutated_frames_never_raise(frame: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(frame)
    for pos, x in flips:
        data[pos % len(data)] ^= x
    h = harness(buffer_limit=4096, parser_config={"max_inspect_bytes": 4096})
    h.feed(bytes(data), split="random", seed=len(flips))
    assert h.error is None or h.error.kind in ("parser_error", "buffer_limit"), h.error


def _api_versions(version: int, corr: int, produce_max: int) -> bytes:
    keys = [
        {"ApiKey": 0, "MinVersion": 3, "MaxVersion": produce_max},
        {"ApiKey": 1, "MinVersion": 4, "MaxVersion": 17},
        {"ApiKey": 18, "MinVersion": 0, "MaxVersion": 4},
    ]
    return response(18, version, {"ErrorCode": 0, "ApiKeys": keys}, corr)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4])
def test_api_versions_capped_only_where_policy_needs_the_request_read(version: int) -> None:
    table_max = APIS[PRODUCE][2]
    req = request(18, version, {"ClientSoftwareName": "t", "ClientSoftwareVersion": "1"}, corr=1)
    newer = _api_versions(version, 1, table_max + 2)
    for split in SPLITS:
        h = harness()  # topic rules: a Produce past the table could not be judged
        h.feed(req)
        h.feed(newer, reply=True, split=split, seed=version)
        _, tree = decode_response(18, version, h.to_client)
        assert [k["MaxVersion"] for k in tree["ApiKeys"]] == [table_max, 17, 4]
        assert h.log[-1].fields["versions_capped"] == [f"produce v{table_max + 2}->v{table_max}"]
    h = harness([{}])  # allow-all: the answer passes byte for byte
    h.feed(req)
    h.feed(newer, reply=True)
    assert h.to_client == newer
    h = harness()  # nothing past the table: byte for byte
    h.feed(req)
    same = _api_versions(version, 1, table_max)
    h.feed(same, reply=True)
    assert h.to_client == same


def test_allowed_produce_streams_once_its_topic_is_read() -> None:
    """Record batches of an allowed produce are never held: it is decided from its head."""
    lay = layout(PRODUCE, 9, False)
    assert lay is not None
    tree = sample(lay, "ok", ID_OK)
    tree["TopicData"][0]["PartitionData"] = [{"Index": i, "Records": b"R" * 6000} for i in range(3)]
    wire = request(PRODUCE, 9, tree, corr=1)
    for split in [[512] * 60, "random"]:
        h = harness(buffer_limit=4096)  # far below the 18 KB request
        h.feed(wire, split=split, seed=5)
        assert h.to_server == wire and h.error is None
        assert h.engine.buffered(False) == 0
    tree["TopicData"][0]["Name"] = "secret"  # a denial reads the whole request (never forwarded)
    secret = request(PRODUCE, 9, tree, corr=2)
    outs = set()
    for split in [None, [512] * 60, "random"]:
        h = harness()
        h.feed(secret, split=split, seed=6)
        assert h.to_server == b"" and h.log[-1].verdict == "denied"
        outs.add(h.to_client)
    (frame,) = outs
    _, resp = decode_response(PRODUCE, 9, frame)
    assert [p["Index"] for p in resp["Responses"][0]["PartitionResponses"]] == [0, 1, 2]
