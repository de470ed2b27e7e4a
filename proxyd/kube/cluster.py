"""The daemon's Kubernetes source: reflectors wired to the cluster state and to the daemon.

This is the whole integration surface: the daemon makes one :class:`KubeSource`, asks it for
an address's identity at accept (:meth:`KubeSource.identity`, one dict probe), starts it, and
waits on ``synced`` before binding its listeners. Each applied event reports the addresses it
changed through ``on_change`` (the daemon drops them from its label cache), and the freshness
through the two ``proxyd_kubernetes_*`` gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxyd.config import KubernetesConfig
from proxyd.kube.objects import (
    endpointslice_record,
    namespace_labels,
    node_record,
    pod_record,
    service_labels,
)
from proxyd.kube.policies import CCNP, CNP, ApiPolicies
from proxyd.kube.state import ClusterState, Identity, canonical_ip
from proxyd.kube.watch import ClusterSource, Log, make_client, node_name


class KubeSource:
    def __init__(
        self,
        kc: KubernetesConfig,
        *,
        on_change: Callable[[set[str]], None],
        on_state: Callable[[bool, float], None],
        log_warning: Log,
        on_policies: Callable[[], None] = lambda: None,
        client: Any = None,
    ) -> None:
        self.config = kc
        self.node_name = node_name(kc)
        if self.node_name is None:
            log_warning("kubernetes: no node_name and no $NODE_NAME: no address is the entity host")
        self.state = ClusterState(kc.cluster_name, self.node_name)
        self.on_change = on_change
        self.source = ClusterSource(client if client is not None else make_client(kc), log_warning)
        self.source.on_state = lambda: on_state(self.source.all_watching, self.source.last_event)
        self.policies = ApiPolicies()
        self.on_policies = on_policies
        if kc.identities:
            self._wire_identities()
        if kc.policies:
            self._wire_policies()

    def _wire_policies(self) -> None:
        from lightkube import ALL_NS
        from lightkube.generic_resource import create_global_resource, create_namespaced_resource

        cnp = create_namespaced_resource("cilium.io", "v2", CNP, "ciliumnetworkpolicies")
        ccnp = create_global_resource("cilium.io", "v2", CCNP, "ciliumclusterwidenetworkpolicies")
        pol = self.policies

        def wire(kind: str) -> tuple[Callable[[list[Any]], None], Callable[[str, Any], None]]:
            def replace(objs: list[Any]) -> None:
                pol.replace(kind, [_plain(o) for o in objs])
                self.on_policies()

            def apply(event: str, obj: Any) -> None:
                pol.apply(kind, event, _plain(obj))
                self.on_policies()

            return replace, apply

        self.source.add(cnp, *wire(CNP), namespace=ALL_NS, name=CNP, optional=True)
        self.source.add(ccnp, *wire(CCNP), name=CCNP, optional=True)

    def _wire_identities(self) -> None:
        from lightkube import ALL_NS
        from lightkube.resources.core_v1 import Namespace, Node, Pod, Service
        from lightkube.resources.discovery_v1 import EndpointSlice

        s, src, changed = self.state, self.source, self.on_change
        src.add(
            Namespace,
            lambda objs: changed(s.replace_namespaces(dict(namespace_labels(o) for o in objs))),
            lambda ev, o: changed(s.apply_namespace(ev, *namespace_labels(o))),
        )
        src.add(
            Pod,
            lambda objs: changed(s.replace_pods(pod_record(o) for o in objs)),
            lambda ev, o: changed(s.apply_pod(ev, pod_record(o))),
            namespace=ALL_NS,
        )
        src.add(
            Node,
            lambda objs: changed(s.replace_nodes(node_record(o) for o in objs)),
            lambda ev, o: changed(s.apply_node(ev, node_record(o))),
        )
        src.add(
            Service,
            lambda objs: changed(s.replace_services({k[:2]: k[2] for k in map(service_labels, objs)})),
            lambda ev, o: changed(s.apply_service(ev, *service_labels(o))),
            namespace=ALL_NS,
        )
        src.add(
            EndpointSlice,
            lambda objs: changed(s.replace_endpointslices(endpointslice_record(o) for o in objs)),
            lambda ev, o: changed(s.apply_endpointslice(ev, endpointslice_record(o))),
            namespace=ALL_NS,
        )

    def identity(self, ip: str) -> Identity | None:
        """The cluster's identity for an address as a socket reports it, or None.

        Sockets report IPv4 in the canonical dotted form, so the common case is one dict probe;
        an IPv6 text (IPv4-mapped, a zone, another spelling) is canonicalised on a miss.
        """
        found = self.state.identity(ip)
        if found is not None or ":" not in ip:
            return found
        c = canonical_ip(ip)
        return None if c is None or c == ip else self.state.identity(c)

    def start(self) -> None:
        self.source.start()

    async def stop(self) -> None:
        await self.source.stop()


def _plain(obj: Any) -> dict[str, Any]:
    """A generic resource as plain JSON data (what the policy loader reads)."""
    to_dict = getattr(obj, "to_dict", None)
    return dict(to_dict() if to_dict is not None else obj)


class LayeredIdentities:
    """The identities the daemon enforces: the cluster's addresses first, then static prefixes.

    For ``proxyd explain`` and ``GET /v1/identities``, which also say where labels came from.
    """

    def __init__(self, kube: KubeSource | None, static: Any) -> None:
        self.kube = kube
        self.static = static

    def labels_for(self, ip: str) -> Mapping[str, str]:
        found = self.kube.identity(ip) if self.kube is not None else None
        if found is not None:
            return found.labels
        return self.static.labels_for(ip)  # type: ignore[no-any-return]

    def origin_for(self, ip: str) -> str:
        found = self.kube.identity(ip) if self.kube is not None else None
        if found is not None:
            return found.origin
        try:
            net = self.static.prefix_for(ip)
        except ValueError:
            return ""
        return f"identities entry {net}" if net is not None else ""

    def entries(self) -> list[dict[str, Any]]:
        """Every address the cluster knows, then every static entry, with labels and origin."""
        out: list[dict[str, Any]] = []
        if self.kube is not None:
            for ip, ident in sorted(self.kube.state.identities().items()):
                out.append({"cidr": f"{ip}/{128 if ':' in ip else 32}", "labels": dict(ident.labels),
                            "origin": ident.origin})  # fmt: skip
        for net, labels in self.static.entries:
            out.append({"cidr": str(net), "labels": dict(labels), "origin": f"identities entry {net}"})
        return out
