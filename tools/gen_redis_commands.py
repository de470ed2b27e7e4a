#!/usr/bin/env python3
"""Generate proxyd/parsers/redis/commands.json from a real redis-server.

Usage::

    tools/gen_redis_commands.py                 # starts a throwaway redis-server (from PATH)
    tools/gen_redis_commands.py --port 6379     # asks a running server instead

It asks ``COMMAND INFO`` (names, arity, flags, ACL categories, key specs, subcommands) and
``COMMAND DOCS`` (groups) over RESP2 with redis-py, and writes the table in the form
``proxyd.parsers.redis.table.normalize`` defines; tests/parsers/test_redis_table.py checks the
stored file against the server CI starts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "proxyd" / "parsers" / "redis" / "commands.json"


def fetch(port: int) -> dict[str, Any]:
    """The table of the server on 127.0.0.1:port, as stored."""
    import redis

    from proxyd.parsers.redis.table import normalize

    r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, protocol=2)
    r.response_callbacks.pop("COMMAND", None)  # the raw rows, not redis-py's summary
    try:
        info = r.execute_command("COMMAND", "INFO")
        docs = r.execute_command("COMMAND", "DOCS")
        version = r.info("server")["redis_version"]
    finally:
        r.close()
    return {"redis_version": version, "commands": normalize(info, docs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, help="a running server's port (default: start one)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.port:
        table = fetch(args.port)
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", d],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                for _ in range(200):
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.2).close()
                        break
                    except OSError:
                        time.sleep(0.05)
                table = fetch(port)
            finally:
                proc.terminate()
                proc.wait(10)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", "utf-8")
    print(f"{args.out}: {len(table['commands'])} commands from redis {table['redis_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
