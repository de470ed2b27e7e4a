"""CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects from the API, each validated alone.

Theory of operation (docs/kubernetes.md). The watch code records each object's latest form
(:meth:`ApiPolicies.apply`, cheap, on the event loop); :meth:`ApiPolicies.take` hands the
objects changed since the last batch to a worker thread, which parses each one alone with the
same loader as files (:func:`validate`); :meth:`ApiPolicies.commit` then keeps, per object,
its new document, or (when the new form is invalid) its last good document and the errors.
So one bad object never blocks the others, and a bad edit never removes what was enforced.

Documents are named as Cilium names them, ``namespace/name`` (clusterwide: ``name``); they are
kept apart from files and admin imports, so the same name may exist in both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from proxyd.errors import PolicyError
from proxyd.policy.loader import ParserLookup, parse_text
from proxyd.policy.model import Document

CNP: Final = "CiliumNetworkPolicy"
CCNP: Final = "CiliumClusterwideNetworkPolicy"
SOURCE: Final = "kubernetes"

#: A batch result per key: the new document, or None (deleted), or the problems (refused).
Result = Document | None | list[str]


def key_of(kind: str, obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata") or {}
    name = str(md.get("name", ""))
    return name if kind == CCNP else f"{md.get('namespace', '')}/{name}"


def validate(
    batch: Mapping[str, tuple[str, Mapping[str, Any] | None]], registry: ParserLookup
) -> dict[str, Result]:
    """Parse each object of a batch alone (on a worker thread: policy text is not parsed on the loop)."""
    out: dict[str, Result] = {}
    for key, (kind, obj) in batch.items():
        if obj is None:
            out[key] = None
            continue
        body = {k: v for k, v in obj.items() if k != "status"}
        body.setdefault("kind", kind)
        body.setdefault("apiVersion", "cilium.io/v2")
        text = json.dumps(body, indent=1, default=str)
        try:
            docs = parse_text(text, f"{SOURCE}:{kind}/{key}", registry, kubernetes=True)
        except PolicyError as exc:
            out[key] = list(exc.problems)
            continue
        if len(docs) != 1:
            out[key] = [f"{SOURCE}:{kind}/{key}: expected one document, got {len(docs)}"]
            continue
        out[key] = docs[0]
    return out


class ApiPolicies:
    def __init__(self) -> None:
        self.good: dict[str, Document] = {}  # key -> the document in force
        self.errors: dict[str, list[str]] = {}  # key -> why its latest form was refused
        self._pending: dict[str, tuple[str, Mapping[str, Any] | None]] = {}
        self._known: dict[str, str] = {}  # key -> kind, every object the API has now

    def apply(self, kind: str, event: str, obj: Mapping[str, Any]) -> None:
        key = key_of(kind, obj)
        if event == "DELETED":
            self._known.pop(key, None)
            self._pending[key] = (kind, None)
        else:
            self._known[key] = kind
            self._pending[key] = (kind, obj)

    def replace(self, kind: str, objs: Iterable[Mapping[str, Any]]) -> None:
        """A full list of one kind: its objects not in the list are deleted."""
        new = {key_of(kind, o): o for o in objs}
        for key in [k for k, kd in self._known.items() if kd == kind and k not in new]:
            self.apply(kind, "DELETED", {"metadata": _meta(key)})
        for key, obj in new.items():
            self._known[key] = kind
            self._pending[key] = (kind, obj)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def take(self) -> dict[str, tuple[str, Mapping[str, Any] | None]]:
        batch, self._pending = self._pending, {}
        return batch

    def preview(self, results: Mapping[str, Result]) -> dict[str, Document]:
        """The documents in force once ``results`` are committed."""
        good = dict(self.good)
        for key, res in results.items():
            if res is None:
                good.pop(key, None)
            elif isinstance(res, Document):
                good[key] = res
        return good

    def commit(self, results: Mapping[str, Result]) -> list[tuple[str, list[str]]]:
        """Put a validated batch in force; returns the refused objects and their problems."""
        refused = []
        self.good = self.preview(results)
        for key, res in results.items():
            if isinstance(res, list):
                self.errors[key] = res
                refused.append((key, res))
            else:
                self.errors.pop(key, None)
        return refused


def _meta(key: str) -> dict[str, str]:
    ns, sep, name = key.partition("/")
    return {"namespace": ns, "name": name} if sep else {"name": key}
