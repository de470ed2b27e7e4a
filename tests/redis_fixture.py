"""A real redis-server (Debian package) on a free loopback port, for tests that need the server.

``start_redis()`` is a context manager yielding the port. The server runs in its own directory
with persistence off (``--save ''``, ``--appendonly no``); it skips when redis-server is missing,
or fails when PROXYD_REQUIRE_BINARIES=1 (as CI sets), through :func:`needs.need_binary`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

from needs import free_port, need_binary


def _wait_accepting(
    proc: subprocess.Popen[bytes], port: int, password: str | None, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    probe = b"PING\r\n" if password is None else b"AUTH " + password.encode() + b"\r\nPING\r\n"
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(probe)
                if b"PONG" in s.recv(64) or b"PONG" in s.recv(64):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"redis-server did not start on port {port}: {err!r}")
        time.sleep(0.05)


@contextlib.contextmanager
def start_redis(*extra: str, password: str | None = None) -> Iterator[int]:
    """``redis-server --port PORT --bind 127.0.0.1 --save '' --appendonly no --dir TMP``."""
    need_binary("redis-server")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if password is not None:
        args += ["--requirepass", password]
    with tempfile.TemporaryDirectory(prefix="proxyd-redis-") as d:
        proc = subprocess.Popen(
            [*args, "--dir", d, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_accepting(proc, port, password)
            yield port
        finally:
            proc.kill()
            proc.communicate(timeout=5)
