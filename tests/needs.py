"""What a test needs from the machine. Tests that need root, namespaces or a binary skip on a
developer's laptop but fail in CI, where ``.ci/run`` sets PROXYD_REQUIRE_ROOT_TESTS=1 and
PROXYD_REQUIRE_BINARIES=1. (A module of its own: several ``conftest.py`` files would shadow
each other under ``from conftest import``.)"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def _required(var: str) -> bool:
    return os.environ.get(var, "") not in ("", "0")


def need_binary(*names: str) -> None:
    """Skip (or, when PROXYD_REQUIRE_BINARIES=1, fail) unless every binary is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        msg = f"missing binaries: {', '.join(missing)}"
        if _required("PROXYD_REQUIRE_BINARIES"):
            pytest.fail(msg + " (required: PROXYD_REQUIRE_BINARIES=1)")
        pytest.skip(msg)


def need_root() -> None:
    """Skip (or, when PROXYD_REQUIRE_ROOT_TESTS=1, fail) unless root with netns + iptables."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    for b in ("ip", "iptables", "iptables-save", "iptables-restore"):
        if shutil.which(b) is None:
            problems.append(f"no {b}")
    if problems:
        msg = "root tests unavailable: " + ", ".join(problems)
        if _required("PROXYD_REQUIRE_ROOT_TESTS"):
            pytest.fail(msg + " (required: PROXYD_REQUIRE_ROOT_TESTS=1)")
        pytest.skip(msg)


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
