"""Node-sized policy and identities: start, memory, reloads and their stalls, CPU at rest.

For each size (N policy documents, M identities with three labels each, 500 label sets between
them) it writes a config and a policy directory, starts ``python -m proxyd run`` with an r2d2
listener in front of a small line server (a process of its own), and measures:

- ready: from spawning the daemon to ``/readyz`` 200 (and the CPU time it took, which depends
  less on what else the machine is doing: the daemon's and that of the child process it parses
  part of the policy files in at start, on a second core);
- RSS: VmRSS once ready;
- CPU at rest: the daemon's CPU time over ``--rest`` seconds with no traffic, as % of one core;
- accept: median and p99 time of a whole new connection (connect, one request, its answer);
- one-document reload: a document rewritten atomically (temporary file, rename) to the
  ``policy reloaded`` log line's timestamp, and the ``compiled`` count that line gives
  (``--repeat`` times: median and max);
- SIGHUP reload: SIGHUP to the ``config reloaded`` line (config, M identities, N documents;
  half as many times);
- stall: the longest request-to-answer time of one open connection asking all the time, during
  each reload (the longest before any reload is shown as the baseline).

Usage: ``python bench/scale.py`` (sizes 100/1,000, 1,000/10,000, 10,000/100,000), or
``--sizes 100x1000,10000x100000``; ``--keep`` keeps the work directory. Run it with ``nice``:
the numbers are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# bench/ holds http.py (the http benchmark), which would shadow the standard library's http
# package that urllib needs: import that first, from a path without bench/ on it.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH]
import urllib.request  # noqa: E402, F401

sys.path.insert(0, _BENCH)
from benchlib import cpu_seconds, free_port, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p{i}}}
spec:
  endpointSelector: {{matchLabels: {{app: {app}}}}}
  ingress:
    - fromEndpoints: [{{matchLabels: {{role: r{role}}}}}]
      toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules: {{l7proto: r2d2, l7: [{{cmd: READ}}, {{cmd: {cmd}}}]}}
"""

UPSTREAM = """
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", PORT)); s.listen(256)
def serve(c):
    with c, c.makefile("rb") as f:
        for line in f:
            c.sendall(b"OK " + line)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def write_setup(work: Path, n_docs: int, n_ids: int, port: int, upstream: int, admin: int) -> None:
    pdir = work / "policy"
    pdir.mkdir(parents=True)
    for i in range(n_docs):
        # Document 0 selects the bench's own endpoint (127.0.0.1: app0, role r0).
        text = POLICY.format(i=i, app=f"app{i % 500}", role=i % 50, port=upstream, cmd="WRITE")
        (pdir / f"p{i:05d}.yaml").write_text(text)
    lines = [
        f'listeners:\n  - name: r2d2\n    address: "127.0.0.1:{port}"\n    upstream: "127.0.0.1:{upstream}"\n'
        f"    l7proto: r2d2\n",
        f'admin:\n  address: "127.0.0.1:{admin}"\naccess_log:\n  path: access.log\n  requests: none\n',
        "policy:\n  paths: [policy]\nidentities:\n",
        "  - cidr: 127.0.0.1/32\n    labels: {app: app0, role: r0, team: t0}\n",
    ]
    for j in range(n_ids):
        lines.append(
            f"  - cidr: 10.{j >> 16 & 255}.{j >> 8 & 255}.{j & 255}/32\n"
            f"    labels: {{app: app{j % 500}, role: r{j % 50}, team: t{j % 7}}}\n"
        )
    (work / "proxyd.yaml").write_text("".join(lines))


class Asker(threading.Thread):
    """One open connection asking ``READ`` all the time; keeps (sent, answered) times."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.times: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        f = self.sock.makefile("rb")
        while not self.stop.is_set() and len(self.times) < 5_000_000:
            t0 = time.time()
            self.sock.sendall(b"READ k\r\n")
            line = f.readline()
            if not line:
                self.errors += 1
                return
            if line != b"OK READ k\r\n":
                self.errors += 1
            self.times.append((t0, time.time()))
            time.sleep(0.0005)

    def worst(self, start: float, end: float) -> float:
        """The longest wait for an answer of a request outstanding at any time in [start, end]."""
        return max((b - a for a, b in self.times if b >= start and a <= end), default=0.0)


def log_time(out: Path, event: str, after: float, timeout: float = 120) -> tuple[float, dict[str, Any]]:
    """The timestamp (epoch seconds) of the first ``event`` line logged after ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event:
                ts = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                if ts >= after:
                    return ts, e
        time.sleep(0.005)
    raise RuntimeError(f"no {event!r} line after {after}: {out.read_text()[-2000:]}")


def rss_mib(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else 0.0


def accept_cost(port: int, count: int) -> tuple[float, float]:
    took = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"READ a\r\n")
            got = b""
            while not got.endswith(b"\n"):
                got += c.recv(4096)
        took.append(time.perf_counter() - t0)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]


def run_size(n_docs: int, n_ids: int, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    work = base / f"{n_docs}x{n_ids}"
    port, upstream, admin = free_port(), free_port(), free_port()
    write_setup(work, n_docs, n_ids, port, upstream, admin)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM.replace("PORT", str(upstream))])
    out = work / "proxyd.out"
    t0 = time.monotonic()
    with out.open("wb") as log:
        argv = [sys.executable, "-m", "proxyd", "run", "--config", str(work / "proxyd.yaml")]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        wait_ready(f"http://127.0.0.1:{admin}/readyz", proc, timeout=300)
        ready = time.monotonic() - t0
        ready_cpu = cpu_seconds(proc.pid, children=True)
        time.sleep(1.0)
        rss = rss_mib(proc.pid)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.rest)
        rest = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0) * 100
        acc_med, acc_p99 = accept_cost(port, args.accepts)
        asker = Asker(port)
        asker.start()
        time.sleep(1.0)
        base_start = time.time()
        time.sleep(2.0)
        baseline = asker.worst(base_start, time.time())
        # One document rewritten atomically, --repeat times (document 1: it selects app1, r1).
        doc = work / "policy" / "p00001.yaml"
        tmp = work / "policy" / ".p00001.tmp"
        one_reloads, one_stalls, compiled = [], [], []
        for k in range(args.repeat):
            tmp.write_text(
                POLICY.format(i=1, app="app1", role=1, port=upstream, cmd=("HALT", "RESET")[k % 2])
            )
            t_edit = time.time()
            tmp.rename(doc)
            t_done, line = log_time(out, "policy reloaded", t_edit)
            time.sleep(0.5)
            one_reloads.append(t_done - t_edit)
            one_stalls.append(asker.worst(t_edit, t_done + 0.2))
            compiled.append(line.get("compiled"))
        # SIGHUP: the whole config again (identities rewritten with one label changed).
        hup_reloads, hup_stalls = [], []
        for k in range(max(1, args.repeat // 2)):
            text = (work / "proxyd.yaml").read_text()
            text = re.sub(r"team: t\d+\}", f"team: t{9 + k}}}", text, count=1)
            (work / "proxyd.yaml").write_text(text)
            t_hup = time.time()
            proc.send_signal(signal.SIGHUP)
            t_hup_done, _ = log_time(out, "config reloaded", t_hup, timeout=300)
            time.sleep(0.5)
            hup_reloads.append(t_hup_done - t_hup)
            hup_stalls.append(asker.worst(t_hup, t_hup_done + 0.2))
        asker.stop.set()
        asker.join(10)
        rss_after = rss_mib(proc.pid)
        return {
            "docs": n_docs,
            "identities": n_ids,
            "ready_s": ready,
            "ready_cpu_s": ready_cpu,
            "rss_mib": rss,
            "rss_after_mib": rss_after,
            "cpu_rest_pct": rest,
            "accept_ms": acc_med * 1000,
            "accept_p99_ms": acc_p99 * 1000,
            "reload_one_ms": statistics.median(one_reloads) * 1000,
            "reload_one_max_ms": max(one_reloads) * 1000,
            "compiled": max(compiled),
            "stall_one_ms": max(one_stalls) * 1000,
            "stall_one_median_ms": statistics.median(one_stalls) * 1000,
            "sighup_s": statistics.median(hup_reloads),
            "stall_sighup_ms": max(hup_stalls) * 1000,
            "stall_sighup_median_ms": statistics.median(hup_stalls) * 1000,
            "baseline_ms": baseline * 1000,
            "requests": len(asker.times),
            "bad_answers": asker.errors,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        up.kill()
        up.wait()


FLOORS = {"ready_s": 10, "reload_one_ms": 100, "stall_one_ms": 20, "stall_sighup_ms": 20,
          "cpu_rest_pct": 1, "rss_mib": 400}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| documents | identities | ready (CPU) | RSS | CPU at rest | accept median / p99 "
        "| one-document reload: median / max (compiled) | its longest stall: max / median "
        "| SIGHUP reload (median) | its longest stall: max / median | longest stall, no reload |"
    )
    out = [head, "|" + "---|" * 11]
    for r in rows:
        out.append(
            f"| {r['docs']:,} | {r['identities']:,} | {r['ready_s']:.1f} s ({r['ready_cpu_s']:.1f} s) "
            f"| {r['rss_mib']:.0f} MiB | {r['cpu_rest_pct']:.2f} % "
            f"| {r['accept_ms']:.2f} / {r['accept_p99_ms']:.2f} ms "
            f"| {r['reload_one_ms']:.0f} / {r['reload_one_max_ms']:.0f} ms ({r['compiled']}) "
            f"| {r['stall_one_ms']:.1f} / {r['stall_one_median_ms']:.1f} ms "
            f"| {r['sighup_s']:.1f} s | {r['stall_sighup_ms']:.1f} / {r['stall_sighup_median_ms']:.1f} ms "
            f"| {r['baseline_ms']:.1f} ms |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100x1000,1000x10000,10000x100000",
                    help="documents x identities, comma-separated")  # fmt: skip
    ap.add_argument("--rest", type=float, default=10.0, help="seconds of CPU-at-rest measurement")
    ap.add_argument("--accepts", type=int, default=300, help="connections for the accept cost")
    ap.add_argument("--repeat", type=int, default=5, help="one-document reloads (and half as many SIGHUPs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="proxyd-scale-"))
    rows = []
    for n_docs, n_ids in sizes:
        row = run_size(n_docs, n_ids, args, base)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(table(rows))
    big = rows[-1]
    print(f"\nfloors at {big['docs']:,} documents / {big['identities']:,} identities:")
    for key, floor in FLOORS.items():
        print(f"  {key:16} {big[key]:10.2f}  (floor {floor}) {'met' if big[key] < floor else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.keep:
        print(f"kept {base}")
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
