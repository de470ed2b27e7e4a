"""The cluster's identities as a worker of ``workers: N`` holds them (docs/kubernetes.md).

Theory of operation. The control process runs the one :class:`~proxyd.kube.cluster.KubeSource`
(one set of watches on the API server, however many workers); every applied event reports the
addresses whose identity changed, and the control process sends each worker a *delta* for
those addresses only (:func:`delta`): address -> (labels, origin), or None for an address the
cluster no longer knows. A pod event is a delta of one or two addresses; a relist or a
namespace relabel, of the addresses it touched. A worker (re)starting gets the whole table the
same way (:func:`snapshot`), before it binds its listeners.

A delta carries each address's identity as it is when the delta is sent, not the event that
changed it: applying one twice, or after a snapshot that already had it, changes nothing, so
the control process never has to know which worker saw what.

Deltas are plain tuples (pickled: half the time and size of the frozen dataclasses). Label
mappings arrive as fresh objects; :class:`ClusterMirror` interns them again, so the 10,000 pods
of a deployment share one mapping in a worker as they do in the control process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from proxyd.kube.state import ClusterState, Identity, canonical_ip

#: Address -> (labels, origin), or None: the address has no cluster identity any more.
Delta = dict[str, tuple[Mapping[str, str], str] | None]


def delta(state: ClusterState, ips: Iterable[str]) -> Delta:
    """What a worker needs to know of ``ips``: their identities now."""
    out: Delta = {}
    for ip in ips:
        found = state.identity(ip)
        out[ip] = (found.labels, found.origin) if found is not None else None
    return out


def snapshot(state: ClusterState) -> Delta:
    """Every identity: what a worker starts with."""
    return {ip: (i.labels, i.origin) for ip, i in state.identities().items()}


class ClusterMirror:
    """A worker's identity table: answers :meth:`identity` as the control's source does."""

    def __init__(self) -> None:
        self._by_ip: dict[str, Identity] = {}
        self._interned: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}

    def identity(self, ip: str) -> Identity | None:
        """As :meth:`proxyd.kube.cluster.KubeSource.identity`: one dict probe for IPv4."""
        found = self._by_ip.get(ip)
        if found is not None or ":" not in ip:
            return found
        c = canonical_ip(ip)
        return None if c is None or c == ip else self._by_ip.get(c)

    def identities(self) -> Mapping[str, Identity]:
        return self._by_ip

    def apply(self, changes: Delta) -> set[str]:
        """Put a delta (or a snapshot) in force; returns the addresses whose identity changed."""
        by_ip, changed = self._by_ip, set()
        seen: dict[int, Mapping[str, str]] = {}  # one lookup per mapping the message shares
        for ip, new in changes.items():
            if new is None:
                if by_ip.pop(ip, None) is not None:
                    changed.add(ip)
                continue
            labels, origin = new
            shared = seen.get(id(labels))
            if shared is None:
                shared = seen[id(labels)] = self._intern(labels)
            ident = Identity(shared, origin)
            if by_ip.get(ip) != ident:
                by_ip[ip] = ident
                changed.add(ip)
        if len(self._interned) > 2 * len(by_ip) + 1024:
            # label sets of pods long gone (every rollout brings a new pod-template-hash)
            self._interned = {tuple(sorted(i.labels.items())): i.labels for i in by_ip.values()}
        return changed

    def _intern(self, labels: Mapping[str, str]) -> Mapping[str, str]:
        key = tuple(sorted(labels.items()))
        found = self._interned.get(key)
        if found is None:
            found = self._interned[key] = (
                labels if isinstance(labels, MappingProxyType) else MappingProxyType(dict(labels))
            )
        return found

    async def stop(self) -> None:
        """Nothing to stop: the control process owns the watches (the daemon calls this at stop)."""
