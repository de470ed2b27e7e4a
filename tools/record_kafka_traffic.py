#!/usr/bin/env python3
"""Record the bytes real Kafka clients exchange with a real broker: tests/parsers/kafka_recorded.json.

Usage::

    tools/record_kafka_traffic.py [--out tests/parsers/kafka_recorded.json]

Starts tansu (the broker the tests use) behind a recording relay that it advertises, so every
connection of the clients goes through the relay; runs confluent-kafka (librdkafka) and
kafka-python producing one small record to each of two topics (``rec``, ``rec2``) and consuming
both in a consumer group; writes, per client and per connection in the order they opened, the
bytes each way (base64). tests/parsers/test_kafka_recorded.py replays them through the parser.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kafka_fixture import start_tansu  # noqa: E402
from needs import free_port  # noqa: E402

GROUP_TIMINGS = {"session.timeout.ms": 6000, "max.poll.interval.ms": 7000, "heartbeat.interval.ms": 500}


async def _relay(broker: int, port: int, conns: list[dict[str, Any]]) -> asyncio.Server:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        rec: dict[str, Any] = {"c2s": bytearray(), "s2c": bytearray(), "t": time.monotonic()}
        conns.append(rec)
        sr, sw = await asyncio.open_connection("127.0.0.1", broker)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, buf: bytearray) -> None:
            try:
                while data := await r.read(65536):
                    buf += data
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            w.close()

        await asyncio.gather(pump(cr, sw, rec["c2s"]), pump(sr, cw, rec["s2c"]))

    return await asyncio.start_server(handle, "127.0.0.1", port)


def _confluent(boot: str) -> int:
    import confluent_kafka as ck

    p = ck.Producer({"bootstrap.servers": boot, "linger.ms": 0})
    p.produce("rec", b"v" * 50, key=b"k")
    p.produce("rec2", b"w" * 50)
    p.flush(10)
    c = ck.Consumer(
        {"bootstrap.servers": boot, "group.id": "gr", "auto.offset.reset": "earliest", **GROUP_TIMINGS}
    )
    c.subscribe(["rec", "rec2"])
    got = 0
    for _ in range(40):
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got += 1
            if got == 2:
                break
    c.commit(asynchronous=False)
    c.close()
    return got


def _kafka_python(boot: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kafka
    p = kafka.KafkaProducer(bootstrap_servers=boot)
    p.send("rec", b"kp" * 20).get(10)
    p.send("rec2", b"kq" * 20).get(10)
    p.close()
    c = kafka.KafkaConsumer(
        "rec", "rec2", bootstrap_servers=boot, group_id="gk", auto_offset_reset="earliest",
        consumer_timeout_ms=8000, session_timeout_ms=6000, max_poll_interval_ms=7000,
        heartbeat_interval_ms=500,
    )  # fmt: skip
    got = 0
    for _ in c:
        got += 1
        if got >= 2:
            break
    c.commit()
    c.close()
    return got


async def record(client: Any) -> list[dict[str, str]]:
    conns: list[dict[str, Any]] = []
    port = free_port()
    with start_tansu(port) as broker:
        server = await _relay(broker, port, conns)
        got = await asyncio.to_thread(client, f"127.0.0.1:{port}")
        await asyncio.sleep(0.5)
        server.close()
    if got != 2:
        raise RuntimeError(f"{client.__name__}: consumed {got} records, not 2")
    conns.sort(key=lambda c: c["t"])
    b64 = base64.b64encode
    return [{"c2s": b64(bytes(c["c2s"])).decode(), "s2c": b64(bytes(c["s2c"])).decode()} for c in conns]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "parsers" / "kafka_recorded.json")
    args = ap.parse_args()
    out = {"confluent": asyncio.run(record(_confluent)), "kafka-python": asyncio.run(record(_kafka_python))}
    args.out.write_text(json.dumps(out, indent=0) + "\n")
    print(f"{args.out}: " + ", ".join(f"{k} {len(v)} connections" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
