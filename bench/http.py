#!/usr/bin/env python3
# ruff: noqa: E501, E402  (long report rows read better unwrapped; sys.path is fixed before the imports)
"""http benchmark: nginx direct vs HAProxy (mode http, method+path ACL) vs proxyd L4 vs proxyd http.

One run starts everything on free loopback ports, measures each target with wrk, stops
everything and prints a markdown table (also written to ``bench/results/http-<date>.md``, with
a PNG drawn by ``bench/plot.py``)::

    flock /tmp/proxyd-bench.lock python bench/http.py            # 10 s per target, 3 rounds
    flock /tmp/proxyd-bench.lock python bench/http.py --quick    # 3 s per target, 1 round
    flock /tmp/proxyd-bench.lock python bench/http.py --close    # Connection: close: churn

What runs:

- nginx (Debian package), one foreground process (``master_process off``, one worker), access
  log off, serving a 9-byte static file; HAProxy 2.x ``mode http``, ``nbthread 1``, with an ACL
  on method (GET/HEAD) and path (``path_reg ^/public/.*``) that denies the rest with 403 (the
  anchor: an L7 proxy doing the same job); proxyd as a plain L4 relay (no ``l7proto``); proxyd
  with ``l7proto: http`` and a CiliumNetworkPolicy whose ``rules.http`` allows the same (plus a
  rule the load never matches, evaluated first), ``access_log.requests: denied``. Each proxyd is
  a subprocess ``python -m proxyd run``, ready when its admin ``/readyz`` answers 200.
- Load: ``wrk -t1 -c50 -d{seconds}s`` keep-alive GETs of ``/public/a.txt`` (wrk and the proxy
  and nginx share the 2 cores; one wrk thread).
- ``--close``: wrk sends ``Connection: close``, so every request is a new connection (accept
  to close); CPU per request is then CPU per connection.
- CPU per request: utime+stime of the proxy process (nginx's for direct) from /proc/PID/stat,
  before and after, divided by the requests wrk completed.
- Rounds (``--rounds``, 3 by default): every target runs once per round, in turn; the table
  gives medians and each round's ratio to HAProxy (the pure path runs in the first round only).
- Before measuring, each L7 target is checked to allow ``GET /public/a.txt`` and deny
  ``DELETE /public/a.txt`` with a 403.

Everything is on 127.0.0.1; ratios are to HAProxy in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py, and a script's own directory comes first on sys.path: take it
# off, or the standard library's http package (urllib, matplotlib) would import this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request  # noqa: F401  (the standard http package, before bench/ goes back on sys.path)
from typing import Any

sys.path.append(str(_HERE))  # last, for benchlib
from benchlib import Procs, combine_rounds, cpu_seconds, each_round, free_port, wait_ready

REPO = Path(__file__).resolve().parent.parent

NGINX_CFG = """\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
    }}
}}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend web
    bind 127.0.0.1:{front}
    acl ok_method method GET HEAD
    acl ok_path path_reg ^/public/.*$
    http-request deny deny_status 403 unless ok_method ok_path
    default_backend nginx
backend nginx
    server nginx 127.0.0.1:{nginx}
"""

PROXYD_L4 = """\
listeners:
  - name: l4
    address: "127.0.0.1:{front}"
    upstream: "127.0.0.1:{nginx}"
access_log:
  path: access.log
  requests: denied
admin:
  address: "127.0.0.1:{admin}"
limits:
  max_connections: 20000
"""

PROXYD_HTTP = """\
listeners:
  - name: web
    address: "127.0.0.1:{front}"
    l7proto: http
    upstream: "127.0.0.1:{nginx}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: web, role: bench-client}}
policy:
  paths: [policy.yaml]
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
  name: http-bench
spec:
  endpointSelector:
    matchLabels: {{app: web}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{role: bench-client}}
      toPorts:
        - ports: [{{port: "{nginx}", protocol: TCP}}]
          rules:
            http:
              - method: POST          # never matched by the load: evaluated first, and fails
                path: "/v1/request-landing"
              - method: "GET|HEAD"
                path: "/public/.*"
"""


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def start_proxyd(
    procs: Procs, tmp: Path, tag: str, text: str, files: dict[str, str], src: Path = REPO,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[Any]:
    d = tmp / tag
    d.mkdir()
    admin = free_port()
    (d / "proxyd.yaml").write_text(text.replace("{admin}", str(admin)))
    for name, body in files.items():
        (d / name).write_text(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env or {})
    p = procs.start(
        tag, [sys.executable, "-m", "proxyd", "run", "--config", str(d / "proxyd.yaml")], env, cwd=d
    )
    wait_ready(f"http://127.0.0.1:{admin}/readyz", p)
    return p


def status_of(port: int, method: str, path: str) -> int:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    return int(got[9:12])


def run_wrk(port: int, seconds: float, conns: int, close: bool = False) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--latency",
        *(["-H", "Connection: close"] if close else []),  # wrk reconnects after each response
        f"http://127.0.0.1:{port}/public/a.txt",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out)
    secs = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}[m.group(3)]
    res: dict[str, Any] = {"requests": int(m.group(1)), "seconds": secs}
    res["rps"] = res["requests"] / secs
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(bad.group(1)) if bad else 0
    lat = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    if lat:
        res["p50_ms"] = float(lat.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[lat.group(2)]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="3 s per target")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every target (medians reported)")
    ap.add_argument("--proxyd-src", type=Path, action="append", default=[],
                    help="also measure proxyd from this source tree (repeatable), e.g. main for before/after")
    ap.add_argument("--close", action="store_true",
                    help="Connection: close (a new connection per request): CPU per connection")
    ap.add_argument("--no-python-path", action="store_true",
                    help="skip proxyd http with PROXYD_PURE=1 (the pure-Python data path)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    seconds = 3.0 if args.quick else args.seconds
    if args.quick:
        args.rounds = 1
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for b in ("nginx", "haproxy", "wrk"):
        if shutil.which(b) is None:
            sys.exit(f"{b} not found (Debian packages nginx, haproxy, wrk; ./dev test installs them)")
    tmp = Path(tempfile.mkdtemp(prefix="proxyd-bench-http-"))
    procs = Procs(tmp)
    try:
        nginx_port = free_port()
        nd = tmp / "nginx"
        (nd / "www" / "public").mkdir(parents=True)
        (nd / "www" / "public" / "a.txt").write_text("public a\n")
        (nd / "nginx.conf").write_text(NGINX_CFG.format(d=nd, port=nginx_port))
        nginx = procs.start(
            "nginx",
            [
                shutil.which("nginx") or "nginx",
                "-p",
                str(nd),
                "-c",
                str(nd / "nginx.conf"),
                "-e",
                str(nd / "error.log"),
            ],
        )
        wait_port(nginx_port, nginx)

        ha_port = free_port()
        (tmp / "haproxy.cfg").write_text(HAPROXY_CFG.format(front=ha_port, nginx=nginx_port))
        haproxy = procs.start("haproxy", ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])
        wait_port(ha_port, haproxy)

        srcs = [REPO, *args.proxyd_src]
        proxyds: list[tuple[str, int, int, int, int]] = []  # (tag, l4 port, l4 pid, http port, http pid)
        for i, src in enumerate(srcs):
            tag = "" if i == 0 else f" ({src.name or src})"
            l4_port = free_port()
            l4 = start_proxyd(
                procs, tmp, f"proxyd-l4-{i}", PROXYD_L4.format(front=l4_port, nginx=nginx_port, admin="{admin}"), {}, src
            )
            http_port = free_port()
            l7 = start_proxyd(
                procs, tmp, f"proxyd-http-{i}",
                PROXYD_HTTP.format(front=http_port, nginx=nginx_port, admin="{admin}"),
                {"policy.yaml": POLICY.format(nginx=nginx_port)}, src,
            )  # fmt: skip
            proxyds.append((tag, l4_port, l4.pid, http_port, l7.pid))
            got = (status_of(http_port, "GET", "/public/a.txt"), status_of(http_port, "DELETE", "/public/a.txt"))
            if got != (200, 403):
                raise RuntimeError(f"proxyd http{tag}: policy check failed: GET/DELETE gave {got}")
        pure: list[tuple[str, int, int]] = []  # the first tree's http listener on the Python path
        if not args.no_python_path:
            pure_port = free_port()
            p = start_proxyd(
                procs, tmp, "proxyd-http-pure",
                PROXYD_HTTP.format(front=pure_port, nginx=nginx_port, admin="{admin}"),
                {"policy.yaml": POLICY.format(nginx=nginx_port)}, srcs[0], {"PROXYD_PURE": "1"},
            )  # fmt: skip
            got = (status_of(pure_port, "GET", "/public/a.txt"), status_of(pure_port, "DELETE", "/public/a.txt"))
            if got != (200, 403):
                raise RuntimeError(f"proxyd http (PROXYD_PURE=1): policy check failed: GET/DELETE gave {got}")
            pure.append(("proxyd http + rules.http, PROXYD_PURE=1", pure_port, p.pid))

        got = (status_of(ha_port, "GET", "/public/a.txt"), status_of(ha_port, "DELETE", "/public/a.txt"))
        if got != (200, 403):
            raise RuntimeError(f"HAProxy: policy check failed: GET/DELETE gave {got}")

        targets = [
            ("nginx direct", nginx_port, nginx.pid),
            ("HAProxy mode http + ACL", ha_port, haproxy.pid),
        ]
        for tag, l4_port, l4_pid, http_port, http_pid in proxyds:
            targets += [(f"proxyd L4{tag}", l4_port, l4_pid), (f"proxyd http + rules.http{tag}", http_port, http_pid)]
        targets += pure
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for k in range(args.rounds):
            for name, port, pid in targets:
                if k and "PURE" in name:
                    continue  # the pure path is far from every floor: one round tells it
                run_wrk(port, 1, args.connections, args.close)  # warm up (connections, caches)
                c0 = cpu_seconds(pid)
                res = run_wrk(port, seconds, args.connections, args.close)
                res["cpu_us"] = (cpu_seconds(pid) - c0) / max(res["requests"], 1) * 1e6
                rounds[name].append(res)
                print(f"round {k + 1} {name}: {res['rps']:,.0f} req/s, {res['cpu_us']:.1f} us CPU/req", file=sys.stderr)
                if args.close:
                    time.sleep(1)  # let TIME_WAIT and the proxies' closes settle between targets
        results = combine_rounds(rounds, "HAProxy mode http + ACL", "rps", "cpu_us")
    finally:
        procs.stop_all()

    date = dt.date.today().isoformat()
    mode = "Connection: close (a new connection per request; CPU per request = CPU per connection)" if args.close else "keep-alive"
    lines = [
        f"# http benchmark {date}{' (Connection: close)' if args.close else ''}",
        "",
        f"wrk -t1 -c{args.connections} -d{seconds:g}s, {mode} GET /public/a.txt (9 bytes) from nginx; "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; ratios to HAProxy in this run; "
        f"load average {load_before} before, {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end. "
        f"{args.rounds} rounds, the targets interleaved (the pure path in the first only): medians, and each round's ratio to HAProxy.",
        "",
        f"| {args.connections} connections | req/s | x HAProxy | each round | CPU us/{'conn' if args.close else 'req'} | x HAProxy | each round | p50 ms | non-2xx |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rps']:,.0f} | {r['ratio']:.2f} | {each_round(r['ratio_rounds'])} | {r['cpu_us']:.1f} | "
            f"{r['cpu_ratio']:.2f} | {each_round(r['cpu_ratio_rounds'])} | {r.get('p50_ms', float('nan')):.2f} | {r['non2xx']} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-close" if args.close else ""
    (args.out / f"http-{date}{suffix}.md").write_text(report)
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("plot", _HERE / "plot.py")
        assert spec is not None and spec.loader is not None
        plot = importlib.util.module_from_spec(spec)
        sys.modules["plot"] = plot
        spec.loader.exec_module(plot)
        Row, write_ratio_png = plot.Row, plot.write_ratio_png
        rows = [Row(n, r["rps"], r["ratio"], r["cpu_us"]) for n, r in results.items()]
        write_ratio_png(args.out / f"http-{date}{suffix}.png", f"http, {args.connections} connections (wrk{', Connection: close' if args.close else ''})", rows,
                        baseline="HAProxy mode http + ACL", unit="req/s", cpu_unit="CPU us/req")  # fmt: skip
    except ImportError as exc:
        print(f"no PNG: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
