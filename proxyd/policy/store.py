"""The policy in force: file documents plus imported ones, swapped whole on every change.

Theory of operation (docs/policy.md, "Policy changes"). The store holds one immutable
:class:`~proxyd.policy.engine.PolicySet` and a revision number that only goes up. Every change
(re-reading ``policy.paths`` on SIGHUP or when the daemon's file watcher reports written files;
POST/PUT/DELETE on ``/v1/policy``) builds and validates a complete new set first; only
when that succeeds is it swapped in and the revision bumped. A rejected change raises
:class:`~proxyd.errors.PolicyError` and leaves the old set and revision untouched.

Changes are incremental, so a node-sized policy (10,000 documents) changes in milliseconds:
the store keeps each file's documents with the file's identity (inode, size, mtime, ctime);
a reload re-reads only the files named as changed (:meth:`PolicyStore.build_reload` with
``changed``: the watcher's closed-after-write and renamed-into-place files) or, on SIGHUP, the
files whose identity changed; and the new set compiles only the documents that are new
(:class:`~proxyd.policy.engine.PolicySet` with ``previous``). The same holds for imports: the
documents a POST leaves alone are not compiled again. ``Change.compiled`` counts what was.
A change that leaves an endpoint that had rules with none (a file emptied, truncated, removed,
or a selector that stops selecting) carries a warning naming the file (``Change.warnings``).

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, cast

from proxyd.context import L7Decision
from proxyd.errors import PolicyError
from proxyd.policy import flat
from proxyd.policy.engine import ConnectionPolicy, PolicySet
from proxyd.policy.flat import FlatPolicy
from proxyd.policy.forkload import Loaded, load_split
from proxyd.policy.loader import (
    ParserLookup,
    check_names,
    load_file,
    parse_text,
    policy_file_names,
    policy_files,
)
from proxyd.policy.model import DIRECTIONS, Document
from proxyd.policy.selector import LabelSet

STATE_FILE: Final = "imported-policy.json"
#: Flattened connection policies kept per revision (PolicySet.flat_cache) before starting over.
FLAT_CACHE_SIZE: Final = 4096
STATE_VERSION: Final = 1
#: Total size (as JSON) of all imported documents together: the admin API cannot grow the
#: daemon without bound by importing many documents, each under the request body cap.
MAX_IMPORTED_BYTES: Final = 16 << 20

_Snapshot = tuple[tuple[Any, ...], ...]


_StatKey = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A policy file as last read: its identity then, and its documents."""

    stat: _StatKey | None
    documents: tuple[Document, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """A validated policy change, ready for :meth:`PolicyStore.commit`."""

    files: Mapping[str, FileEntry]
    imported: Mapping[str, Document]
    policy: PolicySet
    #: Endpoints this change leaves without the rules they had, naming the file.
    warnings: tuple[str, ...] = ()
    #: Files read for this change.
    read: tuple[str, ...] = ()
    #: Every file document by name (None: unchanged), to check the names of the next change.
    names: Mapping[str, Document] | None = None
    #: ``policy.paths`` and identity label sets this change was built with (None: unchanged).
    paths: tuple[Path, ...] | None = None
    endpoint_labels: Sequence[Mapping[str, str]] | None = None

    #: How many documents this change compiled (the rest were kept from the old set).
    compiled: int = 0
    #: Imported documents (by name) the change adds, replaces and deletes: for the daemon's log.
    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    #: Documents from the Kubernetes API (None: unchanged), see :meth:`PolicyStore.build_cluster`.
    cluster: Mapping[str, Document] | None = None


def _stat_key(path: Path) -> _StatKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PolicyStore:
    """Current :class:`PolicySet`, its revision, and the ways to change it."""

    def __init__(
        self,
        registry: ParserLookup,
        paths: Sequence[Path],
        state_dir: Path | None = None,
        *,
        kubernetes: bool = False,
        split: bool = False,
    ) -> None:
        """Load the imported documents kept in ``state_dir`` and the files of ``paths``.

        ``split``: parse many files partly in a forked child process (the daemon's start, on
        a loop that serves nothing yet: :mod:`proxyd.policy.forkload`); never for reloads.
        Raises :class:`PolicyError` when either is invalid (the daemon must not start then).
        """
        self.registry = registry
        #: A ``kubernetes`` source is on: node selectors load (docs/kubernetes.md).
        self.kubernetes = kubernetes
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._files: dict[str, FileEntry] = {}
        self._names: Mapping[str, Document] = {}
        self._imported: dict[str, Document] = {d.name: d for d in self._load_state()}
        self._revision = 0
        self._mtimes: _Snapshot = ()
        self._current = PolicySet((), registry, 0)
        #: The revision in force, as the flattened-policy interface shares it with compiled
        #: parsers (proxyd.policy.flat.FlatPolicy.current): a one-item list, replaced in place
        #: by :meth:`commit`, so a connection checks its flat copy without a Python call.
        self.revision_cell: list[object] = [self._current]
        #: Documents from Kubernetes API objects, by ``namespace/name`` (apart from files and
        #: imports: the same name may exist there), and the objects refused with their errors.
        self._cluster: Mapping[str, Document] = {}
        self.cluster_errors: Mapping[str, list[str]] = {}
        #: The distinct label sets of the identities table (for the "left without rules"
        #: warning); the daemon sets it with every identities change.
        self.endpoint_labels: Sequence[Mapping[str, str]] = ()
        #: Whether :meth:`watch_mtimes` is in use (it stats every file at each reload); the
        #: daemon turns it off when it watches the files by inotify events instead.
        self.polling = True
        self._label_cache: (
            tuple[Sequence[Mapping[str, str]], list[tuple[Mapping[str, str], LabelSet]]] | None
        ) = None
        self._split = split
        try:
            self.reload_files()
        finally:
            self._split = False

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
        for origin, docs in (("file", self._file_documents()), ("imported", tuple(self._imported.values()))):
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

    def _file_documents(self, files: Mapping[str, FileEntry] | None = None) -> tuple[Document, ...]:
        entries = (self._files if files is None else files).values()
        return tuple(doc for entry in entries for doc in entry.documents)

    def build_reload(
        self,
        changed: Collection[str] | None = None,
        *,
        paths: Sequence[Path] | None = None,
        endpoint_labels: Sequence[Mapping[str, str]] | None = None,
    ) -> Change:
        """Re-read ``paths`` into a :class:`Change`. Raises :class:`PolicyError`.

        ``changed`` (paths as strings): read only these files, keeping every other file as
        last read, even if it changed since (a file being written is read once its writer
        closes it, when it is named here). None (start, SIGHUP): read every file whose
        identity changed since it was last read. ``paths`` and ``endpoint_labels`` (a config
        reload) replace the store's when the change is committed.
        """
        new_paths = None if paths is None else tuple(Path(p) for p in paths)
        labels = self.endpoint_labels if endpoint_labels is None else endpoint_labels
        change = self._build_reload(changed, self.paths if new_paths is None else new_paths, labels)
        return replace(change, paths=new_paths, endpoint_labels=endpoint_labels)

    def _build_reload(
        self,
        changed: Collection[str] | None,
        paths: tuple[Path, ...],
        endpoint_labels: Sequence[Mapping[str, str]],
    ) -> Change:
        # Snapshot before reading: an edit made while we read is seen by the next poll, and a
        # broken file is not re-read every second until it changes again.
        if self.polling:
            self._mtimes = self._snapshot()
        if (
            changed is not None
            and paths == self.paths
            and self._revision
            and all(n in self._files for n in changed)
        ):
            return self._build_changed(sorted(changed), endpoint_labels)
        files: dict[str, FileEntry | None] = {}  # None: to read
        read: list[str] = []
        stats: dict[str, _StatKey | None] = {}
        #: In the order found: a file read (its name) or a path that is missing (its problem).
        found: list[tuple[str, bool]] = []
        for path, names in self._listing(paths, changed):
            if names is None:
                found.append((f"{path}: no such file or directory (listed in policy.paths)", False))
                continue
            for name in names:
                old = self._files.get(name)
                if changed is not None and name not in changed:
                    if old is not None:
                        files[name] = old
                    continue  # not written yet (no close or rename seen): not read
                stat = _stat_key(Path(name))
                if changed is None and old is not None and stat is not None and old.stat == stat:
                    files[name] = old
                    continue
                read.append(name)
                found.append((name, True))
                files[name], stats[name] = None, stat
        if self._split:
            loaded = load_split(list(dict.fromkeys(read)), lambda n: self._load_file(Path(n)), self.registry)
        else:
            loaded = {name: _loaded(self._load_file, name) for name in read}
        problems: list[str] = []
        for text, is_file in found:
            got = loaded[text] if is_file else [text]
            if isinstance(got, list):
                problems.extend(got)
                files.pop(text, None)
            else:
                files[text] = FileEntry(stats[text], got)
        if problems:
            raise PolicyError(problems)
        return self._build_read(cast(dict[str, FileEntry], files), read, endpoint_labels)

    def _build_read(
        self, files: dict[str, FileEntry], read: list[str], endpoint_labels: Sequence[Mapping[str, str]]
    ) -> Change:
        same = files.keys() == self._files.keys() and all(files[k] is self._files[k] for k in files)
        if not same:
            # A file read again with the same documents (touched, or written unchanged) keeps
            # its old document objects, so nothing is compiled and the revision stays.
            for name in read:
                old = self._files.get(name)
                if old is not None and _same_documents(old.documents, files[name].documents):
                    files[name] = FileEntry(files[name].stat, old.documents)
            same = files.keys() == self._files.keys() and all(
                files[k].documents is self._files[k].documents for k in files
            )
        if same and self._revision:
            # Nothing changed (a SIGHUP or touch): the revision stays.
            return Change(files, self._imported, self._current, read=tuple(read))
        docs = self._file_documents(files)
        check_names(docs, self.registry, self._imported)
        change = self._build(files, self._imported, save=False)
        warnings = self._lost_rules(files, endpoint_labels, change.policy)
        return replace(change, warnings=warnings, read=tuple(read), names={d.name: d for d in docs})

    def _build_changed(self, changed: list[str], endpoint_labels: Sequence[Mapping[str, str]]) -> Change:
        """:meth:`build_reload` of known files only (the watcher's events): the cost is that of
        the files named, plus copying the tables of the others (10,000 files: milliseconds)."""
        files = dict(self._files)
        read: list[str] = []
        problems: list[str] = []
        for name in changed:
            if not os.path.isfile(name):
                del files[name]  # removed
                continue
            read.append(name)
            file = Path(name)
            try:
                entry = FileEntry(_stat_key(file), self._load_file(file))
            except PolicyError as exc:
                problems.extend(exc.problems)
                continue
            old = self._files[name]
            if _same_documents(old.documents, entry.documents):
                entry = FileEntry(entry.stat, old.documents)
            files[name] = entry
        if problems:
            raise PolicyError(problems)
        if all(name in files and files[name].documents is self._files[name].documents for name in changed):
            return Change(files, self._imported, self._current, read=tuple(read))
        # Names: the changed files' documents against each other and every other document.
        names = dict(self._names)
        for name in changed:
            for doc in self._files[name].documents:
                if names.get(doc.name) is doc:
                    del names[doc.name]
        mine = [doc for name in changed if name in files for doc in files[name].documents]
        taken = {d.name: other for d in mine if (other := names.get(d.name) or self._imported.get(d.name))}
        check_names(mine, self.registry, taken)
        names.update((d.name, d) for d in mine)
        change = self._build(files, self._imported, save=False)
        warnings = self._lost_rules(files, endpoint_labels, change.policy, touched=changed)
        return replace(change, warnings=warnings, read=tuple(read), names=names)

    def _load_file(self, file: Path) -> tuple[Document, ...]:
        return tuple(load_file(file, self.registry, kubernetes=self.kubernetes))

    def _listing(
        self, paths: tuple[Path, ...], changed: Collection[str] | None
    ) -> list[tuple[Path | None, list[str] | None]]:
        """The policy files of each of ``paths`` (None: the path is missing)."""
        return [(path, policy_file_names(path) if path.exists() else None) for path in paths]

    def _indexed_labels(
        self, endpoint_labels: Sequence[Mapping[str, str]]
    ) -> list[tuple[Mapping[str, str], LabelSet]]:
        """The identities' label sets, indexed for selector matching (kept while they last)."""
        cached = self._label_cache
        if cached is None or cached[0] is not endpoint_labels:
            cached = self._label_cache = (endpoint_labels, [(lb, LabelSet(lb)) for lb in endpoint_labels])
        return cached[1]

    def _lost_rules(
        self,
        files: Mapping[str, FileEntry],
        endpoint_labels: Sequence[Mapping[str, str]],
        new_set: PolicySet,
        touched: Sequence[str] | None = None,
    ) -> tuple[str, ...]:
        """Warnings for endpoints that had rules from a changed file and now have none."""
        if not self._revision:
            return ()
        out: list[str] = []
        label_sets: list[tuple[Mapping[str, str], LabelSet]] | None = None
        if touched is None:
            touched = [
                n
                for n, e in files.items()
                if (o := self._files.get(n)) is None or o.documents is not e.documents
            ]
            touched += [n for n in self._files if n not in files]
        for name in touched:
            old, new = self._files.get(name), files.get(name)
            old_docs = old.documents if old is not None else ()
            new_docs = new.documents if new is not None else ()
            if not any(spec.rules for doc in old_docs for spec in doc.specs):
                continue
            what = "is gone" if new is None else "changed"
            if not endpoint_labels:
                if not any(spec.rules for doc in new_docs for spec in doc.specs):
                    out.append(
                        f"{name}: the file {what} and gives no rule any more, where it gave "
                        "rules before: the endpoints it selected may now allow everything"
                    )
                continue
            if label_sets is None:
                label_sets = self._indexed_labels(endpoint_labels)
            # Only the label sets the file's old specs selected, then only those, in the new set.
            specs = [spec for doc in old_docs for spec in doc.specs]
            for labels, indexed in label_sets:
                for direction in DIRECTIONS:
                    had = any(
                        s.selects_direction(direction) and s.endpoint_selector.matches(indexed) for s in specs
                    )
                    if had and not new_set.selecting(direction, labels):
                        shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                        out.append(f"{name}: the file {what}; endpoints with labels {{{shown}}} had "
                                   f"{direction} rules from it and now have none: {direction} "
                                   "is allowed for them unless another policy selects them")  # fmt: skip
        return tuple(out)

    def build_import(self, text: str, source: str, replace_all: bool) -> Change:
        """:meth:`import_documents` up to the swap (the state file is written)."""
        files_by_name = {d.name: d for d in self._file_documents()}
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
        docs = (*self._file_documents(), *self._imported.values(), *cluster.values())
        new = PolicySet(docs, self.registry, self._revision + 1, previous=self._current)
        return Change(self._files, self._imported, new, cluster=dict(cluster))

    def _build(
        self, files: Mapping[str, FileEntry], imported: Mapping[str, Document], *, save: bool
    ) -> Change:
        docs = (*self._file_documents(files), *imported.values(), *self._cluster.values())
        new = PolicySet(docs, self.registry, self._revision + 1, previous=self._current)
        if save:
            self._save_state(imported)
        return Change(dict(files), dict(imported), new, compiled=new.compiled)

    def commit(self, change: Change) -> int:
        """Put a built change in force; returns its revision."""
        self._files = dict(change.files)
        if change.names is not None:
            self._names = change.names
        if change.paths is not None:
            self.paths = change.paths
        if change.endpoint_labels is not None:
            self.endpoint_labels = change.endpoint_labels
        self._imported = dict(change.imported)
        if change.cluster is not None:
            self._cluster = change.cluster
        self._current = change.policy
        self._revision = change.policy.revision
        self.revision_cell[0] = change.policy
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


def _loaded(load: Callable[[Path], tuple[Document, ...]], name: str) -> Loaded:
    """What one file gave: its documents, or the problems that refused it."""
    try:
        return load(Path(name))
    except PolicyError as exc:
        return list(exc.problems)


def _same_documents(a: Sequence[Document], b: Sequence[Document]) -> bool:
    return [(d.name, d.source, d.raw) for d in a] == [(d.name, d.source, d.raw) for d in b]


class LiveConnectionPolicy:
    """One connection's view of the store's current policy, recomputed once per revision."""

    __slots__ = ("_args", "_flat", "_policy", "_set", "_store")

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
        self._flat: FlatPolicy | None = None

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

    def flat(self) -> FlatPolicy:
        """:meth:`l4`'s ``l7`` part flattened for a compiled parser (proxyd.policy.flat).

        Built once per revision for this connection, so a twin that finds its copy stale (the
        store's revision cell moved) pays one call here and one build, not one per request;
        and shared by the revision's connections with the same ConnectionPolicy (the policy
        set caches those per connection key), so a new connection usually builds nothing.
        """
        policy = self.l4()
        built = self._flat
        if built is None or built.stamp is not self._set:
            cache = self._set.flat_cache
            entry = cache.get(id(policy))
            if entry is not None and entry[0] is policy:
                built = entry[1]
            else:
                built = flat.build(policy, self._set, self._store.revision_cell)
                if len(cache) >= FLAT_CACHE_SIZE:
                    cache.clear()
                cache[id(policy)] = (policy, built)
            self._flat = built
        return built

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
