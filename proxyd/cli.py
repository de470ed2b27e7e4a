"""The ``proxyd`` command line (argparse: the standard library's well-kept parser is enough)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from proxyd import __version__
from proxyd.errors import ConfigError, PolicyError
from proxyd.registry import Registry, RegistryError


def _load(config: Path, registry: Registry):  # type: ignore[no-untyped-def]
    from proxyd.config import load_config

    return load_config(config, registry)


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from proxyd.server import run_daemon

    try:
        registry = Registry.load()
        _load(args.config, registry)  # validate before anything binds
    except (ConfigError, PolicyError) as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    try:
        return uvloop.run(run_daemon(args.config))
    except (ConfigError, PolicyError) as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"proxyd: cannot start: {exc}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    try:
        registry = Registry.load()
        config = _load(args.config, registry)
        from proxyd.policy.store import PolicyStore

        store = PolicyStore(registry, config.policy.paths, config.policy.state_dir)
    except (ConfigError, PolicyError) as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    for warning in getattr(store, "warnings", lambda: [])():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({len(config.listeners)} listeners, {len(store.documents())} policy documents)")
    return 0


def cmd_parsers(args: argparse.Namespace) -> int:
    reg = Registry.load()
    rows = [("NAME", "ORIGIN", "RULE KEYS", "DESCRIPTION")]
    for name, r in reg.items():
        rows.append((name, r.origin, ",".join(r.factory.rule_keys) or "-", r.factory.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxyd", description="Transparent L7 proxy daemon")
    p.add_argument("--version", action="version", version=f"proxyd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", type=Path, required=True)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate config and policy, then exit 0 or 1")
    check.add_argument("--config", "-c", type=Path, required=True)
    check.set_defaults(func=cmd_check)
    parsers = sub.add_parser("parsers", help="list registered parsers")
    parsers.set_defaults(func=cmd_parsers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except RegistryError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
