"""``workers: 1`` against ``workers: 2``: memcache requests through proxyd, ops/s and CPU per op.

    python bench/workers.py                  # 8 s per point, 50 connections, depth 1 and 8
    python bench/workers.py --seconds 3 --conns 50 --depths 1

Starts memcached and one ``proxyd run`` per point (memcache listener, ``requests: denied``
access log to a file, no policy) and drives it with bench/mcload.c. CPU per op is utime+stime
of every proxyd process (the control process and its workers, from /proc/PID/stat) over the
run, divided by the ops: it shows the per-worker cost, which must not grow with N. ops/s on a
2-core machine is bounded by the load generator and memcached sharing those cores: the load
generator and memcached are pinned to the last CPU (``taskset``), proxyd runs unpinned, so
with N = 2 one worker shares its core with them; read the ratio, not the absolute figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(admin: int) -> bool:
    # Not urllib: bench/http.py would shadow the standard library's http package.
    import socket

    try:
        with socket.create_connection(("127.0.0.1", admin), timeout=2) as s:
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            return s.recv(100).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


def cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / TICK


def family(pid: int) -> list[int]:
    out = [pid]
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(e))
            except OSError:
                continue
    return out


def point(tmp: Path, mcload: str, pin: list[str], mc_port: int, workers: int, conns: int, depth: int,
          seconds: float) -> dict[str, float]:  # fmt: skip
    listen, admin = free_port(), free_port()
    cfg = tmp / f"w{workers}.yaml"
    cfg.write_text(f"""listeners:
  - name: mc
    address: "127.0.0.1:{listen}"
    l7proto: memcache
    upstream: "127.0.0.1:{mc_port}"
access_log: {{path: access-{workers}.log, requests: denied}}
admin: {{address: "127.0.0.1:{admin}"}}
workers: {workers}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "-c", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        end = time.monotonic() + 60
        while True:
            if ready(admin):
                break
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("proxyd did not start")
            time.sleep(0.1)
        pids = family(proc.pid)
        before = sum(cpu_s(p) for p in pids)
        res = subprocess.run([*pin, mcload, "127.0.0.1", str(listen), str(conns), str(depth), str(seconds)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        cpu = sum(cpu_s(p) for p in pids) - before
        out = json.loads(res.stdout)
        return {"ops_s": out["tps"], "p99_us": out["p99_us"], "cpu_us_per_op": cpu / out["ops"] * 1e6,
                "errors": out["errors"]}  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--depths", default="1,8")
    args = ap.parse_args()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or shutil.which("memcached") is None:
        print("needs cc and memcached", file=sys.stderr)
        return 1
    last = str(max(os.sched_getaffinity(0)))
    pin = ["taskset", "-c", last] if shutil.which("taskset") else []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mcload = str(tmp / "mcload")
        subprocess.run([cc, "-O2", "-o", mcload, str(REPO / "bench" / "mcload.c")], check=True)
        mc_port = free_port()
        mc = subprocess.Popen([*pin, "memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(mc_port),
                               "-t", "1", "-m", "256"])  # fmt: skip
        time.sleep(0.5)
        rows = []
        try:
            for depth in (int(x) for x in args.depths.split(",")):
                for workers in (1, 2):
                    r = point(tmp, mcload, pin, mc_port, workers, args.conns, depth, args.seconds)
                    rows.append({"workers": workers, "conns": args.conns, "depth": depth, **r})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            mc.terminate()
            mc.wait(10)
    print("\n| workers | conns | depth | ops/s | p99 µs | proxyd CPU µs/op |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['conns']} | {r['depth']} | {r['ops_s']:.0f} | {r['p99_us']:.0f} | "
              f"{r['cpu_us_per_op']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
