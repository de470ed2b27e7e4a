"""Identities: which labels an IP address carries (docs/configuration.md, ``identities``).

proxyd has no orchestrator to ask, so the operator gives labels to CIDRs in the config and each
endpoint of a connection takes the labels of the longest matching prefix (none: no labels). This
is called for both ends of every accepted connection, so lookups are a handful of dict probes:
one dict per (address family, prefix length), keyed by the masked address as an integer, probed
from the longest prefix length present down to the shortest.

An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket reports for an IPv4
peer) is looked up as the IPv4 address it carries, so one ``identities`` entry serves both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})


def parse_ip(ip: str) -> IPAddress:
    """Parse an address as sockets report it; IPv4-mapped IPv6 becomes IPv4, a zone is dropped.

    Raises ValueError for something that is not an address.
    """
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_cidr(text: str) -> IPNetwork:
    """Parse ``10.0.0.0/8``, ``fd00::/64`` or a bare address (a host prefix).

    Raises ValueError naming the problem, e.g. host bits set (``10.0.0.1/8``).
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a CIDR (expected e.g. 10.0.0.0/8 or fd00::/64)") from exc
        raise ValueError(f"{text!r} has host bits set (did you mean {loose}?)") from exc


class IdentityMap:
    """Longest-prefix-match table from IP address to identity labels. Immutable once built."""

    __slots__ = ("_entries", "_tables")

    def __init__(self) -> None:
        # (version -> [(prefixlen, mask, {network_int: labels})]) longest prefix first
        self._tables: dict[int, list[tuple[int, int, dict[int, Mapping[str, str]]]]] = {4: [], 6: []}
        self._entries: tuple[tuple[IPNetwork, Mapping[str, str]], ...] = ()

    @classmethod
    def from_entries(cls, entries: Sequence[tuple[str, Mapping[str, str]]]) -> IdentityMap:
        """Build the table from ``(cidr, labels)`` pairs.

        Raises ValueError for a malformed CIDR or the same prefix given twice.
        """
        self = cls()
        by_len: dict[tuple[int, int], dict[int, Mapping[str, str]]] = {}
        kept: list[tuple[IPNetwork, Mapping[str, str]]] = []
        for i, (cidr, labels) in enumerate(entries):
            try:
                net = parse_cidr(str(cidr))
            except ValueError as exc:
                raise ValueError(f"identities[{i}].cidr: {exc}") from None
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
                mapped = net.network_address.ipv4_mapped
                if mapped is not None:
                    net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
            frozen = MappingProxyType({str(k): str(v) for k, v in labels.items()})
            table = by_len.setdefault((net.version, net.prefixlen), {})
            key = int(net.network_address)
            if key in table:
                raise ValueError(f"identities[{i}].cidr: {net} is given twice")
            table[key] = frozen
            kept.append((net, frozen))
        for (version, plen), table in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            bits = 32 if version == 4 else 128
            mask = ((1 << plen) - 1) << (bits - plen)
            self._tables[version].append((plen, mask, table))
        self._entries = tuple(kept)
        return self

    def labels_for(self, ip: str) -> Mapping[str, str]:
        """The labels of the longest prefix holding ``ip`` (empty when none does).

        Raises ValueError when ``ip`` is not an IP address.
        """
        addr = parse_ip(ip)
        value = int(addr)
        for _plen, mask, table in self._tables[addr.version]:
            labels = table.get(value & mask)
            if labels is not None:
                return labels
        return NO_LABELS

    def prefix_for(self, ip: str) -> IPNetwork | None:
        """The longest prefix holding ``ip`` (for ``explain``), or None."""
        addr = parse_ip(ip)
        best: IPNetwork | None = None
        for net, _ in self._entries:
            if addr in net and (best is None or net.prefixlen > best.prefixlen):
                best = net
        return best

    @property
    def entries(self) -> tuple[tuple[IPNetwork, Mapping[str, str]], ...]:
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)
