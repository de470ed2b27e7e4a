"""Where access-log lines go: a file or stdout, written by a thread the data path never waits on.

A request must not fail or slow down because its log line cannot be written: the disk is full
(ENOSPC), the device fails (EIO), the reader of a pipe is slow or gone (a blocking write that
never returns, EAGAIN on a non-blocking stdout, EPIPE). So :meth:`LineSink.msg`, the only call
the data path makes, appends the line to a bounded buffer under a lock and returns; it never
raises and never makes a system call. A writer thread takes the buffer every ``flush_interval``
(sooner once ``CHUNK`` bytes wait) and writes it; a write that blocks blocks that thread only.

Failures, and what the file then holds (docs/access-log-and-metrics.md):

- A sink that refuses bytes (ENOSPC, EIO, EPIPE): the lines of the failed write are dropped
  whole and counted (:attr:`LineSink.dropped`), and the sink is tried again every
  ``retry_interval`` with what was queued meanwhile; writing resumes by itself when space comes
  back. Dropping at once, rather than keeping the oldest lines, gives the space that comes back
  to current lines.
- A sink that is slow or stuck (a pipe whose reader does not read: the write blocks, or EAGAIN
  on a non-blocking stdout): lines wait, up to ``max_pending`` bytes; beyond that new lines are
  dropped whole and counted. What reaches the sink is in order, with gaps, never reordered.
- A line is never left torn in the middle of the file. A partial write (the disk filled up in
  the middle of a line) leaves the rest of that line at the head of the buffer, and the next
  successful write finishes it in place, before any other line. If the sink is closed or
  reopened before that (shutdown, SIGUSR1 with the disk still full), the fragment is cut off a
  regular file with ``ftruncate`` (the file then ends at its last whole line) and the line
  counts as dropped. A pipe is written in whole lines of at most PIPE_BUF bytes, which it
  takes whole or not at all, so there is no fragment to cut (only a line longer than PIPE_BUF
  can be cut, if the reader stops in its middle and proxyd then exits).
- Closing waits at most ``CLOSE_TIMEOUT`` for the last lines; what is still unwritten then
  (the disk is still full, the pipe's reader is gone) is counted as dropped, not raised.

The thread blocks every signal, so the kernel delivers them to the event loop's thread and a
blocking write is never cut short by one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import sys
import threading
import time

#: Bytes that may wait for a slow sink before new lines are dropped (some 4,000 typical lines).
MAX_PENDING = 1 << 20
#: Bytes waiting that wake the writer before its interval is up.
CHUNK = 1 << 16
FLUSH_INTERVAL = 0.2  # seconds a line may wait in the buffer
RETRY_INTERVAL = 0.5  # seconds between attempts while the sink refuses bytes
CLOSE_TIMEOUT = 2.0  # seconds close() waits for the last lines
BLOCKED_AFTER = 1.0  # a write pending this long is reported as blocked


class _File:
    """An open sink and how much of an unfinished line it holds at its end."""

    __slots__ = ("fd", "owned", "pipe", "torn")

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned  # ours to close (not stdout)
        self.torn = 0
        try:
            #: Not a regular file (a pipe, a socket, a tty): written in whole lines of at most
            #: PIPE_BUF bytes, which a pipe takes whole or not at all.
            self.pipe = not stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self.pipe = True

    def cut_torn(self) -> None:
        """Cut an unfinished line off the end of a regular file (best effort)."""
        torn, self.torn = self.torn, 0
        if not torn:
            return
        with contextlib.suppress(OSError):
            st = os.fstat(self.fd)
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
            if stat.S_ISREG(st.st_mode) and st.st_size == end >= torn:
                os.ftruncate(self.fd, end - torn)

    def close(self) -> None:
        self.cut_torn()
        if self.owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class LineSink:
    """Whole lines to ``path`` (``-`` is stdout) through a writer thread.

    Opening the file happens here, on the caller's thread: a path that cannot be opened at start
    raises ``OSError`` (a start-up error, named by the caller); nothing later does.
    """

    def __init__(
        self,
        path: str,
        *,
        max_pending: int = MAX_PENDING,
        flush_interval: float = FLUSH_INTERVAL,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self.path = path
        self.max_pending = max_pending
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self._file = self._open()
        self._lock = threading.Lock()  # taken directly in msg(): Condition's __enter__ is Python
        self._cond = threading.Condition(self._lock)
        # Guarded by _cond (the counters are also read without it: plain ints).
        self._buf = bytearray()  # lines for _file; may start with the rest of a torn line
        self._inflight = 0  # bytes the writer took and is writing now
        self._inflight_lines = 0
        #: Files replaced by a reopen, each with the lines queued for it before the reopen.
        self._retired: list[tuple[_File, bytearray]] = []
        #: Lines dropped: refused while the buffer was full, or unwritten at a reopen or close.
        self.dropped = 0
        #: The last write error, while it lasts (None again once a write succeeds).
        self.write_error: OSError | None = None
        self._write_since = 0.0  # monotonic start of the write in progress (0: none)
        self._flush_waiters = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"access-log {path}", daemon=True)
        self._thread.start()

    def _open(self) -> _File:
        if self.path == "-":
            return _File(sys.stdout.fileno(), owned=False)
        # The directory must exist (the config check says so): creating it here would make a
        # typo, or a volume not mounted yet, into a directory owned by whoever started proxyd.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return _File(os.open(self.path, flags, 0o644), owned=True)

    # --- the caller's side (the event loop) --------------------------------------------------

    def msg(self, message: bytes) -> None:
        """Queue one line (``message`` has no newline); drop it whole if the buffer is full."""
        with self._lock:
            buf = self._buf
            size = len(buf)
            if size + self._inflight + len(message) >= self.max_pending:
                self.dropped += 1
                return
            buf += message
            buf += b"\n"
            if not size or (size < CHUNK <= len(buf)):
                self._cond.notify()

    info = warning = error = debug = msg  # structlog calls the method named by the level

    def problem(self) -> str | None:
        """Why lines are not being written now, or None when the sink takes them."""
        err = self.write_error
        if err is not None:
            return err.strerror or str(err)
        since = self._write_since
        if since:
            blocked = time.monotonic() - since
            if blocked >= BLOCKED_AFTER or self.pending() + CHUNK >= self.max_pending:
                return f"a write has been blocked for {blocked:.1f}s (the reader does not keep up)"
        return None

    def pending(self) -> int:
        """Bytes not yet written."""
        return len(self._buf) + self._inflight

    def flush(self, timeout: float = CLOSE_TIMEOUT) -> bool:
        """Write what is buffered now, waiting at most ``timeout``; True if all of it was written."""
        end = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._buf or self._inflight or self._retired:
                    left = end - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(min(left, self.retry_interval))
            finally:
                self._flush_waiters -= 1
        return True

    def reopen(self) -> OSError | None:
        """Open ``path`` again (logrotate moved it); returns the error if it could not be opened.

        Lines queued before this call go to the old file (one last attempt), later ones to the
        new file. On an error the old file stays in use.
        """
        if self.path == "-":
            return None
        try:
            new = self._open()
        except OSError as exc:
            return exc
        with self._cond:
            self._retired.append((self._file, self._buf))
            self._buf = bytearray()
            self._file = new
            self._cond.notify_all()
        return None

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is buffered (waiting at most ``timeout``) and close; never raises."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            stuck = self._thread.is_alive()
            left = self._buf.count(b"\n") + sum(data.count(b"\n") for _, data in self._retired)
            if stuck:  # blocked in a write: what it holds is not written either
                left += self._inflight_lines
            self.dropped += left
            self._buf = bytearray()
            if not stuck:  # the writer is gone: its files are ours to cut and close
                for f, _ in self._retired:
                    f.close()
                self._file.close()
            self._retired = []

    # --- the writer thread --------------------------------------------------------------------

    def _take(self) -> tuple[_File, bytearray, bool] | None:
        """The next write: (file, bytes, whether it is a retired file's last attempt); None to end.

        Called with the lock held; waits for lines, then up to ``flush_interval`` for more.
        """
        cond = self._cond
        while not (self._buf or self._retired or self._closing):
            cond.wait()
        if self._retired:
            f, data = self._retired.pop(0)
            return f, data, True
        deadline = time.monotonic() + self.flush_interval
        while len(self._buf) < CHUNK and not (self._closing or self._flush_waiters or self._retired):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            cond.wait(left)
        if self._retired:
            f, data = self._retired.pop(0)
            return f, data, True
        if not self._buf:
            return None  # closing, and nothing left
        data = self._buf
        self._buf = bytearray()
        return self._file, data, False

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        cond = self._cond
        while True:
            with cond:
                job = self._take()
                if job is None:
                    return
                f, data, last = job
                self._inflight = len(data)
                self._inflight_lines = data.count(b"\n")
                self._write_since = time.monotonic()
            written, err = self._write(f, data)
            with cond:
                self._write_since = 0.0
                self._inflight = 0
                self._inflight_lines = 0
                f.torn = _torn_after(f.torn, data, written)
                rest = data[written:]
                if last:
                    self.dropped += rest.count(b"\n")
                    f.close()
                elif f is not self._file:
                    # Reopened during this write: the rest still belongs to the old file,
                    # which is retired with the lines queued for it.
                    self._retired = [(g, rest + d if g is f else d) for g, d in self._retired]
                elif rest:
                    if err is not None and not isinstance(err, BlockingIOError):
                        # The sink refuses bytes (disk full, I/O error, reader gone): drop these
                        # lines now, so space that comes back goes to new lines. The rest of a
                        # line already started in the file is kept, to be finished first.
                        keep = rest.find(b"\n") + 1 if f.torn else 0
                        self.dropped += rest.count(b"\n", keep)
                        rest = rest[:keep]
                    self._buf[:0] = rest
                cond.notify_all()
                if last or f is not self._file:
                    continue
                self.write_error = err
                if err is None:
                    continue
                if self._closing:
                    return  # the sink refuses bytes: close() counts what is left
                cond.wait(self.retry_interval)

    def _write(self, f: _File, data: bytearray) -> tuple[int, OSError | None]:
        """Write ``data``; returns (bytes written, the error that stopped it, if any).

        To a pipe, in pieces of whole lines of at most PIPE_BUF bytes: the kernel writes such a
        piece whole or not at all (blocking or not), so a reader that stops reading, or a
        shutdown while it does not, never leaves half a line in the pipe. A line longer than
        PIPE_BUF is one write of its own and can still be cut there.
        """
        view = memoryview(data)
        done, size = 0, len(data)
        while done < size:
            end = size
            if f.pipe and size - done > select.PIPE_BUF:
                cut = data.rfind(b"\n", done, done + select.PIPE_BUF)
                end = cut + 1 if cut >= 0 else (data.find(b"\n", done + select.PIPE_BUF) + 1 or size)
            try:
                done += os.write(f.fd, view[done:end])
            except BlockingIOError as exc:  # a non-blocking pipe is full: wait until it drains
                if not _wait_writable(f.fd, self.retry_interval):
                    return done, exc
            except OSError as exc:
                return done, exc
        return done, None


def _torn_after(torn: int, data: bytearray, written: int) -> int:
    """Bytes of an unfinished line in the file after ``data[:written]`` was appended."""
    if not written:
        return torn
    last = data.rfind(b"\n", 0, written)
    return torn + written if last < 0 else written - last - 1


def _wait_writable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(timeout * 1000))
    except OSError:
        return False
