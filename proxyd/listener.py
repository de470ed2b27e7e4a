"""Listeners (the data side): a bound listening socket, how it accepts, and admission.

How a listener accepts follows the descriptor budget (fdbudget.py): in bursts, one at a time,
or not at all. :meth:`ListenerRuntime.accept` gathers an accepted connection's facts and asks
:mod:`proxyd.admission` whether to relay it and where to: before any upstream connect it
refuses connections that were not redirected, loops, connections over ``max_connections`` and
what the policy denies at L3/L4; where a ``serverNames`` rule could apply, the verdict waits for
the client's TLS ClientHello (:mod:`proxyd.tlsgate`). Everything of the control side it needs
comes through ``host`` (:class:`proxyd.dataside.DataHost`).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import ipaddress
import os
import socket
from typing import Any

from proxyd.accesslog import AccessLog
from proxyd.admission import ADMIT, AUDIT, READ_HELLO, Refuse, admit, by_policy
from proxyd.context import AllowAllPolicy, ConnInfo, L7Policy
from proxyd.dataside import DataHost, LimitsView, ListenerSettings, ListenerSinks
from proxyd.fdbudget import FDS_PER_CONNECTION, LISTEN_BACKLOG
from proxyd.nativerelay import NativeConnection, NativeServer, hub_for
from proxyd.nativerelay import enabled as native_relay_enabled
from proxyd.origdst import original_dst, unmap
from proxyd.parser import Endpoint, ParserFactory
from proxyd.relay import Connection

CAREFUL_BATCH = 32  # connections accepted one at a time per wake-up of the listening socket
FAST, CAREFUL, PAUSED = "fast", "careful", "paused"  # how a listener accepts (fdbudget.py)


class ListenerRuntime:
    """A bound listener and the connections it accepted.

    ``host`` is the control side (proxyd.dataside.DataHost): the policy in force, limits, the
    log and metric sinks, the descriptor budget. The control side replaces ``config``,
    ``factory``, ``limits`` and ``upstream_mark`` on a reload; new connections use them.
    """

    def __init__(self, host: DataHost[ListenerRuntime], config: ListenerSettings) -> None:
        self.host = host
        self.config = config
        self.factory: ParserFactory | None = host.registry.get(config.l7proto) if config.l7proto else None
        self.metrics: ListenerSinks = host.metrics.for_listener(config.name)
        self.metrics_accept_pauses = host.metrics.accept_pauses_total.labels(config.name)
        self.access_log: AccessLog = host.access_log
        self.limits: LimitsView = host.limits
        self.upstream_mark = host.upstream_mark
        self.server: asyncio.Server | NativeServer | None = None
        #: The listen queue: where connections wait while accepting is paused (fdbudget.py).
        self.backlog = LISTEN_BACKLOG
        #: Our own reference to the listening socket: the event loop's server gets a duplicate,
        #: so accepting can pause (that server closed) while the kernel keeps queueing
        #: connections on this one, and resume with a new server on it.
        self.lsock: socket.socket | None = None
        #: How connections are accepted now (fdbudget.py): FAST (the event loop's server, in
        #: bursts), CAREFUL (one at a time, each checked against the budget) or PAUSED.
        self.accepting = FAST
        self._reading = False  # CAREFUL: a reader on lsock
        self._closing = False
        #: (host, port, is wildcard) once bound: checked for every transparent connection.
        self.bound: tuple[str, int, bool] | None = None
        self.conns: set[Connection | NativeConnection] = set()
        #: Accepting and relaying on the native path (nativerelay.py), fixed at bind.
        self.native = False
        #: The native path's event loop and its epoll set of connections, looked up once.
        self._native_loop: tuple[asyncio.AbstractEventLoop, Any] | None = None

    @property
    def mode(self) -> str:
        return self.config.policy_mode or self.host.policy_mode

    async def bind(self) -> None:
        # The socket is made here rather than by create_server, which sets IPV6_V6ONLY: a
        # "[::]" listener must also accept the IPv4 connections iptables redirects to it.
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.host.reuse_port:  # worker processes share the address (proxyd.workers)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                what = f"listener {self.config.name!r}: cannot bind {self.config.address}: {why}"
                raise OSError(exc.errno, what) from exc
            sock.setblocking(False)
            sock.listen(self.backlog)
            self.native = native_relay_enabled()
            self.server = await self._serve_on(sock)
            bhost, bport = sock.getsockname()[:2]
            self.bound = (unmap(bhost), bport, ipaddress.ip_address(bhost).is_unspecified)
            self.lsock = sock
        except BaseException:
            sock.close()
            raise

    async def _serve_on(self, sock: socket.socket) -> asyncio.Server | NativeServer:
        if self.native:
            # Looked up once: asyncio.get_running_loop() is a getpid() system call (3.11).
            loop = asyncio.get_running_loop()
            self._native_loop = (loop, hub_for(loop))
            return NativeServer(self, sock)  # its own accept loop on this very socket
        dup = sock.dup()
        try:
            return await asyncio.get_running_loop().create_server(
                self._new_connection, sock=dup, backlog=self.backlog
            )
        except BaseException:
            dup.close()
            raise

    def bound_address(self) -> tuple[str, int]:
        assert self.lsock is not None
        host, port = self.lsock.getsockname()[:2]
        return host, port

    def _new_connection(self) -> Connection:
        # The event loop calls this for every socket its server accepted, before
        # connection_made, as it accepts a burst: the one place that counts each descriptor as
        # it is taken. The mode changes soon, not here: closing the server in here would close
        # this very socket.
        d = self.host
        fds = d.fds
        fds.data += FDS_PER_CONNECTION  # its socket, and the upstream socket it will open
        if fds.data >= fds.data_fast_high:
            d.fds_check_soon()
        conn = Connection(self)
        conn.upstream_fd_counted = True
        return conn

    @property
    def paused(self) -> bool:
        return self.accepting == PAUSED

    def set_accepting(self, mode: str) -> None:
        """Accept in bursts (FAST), one at a time (CAREFUL), or not at all (PAUSED: the kernel
        queues new connections, up to ``backlog``)."""
        if self._closing or self.lsock is None or mode == self.accepting:
            return
        old, self.accepting = self.accepting, mode
        if mode == PAUSED:
            self.metrics_accept_pauses.inc()
        if old == FAST and self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        if mode == CAREFUL and not self._reading:
            loop.add_reader(self.lsock.fileno(), self._accept_carefully)
            self._reading = True
        elif mode != CAREFUL and self._reading:
            loop.remove_reader(self.lsock.fileno())
            self._reading = False
        if mode == FAST:
            self.host.spawn(self._serve_fast())

    async def _serve_fast(self) -> None:
        assert self.lsock is not None
        try:
            server = await self._serve_on(self.lsock)
        except OSError:  # no descriptor even for the duplicate: one at a time for now
            self.accepting = PAUSED
            self.set_accepting(CAREFUL)
            return
        if self.accepting != FAST or self._closing:  # changed meanwhile
            server.close()
            return
        self.server = server

    def _accept_carefully(self) -> None:
        """CAREFUL: accept while the budget has room for the connection and its upstream."""
        d = self.host
        fds = d.fds
        lsock = self.lsock
        assert lsock is not None
        for _ in range(CAREFUL_BATCH):
            if not fds.room():
                d.fds_check()
                return
            try:
                sock, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    d.out_of_fds(exc)
                return  # ECONNABORTED and the like: the reader fires again for the rest
            fds.data += FDS_PER_CONNECTION  # as in _new_connection
            fds.seen(sock.fileno())
            sock.setblocking(False)
            d.spawn(self._adopt(sock))

    def _adopted(self) -> Connection:
        conn = Connection(self)
        conn.upstream_fd_counted = True
        return conn

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._adopted, sock)
        except OSError:
            sock.close()
            self.host.data_fd_closed()
            self.host.data_fd_closed()

    def accept(self, conn: Connection) -> None:
        d = self.host
        self.metrics.connections.inc()
        self.conns.add(conn)
        transport = conn.client
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= d.fds.in_use():
            d.fds.seen(sock.fileno())  # the count missed descriptors: it is raised to match
            d.fds_check_soon()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if peer is None or local is None:
            # The client reset the connection before it was handed to us (the event loop could
            # not read its addresses): nothing to relay or log; connection_lost cleans up.
            transport.abort()
            return
        self._admit(conn, sock, unmap(peer[0]), int(peer[1]), unmap(local[0]), int(local[1]))

    def accept_fd(self, fd: int, src_ip: str, src_port: int, local_ip: str, local_port: int) -> bool:
        """The native accept loop's call for each socket it accepted (addresses unmapped).

        Counts the descriptors as ``_new_connection`` does and admits as :meth:`accept`;
        returns whether the loop may accept more now.
        """
        d = self.host
        fds = d.fds
        fds.data += FDS_PER_CONNECTION  # its socket, and the upstream socket it will open
        if fd >= fds.in_use():
            fds.seen(fd)  # the count missed descriptors: it is raised to match
            d.fds_check_soon()
        more = fds.data < fds.data_fast_high
        if not more:
            d.fds_check_soon()
        self.metrics.connections.inc()
        assert self._native_loop is not None
        conn = NativeConnection(self, fd, *self._native_loop)
        self.conns.add(conn)
        sock: Any = None
        if self.config.upstream is None:  # SO_ORIGINAL_DST needs a socket object (no dup)
            assert self.lsock is not None
            sock = _socket.socket(self.lsock.family, socket.SOCK_STREAM, 0, fd)
        try:
            self._admit(conn, sock, src_ip, src_port, local_ip, local_port)
        finally:
            if sock is not None:
                sock.detach()
        return more and not self._closing

    def _admit(self, conn: Connection | NativeConnection, sock: Any, src_ip: str, src_port: int,
               local_ip: str, local_port: int) -> None:  # fmt: skip
        d = self.host
        conn_id = next(d.conn_ids)
        cfg = self.config
        fixed = cfg.upstream
        odst = None
        if fixed is None:
            odst = original_dst(sock)
            if odst is not None:
                odst = (unmap(odst[0]), odst[1])
        upstream, refused = admit(fixed, (local_ip, local_port), (src_ip, src_port), odst, d.is_own_listener,
                                  d.upstream_locals, d.admitted_connections,
                                  self.limits.max_connections)  # fmt: skip
        dst_ip, dst_port = upstream
        src = Endpoint(src_ip, src_port, d.labels_for(src_ip))
        dst = Endpoint(dst_ip, dst_port, d.labels_for(dst_ip))
        info = ConnInfo(conn_id, cfg.name, cfg.direction, src, dst, cfg.l7proto or "")
        policy: L7Policy = AllowAllPolicy()
        decision: str | Refuse = ADMIT
        if refused is None:
            view = d.policy.view(
                cfg.direction,
                info.local.labels,
                info.remote.ip,
                info.remote.labels,
                dst_port,
                cfg.l7proto,
                self.mode == "audit",
            )
            l4 = view.l4()
            decision = by_policy(l4)
            if decision is AUDIT:
                self.access_log.connection(info, verdict="audit", reason=f"policy: {l4.l4_reason}",
                                           policy=l4.policy_name)  # fmt: skip
            elif decision is READ_HELLO:
                conn.read_hello(info, upstream, view)
                return
            elif type(decision) is Refuse:
                refused = decision
            policy = view
        if refused is not None:
            d.log.warning("connection refused", conn_id=conn_id, listener=cfg.name,
                          src=str(src), dst=str(dst), reason=refused.reason)  # fmt: skip
            conn.refuse(refused.reason, info)
            return
        conn.start(info, upstream, policy)

    def forget(self, conn: Connection | NativeConnection) -> None:
        self.conns.discard(conn)
        self.host.connection_ended()
        if not self.conns:
            self.host.listener_idle(self)

    def close_server(self) -> None:
        self._closing = True
        if self.server is not None:
            self.server.close()
        if self._reading and self.lsock is not None:
            asyncio.get_running_loop().remove_reader(self.lsock.fileno())
            self._reading = False
        if self.lsock is not None:
            self.lsock.close()

    def timeouts(self) -> tuple[float, float]:
        """(idle, request) timeouts in force for new sweeps of this listener (0: off)."""
        c, lim = self.config, self.limits
        idle = lim.idle_timeout if c.idle_timeout is None else c.idle_timeout
        request = lim.request_timeout if c.request_timeout is None else c.request_timeout
        return idle, request
