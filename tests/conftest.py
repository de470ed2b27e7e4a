"""Shared pytest configuration; machine requirements live in needs.py."""

from __future__ import annotations

from needs import free_port, need_binary, need_root

__all__ = ["free_port", "need_binary", "need_root"]


def pytest_asyncio_loop_factories(config, item):  # type: ignore[no-untyped-def]
    """Run every async test on uvloop, as the daemon does."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
