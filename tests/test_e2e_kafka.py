"""The kafka parser end to end: the in-process daemon in front of a real broker, real clients.

The broker is tansu (:mod:`kafka_fixture`), advertising proxyd's listener so that clients keep
going through proxyd when they reconnect to the broker Metadata names. The clients are
aiokafka, kafka-python and confluent-kafka (librdkafka); the synchronous ones run in threads
so that the in-process daemon keeps serving. A denial must reach the client as its topic
authorization error, well within the client's own request timeout (set to 30 s: a denial left
unanswered would show up as a timeout instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka_fixture import import_kafka_python, start_tansu
from needs import free_port
from proxyutil import daemon

from proxyd.server import Daemon

aiokafka = pytest.importorskip("aiokafka")
from aiokafka.errors import TopicAuthorizationFailedError  # noqa: E402

kafka = import_kafka_python()

TIMEOUT = 30.0

CONFIG = """
listeners:
  - name: kafka
    address: "127.0.0.1:{pport}"
    l7proto: kafka
    upstream: "127.0.0.1:{bport}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: kafka}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
"""

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kafka-topics
spec:
  endpointSelector:
    matchLabels: {app: kafka}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: kafka}
      toPorts:
        - ports: [{port: "PORT", protocol: TCP}]
          rules:
            kafka:
RULES
"""

#: Cilium's own style: produce and consume roles on named topics; Metadata hides the rest.
ROLES = """
              - role: produce
                topic: allowed
              - role: consume
                topic: allowed
              - role: produce
                topic: allowed2
              - role: consume
                topic: allowed2
"""
#: Metadata of every topic is open: requests for other topics reach the parser and are denied.
#: Group timings short enough for tansu, which otherwise holds a first JoinGroup ~20 s.
FAST_GROUP = {"session.timeout.ms": 6000, "max.poll.interval.ms": 7000, "heartbeat.interval.ms": 500}
OPEN_METADATA = (
    ROLES
    + """
              - apiKey: metadata
"""
)


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[int, int]]:
    """(broker port, proxy port): tansu advertises the proxy's listener."""
    pport = free_port()
    with start_tansu(pport) as bport:
        yield bport, pport


@contextlib.asynccontextmanager
async def kafka_daemon(broker: tuple[int, int], tmp_path: Path, rules: str = ROLES) -> AsyncIterator[Daemon]:
    bport, pport = broker
    policy = POLICY.replace("PORT", str(bport)).replace("RULES\n", rules)
    async with daemon(CONFIG.format(pport=pport, bport=bport), tmp_path, files={"policy.yaml": policy}) as d:
        yield d


def log_entries(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "access.log"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def l7(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for e in log_entries(tmp_path) if e.get("event") == "l7"]


def _topic(base: str) -> str:
    """A fresh topic name per test, so the module's broker carries nothing across tests."""
    return base if base.startswith("allowed") else f"{base}-{uuid.uuid4().hex[:8]}"


async def _aio_produce(pport: int, topic: str, value: bytes, **kw: Any) -> Any:
    p = aiokafka.AIOKafkaProducer(
        bootstrap_servers=f"127.0.0.1:{pport}", request_timeout_ms=int(TIMEOUT * 1000), **kw
    )
    await p.start()
    try:
        return await p.send_and_wait(topic, value)
    finally:
        await p.stop()


async def test_aiokafka_produce_consume_group_and_denials(broker: tuple[int, int], tmp_path: Path) -> None:
    _, pport = broker
    async with kafka_daemon(broker, tmp_path):
        md = await _aio_produce(pport, "allowed", b"a1")
        assert md.topic == "allowed"
        # A topic outside the policy: Metadata answers TOPIC_AUTHORIZATION_FAILED for it.
        with pytest.raises(TopicAuthorizationFailedError):
            await _aio_produce(pport, _topic("secret"), b"x")
        c = aiokafka.AIOKafkaConsumer(
            "allowed", bootstrap_servers=f"127.0.0.1:{pport}", group_id="g-aio", auto_offset_reset="earliest",
            request_timeout_ms=int(TIMEOUT * 1000), session_timeout_ms=6000, max_poll_interval_ms=7000,
            heartbeat_interval_ms=500,
        )  # fmt: skip
        await c.start()
        try:
            msg = await asyncio.wait_for(c.getone(), TIMEOUT)
            assert msg.topic == "allowed" and msg.value is not None
            await c.commit()
        finally:
            await c.stop()
    entries = l7(tmp_path)
    keys = {e["fields"].get("api_key") for e in entries if e["verdict"] == "forwarded"}
    assert {"produce", "fetch", "joingroup", "syncgroup", "offsetcommit", "findcoordinator"} <= keys
    refused = [e for e in entries if "topics_refused" in e["fields"]]
    assert refused and refused[0]["fields"]["api_key"] == "metadata"
    for e in entries:
        if "api_key" in e["fields"]:
            assert e["fields"]["client_id"].startswith("aiokafka")


async def test_aiokafka_produce_denied_by_the_produce_request(
    broker: tuple[int, int], tmp_path: Path
) -> None:
    """With Metadata open, the Produce itself is denied: its answer is a Produce response."""
    _, pport = broker
    secret = _topic("secret")
    async with kafka_daemon(broker, tmp_path, OPEN_METADATA):
        with pytest.raises(TopicAuthorizationFailedError):
            await _aio_produce(pport, secret, b"x")
        # the connection goes on after a denial: the same producer still produces
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{pport}")
        await p.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await p.send_and_wait(secret, b"y")
            assert (await p.send_and_wait("allowed", b"after")).topic == "allowed"
        finally:
            await p.stop()
    denied = [e for e in l7(tmp_path) if e["verdict"] == "denied"]
    assert denied and all(e["fields"]["api_key"] == "produce" for e in denied)
    assert denied[0]["fields"]["topics"] == [secret]


def _kafka_python_flow(pport: int, secret: str) -> dict[str, Any]:
    KpTopicAuth = kafka.errors.TopicAuthorizationFailedError
    TopicPartition = kafka.structs.TopicPartition
    out: dict[str, Any] = {}
    boot = f"127.0.0.1:{pport}"
    p = kafka.KafkaProducer(
        bootstrap_servers=boot, request_timeout_ms=int(TIMEOUT * 1000), max_block_ms=10_000
    )
    try:
        out["sent"] = p.send("allowed2", b"kp1").get(timeout=TIMEOUT).topic
        p.send("allowed", b"kp2").get(timeout=TIMEOUT)
        try:
            p.send(secret, b"x").get(timeout=TIMEOUT)
            out["secret"] = "sent"
        except KpTopicAuth:
            out["secret"] = "denied"
    finally:
        p.close(timeout=5)
    # a consumer group over two topics: Fetch requests naming both
    c = kafka.KafkaConsumer(
        "allowed", "allowed2", bootstrap_servers=boot, group_id="g-kp", auto_offset_reset="earliest",
        consumer_timeout_ms=int(TIMEOUT * 1000), request_timeout_ms=int(TIMEOUT * 1000) + 1000,
        session_timeout_ms=6000, max_poll_interval_ms=7000, heartbeat_interval_ms=500,
    )  # fmt: skip
    try:
        seen: set[str] = set()
        for msg in c:
            seen.add(msg.topic)
            if seen == {"allowed", "allowed2"}:
                break
        out["consumed"] = sorted(seen)
        c.commit()
    finally:
        c.close()
    # assign() a topic outside the policy: the Fetch (or ListOffsets) naming it is denied
    c = kafka.KafkaConsumer(
        bootstrap_servers=boot, consumer_timeout_ms=5000, request_timeout_ms=int(TIMEOUT * 1000) + 1000
    )
    try:
        c.assign([TopicPartition("allowed", 0), TopicPartition(secret, 0)])
        try:
            c.seek_to_beginning()
            for _ in range(20):
                c.poll(timeout_ms=500)
            out["assign"] = "no error"
        except KpTopicAuth:
            out["assign"] = "denied"
    finally:
        c.close()
    return out


async def test_kafka_python_producer_group_consumer_multi_topic(
    broker: tuple[int, int], tmp_path: Path
) -> None:
    _, pport = broker
    secret = _topic("secret")
    async with kafka_daemon(broker, tmp_path, OPEN_METADATA):
        out = await asyncio.wait_for(asyncio.to_thread(_kafka_python_flow, pport, secret), 4 * TIMEOUT)
    assert out["sent"] == "allowed2"
    assert out["secret"] == "denied"
    assert out["consumed"] == ["allowed", "allowed2"]
    assert out["assign"] == "denied"
    entries = l7(tmp_path)
    multi = [
        e
        for e in entries
        if e["fields"].get("api_key") == "fetch" and len(e["fields"].get("topics", [])) == 2
    ]
    assert multi and all(e["verdict"] == "forwarded" for e in multi)
    denied = [e for e in entries if e["verdict"] == "denied"]
    assert {e["fields"]["api_key"] for e in denied} <= {"produce", "fetch", "offsets"}
    assert any(secret in e["fields"].get("topics", []) for e in denied)


def _confluent_flow(pport: int, secret: str) -> dict[str, Any]:
    import confluent_kafka as ck

    out: dict[str, Any] = {}
    boot = f"127.0.0.1:{pport}"
    reports: list[tuple[str, Any]] = []

    def delivered(err: Any, msg: Any) -> None:
        reports.append((msg.topic(), err))

    p = ck.Producer({"bootstrap.servers": boot, "message.timeout.ms": int(TIMEOUT * 1000), "linger.ms": 0})
    p.produce("allowed", b"ck1", callback=delivered)
    p.produce(secret, b"x", callback=delivered)
    p.flush(TIMEOUT)
    out["reports"] = {t: (e.code() if e is not None else None) for t, e in reports}
    out["auth_code"] = ck.KafkaError.TOPIC_AUTHORIZATION_FAILED
    c = ck.Consumer(
        {"bootstrap.servers": boot, "group.id": "g-ck", "auto.offset.reset": "earliest",
         "enable.auto.commit": False, **FAST_GROUP}
    )  # fmt: skip
    try:
        c.subscribe(["allowed"])
        got = None
        for _ in range(int(TIMEOUT * 2)):
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                got = m.topic()
                break
        out["consumed"] = got
        c.commit(asynchronous=False)
    finally:
        c.close()
    # a Fetch (v13+ names topics by id) of a topic outside the policy
    c = ck.Consumer({"bootstrap.servers": boot, "group.id": "g-ck", "enable.auto.commit": False})
    try:
        c.assign([ck.TopicPartition(secret, 0, ck.OFFSET_BEGINNING)])
        out["fetch_error"] = None
        for _ in range(int(TIMEOUT * 2)):
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                out["fetch_error"] = m.error().code()
                break
    finally:
        c.close()
    return out


async def test_confluent_kafka_producer_and_group_consumer(broker: tuple[int, int], tmp_path: Path) -> None:
    pytest.importorskip("confluent_kafka")
    _, pport = broker
    secret = _topic("secret")
    async with kafka_daemon(broker, tmp_path, OPEN_METADATA):
        out = await asyncio.wait_for(asyncio.to_thread(_confluent_flow, pport, secret), 4 * TIMEOUT)
    assert out["reports"]["allowed"] is None
    assert out["reports"][secret] == out["auth_code"]
    assert out["consumed"] == "allowed"
    assert out["fetch_error"] == out["auth_code"]
    denied = [e for e in l7(tmp_path) if e["verdict"] == "denied"]
    assert denied and denied[0]["fields"]["client_id"] == "rdkafka"


async def test_policy_reload_applies_to_an_open_connection(broker: tuple[int, int], tmp_path: Path) -> None:
    _, pport = broker
    async with kafka_daemon(broker, tmp_path, OPEN_METADATA) as d:
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{pport}")
        await p.start()
        try:
            assert (await p.send_and_wait("allowed2", b"before")).topic == "allowed2"
            policy = POLICY.replace("PORT", str(broker[0])).replace(
                "RULES\n", OPEN_METADATA.replace("topic: allowed2", "topic: allowed")
            )
            (tmp_path / "policy.yaml").write_text(policy)
            assert d.reload_policy("test")
            with pytest.raises(TopicAuthorizationFailedError):
                await p.send_and_wait("allowed2", b"after")
            assert (await p.send_and_wait("allowed", b"still")).topic == "allowed"
        finally:
            await p.stop()
    conns = {e["conn_id"] for e in l7(tmp_path) if e["fields"].get("api_key") == "produce"}
    assert len(conns) == 1  # one connection saw both policies


#: Producing only: consumer groups are refused (FindCoordinator, JoinGroup, ... need `consume`).
PRODUCE_ONLY = """
              - role: produce
                topic: allowed
              - apiKey: metadata
"""


def _group_denied_flows(pport: int) -> dict[str, Any]:
    import confluent_kafka as ck

    out: dict[str, Any] = {"ck_code": ck.KafkaError.GROUP_AUTHORIZATION_FAILED}
    boot = f"127.0.0.1:{pport}"
    c = ck.Consumer({"bootstrap.servers": boot, "group.id": "nogroup", **FAST_GROUP})
    try:
        c.subscribe(["allowed"])
        out["ck"] = None
        for _ in range(int(TIMEOUT * 2)):
            m = c.poll(0.5)
            if m is not None and m.error() is not None:
                out["ck"] = m.error().code()
                break
    finally:
        c.close()
    kc = kafka.KafkaConsumer(
        "allowed", bootstrap_servers=boot, group_id="kg", consumer_timeout_ms=int(TIMEOUT * 1000)
    )
    try:
        for _ in kc:
            break
        out["kp"] = "no error"
    except kafka.errors.GroupAuthorizationFailedError:
        out["kp"] = "group denied"
    finally:
        kc.close()
    return out


async def test_group_requests_denied_and_acks_zero(broker: tuple[int, int], tmp_path: Path) -> None:
    _, pport = broker
    async with kafka_daemon(broker, tmp_path, PRODUCE_ONLY):
        # acks=0: a denied produce gets no answer, and the connection's next answers stay in order
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{pport}", acks=0)
        await p.start()
        try:
            await p.send_and_wait(_topic("secret"), b"x")
            await p.send_and_wait("allowed", b"y")
        finally:
            await p.stop()
        assert (await _aio_produce(pport, "allowed", b"z")).topic == "allowed"
        out = await asyncio.wait_for(asyncio.to_thread(_group_denied_flows, pport), 4 * TIMEOUT)
    assert out["ck"] == out["ck_code"]
    assert out["kp"] == "group denied"
    denied = [e["fields"]["api_key"] for e in l7(tmp_path) if e["verdict"] == "denied"]
    assert denied[0] == "produce" and "findcoordinator" in denied
