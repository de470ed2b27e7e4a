#!/usr/bin/env python3
# ruff: noqa: E402, I001  (sys.path is fixed before the imports)
"""Python frames per memcache get on the relay's read path: L4 and memcache+policy, one tree.

A daemon runs in process, on uvloop, in front of a memcached it starts, with the benchmark's
L4 and memcache+policy configurations (bench/memcache.py). One client thread sends ``get``s at
depth 1 through each listener while ``sys.setprofile`` counts, in the event loop's thread, every
Python frame entered (``call``) and every C function called from Python code (``c_call``).
The counts do not depend on what else the shared machine is doing, so a before/after of a
relay change is one run of each tree::

    PYTHONPATH=/path/to/tree python bench/frames.py            # the native path
    PROXYD_PURE=1 PYTHONPATH=/path/to/tree python bench/frames.py

The loop's wait for the client (one executor future) adds a few frames per run, not per get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

# bench/ holds http.py, which would shadow the standard library's http package (socketfree.py).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE] + [str(_HERE)]

import uvloop

from proxyd.config import parse_config
from proxyd.native import IMPLEMENTATION
from proxyd.registry import Registry
from proxyd.server import Daemon

from memcache import KEY_REGEX, POLICY, PROXYD_L4, PROXYD_L7

KEY = b"bench-01abcdefgh"  # matches the benchmark policy's get rule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(port: int, n: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as c, c.makefile("rb") as f:
        c.sendall(b"set " + KEY + b" 0 0 3\r\nabc\r\n")
        f.readline()
        for _ in range(n):
            c.sendall(b"get " + KEY + b"\r\n")
            while f.readline() != b"END\r\n":
                pass


async def count(
    name: str, text: str, files: dict[str, str], front: int, tmp: Path, n: int
) -> dict[str, float]:
    where = tmp / name
    where.mkdir()
    for fn, content in files.items():
        (where / fn).write_text(content)
    (where / "proxyd.yaml").write_text(text)
    os.chdir(where)  # access.log and policy.yaml are relative to it
    registry = Registry.load()
    daemon = Daemon(parse_config(text, where / "proxyd.yaml", registry), registry)
    await daemon.start()
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, client, front, 200)  # warm up
        counts = {"call": 0, "c_call": 0}

        def prof(frame: FrameType, event: str, arg: Any) -> None:
            if event in counts:
                counts[event] += 1

        sys.setprofile(prof)  # this (the event loop's) thread only; the client runs in another
        try:
            await loop.run_in_executor(None, client, front, n)
        finally:
            sys.setprofile(None)
    finally:
        await daemon.stop()
    return {k: v / n for k, v in counts.items()}


async def main(mc: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="proxyd-frames-") as d:
        tmp = Path(d)
        front = free_port()
        ports = {"bulk_front": free_port(), "sink": free_port(), "admin": free_port()}
        a = await count("l4", PROXYD_L4.format(mc_front=front, mc=mc, **ports), {}, front, tmp, n)
        front = free_port()
        l7 = PROXYD_L7.format(mc_front=front, mc=mc, admin=free_port())
        policy = {"policy.yaml": POLICY.format(mc=mc, regex=KEY_REGEX)}
        b = await count("memcache", l7, policy, front, tmp, n)
    print(f"data path: {IMPLEMENTATION}, {n} gets at depth 1, per get (request and reply):")
    for name, c in (("proxyd L4", a), ("proxyd memcache+policy", b)):
        print(f"  {name:24} Python frames {c['call']:5.1f}   C calls from Python {c['c_call']:5.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3000, help="gets per listener (default 3000)")
    args = ap.parse_args()
    mc = free_port()
    proc = subprocess.Popen(["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(mc), "-t", "1"])
    try:
        time.sleep(0.5)
        uvloop.run(main(mc, args.n))
    finally:
        proc.kill()
