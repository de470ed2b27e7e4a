"""The systemd notify protocol (``sd_notify(3)``), without libsystemd or any native dependency.

Why: ``Type=notify`` lets systemd know when proxyd is really serving (every listener bound), when a
SIGHUP reload starts and ends, when it is stopping, and that its loop is alive (``WatchdogSec``).
The protocol is small enough to speak directly: newline-separated ``KEY=VALUE`` assignments in one
datagram to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract-namespace
name when it starts with ``@``). Outside systemd the variable is unset and every call is a no-op
that returns False, so the daemon calls these unconditionally.

Sending is a single non-blocking ``sendto`` on a datagram socket, cheap enough to call from the
event loop; errors are swallowed (a notification must never take the daemon down) and reported
through the return value.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = [
    "notify",
    "notify_ready",
    "notify_reloading",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "watchdog_interval",
]


def _address(env: str) -> str | bytes | None:
    if not env:
        return None
    if env[0] == "@":
        return b"\0" + env[1:].encode()  # abstract namespace: leading NUL, no trailing one
    if env[0] == "/":
        return env
    return None  # vsock (vsock:CID:PORT) and relative paths are not supported


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) to ``$NOTIFY_SOCKET`` in one
    datagram. Returns True when it was sent; False when not under systemd or sending failed."""
    addr = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if addr is None or not states:
        return False
    for s in states:
        if "\n" in s or "=" not in s:
            raise ValueError(f"not a KEY=VALUE notification state: {s!r}")
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(payload, addr)
    except OSError:
        return False
    return True


def _clean(text: str) -> str:
    return text.replace("\n", " ")


def notify_ready(status: str | None = None) -> bool:
    """READY=1 (start-up finished, or a reload finished), with an optional STATUS line."""
    return notify("READY=1", *([f"STATUS={_clean(status)}"] if status else []))


def notify_reloading(status: str | None = None) -> bool:
    """RELOADING=1 with MONOTONIC_USEC (systemd 253+ requires it for ``Type=notify-reload`` and
    uses it to order the reload); follow it with :func:`notify_ready` once the reload is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    extra = [f"STATUS={_clean(status)}"] if status else []
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *extra)


def notify_stopping(status: str | None = None) -> bool:
    """STOPPING=1: shutdown (draining) has begun."""
    return notify("STOPPING=1", *([f"STATUS={_clean(status)}"] if status else []))


def notify_status(status: str) -> bool:
    """A free-form STATUS line, shown by ``systemctl status``."""
    return notify(f"STATUS={_clean(status)}")


def notify_watchdog() -> bool:
    """WATCHDOG=1: the keep-alive ping for ``WatchdogSec``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC`` as sd_watchdog_enabled(3)
    recommends, or None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
