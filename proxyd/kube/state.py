"""Cluster state in, address identities out: the sans-IO half of the Kubernetes source.

Theory of operation (docs/kubernetes.md). The watch code (:mod:`proxyd.kube.watch`) turns API
objects into the small records below and feeds them here one event at a time; this module
never does I/O and never sees the client library, so every rule of how Cilium derives an
identity is tested by feeding records in any order.

- A pod with an IP (not ``hostNetwork``) is an endpoint: its labels with source ``k8s:``, plus
  ``k8s:io.kubernetes.pod.namespace``, ``k8s:io.cilium.k8s.policy.serviceaccount``,
  ``k8s:io.cilium.k8s.policy.cluster`` and its namespace's labels as
  ``k8s:io.cilium.k8s.namespace.labels.KEY``.
- An IP two pods claim (a pod replaced faster than its delete arrives) belongs to the claimant
  that is not terminating; among those, the one whose IP appeared last. Claims are keyed by pod
  UID, so a late delete of the old pod never takes the IP from the new one.
- A node's addresses are ``reserved:host`` (this node) or ``reserved:remote-node``, carrying
  the node's labels with source ``node:`` (which no endpoint selector matches); the
  ``default/kubernetes`` service's endpoints are ``reserved:kube-apiserver``. A pod address wins over a
  node's (Cilium never gives a pod a node's IP unless it is ``hostNetwork``, skipped here).

Every ``apply_*`` returns the set of addresses whose identity changed, so the daemon drops only
those from its caches: one pod event costs a few dict operations, whatever the cluster size.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from proxyd.policy.identity import parse_ip
from proxyd.policy.selector import NAMED_PORT_SOURCE, NODE_SOURCE, SERVICE_SOURCE, encode_service_labels

NAMESPACE_LABEL: Final = "k8s:io.kubernetes.pod.namespace"
SERVICEACCOUNT_LABEL: Final = "k8s:io.cilium.k8s.policy.serviceaccount"
CLUSTER_LABEL: Final = "k8s:io.cilium.k8s.policy.cluster"
NAMESPACE_LABELS_PREFIX: Final = "k8s:io.cilium.k8s.namespace.labels."
HOST: Final = "reserved:host"
REMOTE_NODE: Final = "reserved:remote-node"
KUBE_APISERVER: Final = "reserved:kube-apiserver"
#: The service whose backends are the API server (its EndpointSlices, as Cilium reads them).
APISERVER_SERVICE: Final = ("default", "kubernetes")


@dataclass(frozen=True, slots=True)
class Pod:
    """What identity derivation needs of a pod (``ips`` as the API lists them)."""

    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    ips: tuple[str, ...] = ()
    host_network: bool = False
    terminating: bool = False
    node: str = ""
    #: Container ports by name, for named ports in policy (``toPorts.ports.port: http``).
    named_ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """The ready addresses one EndpointSlice gives its service (``kubernetes.io/service-name``)."""

    namespace: str
    name: str
    service: str
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Identity:
    """An address's labels and where they came from (``pod ns/name``, ``node NAME``, ...)."""

    labels: Mapping[str, str]
    origin: str


def canonical_ip(ip: str) -> str | None:
    """The address as the daemon looks it up (IPv4-mapped IPv6 as IPv4), or None if not one."""
    try:
        return str(parse_ip(ip))
    except ValueError:
        return None


class ClusterState:
    """The identities the cluster gives addresses; changed only through ``apply_*``/``replace_*``."""

    def __init__(self, cluster_name: str = "default", node_name: str | None = None) -> None:
        self.cluster_name = cluster_name
        self.node_name = node_name
        self.pods: dict[str, Pod] = {}  # uid -> pod
        self.namespaces: dict[str, Mapping[str, str]] = {}  # name -> labels
        self.nodes: dict[str, Node] = {}
        self.apiserver: frozenset[str] = frozenset()
        self._ns_pods: dict[str, set[str]] = {}  # namespace -> uids
        #: ip -> {uid: seq when this pod's claim on the ip appeared}
        self._claims: dict[str, dict[str, int]] = {}
        self._node_ips: dict[str, str] = {}  # ip -> node name
        self.services: dict[tuple[str, str], Mapping[str, str]] = {}  # (ns, name) -> labels
        self.slices: dict[tuple[str, str], EndpointSlice] = {}
        self._backends: dict[str, dict[tuple[str, str], int]] = {}  # ip -> {(ns, service): slices}
        self._service_ips: dict[tuple[str, str], set[str]] = {}  # (ns, service) -> ips
        self._seq = itertools.count(1)
        self._by_ip: dict[str, Identity] = {}
        self._interned: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}

    # --- reading -------------------------------------------------------------------------------

    def identity(self, ip: str) -> Identity | None:
        """The identity of a canonical address (see :func:`canonical_ip`), or None."""
        return self._by_ip.get(ip)

    def identities(self) -> Mapping[str, Identity]:
        return self._by_ip

    def owner(self, ip: str) -> Pod | None:
        """The pod that holds ``ip`` now, or None."""
        claims = self._claims.get(ip)
        if not claims:
            return None
        best: tuple[bool, int] | None = None
        owner: Pod | None = None
        for uid, seq in claims.items():
            pod = self.pods[uid]
            rank = (not pod.terminating, seq)
            if best is None or rank > best:
                best, owner = rank, pod
        return owner

    # --- pods ----------------------------------------------------------------------------------

    def apply_pod(self, event: str, pod: Pod) -> set[str]:
        """A pod ``ADDED``/``MODIFIED``/``DELETED``; returns the addresses whose identity changed."""
        touched = self._remove_pod(pod.uid, keep_ips=() if event == "DELETED" else self._pod_ips(pod))
        if event != "DELETED":
            touched |= self._add_pod(pod)
        return self._recompute(touched)

    def replace_pods(self, pods: Iterable[Pod]) -> set[str]:
        """A full list (first sync, or a relist after ``410 Gone``): pods not in it are gone."""
        new = {p.uid: p for p in pods}
        touched: set[str] = set()
        for uid in [u for u in self.pods if u not in new]:
            touched |= self._remove_pod(uid, keep_ips=())
        for pod in new.values():
            touched |= self._remove_pod(pod.uid, keep_ips=self._pod_ips(pod))
            touched |= self._add_pod(pod)
        return self._recompute(touched)

    def _pod_ips(self, pod: Pod) -> tuple[str, ...]:
        if pod.host_network:
            return ()
        out = []
        for ip in pod.ips:
            c = canonical_ip(ip)
            if c is not None:
                out.append(c)
        return tuple(out)

    def _remove_pod(self, uid: str, keep_ips: tuple[str, ...]) -> set[str]:
        """Drop a pod; its claims on ``keep_ips`` keep their age (an update is not a new claim)."""
        old = self.pods.pop(uid, None)
        if old is None:
            return set()
        self._ns_pods.get(old.namespace, set()).discard(uid)
        touched = set()
        for ip in self._pod_ips(old):
            touched.add(ip)
            if ip in keep_ips:
                continue
            claims = self._claims.get(ip)
            if claims is not None:
                claims.pop(uid, None)
                if not claims:
                    del self._claims[ip]
        return touched

    def _add_pod(self, pod: Pod) -> set[str]:
        self.pods[pod.uid] = pod
        self._ns_pods.setdefault(pod.namespace, set()).add(pod.uid)
        ips = self._pod_ips(pod)
        for ip in ips:
            claims = self._claims.setdefault(ip, {})
            if pod.uid not in claims:
                claims[pod.uid] = next(self._seq)
        return set(ips)

    # --- namespaces ----------------------------------------------------------------------------

    def apply_namespace(self, event: str, name: str, labels: Mapping[str, str]) -> set[str]:
        if event == "DELETED":
            if self.namespaces.pop(name, None) is None:
                return set()
        else:
            if self.namespaces.get(name) == labels:
                return set()
            self.namespaces[name] = dict(labels)
        return self._recompute(self._namespace_ips(name))

    def replace_namespaces(self, namespaces: Mapping[str, Mapping[str, str]]) -> set[str]:
        touched: set[str] = set()
        for name in set(self.namespaces) | set(namespaces):
            if self.namespaces.get(name) != namespaces.get(name):
                touched |= self._namespace_ips(name)
        self.namespaces = {k: dict(v) for k, v in namespaces.items()}
        return self._recompute(touched)

    def _namespace_ips(self, name: str) -> set[str]:
        out: set[str] = set()
        for uid in self._ns_pods.get(name, ()):
            out.update(self._pod_ips(self.pods[uid]))
        return out

    # --- nodes and the API server --------------------------------------------------------------

    def apply_node(self, event: str, node: Node) -> set[str]:
        old = self.nodes.pop(node.name, None)
        touched: set[str] = set()
        if old is not None:
            touched |= self._drop_node_ips(old)
        if event != "DELETED":
            self.nodes[node.name] = node
            touched |= self._add_node_ips(node)
        return self._recompute(touched)

    def replace_nodes(self, nodes: Iterable[Node]) -> set[str]:
        touched: set[str] = set()
        for old in self.nodes.values():
            touched |= self._drop_node_ips(old)
        self.nodes = {n.name: n for n in nodes}
        for node in self.nodes.values():
            touched |= self._add_node_ips(node)
        return self._recompute(touched)

    def _drop_node_ips(self, node: Node) -> set[str]:
        out = set()
        for ip in node.addresses:
            c = canonical_ip(ip)
            if c is not None and self._node_ips.get(c) == node.name:
                del self._node_ips[c]
                out.add(c)
        return out

    def _add_node_ips(self, node: Node) -> set[str]:
        out = set()
        for ip in node.addresses:
            c = canonical_ip(ip)
            if c is not None:
                self._node_ips[c] = node.name
                out.add(c)
        return out

    def set_apiserver(self, ips: Iterable[str]) -> set[str]:
        """The ``default/kubernetes`` endpoints' addresses (all of them: a replace)."""
        new = frozenset(c for c in (canonical_ip(ip) for ip in ips) if c is not None)
        touched = set(self.apiserver ^ new)
        self.apiserver = new
        return self._recompute(touched)

    # --- services ------------------------------------------------------------------------------

    def apply_service(self, event: str, namespace: str, name: str, labels: Mapping[str, str]) -> set[str]:
        key = (namespace, name)
        if event == "DELETED":
            self.services.pop(key, None)
        elif self.services.get(key) == labels:
            return set()
        else:
            self.services[key] = dict(labels)
        return self._recompute(set(self._service_ips.get(key, ())))

    def replace_services(self, services: Mapping[tuple[str, str], Mapping[str, str]]) -> set[str]:
        touched: set[str] = set()
        for key in set(self.services) | set(services):
            if self.services.get(key) != services.get(key):
                touched |= self._service_ips.get(key, set())
        self.services = {k: dict(v) for k, v in services.items()}
        return self._recompute(touched)

    def apply_endpointslice(self, event: str, es: EndpointSlice) -> set[str]:
        touched = self._drop_slice((es.namespace, es.name))
        if event != "DELETED":
            touched |= self._add_slice(es)
        return self._recompute(touched)

    def replace_endpointslices(self, slices: Iterable[EndpointSlice]) -> set[str]:
        touched: set[str] = set()
        for key in list(self.slices):
            touched |= self._drop_slice(key)
        for es in slices:
            touched |= self._add_slice(es)
        return self._recompute(touched)

    def _drop_slice(self, key: tuple[str, str]) -> set[str]:
        old = self.slices.pop(key, None)
        if old is None:
            return set()
        svc = (old.namespace, old.service)
        out = set()
        for ip in old.addresses:
            c = canonical_ip(ip)
            backs = self._backends.get(c, {}) if c is not None else {}
            if c is None or svc not in backs:
                continue
            out.add(c)
            backs[svc] -= 1
            if not backs[svc]:
                del backs[svc]
                self._service_ips.get(svc, set()).discard(c)
            if not backs:
                del self._backends[c]
        return out

    def _add_slice(self, es: EndpointSlice) -> set[str]:
        self.slices[(es.namespace, es.name)] = es
        svc = (es.namespace, es.service)
        out = set()
        for ip in es.addresses:
            c = canonical_ip(ip)
            if c is None:
                continue
            backs = self._backends.setdefault(c, {})
            backs[svc] = backs.get(svc, 0) + 1
            self._service_ips.setdefault(svc, set()).add(c)
            out.add(c)
        return out

    # --- deriving ------------------------------------------------------------------------------

    def pod_labels(self, pod: Pod) -> dict[str, str]:
        labels = {f"k8s:{k}": str(v) for k, v in pod.labels.items()}
        for k, v in self.namespaces.get(pod.namespace, {}).items():
            labels[NAMESPACE_LABELS_PREFIX + k] = str(v)
        for name, (number, protocol) in pod.named_ports.items():
            if protocol.upper() == "TCP":  # proxyd relays TCP only
                labels[f"{NAMED_PORT_SOURCE}:{name}"] = str(number)
        labels[NAMESPACE_LABEL] = pod.namespace
        labels[SERVICEACCOUNT_LABEL] = pod.service_account
        labels[CLUSTER_LABEL] = self.cluster_name
        return labels

    def _derive(self, ip: str) -> Identity | None:
        services = {
            f"{SERVICE_SOURCE}:{ns}/{name}": encode_service_labels(self.services.get((ns, name), {}))
            for ns, name in self._backends.get(ip, ())
        }
        pod = self.owner(ip)
        if pod is not None:
            labels = {**self.pod_labels(pod), **services}
            return Identity(self._intern(labels), f"pod {pod.namespace}/{pod.name}")
        labels = dict(services)
        origins = []
        node_name = self._node_ips.get(ip)
        if node_name is not None:
            node = self.nodes[node_name]
            labels.update({f"{NODE_SOURCE}:{k}": str(v) for k, v in node.labels.items()})
            labels[HOST if node_name == self.node_name else REMOTE_NODE] = ""
            origins.append(f"node {node_name}")
        if ip in self.apiserver or APISERVER_SERVICE in self._backends.get(ip, ()):
            labels[KUBE_APISERVER] = ""
            origins.append("service default/kubernetes")
        if services and not origins and KUBE_APISERVER not in labels:
            origins.append("endpointslices of " + ", ".join(sorted(k.partition(":")[2] for k in services)))
        if not origins:
            return None
        return Identity(self._intern(labels), ", ".join(origins))

    def _intern(self, labels: dict[str, str]) -> Mapping[str, str]:
        """One shared mapping per distinct label set: 10,000 pods of a deployment cost one."""
        key = tuple(sorted(labels.items()))
        if len(self._interned) > 2 * len(self._by_ip) + 1024:
            # label sets of pods long gone (every rollout brings a new pod-template-hash)
            self._interned = {tuple(sorted(i.labels.items())): i.labels for i in self._by_ip.values()}
        found = self._interned.get(key)
        if found is None:
            found = self._interned[key] = MappingProxyType({sys.intern(k): v for k, v in key})
        return found

    def _recompute(self, ips: set[str]) -> set[str]:
        changed = set()
        for ip in ips:
            new = self._derive(ip)
            old = self._by_ip.get(ip)
            if new == old:
                continue
            changed.add(ip)
            if new is None:
                del self._by_ip[ip]
            else:
                self._by_ip[ip] = new
        return changed
