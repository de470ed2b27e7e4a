"""The relay: one client connection, its upstream connection, and the engine between them.

Protocol-free I/O on asyncio transports (uvloop). What it guarantees (docs/configuration.md):

- Flow control both ways: when one side's write buffer passes its high-water mark, reading
  from the other side pauses, and resumes below the low mark; the engine's own buffers are
  capped by ``limits.buffer_bytes``. Memory per connection is therefore bounded.
- Half-close both ways: EOF from one side is handed to the parser (``end_stream``) and then
  passed on as a write shutdown once everything before it has been written. The shutdown is
  ``shutdown(SHUT_WR)`` on the transport's own descriptor (no ``dup``: it must work when the
  process has no descriptor to spare) instead of ``transport.write_eof()``, which aborted
  uvloop processes under connection churn on these machines.
- Reading pauses are enforced, not assumed: uvloop starts reading *after* ``connection_made``
  returns, so a pause asked for there would be a no-op. Every ``data_received`` that arrives
  while a pause is wanted pauses the transport again. While the upstream connects the client
  is read until ``buffer_bytes`` wait for it, then paused, so at most that plus one read's
  worth of bytes (plus the engine's ``buffer_bytes``) is ever held before the upstream is
  connected. (Pausing at accept instead cost a pause and a resume, two to four ``epoll_ctl``
  calls, on nearly every short connection, whose request arrives while it connects.)
- Answers proxyd writes itself (injected denials) to a client that sends requests but never
  reads are bounded too: past ``HIGH_WATER + buffer_bytes`` waiting for the client, reading
  from the client pauses until it catches up.
- A direction the parser *holds* (it waits on the other direction: the engine's hold, see
  :mod:`proxyd.engine`) is not read until the hold clears, so its buffered bytes stay within
  ``buffer_bytes`` plus one read; an EOF behind held bytes is passed on once they are.
- A reset (RST) from one side is passed on as a reset: the other side is aborted with
  ``SO_LINGER`` 0, so a truncated transfer never looks complete. An upstream that refuses,
  cannot be reached or does not answer the connect in time is passed on the same way.
- Timeouts (:meth:`Connection.check_timeouts`, called by the daemon's sweep): ``idle`` (no
  byte either way) and ``request`` (the parser has waited on MORE, with a partial request
  buffered and no progress, for that long).
- A connection admitted pending its TLS ClientHello (:mod:`proxyd.tlsgate`) reads the client
  first, bounded by ``buffer_bytes`` and ``request_timeout``, and connects upstream only once
  allowed, sending what it read byte-exact; a refused one gets the gate's alert, or nothing.
- The connection ends when both directions are done, on error, or on policy; exactly one
  ``connection`` access-log line is written, with byte counts and the reason.
- Reads go straight through once a connection is established (:meth:`Connection._go_direct`;
  a parsed connection always, an L4 one on the compiled path): each transport's
  ``data_received`` is the engine's own reader, and the engine writes what it resolves to the
  other transport and counts the bytes itself, so a read the engine fully resolves reaches the
  other side's ``write`` without relay code in between (and, on the compiled engine, without a
  Python frame). Every rule above still holds: replies to a client
  above its high-water mark go through :meth:`Connection._send` again (the bound on answers
  proxyd writes itself), a held upstream read pauses the upstream again, and EOF, resets and
  the rest of the transport events still reach the connection.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from proxyd.context import ConnInfo, Context, L7Policy
from proxyd.engine import EngineError
from proxyd.native import IMPLEMENTATION, Engine
from proxyd.origdst import unmap
from proxyd.tlsgate import GateVerdict, HelloGate, SNIView

if TYPE_CHECKING:
    from proxyd.dataside import ListenerSide

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
CLOSE_LINGER = 10.0  # seconds a closed connection may take to flush before it is aborted


_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _sock_of(transport: asyncio.Transport) -> _socket.socket | None:
    """A socket object on the transport's own descriptor (no ``dup``); ``detach()`` it after.

    The C-level ``_socket.socket``: the ``socket.socket`` wrapper's Python ``__init__`` and
    enum conversions were a visible share of a short connection's teardown. It is only a
    handle for ``shutdown`` and ``SO_LINGER``, which do not depend on the address family, so
    the family is not read off uvloop's pseudo-socket (whose getters convert to enums too).
    """
    pseudo = transport.get_extra_info("socket")
    if pseudo is None:
        return None
    try:
        fd = pseudo.fileno()
        if fd < 0:
            return None
        return _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
    except OSError:
        return None


class _UpstreamSocket(socket.socket):
    """The upstream's socket: ``family`` and ``type`` as the plain ints ``_socket`` gives.

    uvloop's ``create_connection(sock=)`` reads both; ``socket.socket`` converts each to its
    enum on every read, a visible share of a short connection's connect. Still a
    ``socket.socket``, so uvloop detaches it (never closes the descriptor twice) at the end.
    """

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]

    def setblocking(self, flag: bool) -> None:
        # Made SOCK_NONBLOCK (Python knows: its timeout is 0.0), so uvloop's setblocking(False)
        # would be an ioctl(FIONBIO) that changes nothing.
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


def shutdown_write(transport: asyncio.Transport) -> None:
    """Half-close a transport's socket without ``write_eof()`` and without a new descriptor."""
    s = _sock_of(transport)
    if s is None:
        return
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        s.detach()


def reset(transport: asyncio.Transport) -> None:
    """Abort a transport so the peer sees a reset (RST), not a clean end (FIN)."""
    s = _sock_of(transport)
    if s is not None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        finally:
            s.detach()
    transport.abort()


class UpstreamProtocol(asyncio.BaseProtocol):
    """The server side of a relayed connection; forwards events to its :class:`Connection`.

    ``data_received`` is an attribute, not a method, which uvloop reads once: the engine's
    reader (reads go straight through it), else the connection's (see
    :meth:`Connection.upstream_reader`).
    """

    __slots__ = ("conn", "data_received")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.data_received: Callable[[bytes], None] = conn.upstream_reader()

    def eof_received(self) -> bool:
        self.conn.upstream_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lr.host.data_fd_closed()
        self.conn.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_client_reading("upstream-full")

    def resume_writing(self) -> None:
        self.conn.resume_client_reading("upstream-full")


class DirectClient(asyncio.BaseProtocol):
    """The client transport's protocol once its reads go straight to the engine.

    uvloop reads ``data_received`` once (when the protocol is set): here the engine's reader;
    every other event goes to the :class:`Connection`, as before.
    """

    __slots__ = ("conn", "data_received")

    def __init__(self, conn: Connection, reader: Callable[[bytes], None]) -> None:
        self.conn = conn
        self.data_received = reader

    def eof_received(self) -> bool:
        return self.conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class Connection(asyncio.Protocol):
    """The client side of a relayed connection, and the owner of the whole pair."""

    def __init__(self, listener: ListenerSide) -> None:
        self.lr = listener
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.engine: Engine | None = None
        self.ctx: Context | None = None
        self.info: ConnInfo | None = None
        self.upstream_addr: tuple[str, int] | None = None
        self._pending: list[bytes | bytearray] | None = []  # to upstream, before it is connected
        self._pending_size = 0  # bytes in _pending; past buffer_bytes, reading the client pauses
        self._client_pauses: set[str] = set()
        self._client_eof = False
        self._upstream_eof = False
        self._shut = [False, False]  # write side shut down: [upstream, client]
        self._closed = False
        self._counted = False
        self._started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self._unparsed = [0, 0]
        self._task: asyncio.Task[None] | None = None  # resolving the upstream's name
        #: The upstream connect in progress (see _connect_start): socket, whether add_writer
        #: watches it, the connect_timeout timer, its local address in upstream_locals, and
        #: create_connection(sock=) once the handshake is done.
        self._csock: socket.socket | None = None
        self._cwatch = False
        self._ctimer: asyncio.Handle | None = None  # or the fast path's call_soon
        self._clocal: tuple[str, int] | None = None
        self._coro: Any = None
        self._loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)  # connection_made
        #: The upstream socket this connection will open was counted at accept, so accepting
        #: stops in time (fdbudget.py); given back if the connection ends without opening it.
        self.upstream_fd_counted = False
        self._l4 = True  # no parser: relay bytes directly
        self._up_rx = 0  # bytes received from the upstream (idle detection)
        self._upstream_held = False  # the parser holds the server's bytes (engine hold)
        self._client_full = False  # the client's write buffer is above its high-water mark
        #: Abort timers of closed transports still flushing: [client, upstream].
        self._lingers: list[asyncio.TimerHandle | None] | None = None
        #: Past this many bytes waiting for the client, reading its requests pauses.
        self._reply_cap = HIGH_WATER + listener.limits.buffer_bytes
        #: Timeout sweep state: activity seen at the last sweep and since when it is unchanged;
        #: the request position (bytes the parser consumed) and since when a partial request
        #: has waited without progress.
        self._idle_mark = (-1, 0.0)
        self._req_mark = (-1, 0.0)
        #: Reading the ClientHello before connecting (a serverNames rule could apply).
        self._gate: HelloGate | None = None
        self._tls_fields: dict[str, Any] | None = None

    # --- accept ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Once: asyncio.get_running_loop() is a getpid() system call in CPython 3.11.
        self._loop = asyncio.get_running_loop()
        self.client = client = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        client.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        # No pause while the upstream connects: _pend pauses once buffer_bytes wait.
        admitted = self.admitted
        if admitted is not None:  # handed over by the native relay, admitted already
            self.admitted = None
            admitted(self)
            return
        self.lr.accept(self)

    def start(self, info: ConnInfo, upstream: tuple[str, int], policy: L7Policy) -> None:
        """Called by the listener once the connection is admitted: create parser, connect."""
        assert self.client is not None
        self.info = info
        self.upstream_addr = upstream
        if not self._counted:
            self._counted = True
            self.lr.metrics.active.inc()
        factory = self.lr.factory
        if factory is not None:  # an L4 listener relays bytes itself: no engine, no parser
            self._l4 = False
            self.engine = engine = Engine(None, self._send, buffer_limit=self.lr.limits.buffer_bytes,
                                          on_error=self._engine_error, on_hold=self._on_hold)  # fmt: skip
            self.ctx = Context(info, engine, policy, self.lr.access_log)
            try:
                engine.parser = factory.create(self.ctx, self.lr.config.parser_settings)
            except Exception as exc:  # the sandbox: a factory bug closes this connection only
                self._engine_error(EngineError("exception", f"{type(exc).__name__}: {exc}"))
                return
        host, port = upstream
        lr = self.lr
        if is_ip(host) and not lr.host.transparent_listeners and lr.upstream_mark is None:
            self._connect_uv(upstream)
        elif is_ip(host):
            self._connect_start(socket.AF_INET6 if ":" in host else socket.AF_INET, upstream)
        else:
            self._task = self._loop.create_task(self._resolve(host, port))

    def read_hello(self, info: ConnInfo, upstream: tuple[str, int], view: SNIView) -> None:
        """Admitted pending its TLS ClientHello (proxyd.tlsgate): read it before connecting."""
        self.info = info
        self.upstream_addr = upstream
        self._counted = True
        self.lr.metrics.active.inc()
        self._gate = HelloGate(view, self.lr.limits.buffer_bytes)  # the client is being read

    def _gate_decided(self, verdict: GateVerdict) -> None:
        gate, self._gate = self._gate, None
        assert gate is not None and self.info is not None and self.upstream_addr is not None
        self._tls_fields = verdict.fields
        lr = self.lr
        if not verdict.allowed:
            lr.metrics.denials.inc()
            lr.host.metrics.tls_denials_total.labels(lr.config.name, verdict.label).inc()
            if verdict.alert is not None and self.client is not None:
                self.bytes_out += len(verdict.alert)
                self.client.write(verdict.alert)
            self._finish("denied", verdict.reason)
            return
        if verdict.audit:
            lr.access_log.connection(self.info, **verdict.fields, verdict="audit", reason=verdict.reason,
                                     policy=verdict.policy_name)  # fmt: skip
        # Bytes that arrive while the upstream connects wait in _pending: bounded, as at accept.
        self.pause_client_reading("connecting")
        self.start(self.info, self.upstream_addr, verdict.policy)
        if self._closed:
            return
        if self._l4 or self.engine is None:
            assert self._pending is not None
            self._pending.append(gate.data)
        else:
            self.engine.feed(False, gate.data)

    def check_timeouts(self, now: float, idle: float, request: float) -> str | None:
        """Close this connection if a timeout passed (0 = off); returns the reason or None.

        Called about once per sweep interval by the daemon, so no per-chunk timer is kept:
        progress is read off counters the data path keeps anyway.
        """
        if self._closed or self.info is None:
            return None
        if self._gate is not None and request:
            # Waiting for the ClientHello counts from the first sweep that sees it (as below).
            if self._req_mark[0] != -2:
                self._req_mark = (-2, now)
            elif now - self._req_mark[1] >= request:
                verdict = self._gate.end("timeout")
                self._gate_decided(verdict)
                self._req_mark = (-1, 0.0)
                return None if verdict.allowed else "request"
        if idle:
            seen = self.bytes_in + self.bytes_out + self._up_rx
            if seen != self._idle_mark[0]:
                self._idle_mark = (seen, now)
            elif now - self._idle_mark[1] >= idle:
                self._timed_out("idle", f"idle timeout: no byte either way for {idle:g}s")
                return "idle"
        engine = self.engine
        if request and not self._l4 and engine is not None and self.upstream is not None:
            # Held bytes wait on the server's answers, not on the client: no request timeout.
            buffered = 0 if engine.held(False) else engine.buffered(False)
            if not buffered:
                self._req_mark = (-1, 0.0)
            else:
                consumed = self.bytes_in - buffered
                if consumed != self._req_mark[0]:
                    self._req_mark = (consumed, now)
                elif now - self._req_mark[1] >= request:
                    self._timed_out(
                        "request", f"request timeout: a partial request waited {request:g}s for more bytes"
                    )
                    return "request"
        return None

    def _timed_out(self, kind: str, reason: str) -> None:
        self.lr.host.metrics.connection_timeouts_total.labels(self.lr.config.name, kind).inc()
        self._finish("error", reason, abort=True)

    def refuse(self, reason: str, info: ConnInfo | None) -> None:
        """Close at accept without connecting upstream (policy, loop, limits)."""
        self.lr.metrics.denials.inc()
        self.info = info
        self._finish("denied", reason)

    # --- upstream connect ------------------------------------------------------------------
    #
    # A plain callback chain, no task or coroutine of our own per connection (a name to resolve
    # is the exception): socket, non-blocking connect started by hand, add_writer for its end
    # and one timer for connect_timeout unless the handshake was over when connect() returned
    # (a local upstream: then neither), then uvloop's create_connection(sock=) stepped by hand
    # (it only waits for connection_made, one loop iteration). Started by hand so the local
    # address is known before the handshake: if a NAT rule sends this very connection back to
    # one of our listeners, the accept side recognises it and refuses it (no redirect loop).
    # Where no transparent listener exists (nothing reads that registration) and no SO_MARK is
    # set, a literal address is connected by uvloop's own create_connection instead
    # (_connect_uv): cheaper, with the same timeout, failure and descriptor handling.

    async def _resolve(self, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._connect_failed(exc)
            return
        family, _, _, _, addr = infos[0]
        self._connect_start(family, addr)

    def _connect_start(self, family: int, addr: Any) -> None:
        lr = self.lr
        loop = self._loop
        sock: socket.socket | None = None
        try:
            # Non-blocking from socket() on: no ioctl(FIONBIO) of its own.
            sock = _UpstreamSocket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self._csock = sock
            # Counted at accept (upstream_fd_counted); uncounted when closed (data_fd_closed).
            self.upstream_fd_counted = False
            lr.host.fds.seen(sock.fileno())
            # No TCP_NODELAY here: uvloop sets it on every TCP transport it makes.
            if lr.upstream_mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, lr.upstream_mark)
            with contextlib.suppress(BlockingIOError):
                sock.connect(addr)
            if lr.host.transparent_listeners:
                # Only a transparent listener reads upstream_locals (admission's loop check):
                # with none in the daemon, no getsockname() and no registration.
                name = sock.getsockname()
                self._clocal = local = (unmap(name[0]), name[1])
                lr.host.upstream_locals[local] = cast("tuple[str, int]", self.upstream_addr)
            try:
                # Connected already? On loopback (a local upstream) the handshake is over when
                # connect() returns EINPROGRESS. getpeername() fails while it is not (SYN_SENT,
                # or refused): one system call instead of add_writer's poll handle (ioctl and
                # six to eight epoll_ctl in uvloop), its timer and the SO_ERROR check.
                sock.getpeername()
            except OSError:
                loop.add_writer(sock.fileno(), self._connect_ready)
                self._cwatch = True
            else:
                # Finished on the next iteration, as add_writer's callback would be: never from
                # inside connection_made. The handle sits where the timer does, so _finish and
                # _connect_cleanup cancel it alike.
                self._ctimer = loop.call_soon(self._connect_ready, True)
                return
        except OSError as exc:
            # Reported where a failure found by add_writer is (_connect_ready), not from inside
            # connection_made, before the event loop has started reading the client.
            loop.call_soon(self._connect_failed, exc)
            return
        self._ctimer = loop.call_later(lr.limits.connect_timeout, self._connect_failed, TimeoutError())

    def _connect_uv(self, addr: Any) -> None:
        """Connect through uvloop's own C ``create_connection`` (a literal address: no resolver).

        Only where nothing needs the socket before the handshake: no transparent listener (no
        local address to register for the loop check) and no ``upstream_mark``. Measured
        13-20 us CPU cheaper per connect and close than the hand-started connect. Stepped by
        hand as below, from the next loop iteration (never from inside connection_made), with
        one ``connect_timeout`` timer. The descriptor counted at accept stays counted
        (``upstream_fd_counted``) until the outcome is known: on success the transport's
        ``connection_lost`` gives it back, otherwise ``_finish`` or the timeout does. A
        connection that ends while this connect is pending leaves it to its outcome or the
        timer, which bound it either way. The socket's number is not handed to ``fds.seen``
        (uvloop opens it; reading it back costs a system call): the accepted client's number,
        seen at accept, corrects a miscount the same way.
        """
        loop = self._loop
        self._coro = loop.create_connection(self._upstream_protocol, addr[0], addr[1])
        self._ctimer = loop.call_later(self.lr.limits.connect_timeout, self._connect_uv_timeout)
        loop.call_soon(self._step_uv)

    def _step_uv(self, _: Any = None) -> None:
        coro = self._coro
        if coro is None:
            return
        if self._closed and self._cwaiter is None:  # ended before the connect began
            self._connect_uv_abandon()
            return
        try:
            waiter = coro.send(None)
        except StopIteration as done:
            self._coro = None
            if self._ctimer is not None:
                self._ctimer.cancel()
                self._ctimer = None
            self.upstream_fd_counted = False  # the transport's connection_lost gives it back
            self._connected(done.value[0])
            return
        except OSError as exc:  # uvloop closed its transport (never connected: no connection_lost)
            self._coro = None
            if self._closed:
                self._connect_uv_abandon()
                return
            self._connect_failed(exc)  # _finish gives the counted descriptor back
            return
        self._cwaiter = waiter
        waiter.add_done_callback(self._step_uv)

    def _connect_uv_timeout(self) -> None:
        self._ctimer = None
        waiter = self._cwaiter
        if self._coro is None or (waiter is not None and waiter.done()):
            return  # connected (or failed) already: _step_uv runs next
        if waiter is not None:
            waiter.remove_done_callback(self._step_uv)
        self._coro.close()  # uvloop closes its transport; connection_made was never called
        self._coro = None
        if self._closed:
            self._connect_uv_abandon()
            return
        self._connect_failed(TimeoutError())

    def _connect_uv_abandon(self) -> None:
        """The connection ended while uvloop's connect was pending: give its descriptor back."""
        if self._coro is not None:
            self._coro.close()
            self._coro = None
        if self._ctimer is not None:
            self._ctimer.cancel()
            self._ctimer = None
        if self.upstream_fd_counted:
            self.upstream_fd_counted = False
            self.lr.host.data_fd_closed()

    def _connect_cleanup(self, keep_local: bool = False) -> socket.socket | None:
        """Undo what a connect in progress registered; returns its socket (still open).

        ``keep_local``: the connect succeeded; its local address stays registered until the
        connection ends. On loopback the handshake is over before a listener accepts the
        connection a NAT rule sent back to us, so the accept side must still find it then.
        """
        sock, self._csock = self._csock, None
        if self._cwatch and sock is not None:
            self._cwatch = False
            self._loop.remove_writer(sock.fileno())
        if self._ctimer is not None:
            self._ctimer.cancel()
            self._ctimer = None
        if self._clocal is not None and not keep_local:
            self.lr.host.upstream_locals.pop(self._clocal, None)
            self._clocal = None
        return sock

    def _connect_ready(self, connected: bool = False) -> None:
        sock = self._connect_cleanup(keep_local=True)
        assert sock is not None
        err = 0 if connected else sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._csock = sock
            self._connect_failed(OSError(err, os.strerror(err)))
            return
        self._coro = self._loop.create_connection(self._upstream_protocol, sock=sock)
        self._step()

    def _upstream_protocol(self) -> UpstreamProtocol:
        return UpstreamProtocol(self)

    def _step(self, _: Any = None) -> None:
        """Drive create_connection(sock=) by hand: what a Task would do, without one."""
        coro = self._coro
        assert coro is not None
        try:
            waiter = coro.send(None)
        except StopIteration as done:
            self._coro = None
            self._connected(done.value[0])
            return
        except OSError as exc:  # uvloop closed the transport and detached the socket
            self._coro = None
            self._connect_failed(exc, fd_closed=True)
            return
        waiter.add_done_callback(self._step)

    def _connect_failed(self, exc: OSError, fd_closed: bool = False) -> None:
        sock = self._connect_cleanup()
        if sock is not None:
            sock.close()
            fd_closed = True
        if fd_closed:
            self.lr.host.data_fd_closed()
        if self._closed:
            return
        self.lr.metrics.connect_failures.inc()
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self.lr.host.out_of_fds(exc)
        why = "timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        # A reset, as from an upstream that reset: a clean FIN would read as "the server
        # answered nothing and closed", which a client may take for a complete exchange.
        self._finish("error", f"upstream connect failed: {why}", reset_peer=self.client)

    def _connected(self, transport: Any) -> None:
        if self._closed:
            transport.abort()
            return
        self.upstream = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        pending, self._pending = self._pending, None
        if pending:
            transport.write(b"".join(pending))
        if self._client_eof:
            self._maybe_shutdown(False)
        self._go_direct()
        if "connecting" in self._client_pauses:
            self.resume_client_reading("connecting")

    def _pend(self, data: bytes | bytearray) -> None:
        """Keep bytes for the upstream that is still connecting; bounded by pausing the client."""
        assert self._pending is not None
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.lr.limits.buffer_bytes:
            self.pause_client_reading("connecting")

    # --- data ------------------------------------------------------------------------------
    #
    # The byte counts are the relay's own (reads and writes it handled) plus the engine's
    # (reads and writes on the direct path).

    _rx_client = 0  # bytes read from the client by the relay (data_received)
    _tx_client = 0  # bytes written to the client by the relay (_send, L4, TLS alerts)
    _rx_upstream = 0  # bytes read from the upstream by the relay (upstream_data)
    _direct = False  # reads go straight to the engine (_go_direct)
    _cwaiter: Any = None  # what uvloop's create_connection waits on (_connect_uv)
    #: Handed over by nativerelay.py after admission: what to do instead of admitting again.
    admitted: Callable[[Connection], None] | None = None

    def _engine_count(self, sent: bool, reply: bool) -> int:
        engine = self.engine
        if engine is None:
            return 0
        return engine.sent(reply) if sent else engine.received(reply)

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client."""
        return self._rx_client + self._engine_count(False, False)

    @bytes_in.setter
    def bytes_in(self, n: int) -> None:
        self._rx_client = n - self._engine_count(False, False)

    @property
    def bytes_out(self) -> int:
        """Bytes written to the client (forwarded and proxyd's own answers)."""
        return self._tx_client + self._engine_count(True, True)

    @bytes_out.setter
    def bytes_out(self, n: int) -> None:
        self._tx_client = n - self._engine_count(True, True)

    @property
    def _up_rx(self) -> int:
        """Bytes read from the upstream (idle detection)."""
        return self._rx_upstream + self._engine_count(False, True)

    @_up_rx.setter
    def _up_rx(self, n: int) -> None:
        self._rx_upstream = n - self._engine_count(False, True)

    def upstream_reader(self) -> Callable[[bytes], None]:
        """The upstream transport's ``data_received``: the engine's reader.

        An L4 connection gets an engine without a parser for it on the compiled path, where
        that engine is a plain C pipe; on the Python path the relay's own one-frame
        :meth:`upstream_data` is cheaper than an engine's feed, so L4 keeps it there.
        """
        engine = self.engine
        if engine is None and self._l4 and self._gate is None and IMPLEMENTATION == "native":
            engine = self.engine = Engine(None, self._send, buffer_limit=self.lr.limits.buffer_bytes)
        return self.upstream_data if engine is None else engine.read_server

    def _go_direct(self) -> None:
        """Connected, with an engine: hand both transports' reads to the engine itself.

        The engine writes to the upstream, and to the client while the client keeps up
        (:meth:`pause_writing` takes the client off until :meth:`resume_writing`).
        """
        engine, client, upstream = self.engine, self.client, self.upstream
        if engine is None or client is None or upstream is None or self._gate is not None or self._closed:
            return
        engine.relay(upstream, None if self._client_full else client)
        client.set_protocol(DirectClient(self, engine.read_client))
        self._direct = True

    def data_received(self, data: bytes) -> None:
        self._rx_client += len(data)
        if self._client_pauses and self.client is not None:
            # A pause that did not take (asked for before uvloop started reading): take it now.
            self.client.pause_reading()
        if self._gate is not None:
            verdict = self._gate.feed(data)
            if verdict is not None:
                self._gate_decided(verdict)
            return
        if self._l4:
            if self.upstream is not None:
                self.upstream.write(data)
            elif self._pending is not None:  # bounded: reading pauses while connecting
                self._pend(data)
            return
        if self.engine is not None:
            self.engine.feed(False, data)

    def upstream_data(self, data: bytes) -> None:
        self._rx_upstream += len(data)
        if self._upstream_held and self.upstream is not None:
            self.upstream.pause_reading()  # as for the client: a pause is enforced, not assumed
        if self._l4:
            assert self.client is not None
            self._tx_client += len(data)
            self.client.write(data)
            return
        if self.engine is not None:
            self.engine.feed(True, data)

    def _send(self, reply: bool, data: bytes | bytearray) -> None:
        if self._closed:
            return
        if reply:
            client = self.client
            assert client is not None
            self._tx_client += len(data)
            client.write(data)
            if self._client_full and client.get_write_buffer_size() > self._reply_cap:
                # Still growing although the upstream is paused: answers proxyd writes itself
                # (denials) to a client that sends requests but does not read. Stop reading its
                # requests until it catches up (resume_writing), as a server would.
                self.pause_client_reading("client-full")
        elif self.upstream is not None:
            self.upstream.write(data)
        elif self._pending is not None:
            self._pend(data)

    # --- half-close and end ----------------------------------------------------------------

    def eof_received(self) -> bool:
        if self._client_eof:
            return True
        self._client_eof = True
        if self._gate is not None:
            self._gate_decided(self._gate.end("incomplete"))
        if self.engine is not None:
            self._unparsed[0] = self.engine.feed_eof(False)
        self._maybe_shutdown(False)
        self._maybe_done()
        return True

    def upstream_eof(self) -> None:
        if self._upstream_eof:
            return
        self._upstream_eof = True
        if self.engine is not None:
            self._unparsed[1] = self.engine.feed_eof(True)
        self._maybe_shutdown(True)
        self._maybe_done()

    def _maybe_shutdown(self, reply: bool) -> None:
        """Pass an EOF on: shut the write side of the other transport once it is flushed."""
        transport = self.client if reply else self.upstream
        if transport is None or self._closed or self._shut[reply]:
            return
        engine = self.engine
        if engine is not None and engine.held(reply) and engine.error is None:
            return  # bytes of this direction are still held: _on_hold passes the EOF on later
        if transport.get_write_buffer_size():
            # Poll until flushed: uvloop offers no drain callback below the low-water mark.
            self._loop.call_later(0.005, self._maybe_shutdown, reply)
            return
        self._shut[reply] = True
        if not (self._upstream_eof if reply else self._client_eof) or not self._shut[not reply]:
            shutdown_write(transport)
        # else: the last direction of the pair; _maybe_done closes both now, and close() sends
        # the same FIN (everything from this peer was read: its EOF arrived), one call fewer.
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._client_eof and self._upstream_eof and self._shut[0] and self._shut[1]:
            self._finish("forwarded", None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lr.host.data_fd_closed()  # counted when the event loop accepted it
        if self._closed:
            self._cancel_linger(0)
            return
        if isinstance(exc, ConnectionResetError):
            # Passed on as a reset (DESIGN: never a clean EOF), and the upstream connect, if
            # still pending, is cancelled by _finish.
            self._finish("error", "client reset the connection", reset_peer=self.upstream)
            return
        self._finish("error" if exc else "forwarded", f"client closed: {exc}" if exc else "client closed")

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._closed:
            self._cancel_linger(1)
            return
        if isinstance(exc, ConnectionResetError):
            self._finish("error", "upstream reset the connection", reset_peer=self.client)
            return
        self._finish("error" if exc else "forwarded", f"upstream closed: {exc}" if exc else "upstream closed")

    def _cancel_linger(self, side: int) -> None:
        # The transport is gone: drop its linger timer, which would otherwise keep this whole
        # connection (engine, parser, buffers) alive for CLOSE_LINGER seconds after its end.
        lingers = self._lingers
        handle = lingers[side] if lingers is not None else None
        if handle is not None:
            handle.cancel()
            lingers[side] = None  # type: ignore[index]

    def _engine_error(self, err: EngineError) -> None:
        lr = self.lr
        l7proto = lr.config.l7proto or ""
        lr.host.metrics.parser_errors_total.labels(l7proto).inc()
        if self.info is not None:
            fields: dict[str, Any] = {"error_kind": err.kind, "error": str(err)}
            if err.code:
                fields["error_code"] = err.code
            lr.access_log.l7_line(self.info, "request", "error", fields, None)
        # Defer the close: we may be inside the engine's own call stack.
        self._loop.call_soon(self._finish, "error", f"{err.kind}: {err}")

    def close_now(self, reason: str) -> None:
        """Abort both sides (drain timeout, listener removed)."""
        self._finish("error", reason, abort=True)

    def _finish(
        self,
        verdict: str,
        reason: str | None,
        *,
        abort: bool = False,
        reset_peer: asyncio.Transport | None = None,
    ) -> None:
        if self._closed:
            return
        self._closed = True
        if self._direct and self.engine is not None:
            self.engine.relay(None, None)  # nothing is written to a closed transport
        if self._clocal is not None:
            self.lr.host.upstream_locals.pop(self._clocal, None)
            self._clocal = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._csock is not None:
            sock = self._connect_cleanup()
            if sock is not None:
                sock.close()
                self.lr.host.data_fd_closed()
        if self.upstream_fd_counted and self._coro is None:  # else uvloop's connect is pending
            self.upstream_fd_counted = False
            self.lr.host.data_fd_closed()
        loop = self._loop
        for side, t in enumerate((self.client, self.upstream)):
            if t is not None:
                if t is reset_peer:
                    reset(t)
                elif abort:
                    t.abort()
                else:
                    # close() flushes what is buffered first; a peer that never reads would
                    # keep the socket (and its buffer) forever, so it gets a bounded linger.
                    # Nothing buffered: close() is immediate, no timer needed.
                    buffered = t.get_write_buffer_size()
                    t.close()
                    if buffered:
                        if self._lingers is None:
                            self._lingers = [None, None]
                        self._lingers[side] = loop.call_later(CLOSE_LINGER, t.abort)
        lr = self.lr
        if self._counted:
            lr.metrics.active.dec()
        lr.host.add_closed_bytes(lr.config.name, self.bytes_in, self.bytes_out)
        lr.forget(self)
        if self.info is None:
            return
        kv = connection_fields(self.upstream_addr, self._started, self.bytes_in, self.bytes_out, verdict,
                               reason, self._tls_fields, (self._unparsed[0], self._unparsed[1]))  # fmt: skip
        lr.access_log.connection(self.info, **kv)

    # --- flow control ----------------------------------------------------------------------

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream. A
        # parser's replies go through _send again, which bounds what proxyd writes itself to
        # such a client (L4 writes nothing of its own).
        self._client_full = True
        if self._direct and self.engine is not None and not self._l4:
            self.engine.relay(self.upstream, None)
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if self._direct and self.engine is not None and not self._closed:
            self.engine.relay(self.upstream, self.client)
        if self.upstream is not None and not self._closed and not self._upstream_held:
            self.upstream.resume_reading()
        self.resume_client_reading("client-full")

    def pause_client_reading(self, why: str) -> None:
        # Always ask the transport: a pause asked for in connection_made did not take (see
        # the module docstring), and pause_reading() is a no-op when already paused.
        if self.client is not None:
            self.client.pause_reading()
        self._client_pauses.add(why)

    def resume_client_reading(self, why: str) -> None:
        self._client_pauses.discard(why)
        if not self._client_pauses and self.client is not None and not self._closed:
            self.client.resume_reading()

    def _on_hold(self, reply: bool, held: bool) -> None:
        """The engine holds (or releases) one direction: stop (resume) reading it."""
        if reply:
            self._upstream_held = held
            if self.upstream is not None and not self._closed:
                if held:
                    self.upstream.pause_reading()
                elif not self._client_full:
                    self.upstream.resume_reading()
            if not held and self._upstream_eof:
                self._maybe_shutdown(True)
        elif held:
            self.pause_client_reading("held")
        else:
            self.resume_client_reading("held")
            if self._client_eof:
                self._maybe_shutdown(False)


def connection_fields(upstream: tuple[str, int] | None, started: float, bytes_in: int, bytes_out: int,
                      verdict: str, reason: str | None, tls_fields: dict[str, Any] | None,
                      unparsed: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    """The ``connection`` log line's fields at the end (relay.py and the native relay alike)."""
    kv: dict[str, Any] = {
        "upstream": _fmt(upstream) if upstream else None,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "verdict": verdict,
    }
    if tls_fields is not None:
        kv.update(tls_fields)
    if reason and not (verdict == "forwarded" and reason in ("client closed", "upstream closed")):
        kv["reason"] = reason
    elif reason:
        kv["closed_by"] = reason.split(" ")[0]
    if unparsed[0] or unparsed[1]:
        kv["unforwarded_bytes"] = {"client": unparsed[0], "server": unparsed[1]}
        kv.setdefault("reason", "incomplete frame discarded at end of stream")
    return kv


@functools.lru_cache(maxsize=1024)
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
