"""A tiny r2d2 server for the README's quick start: ``python -m proxyd.demo.r2d2_server``.

It answers ``READ f`` with ``OK <contents of f>``, ``WRITE f`` with ``OK``, ``HALT`` and
``RESET`` with ``OK``, anything else with ``ERROR``. The data lives in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

FILES = {"/public/hello": "hello from r2d2", "/secret/plans": "the death star plans"}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            parts = line.rstrip(b"\r\n").decode("latin-1").split(" ")
            if parts[0] == "READ" and len(parts) == 2:
                reply = f"OK {FILES.get(parts[1], '')}"
            elif parts[0] == "WRITE" and len(parts) == 2:
                FILES.setdefault(parts[1], "")
                reply = "OK"
            elif parts[0] in ("HALT", "RESET") and len(parts) == 1:
                reply = "OK"
            else:
                reply = "ERROR"
            writer.write(reply.encode() + b"\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port)
    print(f"r2d2 demo server on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
