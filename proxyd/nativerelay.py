"""The native relay: a connection's life cycle from accept to close on its two descriptors.

With the compiled implementation (``proxyd.native``), a listener accepts with its own
``accept4`` loop (:class:`NativeServer`) and relays an admitted connection in C
(``proxyd/_native_src/relay.c``: ``FdPair`` on one epoll set per event loop, the ``Hub``),
instead of :class:`proxyd.relay.Connection` on two uvloop transports. Why: a short
connection's cost was mostly the transports and the Python frames around them (bench/README.md,
"Connection churn"); here Python runs twice per connection, for admission and for the end (the
log line and counters), and not at all per read on an L4 listener or a compiled parser.

It is a twin of ``relay.py``, held equal to it by the whole test suite (which runs on this path
under the compiled implementation and on relay.py's under ``PROXYD_PURE=1``) and by
``tests/test_native_relay.py``, which runs each case on both: every rule of relay.py's
docstring holds here too (flow control, holds, half-close, resets passed on as resets, a failed
connect passed on as a reset, timeouts, one ``connection`` log line with the same fields).

What stays on relay.py's path, per connection: one admitted pending its TLS ClientHello
(``serverNames``) and one whose upstream is a name to resolve; they are handed over
(:meth:`NativeConnection._hand_over`) before a byte is read. ``PROXYD_NATIVE_RELAY=0`` keeps a
listener on relay.py's path altogether (read when the listener starts accepting).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

from proxyd.context import ConnInfo, Context, L7Policy
from proxyd.engine import EngineError
from proxyd.fdbudget import FDS_PER_CONNECTION
from proxyd.native import IMPLEMENTATION, Engine, native
from proxyd.relay import CLOSE_LINGER, Connection, connection_fields, is_ip, timeout_reason, timeouts_due
from proxyd.tlsgate import SNIView

if TYPE_CHECKING:
    from proxyd.dataside import ListenerSide

ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket, as uvloop's server


def enabled() -> bool:
    """Whether listeners started now relay natively: compiled, and not ``PROXYD_NATIVE_RELAY=0``."""
    return IMPLEMENTATION == "native" and os.environ.get("PROXYD_NATIVE_RELAY", "1") != "0"


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def hub_for(loop: asyncio.AbstractEventLoop) -> Any:
    """The event loop's epoll set of native connections, read by the loop itself."""
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = native.Hub()
        loop.add_reader(hub.fileno(), hub.run)
    return hub


class NativeServer:
    """What a listener's ``server`` is on the native path: the accept loop, as a reader."""

    def __init__(self, lr: ListenerSide, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        host = lr.host

        def out_of_fds(err: int) -> None:
            host.out_of_fds(OSError(err, os.strerror(err)))

        self._acceptor = native.Acceptor(self._fd, ACCEPT_BATCH, lr.accept_fd, out_of_fds)
        self._loop.add_reader(self._fd, self._acceptor.on_readable)

    def close(self) -> None:
        if self._acceptor is not None:
            self._loop.remove_reader(self._fd)
            self._acceptor.stop()
            self._acceptor = None


class NativeConnection:
    """A connection relayed by ``relay.c``: what the listener and the daemon see of it.

    The same surface as :class:`proxyd.relay.Connection` where they use it: ``start``,
    ``refuse``, ``read_hello``, ``check_timeouts``, ``close_now``, ``bytes_in``/``bytes_out``.
    """

    __slots__ = (
        "_bytes",
        "_clocal",
        "_closed",
        "_counted",
        "_hub",
        "_idle_mark",
        "_loop",
        "_req_mark",
        "_started",
        "ctx",
        "engine",
        "fd",
        "info",
        "lr",
        "pair",
        "upstream_addr",
    )  # fmt: skip

    def __init__(self, lr: ListenerSide, fd: int, loop: asyncio.AbstractEventLoop, hub: Any) -> None:
        self.lr = lr
        self.fd = fd  # the client's, until a pair or relay.py's Connection owns it
        self.pair: Any = None
        self.info: ConnInfo | None = None
        self.upstream_addr: tuple[str, int] | None = None
        self.engine: Any = None
        self.ctx: Context | None = None
        self._loop = loop
        self._hub = hub  # hub_for(loop)
        self._started = time.monotonic()
        self._counted = False
        self._closed = False
        self._clocal: tuple[str, int] | None = None
        self._bytes = (0, 0)  # (in, out) once ended
        self._idle_mark = (-1, 0.0)
        self._req_mark = (-1, 0.0)

    # --- admission's answers ---------------------------------------------------------------

    def start(self, info: ConnInfo, upstream: tuple[str, int], policy: L7Policy) -> None:
        """Admitted: relay natively, or hand over to relay.py (an upstream name to resolve, or an
        IPv6 address with a scope, which ``inet_pton`` does not read)."""
        host, port = upstream
        if not is_ip(host) or "%" in host:  # a name to resolve, or an IPv6 scope: relay.py's
            self._hand_over(lambda conn: conn.start(info, upstream, policy))
            return
        lr = self.lr
        self.info = info
        self.upstream_addr = upstream
        self._counted = True
        lr.metrics.active.inc()
        self.pair = pair = native.FdPair(self._hub, self.fd, self._ended, lr.limits.buffer_bytes)
        self.fd = -1
        factory = lr.factory
        if factory is not None:
            self.engine = engine = Engine(None, _unused_send, buffer_limit=lr.limits.buffer_bytes,
                                          on_error=self._engine_error, on_hold=pair._on_hold)  # fmt: skip
            self.ctx = Context(info, engine, policy, lr.access_log)
            try:
                engine.parser = factory.create(self.ctx, lr.config.parser_settings)
            except Exception as exc:  # the sandbox: a factory bug closes this connection only
                self._engine_error(EngineError("exception", f"{type(exc).__name__}: {exc}"))
                return
            pair.set_engine(engine)
        mark = lr.upstream_mark
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            connected, local = pair.connect(family, host, port, -1 if mark is None else mark,
                                            lr.host.transparent_listeners)  # fmt: skip
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                lr.host.out_of_fds(exc)
            # Reported from the event loop, as relay.py does: not from inside admission.
            self._loop.call_soon(pair.connect_failed, exc.errno or errno.EIO)
            return
        if local is not None:  # admission's loop check (relay.py: _connect_start)
            self._clocal = local
            lr.host.upstream_locals[local] = upstream
        if not connected and not pair.closed:
            pair.timer = self._loop.call_later(lr.limits.connect_timeout, pair.connect_timeout)

    def read_hello(self, info: ConnInfo, upstream: tuple[str, int], view: SNIView) -> None:
        """A ``serverNames`` rule could apply: relay.py's Connection reads the ClientHello."""
        self._hand_over(lambda conn: conn.read_hello(info, upstream, view))

    def refuse(self, reason: str, info: ConnInfo | None) -> None:
        """Close at accept without connecting upstream (policy, loop, limits)."""
        lr = self.lr
        lr.metrics.denials.inc()
        self.info = info
        fd, self.fd = self.fd, -1
        os.close(fd)  # nothing was read: a FIN, as relay.py's close()
        self._end("denied", reason, 0, 0, 0, 0)

    def _hand_over(self, admitted: Any) -> None:
        """Continue on relay.py's path: its Connection adopts the descriptor, already admitted."""
        lr = self.lr
        fd, self.fd = self.fd, -1
        conn = Connection(lr)
        lr.conns.discard(self)
        lr.conns.add(conn)
        conn.upstream_fd_counted = True
        conn.admitted = admitted
        sock = socket.socket(fileno=fd)
        lr.host.spawn(_adopt(lr, conn, sock))

    # --- the end ---------------------------------------------------------------------------

    def _ended(self, verdict: str, reason: str | None, connect_failed: bool, rx: int, tx: int,
               unparsed_client: int, unparsed_server: int, lingering: int) -> None:  # fmt: skip
        """relay.c's on_end: every descriptor is closed but ``lingering`` ones still flushing."""
        lr = self.lr
        if connect_failed:
            lr.metrics.connect_failures.inc()
        if lingering:
            # Each is given back to the descriptor budget when it is really closed: flushed,
            # failed, or aborted by this timer.
            pair = self.pair
            pair.on_linger_closed = lr.host.data_fd_closed
            pair.timer = self._loop.call_later(CLOSE_LINGER, pair.abort)
        self._end(verdict, reason, rx, tx, unparsed_client, unparsed_server, lingering)

    def _end(self, verdict: str, reason: str | None, rx: int, tx: int, unparsed_client: int,
             unparsed_server: int, lingering: int = 0) -> None:  # fmt: skip
        self._closed = True
        self._bytes = (rx, tx)
        engine = self.engine
        if engine is not None:
            # Break the connection's reference cycles (engine -> parser -> context -> engine,
            # engine -> on_error -> this record) so reference counting frees it now, not the
            # cyclic collector later: one less thing for it to walk per connection.
            engine.parser = None
            self.engine = self.ctx = None
        lr = self.lr
        d = lr.host
        if self._clocal is not None:
            d.upstream_locals.pop(self._clocal, None)
            self._clocal = None
        # The client's and the upstream's, both counted at accept (the upstream's whether it was
        # opened or not), but those still flushing (given back by on_linger_closed).
        for _ in range(FDS_PER_CONNECTION - lingering):
            d.data_fd_closed()
        if self._counted:
            lr.metrics.active.dec()
        d.add_closed_bytes(lr.config.name, rx, tx)
        lr.forget(self)
        if self.info is None:
            return
        kv = connection_fields(self.upstream_addr, self._started, rx, tx, verdict, reason, None,
                               (unparsed_client, unparsed_server))  # fmt: skip
        lr.access_log.connection(self.info, **kv)

    def _engine_error(self, err: EngineError) -> None:
        lr = self.lr
        lr.host.metrics.parser_errors_total.labels(lr.config.l7proto or "").inc()
        if self.info is not None:
            fields: dict[str, Any] = {"error_kind": err.kind, "error": str(err)}
            if err.code:
                fields["error_code"] = err.code
            lr.access_log.l7_line(self.info, "request", "error", fields, None)
        # Deferred: this runs inside the engine's own call stack.
        self._loop.call_soon(self.pair.close, "error", f"{err.kind}: {err}")

    def close_now(self, reason: str) -> None:
        """Abort both sides (drain timeout, listener removed)."""
        if self.pair is not None:
            self.pair.close("error", reason, True)

    # --- what the daemon reads -------------------------------------------------------------

    @property
    def upstream(self) -> SideView | None:
        """The upstream side once it is connected and open (relay.py: the upstream transport)."""
        pair = self.pair
        return SideView(pair, 1) if pair is not None and pair.connected else None

    @property
    def client(self) -> SideView | None:
        """The client side while the connection is open (relay.py: the client transport)."""
        pair = self.pair
        return SideView(pair, 0) if pair is not None and not pair.closed else None

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client."""
        if self._closed or self.pair is None:
            return self._bytes[0]
        return int(self.pair.counters()[0])

    @property
    def bytes_out(self) -> int:
        """Bytes written to the client."""
        if self._closed or self.pair is None:
            return self._bytes[1]
        return int(self.pair.counters()[1])

    def check_timeouts(self, now: float, idle: float, request: float) -> str | None:
        """relay.py's check_timeouts (no ClientHello is read here): the reason closed, or None."""
        pair = self.pair
        if self._closed or pair is None or self.info is None:
            return None
        rx, tx, up_rx = pair.counters()
        engine = self.engine if pair.connected else None
        self._idle_mark, self._req_mark, due = timeouts_due(
            self._idle_mark, self._req_mark, rx, tx + up_rx, engine, now, idle, request
        )
        if due is not None:
            self._timed_out(due, timeout_reason(due, idle, request))
        return due

    def _timed_out(self, kind: str, reason: str) -> None:
        self.lr.host.metrics.connection_timeouts_total.labels(self.lr.config.name, kind).inc()
        self.pair.close("error", reason, True)


class SideView:
    """One side of a pair as far as relay.py's transports are read from outside (write buffer)."""

    __slots__ = ("_pair", "_side")

    def __init__(self, pair: Any, side: int) -> None:
        self._pair = pair
        self._side = side

    def get_write_buffer_size(self) -> int:
        """Bytes written to this side that the kernel has not taken yet."""
        return int(self._pair.buffered[self._side])


def _unused_send(reply: bool, data: bytes | bytearray) -> None:
    """The engine's ``send``: never called, the engine writes to its relay (the pair)."""
    raise RuntimeError("a native connection's engine writes through its pair")


async def _adopt(lr: ListenerSide, conn: Connection, sock: socket.socket) -> None:
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock)
    except OSError:
        sock.close()
        lr.host.data_fd_closed()
        lr.host.data_fd_closed()
        lr.forget(conn)
