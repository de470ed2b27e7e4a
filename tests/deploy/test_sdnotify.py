"""proxyd.sdnotify against real AF_UNIX datagram sockets (a path and an abstract name), and the
daemon's notifications under a fake systemd: READY, RELOADING+MONOTONIC_USEC then READY on SIGHUP,
STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import free_port

from proxyd import sdnotify


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"proxyd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_with_status_to_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=2 listeners bound") is True
    assert recv(path_socket) == ["READY=1", "STATUS=2 listeners bound"]
    assert sdnotify.notify_ready("serving\nnow") is True
    assert recv(path_socket) == ["READY=1", "STATUS=serving now"]


def test_all_helpers_to_abstract_socket(abstract_socket: socket.socket) -> None:
    t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.notify_reloading("reloading policy")
    t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, usec, status = recv(abstract_socket)
    assert first == "RELOADING=1"
    assert usec.startswith("MONOTONIC_USEC=")
    assert t0 <= int(usec.split("=", 1)[1]) <= t1
    assert status == "STATUS=reloading policy"
    assert sdnotify.notify_stopping()
    assert recv(abstract_socket) == ["STOPPING=1"]
    assert sdnotify.notify_watchdog()
    assert recv(abstract_socket) == ["WATCHDOG=1"]
    assert sdnotify.notify_status("draining 3 connections")
    assert recv(abstract_socket) == ["STATUS=draining 3 connections"]


def test_not_under_systemd_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_malformed_state_is_a_programming_error(path_socket: socket.socket) -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sdnotify.notify("READY")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sdnotify.notify("STATUS=a\nREADY=1")


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("0", None, None),
        ("junk", None, None),
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),
        ("5000000", "self", 2.5),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for var, val in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if val == "self" else val)
    assert sdnotify.watchdog_interval() == expected


# --- the daemon under a fake systemd ---------------------------------------------------------


def _wait_for(sock: socket.socket, key: str, seen: list[list[str]], timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            msg = recv(sock)
        except TimeoutError:
            break
        seen.append(msg)
        if key in msg:
            return msg
    raise AssertionError(f"no {key} from the daemon; got {seen}")


def test_daemon_notifies_ready_reload_watchdog_stopping(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    port, admin = free_port(), free_port()
    (tmp_path / "policy.yaml").write_text("[]\n")
    cfg = tmp_path / "proxyd.yaml"
    cfg.write_text(
        "listeners:\n"
        f"  - name: r2\n    address: '127.0.0.1:{port}'\n    l7proto: r2d2\n    upstream: '127.0.0.1:9'\n"
        "policy:\n  paths: [policy.yaml]\n"
        f"admin:\n  address: '127.0.0.1:{admin}'\n"
    )
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxyd", "run", "--config", str(cfg)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    seen: list[list[str]] = []
    try:
        _wait_for(sock, "READY=1", seen)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # listeners really are bound once READY=1 was sent
        _wait_for(sock, "WATCHDOG=1", seen, timeout=2)
        proc.send_signal(signal.SIGHUP)
        reloading = _wait_for(sock, "RELOADING=1", seen)
        assert any(s.startswith("MONOTONIC_USEC=") for s in reloading)
        _wait_for(sock, "READY=1", seen)
        proc.send_signal(signal.SIGTERM)
        _wait_for(sock, "STOPPING=1", seen)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "Traceback" not in stderr, stderr
