"""Helpers for end-to-end tests: in-process daemons, small servers, and socket clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from proxyd.config import parse_config
from proxyd.registry import Registry
from proxyd.server import Daemon


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` as the docs tell operators to (write beside it, rename into place).

    A test that also reloads by hand must not let the file watcher catch the file half-written
    by a plain ``write_text`` (seen under load: a late event read a truncated file).
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def daemon(
    yaml_text: str, tmp_path: Path, registry: Registry | None = None, files: dict[str, str] | None = None
) -> AsyncIterator[Daemon]:
    """Start a daemon from config text written to tmp_path/proxyd.yaml; stop it afterwards."""
    for name, content in (files or {}).items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    cfg_path = tmp_path / "proxyd.yaml"
    cfg_path.write_text(yaml_text)
    registry = registry or Registry.load()
    config = parse_config(yaml_text, cfg_path, registry)
    d = Daemon(config, registry)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


def addr(d: Daemon, listener: str) -> tuple[str, int]:
    return d.listeners[listener].bound_address()


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[tuple[str, int]]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            tasks.discard(task)
            w.close()

    server = await asyncio.start_server(wrapped, host, 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back."""
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.write_eof()


async def r2d2_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while line := await r.readline():
        w.write(b"OK " + line)
        await w.drain()


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
