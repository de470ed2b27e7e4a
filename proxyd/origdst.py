"""Recovering a redirected connection's original destination (``SO_ORIGINAL_DST``).

Facts measured on Linux 6.x with iptables 1.8 (nft backend): an IPv4 peer, also on a
dual-stack ``[::]`` listener where it shows as ``::ffff:a.b.c.d``, needs ``(SOL_IP, 80)``; an IPv6
peer needs ``(IPPROTO_IPV6, 80)``. A connection that was not redirected fails with ENOENT where
no NAT rule is loaded, but returns the listener's own address where NAT is active: callers must
treat both as "not redirected".
"""

from __future__ import annotations

import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


def original_dst(sock: Any) -> tuple[str, int] | None:
    """The (ip, port) the client originally connected to, or None if there is none."""
    try:
        family = sock.family
        if family == socket.AF_INET6:
            peer = sock.getpeername()[0]
            if peer.startswith("::ffff:") and "." in peer:
                raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    except OSError:
        return None


def unmap(ip: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; other addresses unchanged."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip
