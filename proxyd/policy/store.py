"""The policy in force: file documents plus imported ones, swapped whole on every change.

Theory of operation (docs/policy.md, "Policy changes"). The store holds one immutable
:class:`~proxyd.policy.engine.PolicySet` and a revision number that only goes up. Every change
(re-reading ``policy.paths`` on SIGHUP or when :meth:`PolicyStore.watch_mtimes` sees a file
change; POST/PUT/DELETE on ``/v1/policy``) builds and validates a complete new set first; only
when that succeeds is it swapped in and the revision bumped. A rejected change raises
:class:`~proxyd.errors.PolicyError` and leaves the old set and revision untouched.

Open connections see a change at their next request: :meth:`PolicyStore.view` gives each
connection a :class:`LiveConnectionPolicy` that notices a new set by identity and recomputes
(and caches) its :class:`~proxyd.policy.engine.ConnectionPolicy` once per revision.

Changes are built in two steps so the daemon can do the expensive part (reading and parsing
text, compiling rules, writing the state file) on a worker thread, never on the event loop:
``build_*`` returns a :class:`Change` and touches nothing the event loop reads;
:meth:`PolicyStore.commit` swaps it in (cheap, on the loop). The daemon runs one change at a
time. The plain methods (:meth:`PolicyStore.reload_files` and friends) do both at once.

Imported documents are kept in ``state_dir/imported-policy.json`` (written atomically: a
temporary file, fsync, rename) so they survive a restart. A document name is unique across
files and imports; an import may replace an imported document of the same name, never a file's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from proxyd.context import L7Decision
from proxyd.errors import PolicyError
from proxyd.policy.engine import ConnectionPolicy, PolicySet
from proxyd.policy.loader import ParserLookup, load_paths, parse_text, policy_files
from proxyd.policy.model import Document

STATE_FILE: Final = "imported-policy.json"
STATE_VERSION: Final = 1
#: Total size (as JSON) of all imported documents together: the admin API cannot grow the
#: daemon without bound by importing many documents, each under the request body cap.
MAX_IMPORTED_BYTES: Final = 16 << 20

_Snapshot = tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class Change:
    """A validated policy change, ready for :meth:`PolicyStore.commit`."""

    files: tuple[Document, ...]
    imported: Mapping[str, Document]
    policy: PolicySet
    #: Imported documents (by name) the change adds, replaces and deletes: for the daemon's log.
    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    #: Documents from the Kubernetes API (None: unchanged), see :meth:`PolicyStore.build_cluster`.
    cluster: Mapping[str, Document] | None = None


class PolicyStore:
    """Current :class:`PolicySet`, its revision, and the ways to change it."""

    def __init__(
        self,
        registry: ParserLookup,
        paths: Sequence[Path],
        state_dir: Path | None = None,
        *,
        kubernetes: bool = False,
    ) -> None:
        """Load the imported documents kept in ``state_dir`` and the files of ``paths``.

        Raises :class:`PolicyError` when either is invalid (the daemon must not start then).
        """
        self.registry = registry
        #: A ``kubernetes`` source is on: node selectors load (docs/kubernetes.md).
        self.kubernetes = kubernetes
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._files: tuple[Document, ...] = ()
        self._imported: dict[str, Document] = {d.name: d for d in self._load_state()}
        self._revision = 0
        self._mtimes: _Snapshot = ()
        self._current = PolicySet((), registry, 0)
        #: Documents from Kubernetes API objects, by ``namespace/name`` (apart from files and
        #: imports: the same name may exist there), and the objects refused with their errors.
        self._cluster: Mapping[str, Document] = {}
        self.cluster_errors: Mapping[str, list[str]] = {}
        self.reload_files()

    # --- reading -------------------------------------------------------------------------------

    @property
    def current(self) -> PolicySet:
        return self._current

    @property
    def revision(self) -> int:
        return self._revision

    def documents(self) -> list[dict[str, Any]]:
        """Every document in force, files first: name, source, where, origin, warnings, document.

        ``source`` is the file (``admin-api`` for an import); ``where`` is ``file:line`` of the
        document in its file, None for an import (its text is not kept as it was sent).
        """
        out: list[dict[str, Any]] = []
        for origin, docs in (("file", self._files), ("imported", tuple(self._imported.values()))):
            for doc in docs:
                out.append(
                    {
                        "name": doc.name,
                        "source": doc.source,
                        "where": doc.where if origin == "file" else None,
                        "origin": origin,
                        "warnings": list(doc.warnings),
                        "document": doc.raw,
                    }
                )
        for doc in self._cluster.values():
            out.append({"name": doc.name, "source": "kubernetes", "where": None, "origin": "kubernetes",
                        "warnings": list(doc.warnings), "document": doc.raw})  # fmt: skip
        for name, errors in self.cluster_errors.items():
            out.append({"name": name, "source": "kubernetes", "errors": list(errors)})
        return out

    def warnings(self) -> list[str]:
        return [w for doc in self._current.documents for w in doc.warnings]

    # --- changing ------------------------------------------------------------------------------

    def reload_files(self) -> int:
        """Re-read ``paths``; returns the revision in force (unchanged when the documents are).

        Raises :class:`PolicyError` (old set kept)."""
        return self.commit(self.build_reload())

    def import_documents(self, text: str, source: str, replace_all: bool) -> int:
        """Add documents from ``text`` (POST), or replace all imported ones (PUT, ``replace_all``).

        Returns the new revision. Raises :class:`PolicyError` (old set kept), or OSError when
        the state directory cannot be written (old set kept).
        """
        return self.commit(self.build_import(text, source, replace_all))

    def delete_imported(self, name: str) -> int:
        """Remove the imported document ``name``; returns the new revision.

        Raises KeyError when there is no imported document of that name.
        """
        return self.commit(self.build_delete(name))

    def build_reload(self) -> Change:
        """Re-read ``paths`` into a :class:`Change`. Raises :class:`PolicyError`."""
        # Snapshot before reading: an edit made while we read is seen by the next poll, and a
        # broken file is not re-read every second until it changes again.
        self._mtimes = self._snapshot()
        files = tuple(load_paths(self.paths, self.registry, taken=self._imported, kubernetes=self.kubernetes))
        same = [(d.name, d.source, d.raw) for d in files] == [(d.name, d.source, d.raw) for d in self._files]
        if same and self._revision:
            # Nothing changed (a SIGHUP or touch): the revision stays.
            return Change(self._files, self._imported, self._current)
        return self._build(files, self._imported, save=False)

    def build_import(self, text: str, source: str, replace_all: bool) -> Change:
        """:meth:`import_documents` up to the swap (the state file is written)."""
        files_by_name = {d.name: d for d in self._files}
        docs = parse_text(text, source, self.registry, taken=files_by_name, kubernetes=self.kubernetes)
        if replace_all:
            imported = {d.name: d for d in docs}
        else:
            imported = dict(self._imported)
            for doc in docs:
                imported.pop(doc.name, None)
                imported[doc.name] = doc
        total = sum(len(json.dumps(d.raw, separators=(",", ":"), default=str)) for d in imported.values())
        if total > MAX_IMPORTED_BYTES:
            raise PolicyError(
                [f"{source}:0: imported documents would total {total} bytes, over the cap of "
                 f"{MAX_IMPORTED_BYTES} (delete some, or put large policies in policy.paths files)"]
            )  # fmt: skip
        names = tuple(dict.fromkeys(d.name for d in docs))
        change = self._build(self._files, imported, save=True)
        return replace(
            change,
            added=tuple(n for n in names if n not in self._imported),
            replaced=tuple(n for n in names if n in self._imported),
            deleted=tuple(n for n in self._imported if n not in imported),
        )

    def build_delete(self, name: str) -> Change:
        """:meth:`delete_imported` up to the swap. Raises KeyError for an unknown name."""
        if name not in self._imported:
            raise KeyError(name)
        imported = {k: v for k, v in self._imported.items() if k != name}
        return replace(self._build(self._files, imported, save=True), deleted=(name,))

    def build_cluster(self, cluster: Mapping[str, Document]) -> Change:
        """Files and imports as they are, with ``cluster`` as the Kubernetes API's documents."""
        docs = (*self._files, *self._imported.values(), *cluster.values())
        new = PolicySet(docs, self.registry, self._revision + 1)
        return Change(self._files, self._imported, new, cluster=dict(cluster))

    def _build(self, files: tuple[Document, ...], imported: Mapping[str, Document], *, save: bool) -> Change:
        docs = (*files, *imported.values(), *self._cluster.values())
        new = PolicySet(docs, self.registry, self._revision + 1)
        if save:
            self._save_state(imported)
        return Change(files, dict(imported), new)

    def commit(self, change: Change) -> int:
        """Put a built change in force; returns its revision."""
        self._files = change.files
        self._imported = dict(change.imported)
        if change.cluster is not None:
            self._cluster = change.cluster
        self._current = change.policy
        self._revision = change.policy.revision
        return self._revision

    # --- watching ------------------------------------------------------------------------------

    def watch_mtimes(self) -> bool:
        """Whether a policy file or directory changed since the last reload attempt (cheap)."""
        return self._snapshot() != self._mtimes

    def _snapshot(self) -> _Snapshot:
        out: list[tuple[Any, ...]] = []
        for path in self.paths:
            try:
                st = path.stat()
                if path.is_dir():
                    files = []
                    for f in policy_files(path):
                        fst = f.stat()
                        files.append((f.name, fst.st_mtime_ns, fst.st_size, fst.st_ino))
                    out.append((str(path), st.st_mtime_ns, tuple(files)))
                else:
                    out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    # --- persistence ---------------------------------------------------------------------------

    @property
    def state_file(self) -> Path | None:
        return self.state_dir / STATE_FILE if self.state_dir is not None else None

    def _load_state(self) -> list[Document]:
        path = self.state_file
        if path is None or not path.exists():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data["documents"]
            if data.get("version") != STATE_VERSION or not isinstance(entries, list):
                raise ValueError(f"unknown format version {data.get('version')!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PolicyError([f"{path}:0: cannot read imported policy: {exc}"]) from exc
        docs: list[Document] = []
        problems: list[str] = []
        for i, entry in enumerate(entries):
            try:
                text = json.dumps(entry["document"], indent=2)
                docs.extend(parse_text(text, str(entry["source"]), self.registry, kubernetes=self.kubernetes))
            except PolicyError as exc:
                problems.extend(f"{path}: imported document {i}: {p}" for p in exc.problems)
            except (KeyError, TypeError) as exc:
                problems.append(f"{path}: imported document {i}: malformed entry ({exc})")
        names: set[str] = set()
        for doc in docs:
            if doc.name in names:
                problems.append(f"{path}: duplicate imported document {doc.name!r}")
            names.add(doc.name)
        if problems:
            raise PolicyError(problems)
        return docs

    def _save_state(self, imported: Mapping[str, Document]) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "version": STATE_VERSION,
            "documents": [{"source": d.source, "document": d.raw} for d in imported.values()],
        }
        data = json.dumps(payload, indent=2, sort_keys=False).encode()
        fd, tmp = tempfile.mkstemp(prefix=".imported-policy.", dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_dir / STATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # --- per-connection view -------------------------------------------------------------------

    def view(
        self,
        direction: str,
        local_labels: Mapping[str, str],
        remote_ip: str,
        remote_labels: Mapping[str, str],
        port: int,
        l7proto: str | None,
        audit: bool = False,
    ) -> LiveConnectionPolicy:
        """A connection's policy that follows reloads (the :class:`L7Policy` for its parser)."""
        return LiveConnectionPolicy(
            self, direction, local_labels, remote_ip, remote_labels, port, l7proto, audit
        )


class LiveConnectionPolicy:
    """One connection's view of the store's current policy, recomputed once per revision."""

    __slots__ = ("_args", "_policy", "_set", "_store")

    def __init__(
        self,
        store: PolicyStore,
        direction: str,
        local_labels: Mapping[str, str],
        remote_ip: str,
        remote_labels: Mapping[str, str],
        port: int,
        l7proto: str | None,
        audit: bool,
        sni: str | None = None,
    ) -> None:
        self._store = store
        self._args = (direction, local_labels, remote_ip, remote_labels, port, l7proto, audit, sni)
        self._set = store.current
        self._policy = self._set.connection_policy(*self._args)

    def with_sni(self, sni: str | None) -> LiveConnectionPolicy:
        """This connection's view once its TLS ClientHello is read: ``serverNames`` rules see ``sni``."""
        direction, local, remote_ip, remote, port, l7proto, audit, _ = self._args
        store = self._store
        return LiveConnectionPolicy(store, direction, local, remote_ip, remote, port, l7proto, audit, sni)

    def l4(self) -> ConnectionPolicy:
        """The connection's verdicts under the current policy (L3/L4 at accept, and L7)."""
        current = self._store.current
        if current is not self._set:
            self._policy = current.connection_policy(*self._args)
            self._set = current
        return self._policy

    def decide(self, request: Any) -> L7Decision:
        """Whether the current policy allows ``request`` (a reload applies from the next one).

        A connection that a new revision denies at L3/L4 gets every further request denied.
        """
        if self._store.current is self._set:
            return self._policy.decide(request)
        return self.l4().decide(request)

    @property
    def revision(self) -> int:
        return self._set.revision
