"""Parsing many policy files on two cores at start: part of them in a forked child process.

Before it is ready the daemon parses every policy file (10,000 documents: about 3 s on one
core) and serves nothing yet, so the work can be split: a child forked from the daemon parses
the last part of the files and hands its documents back pickled (unpickling costs a sixth of
parsing), while the daemon parses the rest.

The documents that come back are the ones the child parsed, but for their compiled L7 rules:
a parser's matcher is not made to be pickled (a plugin's may hold anything; the built-in ones
are compared by identity), so only the rules travel and the daemon compiles them again with its
own registry (cheap next to parsing). Anything that goes wrong in the child (it dies, a value
does not pickle, a rule does not compile the same) only costs time: the daemon then parses the
child's files itself, so problems are reported as a one-process load reports them.

Only the start does this: a reload runs on a worker thread beside a serving event loop, where
forking would copy a process in the middle of its work.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Final

from proxyd.errors import PolicyError
from proxyd.parser import RuleMatcher
from proxyd.policy.model import Document, L7Rules

#: Fewer files than this are parsed in the daemon alone (a fork costs a few milliseconds).
MIN_FILES: Final = 256
#: The child's share of the files: the daemon also unpickles what the child parsed (measured:
#: 10,000 documents, both sides then take about as long).
CHILD_SHARE: Final = 0.52

#: What a file gave: its documents, or the problems that refused it.
Loaded = tuple[Document, ...] | list[str]


class _NoMatchers(pickle.Pickler):
    """Pickles documents with their L7 rules' matchers left out (see the module docstring), and
    the model's dataclasses as calls of their constructors (unpickled field by field through
    their generated ``__setstate__``, they took a third of the daemon's share)."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is L7Rules and obj.matchers is not None:
            return _compiled, (obj.l7proto, obj.rules, obj.where, obj.key)
        if cls in _init_fields:
            names = _init_fields[cls]
        else:
            names = _init_fields[cls] = _constructor_fields(cls)
        if names is None:
            return NotImplemented
        return cls, tuple([getattr(obj, name) for name in names])


#: A class's fields in constructor order, when calling it with them rebuilds an instance (a
#: dataclass whose fields all are ``__init__`` arguments, with no ``__post_init__``); else None.
_init_fields: dict[type, tuple[str, ...] | None] = {}


def _constructor_fields(cls: type) -> tuple[str, ...] | None:
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    return tuple(f.name for f in fields) if all(f.init for f in fields) else None


#: The daemon's parser lookup while it unpickles the child's documents.
_registry: list[Any] = []


def _compiled(l7proto: str, rules: tuple[Any, ...], where: str, key: str) -> L7Rules:
    """An :class:`L7Rules` whose matchers the child compiled, compiled again here."""
    factory = _registry[-1].get(l7proto)
    matchers: tuple[RuleMatcher, ...] = tuple(factory.compile_rule(rule) for rule in rules)
    return L7Rules(l7proto, rules, matchers, where, key)


def load_split(
    names: Sequence[str], load: Callable[[str], tuple[Document, ...]], registry: Any
) -> dict[str, Loaded]:
    """What ``load`` gives for each of ``names`` (its problems where it raised PolicyError),
    parsing a share of them in a forked child when there are many. ``registry`` compiles the
    child's L7 rules again."""
    if len(names) < MIN_FILES or not hasattr(os, "fork"):
        return {name: _load_one(load, name) for name in names}
    cut = len(names) - int(len(names) * CHILD_SHARE)
    mine, theirs = names[:cut], names[cut:]
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:  # the child: parse, pickle, and leave without running anything of the parent's
            code = 1
            try:
                _NoMatchers(out, pickle.HIGHEST_PROTOCOL).dump({n: _load_one(load, n) for n in theirs})
                out.flush()
                code = 0
            finally:
                os._exit(code)
        try:
            results = {name: _load_one(load, name) for name in mine}
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        got = _collect(pid, out, registry)
    if got is None or got.keys() != set(theirs):
        got = {name: _load_one(load, name) for name in theirs}
    results.update(got)
    return results


def _collect(pid: int, out: Any, registry: Any) -> dict[str, Loaded] | None:
    """The child's results, or None if it did not finish them."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else: its exit status is unknown
        return None
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    out.seek(0)
    _registry.append(registry)
    try:
        got = pickle.load(out)
    except Exception:  # any failure here only means parsing the child's part again
        return None
    finally:
        _registry.pop()
    return got if isinstance(got, dict) else None


def _load_one(load: Callable[[str], tuple[Document, ...]], name: str) -> Loaded:
    try:
        return load(name)
    except PolicyError as exc:
        return list(exc.problems)
