"""`proxyd run` as a real subprocess: readiness, signals (TERM drain, HUP reload, USR1 reopen)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import free_port


class Backend:
    """A threaded line server: replies "OK <line>" to each line, until the client's EOF."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket) -> None:
        f = c.makefile("rb")
        try:
            for line in f:
                c.sendall(b"OK " + line)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def write_config(tmp_path: Path, backend_port: int, listeners: list[tuple[str, int]], admin: int) -> Path:
    body = "listeners:\n"
    for name, port in listeners:
        body += (f"  - name: {name}\n    address: \"127.0.0.1:{port}\"\n    l7proto: r2d2\n"
                 f"    upstream: \"127.0.0.1:{backend_port}\"\n")  # fmt: skip
    body += "access_log:\n  path: access.log\n"
    body += f'admin:\n  address: "127.0.0.1:{admin}"\nlimits:\n  drain_timeout: 3s\n'
    p = tmp_path / "proxyd.yaml"
    p.write_text(body)
    return p


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def wait_ready(admin: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        if http_status(f"http://127.0.0.1:{admin}/readyz") == 200:
            return
        time.sleep(0.05)
    raise AssertionError("daemon not ready")


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def start(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def ask(s: socket.socket, line: bytes) -> bytes:
    s.sendall(line + b"\r\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def test_run_sigterm_drains_open_connections(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, backend.port, [("r2d2", port)], admin)
    proc = start(cfg)
    try:
        wait_ready(admin, proc)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert ask(s, b"READ /a") == b"OK READ /a\r\n"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Not accepting any more, but the open connection goes on while draining.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).recv(1)
        assert ask(s, b"READ /b") == b"OK READ /b\r\n"
        s.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    log = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert [e["fields"]["file"] for e in log if e["event"] == "l7"] == ["/a", "/b"]


def test_drain_timeout_closes_the_rest(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, backend.port, [("r2d2", port)], admin)
    cfg.write_text(cfg.read_text().replace("drain_timeout: 3s", "drain_timeout: 500ms"))
    proc = start(cfg)
    try:
        wait_ready(admin, proc)
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert ask(s, b"HALT") == b"OK HALT\r\n"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        assert s.recv(10) == b""  # closed by the daemon at the drain timeout
        s.close()
    finally:
        proc.kill()
    conn = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()][-1]
    assert conn["event"] == "connection" and conn["reason"] == "drain timeout at shutdown"


def test_sighup_adds_and_removes_listeners_without_dropping_connections(
    tmp_path: Path, backend: Backend
) -> None:
    p1, p2, admin = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path, backend.port, [("one", p1)], admin)
    proc = start(cfg)
    try:
        wait_ready(admin, proc)
        s1 = socket.create_connection(("127.0.0.1", p1), timeout=5)
        assert ask(s1, b"READ /1") == b"OK READ /1\r\n"
        write_config(tmp_path, backend.port, [("two", p2)], admin)
        proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                s2 = socket.create_connection(("127.0.0.1", p2), timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        assert ask(s2, b"READ /2") == b"OK READ /2\r\n"
        assert ask(s1, b"READ /still-open") == b"OK READ /still-open\r\n"  # old listener's connection
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p1), timeout=1).recv(1)
        # A broken config on SIGHUP is rejected; everything keeps working.
        cfg.write_text("listeners: [oops\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        assert ask(s2, b"READ /3") == b"OK READ /3\r\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
            metrics = r.read().decode()
        assert 'proxyd_policy_reloads_total{result="failure"} 1.0' in metrics
        s1.close()
        s2.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_sigusr1_reopens_access_log(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_port(), free_port()
    cfg = write_config(tmp_path, backend.port, [("r2d2", port)], admin)
    proc = start(cfg)
    try:
        wait_ready(admin, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            ask(s, b"READ /before")
        os.rename(tmp_path / "access.log", tmp_path / "access.log.1")  # logrotate
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            ask(s, b"READ /after")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert "/before" in (tmp_path / "access.log.1").read_text()
    assert "/after" in (tmp_path / "access.log").read_text()


def test_bad_config_exits_1_with_file_line_key(tmp_path: Path) -> None:
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text('listeners:\n  - name: x\n    address: "127.0.0.1:70000"\n    colour: red\n')
    res = subprocess.run([sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"{cfg}:3: listeners[x].address: port 70000 out of range 1-65535",
        f"{cfg}:4: listeners[x].colour: unknown key (known: name, address, l7proto, upstream, direction, "
        "parser_config, policy_mode, redirect, idle_timeout, request_timeout)",
    ]


def test_version_and_parsers() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxyd", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.startswith("proxyd ")
    out = subprocess.run(
        [sys.executable, "-m", "proxyd", "parsers"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    names = {line.split()[0] for line in out.stdout.splitlines()[1:]}
    assert {"r2d2", "memcache", "cassandra"} <= names
    assert "cmd,file" in out.stdout
    # The suite's own parsers, registered for the tests through entry points (conftest.py).
    assert "test.passer" in names
    assert "entry point test.passer = proxyd.parsers.testparsers:PasserFactory" in out.stdout
