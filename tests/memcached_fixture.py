"""A real memcached (Debian package) on a free loopback port, for tests that need the server.

``start_memcached()`` is a context manager yielding the port; it skips when memcached is missing,
or fails when PROXYD_REQUIRE_BINARIES=1 (as CI sets), through :func:`conftest.need_binary`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator

from needs import free_port, need_binary


def _wait_accepting(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"version\r\n")
                if s.recv(64).startswith(b"VERSION "):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"memcached did not start on port {port}: {err!r}")
        time.sleep(0.05)


@contextlib.contextmanager
def start_memcached(*args: str) -> Iterator[int]:
    """``memcached -u root -l 127.0.0.1 -p PORT -t 1 -m 64 ARGS...``; killed afterwards."""
    need_binary("memcached")
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        ["memcached", *user, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", "1", "-m", "64", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_accepting(proc, port)
        yield port
    finally:
        proc.kill()
        proc.communicate(timeout=5)
