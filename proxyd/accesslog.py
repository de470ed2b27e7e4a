"""The access log (docs/access-log-and-metrics.md): one JSON object per line, through structlog.

structlog is wrapped per daemon (not configured globally) so tests can run several daemons in
one process; the processor chain is kept to a timestamp and an orjson renderer because every
request can produce a line. Values from the wire reach the renderer as ``str`` (or ``bytes``,
rendered with :func:`proxyd.parser.wire_text`) and are escaped by JSON encoding; anything
orjson refuses (lone surrogates) falls back to ASCII-escaped JSON.

JSON leaves some characters raw that other readers take as line breaks or controls: U+2028 and
U+2029 (JavaScript, Python's ``str.splitlines``), U+0085 and the other C1 controls
(U+0080-U+009F), and DEL. :func:`_escape_separators` writes them as ``\\uXXXX`` so every line
splits as one line everywhere. In a rendered JSON line those code points can only occur inside
strings, so the byte-level rewrite is exact.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import orjson
import structlog

from proxyd.context import ConnInfo, Context
from proxyd.logsink import LineSink
from proxyd.parser import Fields, wire_text

#: UTF-8 of U+0080-U+009F (C1 controls, U+0085 among them), U+2028, U+2029, and DEL.
_SEPARATORS = re.compile(rb"\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]|\x7f")


def _u_escape(m: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(m.group().decode("utf-8"))


def _escape_separators(line: bytes) -> bytes:
    if b"\xc2" in line or b"\xe2\x80" in line or b"\x7f" in line:
        return _SEPARATORS.sub(_u_escape, line)
    return line


def _default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return wire_text(bytes(obj))
    return str(obj)


def _dumps(obj: Any, **_: Any) -> bytes:
    try:
        line = orjson.dumps(obj, default=_default)
    except TypeError:
        return json.dumps(obj, ensure_ascii=True, default=_default).encode()
    return _escape_separators(line)


def _utc_now() -> str:
    """structlog's ``TimeStamper(fmt="iso", utc=True)`` value."""
    return datetime.datetime.now(tz=datetime.UTC).isoformat().replace("+00:00", "Z")


#: [second, "YYYY-MM-DDTHH:MM:SS"] of the last stamp: the date part is formatted once a second.
_STAMP: list[Any] = [-1, ""]


def _utc_stamp() -> str:
    """What :func:`_utc_now` returns (``datetime.now`` floors to the microsecond, and
    ``isoformat`` leaves the fraction out when it is 0), without a datetime per line."""
    sec, us = divmod(time.time_ns() // 1000, 1_000_000)
    if sec != _STAMP[0]:
        _STAMP[0], _STAMP[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_STAMP[1]}.{us:06d}Z" if us else f"{_STAMP[1]}Z"


class LineWriter:
    """A structlog logger that writes each rendered line at once (the daemon's own messages).

    A write that fails is lost, never raised: the caller may be the data path. The access log
    uses :class:`proxyd.logsink.LineSink` instead, which never blocks either.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[bytes] = self._open()

    def _open(self) -> IO[bytes]:
        if self.path == "-":
            return sys.stdout.buffer
        if self.path == "stderr":
            return sys.stderr.buffer
        # The directory must exist (the config check says so): creating it here would make a
        # typo, or a volume not mounted yet, into a directory owned by whoever started proxyd.
        return open(self.path, "ab", buffering=1 << 16)

    def msg(self, message: bytes) -> None:
        with self._lock:
            try:
                self._file.write(message + b"\n")
                self._file.flush()
            except (OSError, ValueError):  # ValueError: written after close
                pass

    info = warning = error = debug = msg

    def close(self) -> None:
        if self.path not in ("-", "stderr"):
            with contextlib.suppress(OSError):
                self._file.close()


class _Lines(Protocol):
    def msg(self, message: bytes) -> None: ...


def make_logger(writer: _Lines) -> Any:
    return structlog.wrap_logger(
        writer,
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        cache_logger_on_first_use=True,
    )


class Counts(Protocol):
    """Where the access log's counts go (:class:`proxyd.metrics.Metrics` fits): L7 verdicts as
    plain ints, and a way to read the lines its sink dropped, both summed at scrape."""

    @property
    def l7_counts(self) -> dict[tuple[str, str], int]: ...

    access_log_dropped: Callable[[], int]


class AccessLog:
    """Writes ``l7`` and ``connection`` lines and counts L7 verdicts.

    ``requests`` filters ``l7`` lines only (all | denied | none); connection lines are always
    written.
    """

    def __init__(self, path: str, requests: str, metrics: Counts) -> None:
        #: Never raises and never blocks (a full disk or a stuck pipe drops lines, counted).
        self.writer = LineSink(path)
        self.log = make_logger(self.writer)
        metrics.access_log_dropped = lambda: self.writer.dropped
        self.requests = requests
        self.metrics = metrics
        self._counts = metrics.l7_counts
        #: Whether forwarded requests get a line; parsers may skip building fields otherwise.
        self.log_forwarded = requests == "all"

    def quiet_counter(self, l7proto: str) -> tuple[dict[tuple[str, str], int], tuple[str, str]] | None:
        """Where a forwarded request of ``l7proto`` is counted, when it gets no line.

        ``(counts, key)`` unless ``requests: all``: a native parser then counts such requests
        itself (``counts[key] += 1``) instead of calling :meth:`l7` for a line that is dropped.
        """
        if self.log_forwarded:
            return None
        return self._counts, (l7proto, "forwarded")

    # LogSink protocol (proxyd.context)
    def l7(
        self,
        ctx: Context,
        entry_type: str,
        verdict: str,
        fields: Fields,
        policy: str | None,
    ) -> None:
        info = ctx.info
        if entry_type == "request":
            key = (info.l7proto, verdict)
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
        if self.requests == "none" or (self.requests == "denied" and verdict not in ("denied", "audit")):
            return
        self.l7_line(info, entry_type, verdict, fields, policy)

    def l7_line(
        self,
        info: ConnInfo,
        entry_type: str,
        verdict: str,
        fields: Fields,
        policy: str | None,
    ) -> None:
        if callable(fields):
            fields = fields()
        self.log.info(
            "l7",
            conn_id=info.conn_id,
            listener=info.listener,
            src=str(info.src),
            dst=str(info.dst),
            entry_type=entry_type,
            verdict=verdict,
            l7proto=info.l7proto,
            fields=dict(fields),
            policy=policy,
            direction=info.direction,
        )

    def connection(self, info: ConnInfo, **kv: Any) -> None:
        # One per connection: built and rendered here, as structlog's chain (TimeStamper iso utc,
        # JSONRenderer with _dumps) would, without its per-call machinery (a visible share of a
        # short connection's CPU, bench/README.md). Same keys, same order, same bytes. orjson
        # itself is cheap (under 1 us); the datetime per line was not (_utc_stamp). A line
        # written by hand with f-strings measured no faster than this.
        event = {"conn_id": info.conn_id, "listener": info.listener, "src": str(info.src),
                 "dst": str(info.dst), **kv, "event": "connection", "timestamp": _utc_stamp()}  # fmt: skip
        self.writer.msg(_dumps(event))

    def reopen(self) -> OSError | None:
        """Reopen the file (SIGUSR1); the error if it cannot be opened (the old file stays)."""
        return self.writer.reopen()

    def flush(self) -> bool:
        """Wait (bounded) until what is buffered is written; the sink's thread flushes by itself."""
        return self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    @property
    def dropped(self) -> int:
        """Lines dropped because the sink did not take them (``proxyd_access_log_dropped_total``)."""
        return self.writer.dropped
