#!/usr/bin/env python3
"""Accept-to-close profile: CPU per connection of proxyd, split by stage.

Runs a proxyd ``Daemon`` in this process (uvloop) with two listeners on a fixed upstream, an L4
one and an ``l7proto: http`` one with a ``rules.http`` policy, and drives each with a client
subprocess that opens a connection per request (``GET ... Connection: close``), against a small
upstream subprocess that answers and closes. Bounded: ``-n`` connections per listener, and at
most ``--max-seconds`` per pass. Two passes per listener:

1. unprofiled: CPU of this process (``time.process_time``) divided by the connections;
2. under ``cProfile`` with a CPU clock: each function's own time is put into a stage (the table
   ``STAGES`` below), and the stage shares are scaled to the unprofiled CPU per connection.
   What no Python frame sees (uvloop's accept, read, close and the kernel's work under them) is
   the ``event loop`` row: process CPU minus the time Python frames were seen.

::

    python bench/churn_profile.py -n 3000            # native data path
    PROXYD_PURE=1 python bench/churn_profile.py -n 3000
    python bench/churn_profile.py -n 3000 --top 25   # and the 25 most expensive functions
    python bench/churn_profile.py --src /path/to/other/checkout   # profile another tree (before/after)
    python bench/churn_profile.py --floor            # and a bare uvloop relay: what is left to cut

CPU per connection is the lowest of ``--repeat`` unprofiled passes (the machine is shared),
with its user-time part (the rest is the kernel: sockets, loopback TCP, epoll).
cProfile inflates the cost of each Python call, so stages made of many small calls (the log
line, metrics) show larger shares than they cost unprofiled; read the split as where to look,
and measure a change with the unprofiled figure.

Run under ``flock /tmp/proxyd-bench.lock`` on the shared machine; the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# bench/ (this script's directory, first on sys.path) holds http.py, which would shadow the
# standard library's http package that prometheus_client imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

CONFIG_L4 = """\
listeners:
  - name: l4
    address: "127.0.0.1:0"
    upstream: "127.0.0.1:{up}"
access_log:
  path: {d}/access-l4.log
  requests: denied
limits:
  max_connections: 20000
"""

CONFIG_HTTP = """\
listeners:
  - name: web
    address: "127.0.0.1:0"
    l7proto: http
    upstream: "127.0.0.1:{up}"
identities:
  - cidr: 127.0.0.1/32
    labels: {{app: web, role: bench-client}}
policy:
  paths: [{d}/policy.yaml]
access_log:
  path: {d}/access.log
  requests: denied
limits:
  max_connections: 20000
"""

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: churn
spec:
  endpointSelector:
    matchLabels: {{app: web}}
  ingress:
    - fromEndpoints:
        - matchLabels: {{role: bench-client}}
      toPorts:
        - ports: [{{port: "{up}", protocol: TCP}}]
          rules:
            http:
              - method: POST
                path: "/v1/request-landing"
              - method: "GET|HEAD"
                path: "/public/.*"
"""

REQUEST = b"GET /public/a.txt HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\npublic a\n"

#: Stage of a function: first (file part, function name or "*") that matches its own time.
STAGES: list[tuple[str, str, str]] = [
    ("subprocess", "*", "bench driver"),
    ("streams", "*", "bench driver"),
    ("churn_profile", "*", "bench driver"),
    ("'shutdown'", "*", "teardown"),
    ("'detach'", "*", "teardown"),
    ("structlog", "*", "log line"),
    ("accesslog", "*", "log line"),
    ("orjson", "*", "log line"),
    ("datetime", "*", "log line"),
    ("prometheus_client", "*", "metrics"),
    ("metrics", "*", "metrics"),
    ("relay", "_connect", "upstream connect"),
    ("relay", "_connected", "upstream connect"),
    ("relay", "_connect_start", "upstream connect"),
    ("relay", "_connect_cleanup", "upstream connect"),
    ("relay", "_connect_ready", "upstream connect"),
    ("relay", "_connect_failed", "upstream connect"),
    ("relay", "_step", "upstream connect"),
    ("relay", "_upstream_protocol", "upstream connect"),
    ("relay", "_resolve", "upstream connect"),
    ("iterable_coroutine", "*", "upstream connect"),
    ("enum", "*", "socket objects (enum conversions)"),
    ("weakref", "*", "event loop bookkeeping (weakrefs)"),
    ("relay", "_wait_connected", "upstream connect"),
    ("relay", "ready", "upstream connect"),
    ("relay", "_is_ip", "upstream connect"),
    ("relay", "<lambda>", "upstream connect"),
    ("asyncio", "*", "upstream connect"),
    ("relay", "__init__", "accept"),
    ("relay", "connection_made", "accept"),
    ("relay", "start", "context/engine/parser"),
    ("engine", "*", "context/engine/parser"),
    ("context", "__init__", "context/engine/parser"),
    ("parsers", "create", "context/engine/parser"),
    ("parsers", "__init__", "context/engine/parser"),
    ("listener", "accept", "identity+policy"),
    ("admission", "*", "identity+policy"),
    ("server", "labels_for", "identity+policy"),
    ("server", "active_connections", "identity+policy"),
    ("policy", "view", "identity+policy"),
    ("policy", "l4", "identity+policy"),
    ("origdst", "*", "identity+policy"),
    ("context", "*", "identity+policy"),
    ("listener", "forget", "teardown"),
    ("server", "add_closed_bytes", "teardown"),
    ("relay", "_finish", "teardown"),
    ("relay", "reset", "teardown"),
    ("relay", "shutdown_write", "teardown"),
    ("relay", "_sock_of", "teardown"),
    ("relay", "_maybe_shutdown", "teardown"),
    ("relay", "_maybe_done", "teardown"),
    ("relay", "eof_received", "teardown"),
    ("relay", "upstream_eof", "teardown"),
    ("relay", "connection_lost", "teardown"),
    ("relay", "upstream_lost", "teardown"),
    ("relay", "_cancel_linger", "teardown"),
    ("relay", "_fmt", "log line"),
    ("relay", "*", "data (relay callbacks)"),
    ("http", "*", "data (parser, policy)"),
    ("policy", "*", "data (parser, policy)"),
    ("re2", "*", "data (parser, policy)"),
    ("setsockopt", "*", "socket options"),
    ("set_write_buffer_limits", "*", "socket options"),
    ("connect", "*", "upstream connect"),
    ("getsockname", "*", "upstream connect"),
    ("getsockopt", "*", "identity+policy"),
    ("get_extra_info", "*", "accept"),
    ("pause_reading", "*", "data (relay callbacks)"),
    ("resume_reading", "*", "data (relay callbacks)"),
    ("write", "*", "data (relay callbacks)"),
    ("close", "*", "teardown"),
    ("abort", "*", "teardown"),
    ("call_later", "*", "timers"),
    ("cancel", "*", "timers"),
    ("call_soon", "*", "timers"),
    ("socket", "*", "upstream connect"),
]


def stage_of(func: tuple[str, int, str]) -> str:
    path, _, name = func
    where = f"{path}:{name}" if path != "~" else name
    for part, fname, stage in STAGES:
        if part in where and (fname == "*" or fname == name):
            return stage
    return "other Python"


# --- helper subprocesses -----------------------------------------------------------------------


def run_upstream(port_file: str) -> None:
    """Answer each connection's request with RESPONSE and close (like nginx with Connection: close)."""
    import uvloop

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf:
                self.t.write(RESPONSE)
                self.t.close()

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0, backlog=4096)
        Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))  # noqa: ASYNC240 (once, at start)
        await asyncio.Event().wait()

    uvloop.run(main())


def run_client(port: int, n: int, workers: int, max_seconds: float) -> None:
    """``n`` connections, ``workers`` at a time: connect, send REQUEST, read to EOF, close."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        left = [n]
        errors = [0]
        deadline = time.monotonic() + max_seconds

        async def worker() -> None:
            while left[0] > 0 and time.monotonic() < deadline:
                left[0] -= 1
                s = socket.socket()
                s.setblocking(False)
                try:
                    await loop.sock_connect(s, ("127.0.0.1", port))
                    await loop.sock_sendall(s, REQUEST)
                    while await asyncio.wait_for(loop.sock_recv(s, 4096), 5):
                        pass
                except (OSError, TimeoutError):
                    errors[0] += 1
                finally:
                    s.close()

        await asyncio.gather(*(worker() for _ in range(workers)))
        print(n - left[0] - errors[0], errors[0])

    uvloop.run(main())


# --- the floor: a bare uvloop relay ------------------------------------------------------------


class _BareUp(asyncio.Protocol):
    def __init__(self, down: _BareDown) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        assert self.down.t is not None
        self.down.t.write(data)

    def eof_received(self) -> bool:
        assert self.down.t is not None
        self.down.t.close()  # the upstream answered and closed: so does the client side
        return False


class _BareDown(asyncio.Protocol):
    """Accept, connect (uvloop's own create_connection), relay, close: no policy, no log line,
    no counters, no flow control, no half-close: what uvloop and the kernel cost at least."""

    def __init__(self, up_port: int) -> None:
        self.up_port = up_port
        self.t: Any = None
        self.up: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.up, _ = await loop.create_connection(lambda: _BareUp(self), "127.0.0.1", self.up_port)
        self.up.write(b"".join(self.pending))

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def floor(args: argparse.Namespace, up: int) -> list[str]:
    srv = await asyncio.get_running_loop().create_server(lambda: _BareDown(up), "127.0.0.1", 0, backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    try:
        await drive(port, min(args.n, 300), args.workers, args.max_seconds)
        best, user = float("inf"), 0.0
        for _ in range(args.repeat):
            c0, t0 = time.process_time(), os.times()
            ok, _ = await drive(port, args.n, args.workers, args.max_seconds)
            await asyncio.sleep(0.3)
            us = (time.process_time() - c0) / max(ok, 1) * 1e6
            if us < best:
                best, user = us, (os.times().user - t0.user) / max(ok, 1) * 1e6
    finally:
        srv.close()
    return [f"### bare uvloop relay (the floor of this design): {best:.0f} us CPU per connection, "
            f"{user:.0f} of it user time", ""]  # fmt: skip


# --- the profile ---------------------------------------------------------------------------------


async def drive(port: int, n: int, workers: int, max_seconds: float) -> tuple[int, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--_client", str(port), str(n), str(workers), str(max_seconds),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    ok, errors = out.split()
    return int(ok), int(errors)


async def profile(args: argparse.Namespace, up: int, d: Path) -> list[str]:
    from proxyd.config import load_config
    from proxyd.engine import IMPLEMENTATION
    from proxyd.registry import Registry
    from proxyd.server import Daemon

    (d / "policy.yaml").write_text(POLICY.format(up=up))
    (d / "l4.yaml").write_text(CONFIG_L4.format(up=up, d=d))
    (d / "web.yaml").write_text(CONFIG_HTTP.format(up=up, d=d))
    registry = Registry.load()
    lines = [
        f"source {args.src}; data path: {IMPLEMENTATION}; "
        f"{args.n} connections per pass, {args.workers} at a time; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
    ]
    for name in args.listeners.split(","):
        daemon = Daemon(load_config(d / f"{name}.yaml", registry), registry)
        await daemon.start()
        try:
            port = daemon.listeners[name].bound_address()[1]
            await drive(port, min(args.n, 300), args.workers, args.max_seconds)  # warm up
            await asyncio.sleep(0.3)
            base_us, user_us = float("inf"), 0.0
            for _ in range(args.repeat):  # the least disturbed pass of a busy machine
                c0, t0 = time.process_time(), os.times()
                ok, errors = await drive(port, args.n, args.workers, args.max_seconds)
                await asyncio.sleep(0.3)  # closes and the last log lines
                us = (time.process_time() - c0) / max(ok, 1) * 1e6
                if us < base_us:
                    base_us, user_us = us, (os.times().user - t0.user) / max(ok, 1) * 1e6
            prof = cProfile.Profile(time.process_time)
            c0 = time.process_time()
            prof.enable()
            ok2, _ = await drive(port, args.n, args.workers, args.max_seconds)
            await asyncio.sleep(0.3)
            prof.disable()
            total = time.process_time() - c0
            st = pstats.Stats(prof)
            by_stage: dict[str, float] = {}
            seen = 0.0
            rows = []
            for func, (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
                by_stage[stage_of(func)] = by_stage.get(stage_of(func), 0.0) + tt
                seen += tt
                rows.append((tt, ct, func))
            by_stage["event loop (uvloop/kernel, no Python frame)"] = max(total - seen, 0.0)
            label = "proxyd L4" if name == "l4" else "proxyd http + rules.http"
            lines += [
                f"### {label}: {base_us:.0f} us CPU per connection, {user_us:.0f} of it user time "
                f"({ok} ok, {errors} errors)",
                "",
                "| stage | us/conn | share |",
                "|---|---:|---:|",
            ]
            for stage, t in sorted(by_stage.items(), key=lambda kv: -kv[1]):
                share = t / total if total else 0.0
                lines.append(f"| {stage} | {share * base_us:.1f} | {share:.0%} |")
            lines.append("")
            if args.top:
                lines += [f"top {args.top} functions (own CPU per connection under the profiler):", "", "```"]
                for tt, ct, func in sorted(rows, reverse=True)[: args.top]:
                    per = 1e6 / max(ok2, 1)
                    where = f"{Path(func[0]).name}:{func[1]}({func[2]})"
                    lines.append(f"{tt * per:8.1f} {ct * per:8.1f}  {stage_of(func):22} {where}")
                lines += ["```", ""]
        finally:
            await daemon.stop()
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_upstream":
        run_upstream(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--_client":
        run_client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3000, help="connections per pass (bounded)")
    ap.add_argument("--workers", type=int, default=16, help="client connections in flight")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time bound per pass")
    ap.add_argument("--repeat", type=int, default=3, help="unprofiled passes; the lowest CPU counts")
    ap.add_argument("--src", type=Path, default=REPO, help="the proxyd source tree to profile (e.g. main)")
    ap.add_argument("--listeners", default="l4,web", help="which of l4,web to measure")
    ap.add_argument("--floor", action="store_true", help="also measure a bare uvloop relay (no proxyd)")
    ap.add_argument("--top", type=int, default=0, help="also list the N most expensive functions")
    args = ap.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import uvloop

    with tempfile.TemporaryDirectory(prefix="proxyd-churn-") as tmp:
        d = Path(tmp)
        port_file = d / "up.port"
        up = subprocess.Popen([sys.executable, __file__, "--_upstream", str(port_file)])
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or up.poll() is not None:
                    raise SystemExit("upstream did not start")
                time.sleep(0.05)
            lines = uvloop.run(profile(args, int(port_file.read_text()), d))
            if args.floor:
                lines += uvloop.run(floor(args, int(port_file.read_text())))
        finally:
            up.terminate()
            up.wait(5)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
