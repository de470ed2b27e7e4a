"""Which implementation runs each twin: the compiled ``proxyd._native`` or the Python reference.

Every piece of the hot path with a compiled twin (the verdict engine, the memcache parser) has
its readable Python reference beside it; this module is the one place that decides which of the
two runs, the way yarl's ``_quoting.py`` picks ``_quoting_c`` or ``_quoting_py``. Code that
needs a twin asks here instead of importing ``proxyd._native`` itself, so the rule is written
once: the compiled module when it is built and ``PROXYD_PURE`` does not force the Python path.

A connection is all native or all Python: its parser twins follow its engine
(:func:`parser_twins`), which also lets a test drive the compiled engine and parsers on a
``PROXYD_PURE=1`` run (:func:`engine_class`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from proxyd.engine import EngineError, PyEngine, _name, _opcode, _unpack
from proxyd.ops import Op

_module: Any = None


def native_module() -> Any:
    """The compiled module (set up for use), or None when it is not built.

    Ignores ``PROXYD_PURE``: the equivalence tests drive both paths in one process.
    """
    global _module
    if _module is None:
        try:
            from proxyd import _native  # type: ignore[attr-defined]
        except ImportError:
            return None
        _native.setup(EngineError=EngineError, ops=tuple(Op), unpack=_unpack, opcode=_opcode, opname=_name)
        _module = _native
    return _module


def pure_forced() -> bool:
    """Whether ``PROXYD_PURE`` (set, not empty, not 0) forces the Python path."""
    return os.environ.get("PROXYD_PURE", "") not in ("", "0")


#: The compiled module when the native path runs (built, and not ``PROXYD_PURE=1``), else None.
native: Any = None if pure_forced() else native_module()
#: Which data path runs: ``native`` (compiled twin) or ``python`` (reference).
IMPLEMENTATION = "native" if native is not None else "python"

if TYPE_CHECKING:
    Engine = PyEngine
else:
    Engine = native.Engine if native is not None else PyEngine


def engine_class(implementation: str | None) -> type[PyEngine]:
    """The engine class for ``implementation`` (``python``, ``native`` or None: the default)."""
    if implementation is None:
        return Engine
    if implementation == "python":
        return PyEngine
    if implementation == "native":
        mod = native_module()
        if mod is None:
            raise ValueError("the native engine is not built (proxyd._native)")
        return mod.Engine  # type: ignore[no-any-return]
    raise ValueError(f"implementation must be 'python' or 'native', not {implementation!r}")


def parser_twins(ctx: object) -> Any:
    """The compiled module whose parser twins serve ``ctx``'s connection, or None.

    Set exactly when ``ctx`` is a :class:`proxyd.context.Context` on the compiled engine: a
    connection is all native or all Python, whatever ``PROXYD_PURE`` says (a test may ask for
    the native engine).
    """
    mod = native_module()
    if mod is None:
        return None
    from proxyd.context import Context  # imports this module: not at the top

    if isinstance(ctx, Context) and type(ctx.engine) is mod.Engine:
        return mod
    return None
