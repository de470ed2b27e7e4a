"""Helpers the bench scripts share: loopback ports, process CPU, readiness waits, a process set.

Import it after the script has fixed ``sys.path`` (bench/http.py would shadow the standard
library's http package that urllib needs: the stdlib must come first, bench/ after it).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of process ``pid`` so far, in seconds, from /proc/PID/stat; ``children``:
    with that of its children it waited for (proxyd's start parses policy partly in one)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime, stime
    return (own + (int(fields[13]) + int(fields[14]) if children else 0)) / CLK  # cutime, cstime


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Poll ``url`` until it answers 200; raise if ``proc`` exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def exchange(port: int, payload: bytes, lines: int) -> bytes:
    """Send ``payload`` to 127.0.0.1:``port`` and read until ``lines`` CRLFs, EOF or 5 s."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(payload)
        got = b""
        deadline = time.monotonic() + 5
        while got.count(b"\r\n") < lines and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got


class Procs:
    """The processes of one run, each logging to ``workdir/<name>.out``; stopped in reverse."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[Any]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` (in ``cwd``, default the workdir) with stdout+stderr to its log."""
        log = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd or self.workdir)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        """SIGTERM every process still running, newest first; SIGKILL any not gone in 5 s."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def combine_rounds(
    rounds: dict[str, list[dict[str, Any]]], base: str, rate: str, cpu: str
) -> dict[str, dict[str, Any]]:
    """Each target's medians over interleaved rounds, with its ratios to ``base`` round by round.

    Targets run one after another, so a neighbour's burst lands on one of them: a ratio between
    two single runs here moved by up to 13 %. Running every target once per round, in turn, and
    taking medians (of each number, and of the per-round ratios to ``base``) keeps one burst
    from deciding. A number-valued field gives its median, a dict of numbers its median per key;
    ``ratio_rounds``/``cpu_ratio_rounds`` list the per-round ratios (a target that ran fewer
    rounds is compared with the base's first ones), ``ratio``/``cpu_ratio`` are their medians.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, runs in rounds.items():
        pairs = list(zip(runs, rounds[base], strict=False))
        merged: dict[str, Any] = {}
        for key in runs[0]:
            values = [r[key] for r in runs if key in r]
            if all(isinstance(v, (int, float)) for v in values):
                merged[key] = statistics.median(values)
            elif all(isinstance(v, dict) for v in values):
                keys = sorted({k for v in values for k in v})
                merged[key] = {k: statistics.median(v.get(k, 0.0) for v in values) for k in keys}
            else:
                merged[key] = values[0]
        merged["ratio_rounds"] = [r[rate] / b[rate] for r, b in pairs if b[rate]]
        merged["cpu_ratio_rounds"] = [r[cpu] / b[cpu] for r, b in pairs if b[cpu]]
        merged["ratio"] = statistics.median(merged["ratio_rounds"])
        merged["cpu_ratio"] = statistics.median(merged["cpu_ratio_rounds"])
        merged["rounds"] = len(runs)
        out[name] = merged
    return out


def each_round(values: list[float]) -> str:
    """Per-round ratios for a table cell: ``0.98 / 1.08 / 0.84``."""
    return " / ".join(f"{x:.2f}" for x in values)

