"""Connection churn with half-close: the daemon (a subprocess, so a crash is seen as one)
survives thousands of short connections from several concurrent clients, byte-exact."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from needs import free_port
from proxyutil import echo, tcp_server
from test_process import wait_ready

CONNECTIONS = 10000
CLIENTS = 6
TIME_LIMIT = 60.0


async def test_churn_with_half_close(tmp_path: Path) -> None:
    async with tcp_server(echo) as up:
        l4, l7, admin = free_port(), free_port(), free_port()
        cfg = tmp_path / "proxyd.yaml"
        cfg.write_text(f"""
listeners:
  - name: l4
    address: "127.0.0.1:{l4}"
    upstream: "{up[0]}:{up[1]}"
  - name: lines
    address: "127.0.0.1:{l7}"
    upstream: "{up[0]}:{up[1]}"
    l7proto: test.lineparser
access_log:
  path: access.log
  requests: none
admin:
  address: "127.0.0.1:{admin}"
""")
        proc = subprocess.Popen([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            await asyncio.to_thread(wait_ready, admin, proc)
            deadline = time.monotonic() + TIME_LIMIT
            done = 0
            failures: list[str] = []

            async def one(port: int, i: int) -> None:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                payload = b"line %d %s\n" % (i, os.urandom(8).hex().encode()) * (1 + i % 5)
                w.write(payload)
                w.write_eof()  # half-close: the reply still comes back
                got = await asyncio.wait_for(r.read(), 10)
                w.close()
                if got != payload:
                    failures.append(f"conn {i}: {len(got)} != {len(payload)} bytes")

            async def client(k: int) -> None:
                nonlocal done
                for i in range(k, CONNECTIONS, CLIENTS):
                    if time.monotonic() > deadline:
                        return
                    await one(l4 if i % 2 else l7, i)
                    done += 1

            await asyncio.gather(*(client(k) for k in range(CLIENTS)))
            assert proc.poll() is None, "daemon died: " + (proc.stderr.read().decode() if proc.stderr else "")
            assert failures == []
            assert done >= CONNECTIONS // 3, f"only {done} connections in {TIME_LIMIT}s"
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0
        finally:
            proc.kill()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == done
    assert all('"verdict":"forwarded"' in line for line in lines)
