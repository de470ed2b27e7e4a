"""Identities: which labels an IP address carries (docs/configuration.md, ``identities``).

proxyd has no orchestrator to ask, so the operator gives labels to CIDRs in the config and each
endpoint of a connection takes the labels of the longest matching prefix (none: no labels). This
is called for both ends of every accepted connection, so lookups are a handful of dict probes:
host entries (``/32``, ``/128``: most of a large cluster's pods) sit in dicts keyed by the
address as an integer (one of :data:`EXACT_SHARDS`, chosen by its low bits), found in one probe;
other prefixes sit in one dict per (address family, prefix length), probed from the longest
prefix length present down to the shortest.

Held compactly for node-sized tables (100,000 pods): an entry is its integer key in a dict, not
an ``ipaddress`` object (those are made only for ``explain``), and equal label sets are one
shared read-only mapping (:class:`LabelInterner`), so 100,000 pods sharing 500 label sets hold
500 mappings.

An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket reports for an IPv4
peer) is looked up as the IPv4 address it carries, so one ``identities`` entry serves both.
"""

from __future__ import annotations

import ipaddress

# inet_pton from the C module: the policy package stays free of the socket module's I/O
# machinery (selectors), which the sans-IO readers that import it are checked for.
from _socket import AF_INET, inet_pton
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


class LabelInterner:
    """One shared read-only mapping per distinct label set."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[frozenset[tuple[str, str]], Mapping[str, str]] = {}

    def __call__(self, labels: Mapping[str, str]) -> Mapping[str, str]:
        key = frozenset(labels.items())
        found = self._seen.get(key)
        if found is None:
            found = self._seen[key] = MappingProxyType(dict(labels))
        return found

    def __len__(self) -> int:
        return len(self._seen)

    def dismantle(self) -> None:
        """Forget every set one at a time (a few thousand freed at once hold the interpreter
        lock for milliseconds on a reload's worker thread); the mappings given out stay."""
        while self._seen:
            self._seen.popitem()


def fast_cidr(text: str) -> tuple[int, int, int] | None:
    """``(version, network as int, prefix length)`` of a canonical IPv4 ``a.b.c.d[/n]`` (the
    common case of a large table), or None: let :func:`parse_cidr` decide (IPv6, errors)."""
    addr, slash, plen_text = text.partition("/")
    if ":" in addr or not (plen_text.isdigit() or not slash):
        return None
    try:
        value = int.from_bytes(inet_pton(AF_INET, addr), "big")
    except OSError:
        return None
    plen = int(plen_text) if slash else 32
    if plen > 32 or value & ((1 << (32 - plen)) - 1) or str(plen) != (plen_text or "32"):
        return None
    return 4, value, plen


#: Host entries are spread over this many dicts. One dict of 100,000 entries grows by copying
#: itself into a new table of megabytes, in one call that holds the interpreter lock for 10-20
#: ms where memory is first touched slowly (a VM): building the table for a SIGHUP on a worker
#: thread then stalls the event loop. 256 dicts of a few hundred entries grow in small steps.
EXACT_SHARDS: Final = 256
EXACT_MASK: Final = EXACT_SHARDS - 1


class IdentityMap:
    """Longest-prefix-match table from IP address to identity labels. Immutable once built."""

    __slots__ = ("_exact", "_order", "_tables")

    def __init__(self) -> None:
        #: host entries: (version << 128 | address) -> labels, in EXACT_SHARDS dicts by the
        #: address's low bits (see EXACT_SHARDS)
        self._exact: list[dict[int, Mapping[str, str]]] = [{} for _ in range(EXACT_SHARDS)]
        # (version -> [(prefixlen, mask, {network_int: labels})]) longest prefix first, hosts excluded
        self._tables: dict[int, list[tuple[int, int, dict[int, Mapping[str, str]]]]] = {4: [], 6: []}
        #: (version, network, prefixlen, labels) in the order given, for ``entries``.
        self._order: list[tuple[int, int, int, Mapping[str, str]]] = []

    @classmethod
    def from_entries(
        cls, entries: Sequence[tuple[str, Mapping[str, str]]], interner: LabelInterner | None = None
    ) -> IdentityMap:
        """Build the table from ``(cidr, labels)`` pairs.

        Raises ValueError for a malformed CIDR or the same prefix given twice.
        """
        self = cls()
        intern = interner or LabelInterner()
        by_len: dict[tuple[int, int], dict[int, Mapping[str, str]]] = {}
        kept: list[tuple[int, int, int, Mapping[str, str]]] = []
        # The config gives interned label sets (one object per distinct set): each is
        # interned here once, not once per entry (100,000 entries, a few hundred sets).
        seen: dict[int, tuple[Mapping[str, str], Mapping[str, str]]] = {}
        for i, (cidr, labels) in enumerate(entries):
            fast = fast_cidr(str(cidr))
            if fast is not None:
                version, key, plen = fast
            else:
                try:
                    net = parse_cidr(str(cidr))
                except ValueError as exc:
                    raise ValueError(f"identities[{i}].cidr: {exc}") from None
                if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
                    mapped = net.network_address.ipv4_mapped
                    if mapped is not None:
                        net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
                version, key, plen = net.version, int(net.network_address), net.prefixlen
            known = seen.get(id(labels)) if type(labels) is MappingProxyType else None
            if known is not None and known[0] is labels:
                frozen = known[1]
            else:
                frozen = intern(labels if isinstance(labels, MappingProxyType) else
                                {str(k): str(v) for k, v in labels.items()})  # fmt: skip
                if type(labels) is MappingProxyType:
                    seen[id(labels)] = (labels, frozen)  # holds labels: its id stays its own
            if plen == (32 if version == 4 else 128):
                tkey = version << 128 | key
                table = self._exact[tkey & EXACT_MASK]
            else:
                table, tkey = by_len.setdefault((version, plen), {}), key
            if tkey in table:
                raise ValueError(f"identities[{i}].cidr: {_net(version, key, plen)} is given twice")
            table[tkey] = frozen
            kept.append((version, key, plen, frozen))
        for (version, plen), table in sorted(by_len.items(), key=lambda kv: -kv[0][1]):
            bits = 32 if version == 4 else 128
            mask = ((1 << plen) - 1) << (bits - plen)
            self._tables[version].append((plen, mask, table))
        self._order = kept
        if interner is None:
            intern.dismantle()
        while seen:
            seen.popitem()
        return self

    def dismantle(self) -> None:
        """Empty a table that is no longer in force, entry by entry (a reload calls this on a
        worker thread: freed whole, 100,000 entries hold the interpreter lock for milliseconds)."""
        for table in (*self._exact, *(t for tables in self._tables.values() for _, _, t in tables)):
            while table:
                table.popitem()
        while self._order:
            self._order.pop()

    def labels_for(self, ip: str) -> Mapping[str, str]:
        """The labels of the longest prefix holding ``ip`` (empty when none does).

        Raises ValueError when ``ip`` is not an IP address.
        """
        addr = parse_ip(ip)
        value = int(addr)
        key = addr.version << 128 | value
        labels = self._exact[key & EXACT_MASK].get(key)
        if labels is not None:
            return labels
        for _plen, mask, table in self._tables[addr.version]:
            labels = table.get(value & mask)
            if labels is not None:
                return labels
        return NO_LABELS

    def prefix_for(self, ip: str) -> IPNetwork | None:
        """The longest prefix holding ``ip`` (for ``explain``), or None."""
        addr = parse_ip(ip)
        value = int(addr)
        key = addr.version << 128 | value
        if key in self._exact[key & EXACT_MASK]:
            return _net(addr.version, value, addr.max_prefixlen)
        for plen, mask, table in self._tables[addr.version]:
            if value & mask in table:
                return _net(addr.version, value & mask, plen)
        return None

    @property
    def entries(self) -> tuple[tuple[IPNetwork, Mapping[str, str]], ...]:
        """Every entry as given (made on demand: ``ipaddress`` objects are large)."""
        return tuple((_net(v, key, plen), labels) for v, key, plen, labels in self._order)

    def label_sets(self) -> list[Mapping[str, str]]:
        """Each distinct label set of the table once."""
        return list({id(labels): labels for *_, labels in self._order}.values())

    def __len__(self) -> int:
        return len(self._order)


def _net(version: int, key: int, plen: int) -> IPNetwork:
    if version == 4:
        return ipaddress.IPv4Network((key, plen))
    return ipaddress.IPv6Network((key, plen))
