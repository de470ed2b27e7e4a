"""How many file descriptors the data path may use, and how it accepts as the limit nears.

Running out of descriptors must not turn into connections accepted and dropped, or a blind
admin API. Two things go wrong at ``EMFILE`` with an event loop on libuv: the accept fails, and
libuv then accepts and closes at once every connection waiting in that listener's queue (its
"EMFILE trick"); and the admin API, the policy files and the upstream sockets of connections
already accepted find no descriptor either. So accepting stops *before* the limit (docs/
configuration.md, "Limits and timeouts"), and new connections wait in the kernel's listen queue
(``LISTEN_BACKLOG`` each: waiting there costs no descriptor).

- ``other`` descriptors are never used by connections: the admin API, policy files being read,
  name lookups, the log files. ``limit / 16``, at least 16 and at most 256. The admin API may
  hold at most half of them (``admin``, admin.py closes any connection past that at once), so
  idle scrapers or a port scan cannot take what policy reloads and log reopening need.
- The event loop's server accepts in bursts: everything queued on a listener in one go, before
  proxyd's code runs (up to the backlog + 1, each needing an upstream socket too). That fast
  path is used only while a whole burst of every listener still fits under the ceiling.
- Above that, up to the ceiling, proxyd accepts one connection at a time itself (a reader on
  the listening socket, the socket then handed to the event loop): a little slower, and exact.
- At the ceiling, accepting pauses until connections close.

The data path counts its own sockets (:attr:`FdBudget.data`): two per connection from the
moment it is accepted (its own and the upstream socket it will open; one is given back if it
ends without opening it), less each one closed. ``base`` is what the process had open besides
(listeners, admin server, log files, the event loop's own), counted at start. The count is
checked both ways: an accepted descriptor's number proves the ones below it are in use (a count
too low is raised to match), and off the fast path the descriptors really open are listed
every few seconds on a worker thread (a count too high is lowered), so a miscount can cost a
little room for a while but never keep accepting paused, or one at a time, for good.
"""

from __future__ import annotations

import os
import resource

#: The kernel's listen queue per listener: where connections wait while accepting is paused
#: (it costs no descriptor), and the most one burst of the event loop's accepting can take.
LISTEN_BACKLOG = 1024
FDS_PER_CONNECTION = 2  # a relayed connection's client and upstream socket
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


class FdBudget:
    """The marks, from the limit down; ``data`` is kept by the relay, one per socket.

    - ``high``: the data path's ceiling (``limit`` less the ``other`` uses). A connection is
      accepted only while ``in_use() + 2 <= high``; past that, accepting pauses.
    - ``low``: where a pause ends.
    - ``fast_high``: below it the event loop's server accepts in bursts (the fast path);
      from it up to ``high`` proxyd accepts one connection at a time, each checked against
      ``high``. The gap is every listener's worst burst, ``2 * (backlog + 1)``, so a burst that
      starts below ``fast_high`` cannot pass ``high``.
    - ``fast_low``: where accepting in bursts starts again.
    """

    __slots__ = (
        "admin", "base", "data", "data_fast_high", "fast_high", "fast_low", "high", "limit", "low", "other",
    )  # fmt: skip

    def __init__(self, limit: int, base: int, backlogs: list[int]) -> None:
        self.data = 0
        self.configure(limit, base, backlogs)

    def configure(self, limit: int, base: int, backlogs: list[int]) -> None:
        """Set the marks for ``limit``, a ``base`` count and the listeners' backlogs (at start
        and when listeners change); the data path's count carries over."""
        self.limit = limit
        self.base = base
        #: Kept back from the data path for the admin API, policy files, lookups, logs.
        self.other = max(OTHER_MIN, min(OTHER_MAX, limit // 16))
        #: The admin API's share of ``other``: its connections open at most.
        self.admin = self.other // 2
        margin = max(2, limit // 100)
        self.high = limit - self.other
        self.low = self.high - margin
        self.fast_high = self.high - sum(2 * (b + 1) for b in backlogs)
        self.fast_low = self.fast_high - margin
        self._rebase()

    def _rebase(self) -> None:
        #: ``data`` at which bursts stop (the one comparison made per connection accepted so).
        self.data_fast_high = self.fast_high - self.base

    def in_use(self) -> int:
        """Descriptors in use, as counted: the start-time ``base`` plus the data path's."""
        return self.base + self.data

    def room(self) -> bool:
        """Whether one more connection (two sockets) stays under ``high``."""
        return self.base + self.data + FDS_PER_CONNECTION <= self.high

    def seen(self, fd: int) -> None:
        """Descriptor ``fd`` was just handed out. The kernel hands out the lowest free number,
        so every one below it is in use: if the count says fewer, it missed some (descriptors
        proxyd does not count, such as the admin API's) and ``base`` is raised to match."""
        if fd >= self.base + self.data:
            self.base = fd + 1 - self.data
            self._rebase()

    def correct(self, really_open: int, data_then: int) -> int:
        """Lower ``base`` when fewer descriptors are open than counted (``data_then``: the data
        path's count when the listing began); returns by how much.

        A socket is closed a moment before the data path hears of it, so a listing can find a
        few fewer than counted: only the excess beyond the resume margin is taken off."""
        excess = self.base + min(data_then, self.data) - really_open - (self.high - self.low)
        if excess <= 0:
            return 0
        self.base -= excess
        self._rebase()
        return excess
