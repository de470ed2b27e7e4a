"""How many file descriptors the data path may use, and how many are kept back for the rest.

Running out of descriptors must not turn into connections accepted and dropped, or a blind
admin API. Two things go wrong at ``EMFILE`` with an event loop on libuv: the accept fails, and
libuv then accepts and closes at once every connection waiting in that listener's queue (its
"EMFILE trick"); and the admin API, the policy files and the upstream sockets of connections
already accepted find no descriptor either. So accepting stops *before* the limit (docs/
configuration.md, "Limits and timeouts"): new connections then wait in the kernel's listen
queue, and the descriptors above the mark stay free for:

- the accept burst: the event loop accepts everything queued on a listener in one go before
  proxyd's code runs, up to the listen backlog (+1), and each of those connections needs an
  upstream socket too: ``2 * (backlog + 1)`` per listener. The backlog is sized from the limit
  so this stays a small share of it;
- everything else: admin API connections, policy files being read, name lookups, the log
  files. ``limit / 16``, at least 16 and at most 256.

The data path counts its own sockets (:attr:`FdBudget.data`: client and upstream sockets open
now). ``base`` is what the process had open before the first connection (listeners, admin
server, log files, the event loop's own), counted once at start. Accepting pauses when
``base + data`` reaches :attr:`FdBudget.high` and resumes at :attr:`FdBudget.low`, a little
lower, so it does not flap on every connection. While accepting is paused the count is checked
against the descriptors really open (every few seconds, on a worker thread), so a miscount can
lower the mark for a while but never keep accepting paused for good.
"""

from __future__ import annotations

import os
import resource

#: The kernel's listen queue per listener at a large limit (and the most the burst can add).
MAX_BACKLOG = 1024
MIN_BACKLOG = 4
OTHER_MIN, OTHER_MAX = 16, 256  # descriptors kept for the admin API, policy files, lookups, logs


def nofile_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` (a very large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int | None:
    """Descriptors open in this process now (None where /proc is not mounted)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used itself
    except OSError:
        return None


def listen_backlog(limit: int, listeners: int) -> int:
    """The listen backlog for each of ``listeners`` listeners under descriptor limit ``limit``:
    all their accept bursts together take at most about an eighth of the limit."""
    return max(MIN_BACKLOG, min(MAX_BACKLOG, limit // (16 * max(1, listeners))))


class FdBudget:
    """The pause and resume marks; ``data`` is kept by the relay, one per socket."""

    __slots__ = ("base", "data", "data_high", "high", "limit", "low", "other", "reserve")

    def __init__(self, limit: int, base: int, backlogs: list[int]) -> None:
        self.data = 0
        self.configure(limit, base, backlogs)

    def configure(self, limit: int, base: int, backlogs: list[int]) -> None:
        """Set the marks for ``limit``, a ``base`` count and the listeners' backlogs (at start
        and when listeners change); the data path's count carries over."""
        self.limit = limit
        self.base = base
        self.other = max(OTHER_MIN, min(OTHER_MAX, limit // 16))
        #: Kept back from the data path: the other uses, and every listener's accept burst.
        self.reserve = self.other + sum(2 * (b + 1) for b in backlogs)
        self.high = limit - self.reserve
        self.low = self.high - max(2, limit // 100)
        #: ``data`` at which accepting pauses (the one comparison made per accepted connection).
        self.data_high = self.high - base

    def in_use(self) -> int:
        """Descriptors in use, as counted: the start-time ``base`` plus the data path's."""
        return self.base + self.data

    def can_resume(self) -> bool:
        return self.base + self.data <= self.low

    def correct(self, really_open: int, data_then: int) -> int:
        """Lower ``base`` when fewer descriptors are open than counted (``data_then``: the data
        path's count when the listing began); returns by how much.

        A socket is closed a moment before the data path hears of it, so a listing can find a
        few fewer than counted: only the excess beyond the resume margin is taken off. The
        count is never raised here: one too low is caught by the descriptor numbers themselves
        (server.py)."""
        excess = self.base + min(data_then, self.data) - really_open - (self.high - self.low)
        if excess <= 0:
            return 0
        self.base -= excess
        self.data_high += excess
        return excess
