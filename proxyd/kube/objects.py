"""API objects (lightkube's models) to the plain records :mod:`proxyd.kube.state` derives from.

Kept apart from the state so the state never sees the client library, and apart from the
watch code so these rules (which IPs a pod holds, when it counts as terminating) are pure.
"""

from __future__ import annotations

from typing import Any

from proxyd.kube.state import EndpointSlice, Node, Pod

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

#: Phases whose pod has given its IP back (Cilium drops such pods' endpoints too).
DONE_PHASES = ("Succeeded", "Failed")
#: Node address types that carry traffic (not Hostname / InternalDNS / ExternalDNS).
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def pod_record(obj: Any) -> Pod:
    md, spec, status = obj.metadata, obj.spec, obj.status
    ips: tuple[str, ...] = ()
    if status is not None and status.phase not in DONE_PHASES:
        ips = tuple(p.ip for p in (status.podIPs or ()) if p.ip)
        if not ips and status.podIP:
            ips = (status.podIP,)
    named: dict[str, tuple[int, str]] = {}
    if spec is not None:
        for c in spec.containers or ():
            for port in c.ports or ():
                if port.name:
                    named[port.name] = (int(port.containerPort), port.protocol or "TCP")
    return Pod(
        uid=md.uid or f"{md.namespace}/{md.name}",
        namespace=md.namespace or "default",
        name=md.name or "",
        labels=dict(md.labels or {}),
        service_account=(spec.serviceAccountName if spec is not None else None) or "default",
        ips=ips,
        host_network=bool(spec is not None and spec.hostNetwork),
        terminating=md.deletionTimestamp is not None,
        node=(spec.nodeName if spec is not None else None) or "",
        named_ports=named,
    )


def node_record(obj: Any) -> Node:
    md, status = obj.metadata, obj.status
    addresses = tuple(
        a.address for a in ((status.addresses if status is not None else None) or ())
        if a.type in NODE_ADDRESS_TYPES
    )  # fmt: skip
    return Node(name=md.name or "", labels=dict(md.labels or {}), addresses=addresses)


def namespace_labels(obj: Any) -> tuple[str, dict[str, str]]:
    return obj.metadata.name or "", dict(obj.metadata.labels or {})


def service_labels(obj: Any) -> tuple[str, str, dict[str, str]]:
    md = obj.metadata
    return md.namespace or "default", md.name or "", dict(md.labels or {})


def endpointslice_record(obj: Any) -> EndpointSlice:
    """A slice's ready addresses (``conditions.ready`` unset counts as ready, as in Kubernetes)."""
    md = obj.metadata
    addresses: list[str] = []
    for ep in obj.endpoints or ():
        ready = ep.conditions.ready if ep.conditions is not None else None
        if ready is False:
            continue
        addresses.extend(ep.addresses or ())
    service = (md.labels or {}).get(SERVICE_NAME_LABEL, "")
    return EndpointSlice(md.namespace or "default", md.name or "", service, tuple(addresses))
