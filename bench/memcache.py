#!/usr/bin/env python3
# ruff: noqa: E501, E402  (report-building f-strings and table rows read better unwrapped)
"""memcache benchmark: memcached direct vs HAProxy (mode tcp, 1 thread) vs proxyd L4 vs proxyd memcache.

One run starts everything on free loopback ports, measures, stops everything and prints a
markdown table (also written to ``bench/results/memcache-<date>.md``)::

    python bench/memcache.py                 # ~10 s per load point (about 3 minutes in all)
    python bench/memcache.py --quick         # short runs, for development
    python bench/memcache.py --seconds 20 --proxyd-src /tmp/proxyd-proto   # another tree too

What runs (see bench/README.md for the reasoning):

- ``memcached -t 1 -m 256``; HAProxy 2.x ``mode tcp``, ``nbthread 1``; proxyd as a plain L4
  relay (listener without ``l7proto``); proxyd with ``l7proto: memcache``, identities and a
  CiliumNetworkPolicy allowing get/set for the key shapes the load uses (plus rules the load
  never matches), ``access_log.requests: denied`` to a file. Each proxyd is a subprocess
  ``python -m proxyd run --config ...``, ready when its admin ``/readyz`` answers 200.
- Request load: memaslap (Debian ``libmemcached-tools``: ``memcaslap`` or ``memaslap``) for a
  fixed time, 90 % get / 10 % set, 32-byte keys, 100-byte values, at 1 and 50 connections, one
  memaslap thread (the machine has 2 cores: load generator + server + proxy already make 3
  busy threads). Falls back to a small built-in asyncio load generator when memaslap is absent.
- CPU per op: utime+stime of the proxy process (memcached's for direct) from /proc/PID/stat,
  before and after, divided by the ops done.
- Rounds (``--rounds``, 3 by default): each request point runs every target once per round, in
  turn; the table gives medians and each round's ratio to HAProxy, and the floors are judged on
  the median ratio (the pure path runs in the first round only).
- Bulk: 1 GiB (``--bulk-mib``) sent through each L4 relay (and directly) to a sink process that
  reads until EOF and answers the byte count; MB/s = 10^6 bytes/s.
- Churn: a new connection per request (``get`` of one key, read ``END``, close), 8 concurrent
  workers in one uvloop process, bounded by time and count.

Every load loop is bounded in count and time, everything is on 127.0.0.1. Ratios are to
HAProxy measured in the same run: the machine is shared and noisy, absolute numbers drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds http.py (the http benchmark): as a script's own directory it comes first on
# sys.path and would shadow the standard library's http package (urllib). Keep it, last.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from benchlib import Procs, combine_rounds, cpu_seconds, each_round, exchange, free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent
KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"
# memaslap's keys: 8 bytes of binary per-connection prefix (e.g. b"\\x10\\xb0\\x10..."), then random
# characters over KEY_CHARS; the policy allows exactly that shape for get and set.
KEY_REGEX = "(?s)^.{8}[A-Za-z0-9.-]{8}"

# --------------------------------------------------------------------------------------------
# helper subprocess modes: sink, load generator (fallback), churn client
# --------------------------------------------------------------------------------------------


def run_sink(port: int) -> None:
    """Accept connections one at a time; read to EOF; answer the byte count (8 bytes, BE)."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        c, _ = ls.accept()
        c.settimeout(300)
        total = 0
        try:
            while True:
                n = c.recv_into(view)
                if not n:
                    break
                total += n
            c.sendall(total.to_bytes(8, "big"))
        except OSError:
            pass
        finally:
            c.close()


async def _churn(port: int, seconds: float, max_conns: int, workers: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done = 0
    errors = 0
    deadline = time.monotonic() + seconds
    req = b"get churn-k-key-bench\r\n"

    async def worker() -> None:
        nonlocal done, errors
        while done + errors < max_conns and time.monotonic() < deadline:
            s = socket.socket()
            s.setblocking(False)
            try:
                await loop.sock_connect(s, ("127.0.0.1", port))
                await loop.sock_sendall(s, req)
                got = b""
                while not got.endswith(b"END\r\n") and not got.startswith(b"CLIENT_ERROR"):
                    chunk = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
                    if not chunk:
                        raise OSError("closed early")
                    got += chunk
                if got.startswith(b"CLIENT_ERROR"):
                    raise OSError(got.decode(errors="replace"))
                done += 1
            except (OSError, TimeoutError):
                errors += 1
            finally:
                s.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return {"conns": done, "errors": errors, "seconds": time.monotonic() - t0}


async def _ops(port: int, seconds: float, conns: int, max_ops: int) -> dict[str, Any]:
    """Fallback load generator: persistent connections, 90 % get / 10 % set, one request in flight."""
    value = b"x" * 100
    deadline = time.monotonic() + seconds
    lats: list[float] = []
    ops = 0
    errors = 0

    async def worker(i: int) -> None:
        nonlocal ops, errors
        r, w = await asyncio.open_connection("127.0.0.1", port)
        rnd = random.Random(i)
        keys = [
            b"bench%03d" % i + "".join(rnd.choice(KEY_CHARS) for _ in range(24)).encode() for _ in range(1000)
        ]
        for k in keys[:100]:
            w.write(b"set %s 0 0 100\r\n%s\r\n" % (k, value))
            await w.drain()
            await r.readline()
        while ops < max_ops and time.monotonic() < deadline:
            k = keys[rnd.randrange(100)] if rnd.random() < 0.9 else keys[rnd.randrange(1000)]
            t = time.perf_counter()
            if rnd.random() < 0.1:
                w.write(b"set %s 0 0 100\r\n%s\r\n" % (k, value))
                line = await r.readline()
                ok = line == b"STORED\r\n"
            else:
                w.write(b"get %s\r\n" % k)
                line = await r.readline()
                ok = True
                while line.startswith(b"VALUE"):
                    await r.readexactly(int(line.split()[3]) + 2)
                    line = await r.readline()
                ok = line == b"END\r\n"
            lats.append(time.perf_counter() - t)
            ops += 1
            errors += not ok
        w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(conns)))
    el = time.monotonic() - t0
    lats.sort()
    return {
        "ops": ops,
        "errors": errors,
        "seconds": el,
        "mean_us": 1e6 * sum(lats) / max(1, len(lats)),
        "p99_us": 1e6 * lats[int(0.99 * (len(lats) - 1))] if lats else 0.0,
    }


def helper_main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "sink":
        run_sink(int(argv[1]))
        return
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if mode == "churn":
        port, seconds, max_conns, workers = int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(runner(_churn(port, seconds, max_conns, workers))))
    elif mode == "ops":
        port, seconds, conns, max_ops = int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(runner(_ops(port, seconds, conns, max_ops))))


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready after {timeout}s ({proc.args!r})")


HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend mc
    bind 127.0.0.1:{mc_front}
    default_backend mc
backend mc
    server memcached 127.0.0.1:{mc}
frontend bulk
    bind 127.0.0.1:{bulk_front}
    default_backend bulk
backend bulk
    server sink 127.0.0.1:{sink}
"""

PROXYD_L4 = """\
listeners:
  - name: mc-l4
    address: "127.0.0.1:{mc_front}"
    upstream: "127.0.0.1:{mc}"
  - name: bulk-l4
    address: "127.0.0.1:{bulk_front}"
    upstream: "127.0.0.1:{sink}"
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
limits:
  max_connections: 20000
"""

PROXYD_L7 = """\
listeners:
  - name: mc-l7
    address: "127.0.0.1:{mc_front}"
    l7proto: memcache
    upstream: "127.0.0.1:{mc}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: memcached, role: bench-client}}
policy:
  paths: [policy.yaml]
  mode: enforce
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
limits:
  max_connections: 20000
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: memcache-bench
spec:
  endpointSelector:
    matchLabels: {{app: memcached}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{role: bench-client}}
      toPorts:
        - ports: [{{port: "{mc}", protocol: TCP}}]
          rules:
            l7proto: memcache
            l7:
              # never matched by the load: evaluated first, and fails
              - command: writeGroup
                keyPrefix: "alliance/fleet/"
              - command: get
                keyRegex: "{regex}"
              - command: set
                keyRegex: "{regex}"
"""

MEMASLAP_CFG = """\
key
32 32 1
value
100 100 1
cmd
0 0.1
1 0.9
"""


class Target:
    def __init__(self, name: str, port: int, pid: int, bulk_port: int | None) -> None:
        self.name = name
        self.port = port
        self.pid = pid  # the process whose CPU is charged
        self.bulk_port = bulk_port


def start_proxyd(
    procs: Procs, tmp: Path, tag: str, src: Path, text: str, files: dict[str, str],
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[Any], int]:
    d = tmp / tag
    d.mkdir()
    admin = free_port()
    (d / "proxyd.yaml").write_text(text.replace("{admin}", str(admin)))
    for name, body in files.items():
        (d / name).write_text(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env or {})
    p = procs.start(tag, [sys.executable, "-m", "proxyd", "run", "--config", str(d / "proxyd.yaml")], env)
    wait_ready(f"http://127.0.0.1:{admin}/readyz", p)
    return p, admin


def check_policy(port: int) -> str:
    """One allowed and one denied request through the memcache listener."""
    got = exchange(port, b"set bench-check-key1 0 0 2\r\nok\r\ndelete bench-check-key1\r\nget bench-check-key1\r\n", 5)
    want = b"STORED\r\nCLIENT_ERROR access denied\r\nVALUE bench-check-key1 0 2\r\nok\r\nEND\r\n"
    if got != want:
        raise RuntimeError(f"policy check through proxyd memcache failed: {got!r}")
    return "set allowed, delete denied (CLIENT_ERROR access denied), get allowed"


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def parse_memaslap(out: str) -> dict[str, Any]:
    m = re.search(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", out)
    if not m:
        raise RuntimeError("memaslap output not understood:\n" + out[-2000:])
    res: dict[str, Any] = {"seconds": float(m.group(1)), "ops": int(m.group(2)), "tps": int(m.group(3))}
    block = out.split("Total Statistics (", 1)
    if len(block) == 2:
        b = block[1].split("\n\n", 1)[0]
        am = re.search(r"Avg:\s+([\d.]+)", b)
        res["mean_us"] = float(am.group(1)) if am else None
        # Log2 Dist: row "i:" then counts of buckets i, i+1, ...; bucket k holds (2^(k-1), 2^k] us
        dist: dict[int, int] = {}
        for row in re.findall(r"^\s+(\d+):((?:\s+\d+)+)\s*$", b.split("Log2 Dist:", 1)[-1], re.M):
            base = int(row[0])
            for j, c in enumerate(row[1].split()):
                dist[base + j] = int(c)
        total = sum(dist.values())
        if total:
            acc = 0
            for k in sorted(dist):
                acc += dist[k]
                if acc >= 0.99 * total:
                    res["p99_us"] = float(2**k)
                    res["p99_bound"] = True
                    break
    return res


def build_mcload(tmp: Path) -> str | None:
    """Compile bench/mcload.c (the pipelined load generator) into the temp dir."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = tmp / "mcload"
    subprocess.run([cc, "-O2", "-o", str(exe), str(REPO / "bench" / "mcload.c")], check=True)
    return str(exe)


def run_ops(tool: str | None, t: Target, conns: int, seconds: float, tmp: Path, cfg: Path,
            depth: int = 1, mcload: str | None = None) -> dict[str, Any]:  # fmt: skip
    c0 = cpu_seconds(t.pid)
    w0 = time.monotonic()
    if mcload:
        p = subprocess.run([mcload, "127.0.0.1", str(t.port), str(conns), str(depth), str(seconds)],
                           capture_output=True, text=True, timeout=seconds + 120)  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"mcload failed against {t.name}: {p.stderr}")
        res = json.loads(p.stdout)
        ops = res["ops"]
    elif tool:
        argv = [tool, "-s", f"127.0.0.1:{t.port}", "-F", str(cfg), "-t", f"{int(seconds)}s",
                "-S", f"{int(seconds)}s", "-T", "1", "-c", str(conns)]  # fmt: skip
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        res = parse_memaslap(p.stdout)
        ops = res["ops"]
    else:
        p = subprocess.run([sys.executable, __file__, "--_helper", "ops", str(t.port), str(seconds), str(conns), "10000000"],
                           capture_output=True, text=True, timeout=seconds + 60)  # fmt: skip
        res = json.loads(p.stdout)
        ops = res["ops"]
        res["tps"] = ops / res["seconds"]
    cpu = cpu_seconds(t.pid) - c0
    res["wall"] = time.monotonic() - w0
    res["cpu_s"] = cpu
    res["cpu_us_op"] = 1e6 * cpu / ops if ops else None
    return res


def run_bulk(t: Target, nbytes: int, timeout: float) -> dict[str, Any]:
    assert t.bulk_port is not None
    chunk = memoryview(bytes(1 << 20))
    c0 = cpu_seconds(t.pid)
    s = socket.create_connection(("127.0.0.1", t.bulk_port), 5)
    s.settimeout(timeout)
    t0 = time.monotonic()
    sent = 0
    try:
        while sent < nbytes and time.monotonic() - t0 < timeout:
            s.sendall(chunk[: min(len(chunk), nbytes - sent)])
            sent += min(len(chunk), nbytes - sent)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            part = s.recv(8 - len(got))
            if not part:
                break
            got += part
    finally:
        s.close()
    el = time.monotonic() - t0
    received = int.from_bytes(got, "big") if len(got) == 8 else -1
    cpu = cpu_seconds(t.pid) - c0
    return {"sent": sent, "received": received, "seconds": el, "mb_s": received / el / 1e6 if received > 0 else 0.0,
            "cpu_s_gib": cpu / (received / (1 << 30)) if received > 0 else None}  # fmt: skip


def run_churn(t: Target, seconds: float, max_conns: int, procs: int = 3) -> dict[str, Any]:
    """``procs`` client processes of 8 workers each at once: one Python process was the limit."""
    c0 = cpu_seconds(t.pid)
    share = max(max_conns // procs, 1)
    clients = [subprocess.Popen([sys.executable, __file__, "--_helper", "churn", str(t.port), str(seconds), str(share), "8"],
                                stdout=subprocess.PIPE, text=True) for _ in range(procs)]  # fmt: skip
    outs = [json.loads(c.communicate(timeout=seconds + 60)[0]) for c in clients]
    cpu = cpu_seconds(t.pid) - c0
    res: dict[str, Any] = {"conns": sum(o["conns"] for o in outs), "errors": sum(o["errors"] for o in outs),
                           "seconds": max(o["seconds"] for o in outs)}  # fmt: skip
    res["conn_s"] = res["conns"] / res["seconds"]
    res["cpu_us_conn"] = 1e6 * cpu / res["conns"] if res["conns"] else None
    return res


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(v: float | None, base: float | None) -> str:
    if v is None or not base:
        return "-"
    return f"{v / base:.2f}"


def version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def write_png(path: Path, results: dict[str, Any], when: str, depth: int = 1) -> Path | None:
    """Draw the requests table at the highest concurrency measured, for one pipelining depth
    (bench/plot.py); None if there is none."""
    points = []
    for k, v in results.items():
        m = re.fullmatch(r"ops(\d+)(?:d(\d+))?", k)
        if m and int(m.group(2) or 1) == depth:
            points.append((int(m.group(1)), v))
    if not points:
        return None
    try:
        from plot import Row, write_ratio_png
    except ImportError as e:  # matplotlib comes with the [test] extra
        print(f"no PNG: {e}")
        return None
    conns, rows = max(points, key=lambda p: p[0])
    base = rows["HAProxy"]["tps"]  # rows from combine_rounds carry their median ratio
    table = [Row("memcached direct" if name == "direct" else name, r["tps"], r.get("ratio", r["tps"] / base), r["cpu_us_op"])
             for name, r in rows.items()]  # fmt: skip
    inflight = "" if depth == 1 else f" x {depth} in flight"
    return write_ratio_png(path, f"memcache, {conns} connections{inflight} (90 % get)", table, note=when)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_helper":
        helper_main(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=10, help="seconds per memaslap point (default 10)")
    ap.add_argument("--quick", action="store_true", help="short runs: 3 s points, 256 MiB bulk, 2 s churn")
    ap.add_argument("--bulk-mib", type=int, default=1024, help="bulk transfer size (default 1024 MiB)")
    ap.add_argument("--churn-seconds", type=float, default=5)
    ap.add_argument("--churn-max", type=int, default=20000)
    ap.add_argument("--churn-procs", type=int, default=3, help="churn client processes (8 workers each)")
    ap.add_argument("--conns", default="1,50", help="memaslap concurrencies (default 1,50)")
    ap.add_argument("--proxyd-src", action="append", type=Path, default=[],
                    help="source tree(s) of proxyd to run (default: this repo); more than one adds targets")  # fmt: skip
    ap.add_argument("--no-memaslap", action="store_true", help="use the built-in load generator")
    ap.add_argument("--memaslap", action="store_true",
                    help="depth-1 points with memaslap instead of bench/mcload.c (which also pipelines)")  # fmt: skip
    ap.add_argument("--depths", default="1,16", help="requests in flight per connection (default 1,16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the request targets (medians reported)")
    ap.add_argument("--no-python-path", action="store_true",
                    help="skip the PROXYD_PURE=1 (pure-Python data path) memcache target")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma list of sections to skip: ops,bulk,churn")
    ap.add_argument("--out", type=Path, help="markdown output (default bench/results/memcache-<date>.md)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 3)
        args.bulk_mib = min(args.bulk_mib, 256)
        args.churn_seconds = min(args.churn_seconds, 2)
        args.rounds = 1
    srcs = [p.resolve() for p in args.proxyd_src] or [REPO]
    skip = set(filter(None, args.skip.split(",")))
    tool = None if args.no_memaslap else (shutil.which("memaslap") or shutil.which("memcaslap"))
    conns_list = [int(c) for c in args.conns.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
    procs = Procs(tmp)
    lines: list[str] = []
    try:
        mc_port, sink_port = free_port(), free_port()
        mc = procs.start(
            "memcached",
            ["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(mc_port), "-t", "1", "-m", "256"],
        )
        wait_port(mc_port, mc)
        sink = procs.start("sink", [sys.executable, __file__, "--_helper", "sink", str(sink_port)])
        wait_port(sink_port, sink)
        ports = {"mc": mc_port, "sink": sink_port}

        hp = {"mc_front": free_port(), "bulk_front": free_port(), **ports}
        (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(**hp))
        hap = procs.start("haproxy", ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])
        wait_port(hp["mc_front"], hap)

        targets = [
            Target("direct", mc_port, mc.pid, sink_port),
            Target("HAProxy", hp["mc_front"], hap.pid, hp["bulk_front"]),
        ]
        l7_targets: list[Target] = []
        policy_note = ""
        for i, src in enumerate(srcs):
            sfx = "" if i == 0 else f" [{src.name}]"
            l4 = {"mc_front": free_port(), "bulk_front": free_port(), **ports}
            p4, _ = start_proxyd(
                procs, tmp, f"proxyd-l4-{i}", src, PROXYD_L4.format(admin="{admin}", **l4), {}
            )
            targets.append(Target("proxyd L4" + sfx, l4["mc_front"], p4.pid, l4["bulk_front"]))
            l7 = {"mc_front": free_port(), **ports}
            p7, _ = start_proxyd(procs, tmp, f"proxyd-l7-{i}", src, PROXYD_L7.format(admin="{admin}", **l7),
                                 {"policy.yaml": POLICY.format(mc=mc_port, regex=KEY_REGEX)})  # fmt: skip
            policy_note = check_policy(l7["mc_front"])
            t7 = Target("proxyd memcache+policy native" + sfx, l7["mc_front"], p7.pid, None)
            targets.append(t7)
            l7_targets.append(t7)
            if not args.no_python_path:
                l7p = {"mc_front": free_port(), **ports}
                p7p, _ = start_proxyd(procs, tmp, f"proxyd-l7py-{i}", src,
                                      PROXYD_L7.format(admin="{admin}", **l7p),
                                      {"policy.yaml": POLICY.format(mc=mc_port, regex=KEY_REGEX)},
                                      {"PROXYD_PURE": "1"})  # fmt: skip
                check_policy(l7p["mc_front"])
                t7p = Target("proxyd memcache+policy python" + sfx, l7p["mc_front"], p7p.pid, None)
                targets.append(t7p)
                l7_targets.append(t7p)
        cfg = tmp / "memaslap.cfg"
        cfg.write_text(MEMASLAP_CFG)
        mcload = build_mcload(tmp)
        depths = [int(d) for d in args.depths.split(",")]
        if mcload is None:
            depths = [1]
        points = [(c, d) for c in conns_list for d in depths]

        started = dt.datetime.now()
        load0 = os.getloadavg()
        lines += [
            f"# proxyd memcache benchmark, {started:%Y-%m-%d %H:%M}",
            "",
            f"Command: `python bench/memcache.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
            "",
            f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, load average at start {load0[0]:.2f}",
            f"- python {platform.python_version()}, memcached: `{version(['memcached', '-V'])}`, "
            f"haproxy: `{version(['haproxy', '-v'])}`",
            (f"- load: `bench/mcload.c` (one epoll thread, N connections x D requests in flight, {args.seconds:g} s per point; "
             "90 % get / 10 % set, 32-byte memaslap-shaped keys, 100-byte values, keys preloaded)")
            if mcload and not args.memaslap
            else f"- load: `{Path(tool).name} -T 1 -c N -t {int(args.seconds)}s` (90 % get / 10 % set, 32-byte keys, 100-byte values)"
            if tool
            else f"- load: built-in asyncio generator ({args.seconds:g} s per point; memaslap not found)",
            "- proxyd data path: `native` targets run the compiled twin (proxyd._native), `python` targets "
            "the same tree with `PROXYD_PURE=1`",
            "- HAProxy `mode tcp`, `nbthread 1`; memcached `-t 1 -m 256`; proxyd: one process each, "
            "`access_log.requests: denied` to a file",
            f"- memcache policy: identities + CiliumNetworkPolicy (get/set with keyRegex `{KEY_REGEX}`, "
            f"writeGroup under `alliance/fleet/`); checked before the load: {policy_note}",
            "- CPU/op: utime+stime of the proxy process (of memcached for direct) over the run / ops",
            "- ratios: to HAProxy in this run",
            "",
        ]
        print("\n".join(lines), flush=True)

        results: dict[str, Any] = {}
        if "ops" not in skip:
            lines += ["## Requests", "",
                      f"{args.rounds} rounds, the targets interleaved (the pure path in the first only): medians, "
                      "'x HAProxy' the median of the per-round ratios, and each round's ratio.", "",
                      "| conns | depth | target | ops/s | x HAProxy | each round | mean latency us | x HAProxy | p99 us | CPU us/op | x HAProxy | each round |",
                      "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
            for conns, depth in points:
                runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
                for k in range(args.rounds):
                    for t in targets:
                        if k and t.name.endswith("python"):
                            continue  # the pure path is far from every floor: one round tells it
                        use = None if (args.memaslap and depth == 1) else mcload
                        r = run_ops(tool, t, conns, args.seconds, tmp, cfg, depth, use)
                        runs[t.name].append(r)
                        print(f"  ops c={conns} d={depth} round {k + 1} {t.name}: {r['tps']:.0f} ops/s, mean {r.get('mean_us')} us, "
                              f"cpu {r['cpu_us_op']:.1f} us/op, errors {r.get('errors', 0)}", flush=True)  # fmt: skip
                rows = combine_rounds(runs, "HAProxy", "tps", "cpu_us_op")
                results[f"ops{conns}" if depth == 1 else f"ops{conns}d{depth}"] = rows
                b = rows["HAProxy"]
                for t in targets:
                    r = rows[t.name]
                    p99 = r.get("p99_us")
                    p99s = "-" if p99 is None else ("<= " if r.get("p99_bound") else "") + fmt(p99)
                    lines.append(
                        f"| {conns} | {depth} | {t.name} | {fmt(r['tps'])} | {r['ratio']:.2f} | {each_round(r['ratio_rounds'])} | "
                        f"{fmt(r.get('mean_us'))} | {ratio(r.get('mean_us'), b.get('mean_us'))} | {p99s} | {fmt(r['cpu_us_op'], 1)} | "
                        f"{r['cpu_ratio']:.2f} | {each_round(r['cpu_ratio_rounds'])} |"
                    )
            lines += ["", "p99 from memaslap's log2 histogram: the upper bound of the bucket holding the 99th percentile."
                      if tool and args.memaslap else "", ""]  # fmt: skip
        if "bulk" not in skip:
            lines += [f"## Bulk ({args.bulk_mib} MiB, one connection, to a sink)", "",
                      "| target | MB/s | x HAProxy | proxy CPU s/GiB | x HAProxy |", "|---|---:|---:|---:|---:|"]  # fmt: skip
            rows = {}
            for t in targets:
                if t.bulk_port is None:
                    continue
                r = run_bulk(t, args.bulk_mib << 20, timeout=120)
                rows[t.name] = r
                print(f"  bulk {t.name}: {r['mb_s']:.0f} MB/s ({r['received']} bytes)", flush=True)
            b = rows["HAProxy"]
            for name, r in rows.items():
                cpu = "-" if name == "direct" else fmt(r["cpu_s_gib"], 2)
                cr = "-" if name == "direct" else ratio(r["cpu_s_gib"], b["cpu_s_gib"])
                bad = "" if r["received"] == args.bulk_mib << 20 else f" (received {r['received']} bytes!)"
                lines.append(
                    f"| {name}{bad} | {fmt(r['mb_s'])} | {ratio(r['mb_s'], b['mb_s'])} | {cpu} | {cr} |"
                )
            lines += ["", "direct: sender to sink without a proxy (CPU column: no proxy).", ""]
            results["bulk"] = rows
        if "churn" not in skip:
            lines += [f"## Connection churn (new connection per `get`, {args.churn_procs} client processes x 8 workers, {args.churn_seconds:g} s or "
                      f"{args.churn_max} connections)", "",
                      "| target | conn/s | x HAProxy | CPU us/conn | x HAProxy | errors |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            rows = {}
            for t in targets:
                r = run_churn(t, args.churn_seconds, args.churn_max, args.churn_procs)
                rows[t.name] = r
                print(f"  churn {t.name}: {r['conn_s']:.0f} conn/s, errors {r['errors']}", flush=True)
            b = rows["HAProxy"]
            for name, r in rows.items():
                lines.append(f"| {name} | {fmt(r['conn_s'])} | {ratio(r['conn_s'], b['conn_s'])} | "
                             f"{fmt(r['cpu_us_conn'], 1)} | {ratio(r['cpu_us_conn'], b['cpu_us_conn'])} | {r['errors']} |")  # fmt: skip
            lines += [
                "",
                "CPU of memcached for direct. The clients are separate processes (--churn-procs), so one client process is not the limit.",
                "",
            ]
            results["churn"] = rows
        if 50 in conns_list:
            lines += ["## Floors (50 connections, relative to HAProxy in this run)", ""]
            checks: list[tuple[str, str, float, float | None]] = []
            for t in targets:
                if not t.name.startswith("proxyd"):
                    continue
                for depth in depths:
                    key = "ops50" if depth == 1 else f"ops50d{depth}"
                    if "ops" in skip or key not in results:
                        continue
                    rows = results[key]
                    want = 0.95 if "L4" in t.name else 0.9
                    checks.append((t.name, f"ops/s at depth {depth}", want, rows[t.name]["ratio"]))
                    if "L4" not in t.name:  # an L7 target's CPU per op: at most 1.3x HAProxy's
                        checks.append((t.name, f"CPU per op at depth {depth} (at most)", -1.3, rows[t.name]["cpu_ratio"]))
                if "churn" in results and "L4" not in t.name:
                    rows = results["churn"]
                    checks.append((t.name, "connections/s (churn)", 0.6, rows[t.name]["conn_s"] / rows["HAProxy"]["conn_s"]))
            for name, what, want, got in checks:  # want < 0: a ceiling of -want
                if got is not None:
                    ok = got <= -want if want < 0 else got >= want
                    bound = f"ceiling {-want}" if want < 0 else f"floor {want}"
                    lines.append(f"- {name}, {what}: {got:.3f} x HAProxy ({bound}): {'met' if ok else 'MISSED'}")
            lines.append("")
        denials = sum(
            1
            for t in tmp.glob("proxyd-l7-*/access.log")
            for ln in t.read_text().splitlines()
            if '"denied"' in ln
        )
        lines += [f"Denied-request lines in the memcache access logs: {denials} (the policy check's `delete`).",
                  f"Load average at end: {os.getloadavg()[0]:.2f}. Finished {dt.datetime.now():%H:%M:%S}.", ""]  # fmt: skip
        (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    text = "\n".join(lines)
    print(text[text.find("## ") :] if "## " in text else text)
    out = (
        args.out
        or REPO
        / "bench"
        / "results"
        / f"memcache-{dt.date.today():%Y-%m-%d}{'-quick' if args.quick else ''}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written {out}")
    note = f"{started:%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, ratios to HAProxy in this run"
    for depth in sorted({1, *[int(d) for d in args.depths.split(",")]}):
        dest = out.with_suffix(".png") if depth == 1 else out.with_name(f"{out.stem}-d{depth}.png")
        png = write_png(dest, results, note, depth)
        if png:
            print(f"written {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
