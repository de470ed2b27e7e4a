#!/usr/bin/env python3
# ruff: noqa: E501  (report-building f-strings and table rows read better unwrapped)
"""redis benchmark: redis-server direct vs HAProxy (mode tcp, 1 thread) vs proxyd L4 vs proxyd redis (native and pure).

One run starts everything on free loopback ports, measures, stops everything and prints a
markdown table (also written to ``bench/results/redis-<date>.md``, with a PNG by bench/plot.py)::

    flock /tmp/proxyd-bench.lock .venv/bin/python bench/redis.py            # about 3 minutes
    flock /tmp/proxyd-bench.lock .venv/bin/python bench/redis.py --quick    # short runs

What runs:

- ``redis-server --save '' --appendonly no`` (Debian ``redis-server``); HAProxy ``mode tcp``,
  ``nbthread 1``; proxyd as a plain L4 relay (listener without ``l7proto``); proxyd with
  ``l7proto: redis``, identities and a CiliumNetworkPolicy allowing ``get``/``set`` on the keys
  the load uses (behind a rule the load never matches), ``access_log.requests: denied``. Each
  proxyd is a subprocess ``python -m proxyd run``, ready when its admin ``/readyz`` answers 200.
- Load: ``redis-benchmark`` (Debian ``redis-tools``) ``-t set,get -c 50 -r 100000 -d 100``,
  without pipelining and with ``-P 16``, one benchmark thread (the machine has 2 cores: load
  generator + server + proxy already make 3 busy threads).
- CPU per op: utime+stime of the proxy process (redis-server's for direct) from /proc/PID/stat,
  before and after, divided by the requests done.
- Rounds (``--rounds``, 3 by default): every target runs once per round, in turn, and the table
  gives medians and each round's ratio to HAProxy, so that one burst from a neighbour does not
  decide a ratio (the pure path runs in the first round only).

Ratios are to HAProxy measured in the same run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
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
from benchlib import Procs, combine_rounds, cpu_seconds, each_round, exchange, free_port  # noqa: E402
from memcache import fmt, start_proxyd, version, wait_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend rd
    bind 127.0.0.1:{front}
    default_backend rd
backend rd
    server redis 127.0.0.1:{redis}
"""

PROXYD_L4 = """\
listeners:
  - name: redis-l4
    address: "127.0.0.1:{front}"
    upstream: "127.0.0.1:{redis}"
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
"""

PROXYD_L7 = """\
listeners:
  - name: redis-l7
    address: "127.0.0.1:{front}"
    l7proto: redis
    upstream: "127.0.0.1:{redis}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: redis, role: bench-client}}
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
  name: redis-bench
spec:
  endpointSelector:
    matchLabels: {{app: redis}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{role: bench-client}}
      toPorts:
        - ports: [{{port: "{redis}", protocol: TCP}}]
          rules:
            l7proto: redis
            l7:
              - command: "@admin"        # never matched by the load: evaluated first, and fails
                keyPrefix: "admin:"
              - command: get
                keyPrefix: "key:"
              - command: set
                keyPrefix: "key:"
              - command: "config|get"    # redis-benchmark reads the server's config first
"""


def check_policy(port: int) -> str:
    """One allowed, one denied and one allowed command through the redis listener."""
    got = exchange(port, b"SET key:check ok\r\nDEL key:check\r\nGET key:check\r\n", 4)
    want = b"+OK\r\n-NOPERM access denied\r\n$2\r\nok\r\n"
    if got != want:
        raise RuntimeError(f"policy check through proxyd redis failed: {got!r}")
    return "SET allowed, DEL denied (-NOPERM access denied), GET allowed"


def run_benchmark(port: int, pid: int, tests: str, requests: int, pipeline: int, conns: int) -> dict[str, Any]:
    """redis-benchmark --csv against ``port``; ops/s per test and CPU us/op of ``pid``."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", tests, "-n", str(requests),
            "-c", str(conns), "-P", str(pipeline), "-r", "100000", "-d", "100", "--csv"]  # fmt: skip
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True).stdout
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    rps: dict[str, float] = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] != "test":
            rps[cells[0]] = float(cells[1])
    done = requests * len(rps)
    return {"rps": rps, "tps": sum(rps.values()) / max(1, len(rps)), "cpu_us_op": cpu * 1e6 / max(1, done), "wall": wall}


def write_png(path: Path, rows: dict[str, dict[str, Any]], title: str, when: str) -> Path | None:
    try:
        from plot import Row, write_ratio_png
    except ImportError as e:  # matplotlib comes with the [test] extra
        print(f"no PNG: {e}")
        return None
    table = [Row(name, r["tps"], r["ratio"], r["cpu_us_op"]) for name, r in rows.items()]
    return write_ratio_png(path, title, table, note=when)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000, help="requests per test without pipelining")
    ap.add_argument("--pipelined-requests", type=int, default=1_000_000, help="requests per test with -P 16")
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every target (medians reported)")
    ap.add_argument("--quick", action="store_true", help="short runs, for development")
    ap.add_argument("--proxyd-src", type=Path, default=REPO, help="the proxyd tree to run (default: this one)")
    ap.add_argument("--no-python-path", action="store_true",
                    help="skip proxyd redis with PROXYD_PURE=1 (the pure-Python data path)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.pipelined_requests, args.rounds = 20_000, 100_000, 1
    for b in ("redis-server", "redis-benchmark", "haproxy"):
        if shutil.which(b) is None:
            print(f"missing {b} (Debian redis-server, redis-tools, haproxy; ./dev test installs them)")
            return 2
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, dict[str, dict[str, Any]]] = {"1": {}, "16": {}}
    with tempfile.TemporaryDirectory(prefix="proxyd-bench-redis-") as tmpdir:
        tmp = Path(tmpdir)
        procs = Procs(tmp)
        try:
            rport = free_port()
            rdir = tmp / "redis"
            rdir.mkdir()
            rs = procs.start("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(rdir)])  # fmt: skip
            wait_port(rport, rs)
            hport = free_port()
            (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(front=hport, redis=rport))
            hp = procs.start("haproxy", ["haproxy", "-f", str(tmp / "haproxy.cfg")])
            wait_port(hport, hp)
            l4port = free_port()
            l4, _ = start_proxyd(procs, tmp, "l4", args.proxyd_src, PROXYD_L4.format(front=l4port, redis=rport, admin="{admin}"), {})
            l7port = free_port()
            l7, _ = start_proxyd(procs, tmp, "l7", args.proxyd_src, PROXYD_L7.format(front=l7port, redis=rport, admin="{admin}"),
                                 {"policy.yaml": POLICY.format(redis=rport)})  # fmt: skip
            policy_note = check_policy(l7port)
            targets = [("redis direct", rport, rs.pid), ("HAProxy", hport, hp.pid), ("proxyd L4", l4port, l4.pid),
                       ("proxyd redis + policy", l7port, l7.pid)]  # fmt: skip
            if not args.no_python_path:
                pport = free_port()
                pure, _ = start_proxyd(procs, tmp, "l7-pure", args.proxyd_src,
                                       PROXYD_L7.format(front=pport, redis=rport, admin="{admin}"),
                                       {"policy.yaml": POLICY.format(redis=rport)}, {"PROXYD_PURE": "1"})  # fmt: skip
                check_policy(pport)
                targets.append(("proxyd redis + policy, PROXYD_PURE=1", pport, pure.pid))
            for pipe, n in (("1", args.requests), ("16", args.pipelined_requests)):
                rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
                for k in range(args.rounds):
                    for name, port, pid in targets:
                        if k and "PURE" in name:
                            continue  # the pure path is far from every floor: one round tells it
                        r = run_benchmark(port, pid, "set,get", n, int(pipe), args.conns)
                        rounds[name].append(r)
                        print(f"-P {pipe:>2} round {k + 1} {name:24} {r['tps']:>12,.0f} ops/s  {r['cpu_us_op']:6.2f} us/op  {r['rps']}")
                results[pipe] = combine_rounds(rounds, "HAProxy", "tps", "cpu_us_op")
        finally:
            procs.stop_all()
    lines = [
        f"# redis benchmark, {when}",
        "",
        f"Machine: {platform.machine()}, {shutil.which('nproc') and subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, Python {platform.python_version()}; "
        f"{version(['redis-server', '--version'])}; {version(['haproxy', '-v'])}.",
        f"Load: redis-benchmark -t set,get -c {args.conns} -r 100000 -d 100, -n {args.requests} (-P 1) and {args.pipelined_requests} (-P 16), one thread. "
        f"Policy check: {policy_note}.",
        f"Rounds: {args.rounds}, the targets interleaved (HAProxy, L4, redis + policy, ... each round; the pure path in the first only); "
        "the rates and CPU per op are medians over the rounds, 'x HAProxy' the median of the per-round ratios.",
        f"Load average before: {load_before}.",
        "",
    ]
    for pipe in ("1", "16"):
        rows = results[pipe]
        lines += [
            f"| -P {pipe}, {args.conns} connections | SET ops/s | GET ops/s | mean ops/s | x HAProxy | each round | CPU us/op | x HAProxy | each round |",
            "|---|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {fmt(r['rps'].get('SET'))} | {fmt(r['rps'].get('GET'))} | {fmt(r['tps'])} "
                f"| {r['ratio']:.2f} | {each_round(r['ratio_rounds'])} "
                f"| {fmt(r['cpu_us_op'], 2)} | {r['cpu_ratio']:.2f} | {each_round(r['cpu_ratio_rounds'])} |"
            )
        lines.append("")
    report = "\n".join(lines)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    (args.out / f"redis-{stamp}.md").write_text(report + "\n")
    for pipe in ("1", "16"):
        png = write_png(args.out / f"redis-P{pipe}-{stamp}.png", results[pipe],
                        f"redis, -P {pipe}, {args.conns} connections (redis-benchmark set,get)", when)  # fmt: skip
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
