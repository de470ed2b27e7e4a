#!/usr/bin/env python3
# ruff: noqa: E501, E402, ASYNC210, ASYNC220
# (report rows read better unwrapped; sys.path is fixed before the imports; the driver's few
# blocking calls, starting proxyd and one scrape a minute, do not matter to its load loops)
"""Soak: connection churn + slowloris + fuzz against one ``proxyd run``, reporting RSS, fds and
errors over time. Not part of the test suite (it runs for 30 minutes by default)::

    flock /tmp/proxyd-bench.lock python bench/soak.py                  # 30 min, moderate load
    flock /tmp/proxyd-bench.lock python bench/soak.py --minutes 2      # a quick look

What runs, all on 127.0.0.1, every loop bounded by the run's duration:

- proxyd as a subprocess with three listeners: ``l4`` (no parser) in front of an echo server,
  ``r2d2`` and ``mc`` (``l7proto: memcache``) in front of small line servers; a policy that
  allows READ on r2d2 and get/set on memcache (so fuzz and denied requests are judged);
  ``limits.request_timeout: 5s`` and ``idle_timeout: 20s`` so slowloris connections are cut.
- churn: ``--churn`` workers, each a loop of short connections (send, half-close, read all,
  compare byte for byte) alternating l4 and r2d2; a mismatch or failure is an error.
- slowloris: ``--slowloris`` connections that send one byte of an unfinished request per
  second; each is expected to be closed by proxyd (request timeout) and is then reopened.
- fuzz: ``--fuzz`` workers sending random bytes (random lengths, random segmentation; some
  connections end with a reset) to r2d2 and memcache; the answer does not matter, the daemon's
  survival and its good clients' results do.
- Every ``--interval`` seconds a sample: VmRSS and VmHWM from /proc/PID/status, open fds
  from /proc/PID/fd, connections done by kind, client errors, proxyd stderr error lines,
  access-log lines that are not one valid JSON object, and proxyd_connection_timeouts_total.

Prints a markdown table and writes it to ``bench/results/soak-<date>.md``.
"""

from __future__ import annotations

import sys

# bench/http.py would shadow the standard library's http package (urllib imports it).
sys.path[:] = [p for p in sys.path if p.rstrip("/") != __file__.rsplit("/", 1)[0]]

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.append(__file__.rsplit("/", 1)[0])  # bench/, last (after the standard http package)
from benchlib import free_port

REPO = Path(__file__).resolve().parents[1]

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: soak}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
    - toPorts:
        - ports: [{port: "R2PORT", protocol: TCP}]
          rules: {l7proto: r2d2, l7: [{cmd: READ}, {cmd: WRITE, file: "^/public/"}]}
        - ports: [{port: "MCPORT", protocol: TCP}]
          rules: {l7proto: memcache, l7: [{command: get}, {command: set, keyPrefix: "soak:"}]}
        - ports: [{port: "ECHOPORT", protocol: TCP}]
"""


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.write_eof()
    w.close()


async def lines(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answers every line: r2d2 ``OK ...``; memcache ``END``/``STORED`` (good enough for the parser)."""
    with contextlib.suppress(ConnectionError, asyncio.LimitOverrunError, ValueError):
        while line := await r.readline():
            if line.startswith(b"set "):
                with contextlib.suppress(Exception):
                    n = int(line.split()[4])
                    await r.readexactly(n + 2)
                w.write(b"STORED\r\n")
            elif line.startswith(b"get "):
                w.write(b"END\r\n")
            else:
                w.write(b"OK " + line)
            await w.drain()
    w.close()


class Stats:
    def __init__(self) -> None:
        self.done = {"churn": 0, "slowloris_cut": 0, "fuzz": 0}
        self.errors: list[str] = []


def rss_fds(pid: int) -> tuple[int, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss, hwm, len(os.listdir(f"/proc/{pid}/fd"))


async def churn(k: int, ports: dict[str, int], st: Stats, end: float) -> None:
    i = 0
    while time.monotonic() < end:
        i += 1
        kind = "l4" if i % 2 else "r2d2"
        payload = (b"READ /public/%d-%d\r\n" % (k, i)) * (1 + i % 4)
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ports[kind]), 10)
            w.write(payload)
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 15)
            w.close()
            want = (
                payload if kind == "l4" else b"".join(b"OK " + ln for ln in payload.splitlines(keepends=True))
            )
            if got != want:
                st.errors.append(f"churn {kind}: {len(got)} bytes != {len(want)}")
        except (OSError, TimeoutError) as exc:
            st.errors.append(f"churn {kind}: {type(exc).__name__}: {exc}")
        st.done["churn"] += 1


async def slowloris(port: int, st: Stats, end: float) -> None:
    while time.monotonic() < end:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            st.errors.append(f"slowloris connect: {exc}")
            await asyncio.sleep(1)
            continue
        try:
            while time.monotonic() < end:
                w.write(b"R")
                await w.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(r.read(1), 1.0) == b"":
                        st.done["slowloris_cut"] += 1
                        break
        except OSError:
            st.done["slowloris_cut"] += 1
        w.close()


async def fuzz(ports: list[int], st: Stats, end: float, rng: random.Random) -> None:
    while time.monotonic() < end:
        port = rng.choice(ports)
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            words = [
                b"get ",
                b"set soak:k 0 0 5\r\nhello\r\n",
                b"READ /x\r\n",
                b"\r\n",
                b"\x80\x00",
                b"gets ",
                b"mg k v\r\n",
            ]
            for _ in range(rng.randint(1, 8)):
                chunk = rng.choice(words) if rng.random() < 0.5 else os.urandom(rng.randint(1, 300))
                w.write(chunk)
                await w.drain()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(r.read(4096), 0.2)
            if rng.random() < 0.3:
                sock = w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.close()
        except (OSError, TimeoutError):
            pass
        st.done["fuzz"] += 1


def scrape(admin: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(
                ("proxyd_connection_timeouts_total", "proxyd_connections_total", "proxyd_parser_errors_total")
            ):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
    return out


def log_check(path: Path, offset: int) -> tuple[int, int, int]:
    """(new offset, lines read, bad lines) of the access log since ``offset``."""
    bad = n = 0
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    cut = data.rfind(b"\n") + 1
    for raw in data[:cut].split(b"\n")[:-1]:
        n += 1
        try:
            text = raw.decode("utf-8")
            if len(text.splitlines()) != 1 or not isinstance(json.loads(text), dict):
                bad += 1
        except ValueError:
            bad += 1
    return offset + cut, n, bad


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    ap.add_argument("--churn", type=int, default=4, help="churn workers")
    ap.add_argument("--slowloris", type=int, default=200, help="slowloris connections")
    ap.add_argument("--fuzz", type=int, default=2, help="fuzz workers")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="proxyd-soak-"))
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    line_srv = await asyncio.start_server(lines, "127.0.0.1", 0)
    mc_srv = await asyncio.start_server(lines, "127.0.0.1", 0)
    up = {
        n: s.sockets[0].getsockname()[1] for n, s in (("echo", echo_srv), ("r2d2", line_srv), ("mc", mc_srv))
    }
    ports = {"l4": free_port(), "r2d2": free_port(), "mc": free_port()}
    admin = free_port()
    (tmp / "policy.yaml").write_text(
        POLICY.replace("R2PORT", str(up["r2d2"]))
        .replace("MCPORT", str(up["mc"]))
        .replace("ECHOPORT", str(up["echo"]))
    )
    (tmp / "proxyd.yaml").write_text(f"""
listeners:
  - {{name: l4, address: "127.0.0.1:{ports["l4"]}", upstream: "127.0.0.1:{up["echo"]}"}}
  - {{name: r2d2, address: "127.0.0.1:{ports["r2d2"]}", upstream: "127.0.0.1:{up["r2d2"]}", l7proto: r2d2}}
  - {{name: mc, address: "127.0.0.1:{ports["mc"]}", upstream: "127.0.0.1:{up["mc"]}", l7proto: memcache}}
identities:
  - {{cidr: 127.0.0.1/32, labels: {{app: backend}}}}
policy: {{paths: [policy.yaml]}}
access_log: {{path: access.log, requests: denied}}
admin: {{address: "127.0.0.1:{admin}"}}
limits: {{request_timeout: 5s, idle_timeout: 20s}}
""")
    stderr = (tmp / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxyd", "run", "--config", str(tmp / "proxyd.yaml")],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    for _ in range(200):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1)
            break
        await asyncio.sleep(0.1)
    st = Stats()
    start = time.monotonic()
    end = start + args.minutes * 60
    tasks = [asyncio.create_task(churn(k, ports, st, end)) for k in range(args.churn)]
    tasks += [asyncio.create_task(slowloris(ports["r2d2"], st, end)) for _ in range(args.slowloris)]
    tasks += [
        asyncio.create_task(fuzz([ports["r2d2"], ports["mc"]], st, end, random.Random(rng.random())))
        for _ in range(args.fuzz)
    ]
    rows: list[str] = []
    header = "| t (min) | RSS MiB | peak RSS MiB | fds | churn conns | slowloris cut | fuzz conns | client errors | proxyd error lines | log lines (bad) | timeouts idle/request |"
    print(header)
    print("|" + "---|" * 11)
    offset = log_lines = log_bad = 0
    rss0 = None
    try:
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                st.errors.append(f"proxyd exited with {proc.returncode}")
                break
            rss, hwm, fds = rss_fds(proc.pid)
            rss0 = rss0 or rss
            offset, n, bad = (
                log_check(tmp / "access.log", offset) if (tmp / "access.log").exists() else (0, 0, 0)
            )
            log_lines += n
            log_bad += bad
            m = scrape(admin)
            idle = sum(v for k, v in m.items() if "timeouts" in k and 'reason="idle"' in k)
            req = sum(v for k, v in m.items() if "timeouts" in k and 'reason="request"' in k)
            err_lines = sum(
                1
                for ln in (tmp / "stderr.log").read_bytes().splitlines()
                if not ln.startswith(b"{") or b"failed" in ln or b"out of file descriptors" in ln
            )
            row = (
                f"| {(now - start) / 60:.1f} | {rss / 1024:.1f} | {hwm / 1024:.1f} | {fds} | {st.done['churn']} | "
                f"{st.done['slowloris_cut']} | {st.done['fuzz']} | {len(st.errors)} | {err_lines} | {log_lines} ({log_bad}) | {idle:.0f}/{req:.0f} |"
            )
            print(row, flush=True)
            rows.append(row)
            if now >= end:
                break
            await asyncio.sleep(min(args.interval, max(0.0, end - now)))
        await asyncio.wait(tasks, timeout=30)
    finally:
        for t in tasks:
            t.cancel()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        for srv in (echo_srv, line_srv, mc_srv):
            srv.close()
        await asyncio.sleep(1.0)  # the servers' handlers see their connections end
    summary = [
        f"# proxyd soak, {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC",
        "",
        f"Command: `flock /tmp/proxyd-bench.lock python bench/soak.py --minutes {args.minutes:g} --churn {args.churn} --slowloris {args.slowloris} --fuzz {args.fuzz}`",
        f"proxyd exit code after SIGTERM: {proc.returncode}",
        "",
        header,
        "|" + "---|" * 11,
        *rows,
        "",
        f"Client errors ({len(st.errors)}): " + ("; ".join(sorted(set(st.errors))[:10]) or "none"),
    ]
    print("\n".join(summary[-1:]))
    out = REPO / "bench" / "results" / f"soak-{dt.date.today().isoformat()}.md"
    out.write_text("\n".join(summary) + "\n")
    print(f"written to {out} (workdir {tmp})")
    return 0 if not st.errors and proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
