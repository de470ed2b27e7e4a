"""Helpers for the tests that build network namespaces (root only).

Names are unique per run (``pxd<pid><n>``, short enough for interface names) and everything made
here is deleted in the context managers' exit, so a failed test leaves nothing behind.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_counter = itertools.count()


def unique(prefix: str = "pxd") -> str:
    return f"{prefix}{os.getpid() % 100000}{next(_counter)}"


def sh(*cmd: str, ns: str | None = None, stdin: str | None = None, check: bool = True) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(full)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def netns() -> Iterator[str]:
    """A fresh network namespace with lo up."""
    name = unique("proxyd-t-")
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@dataclass(frozen=True)
class Pair:
    cli: str
    srv: str
    cli4: str = "10.200.10.1"
    srv4: str = "10.200.10.2"
    cli6: str = "fd00:200:10::1"
    srv6: str = "fd00:200:10::2"
    srv_if: str = "v1"


@contextmanager
def veth_pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth pair, on test-only addresses (10.200.x, fd00:200:x::/64)."""
    with netns() as cli, netns() as srv:
        a, b = unique("pxa"), unique("pxb")
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        try:
            sh("ip", "link", "set", a, "netns", cli)
            sh("ip", "link", "set", b, "netns", srv)
            sh("ip", "link", "set", a, "name", "v0", ns=cli)
            sh("ip", "link", "set", b, "name", "v1", ns=srv)
        except AssertionError:
            sh("ip", "link", "del", a, check=False)
            raise
        p = Pair(cli, srv)
        sh("ip", "addr", "add", f"{p.cli4}/24", "dev", "v0", ns=cli)
        sh("ip", "-6", "addr", "add", f"{p.cli6}/64", "dev", "v0", "nodad", ns=cli)
        sh("ip", "addr", "add", f"{p.srv4}/24", "dev", "v1", ns=srv)
        sh("ip", "-6", "addr", "add", f"{p.srv6}/64", "dev", "v1", "nodad", ns=srv)
        sh("ip", "link", "set", "v0", "up", ns=cli)
        sh("ip", "link", "set", "v1", "up", ns=srv)
        yield p


def saved_rules(ns: str, family: int = 4) -> list[str]:
    """``iptables-save -t nat`` without comments and with counters zeroed: the table's state."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    out = []
    for line in sh(tool, "-t", "nat", ns=ns).splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.rsplit(" ", 1)[0]  # drop the [packets:bytes] counters
        out.append(line)
    return out
