"""Shared pytest configuration; machine requirements live in needs.py.

The test parsers (``test.passer``, ``test.lineparser``, ``test.blockparser``) are registered
here for the tests only, as an installed distribution's ``proxyd.parsers`` entry points
(tests/parser_plugins/README.md): on ``sys.path`` for in-process daemons, and on ``PYTHONPATH``
for the ``proxyd`` subprocesses tests start, which inherit the environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from needs import free_port, need_binary, need_root

__all__ = ["free_port", "need_binary", "need_root"]

PARSER_PLUGINS = str(Path(__file__).resolve().parent / "parser_plugins")
if PARSER_PLUGINS not in sys.path:
    sys.path.append(PARSER_PLUGINS)
_pythonpath = os.environ.get("PYTHONPATH", "")
if PARSER_PLUGINS not in _pythonpath.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_pythonpath, PARSER_PLUGINS) if p)


def pytest_asyncio_loop_factories(config, item):  # type: ignore[no-untyped-def]
    """Run every async test on uvloop, as the daemon does."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
