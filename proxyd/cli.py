"""The ``proxyd`` command line (argparse: the standard library's well-kept parser is enough)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxyd import __version__
from proxyd.engine import IMPLEMENTATION
from proxyd.errors import ConfigError, PolicyError
from proxyd.registry import Registry, RegistryError

if TYPE_CHECKING:
    from proxyd.config import Config


def _load(config: Path, registry: Registry) -> Config:
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
        # Bind failures carry their listener and address in strerror; others keep their filename.
        why = exc.strerror if exc.strerror and exc.filename is None else exc
        print(f"proxyd: cannot start: {why}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    try:
        registry = Registry.load()
        config = _load(args.config, registry)
        from proxyd.policy.store import PolicyStore

        store = PolicyStore(registry, config.policy.paths, config.policy.state_dir)
        if config.admin is not None and config.admin.token_file is not None:
            from proxyd.admin import read_token

            read_token(config.admin.token_file)  # as the daemon will, at start
    except (ConfigError, PolicyError) as exc:
        return _problems(exc)
    for warning in getattr(store, "warnings", lambda: [])():
        print(f"warning: {warning}", file=sys.stderr)
    from proxyd.policy.loader import selector_key_warnings

    for warning in selector_key_warnings(store.current.documents, config.identities):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({len(config.listeners)} listeners, {len(store.documents())} policy documents)")
    return 0


#: Built-in parsers the test suite uses (proxyd.parsers.testparsers); `proxyd parsers --all` shows them.
TEST_PARSER_PREFIX = "test."


def cmd_parsers(args: argparse.Namespace) -> int:
    reg = Registry.load()
    rows = [("NAME", "ORIGIN", "RULE KEYS", "DESCRIPTION")]
    for name, r in reg.items():
        if name.startswith(TEST_PARSER_PREFIX) and r.origin == "built-in" and not args.all:
            continue  # the framework's own test parsers: shown with --all
        rows.append((name, r.origin, ",".join(r.factory.rule_keys) or "-", r.factory.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _problems(exc: ConfigError | PolicyError) -> int:
    for line in exc.problems:
        print(line, file=sys.stderr)
    return 1


def _parse_src(value: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address -> (ip, port); ValueError if not."""
    import ipaddress

    from proxyd.config import parse_port

    host, port = value, "0"
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"{value!r} is not an address")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, parse_port(port, allow_zero=True)


def cmd_explain(args: argparse.Namespace) -> int:
    from proxyd.config import parse_hostport
    from proxyd.policy.explain import explain
    from proxyd.policy.identity import IdentityMap
    from proxyd.policy.store import PolicyStore

    try:
        registry = Registry.load()
        config = _load(args.config, registry)
        store = PolicyStore(registry, config.policy.paths, config.policy.state_dir)
    except (ConfigError, PolicyError) as exc:
        return _problems(exc)
    try:
        dst = parse_hostport(args.dst)
    except ValueError as exc:
        print(f"proxyd explain: --dst: {exc} (IP:PORT or [IPv6]:PORT)", file=sys.stderr)
        return 2
    try:
        src = _parse_src(args.src)
    except ValueError as exc:
        print(f"proxyd explain: --src: {exc} (IP, IP:PORT or [IPv6]:PORT)", file=sys.stderr)
        return 2
    listener = None
    if args.listener:
        listener = next((lc for lc in config.listeners if lc.name == args.listener), None)
        if listener is None:
            print(f"proxyd explain: no listener named {args.listener!r}", file=sys.stderr)
            return 2
    else:
        for lc in config.listeners:
            ports = lc.redirect.ports if lc.redirect else ()
            if (lc.upstream and lc.upstream[1] == dst[1]) or dst[1] in ports:
                listener = lc
                break
        if listener is None and len(config.listeners) == 1:
            listener = config.listeners[0]
    if listener is None:
        print("proxyd explain: several listeners could carry this connection; name one with --listener",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"listener: {listener.name} ({listener.direction}, l7proto {listener.l7proto or 'none'})")
    ids = IdentityMap.from_entries(config.identities)
    print(explain(store, ids, listener.direction, src, dst, listener.l7proto, args.sni))
    return 0


def _admin_target(args: argparse.Namespace) -> Any:
    from proxyd import adminclient

    config = _load(args.config, Registry.load()) if args.config and not (args.admin or args.socket) else None
    return adminclient.resolve(admin=args.admin, socket_path=args.socket, token_file=args.token_file,
                               config=config, config_path=args.config)  # fmt: skip


#: The source the admin API gives imported documents (``admin-api:LINE``).
IMPORT_SOURCE = "admin-api"


def cmd_policy(args: argparse.Namespace) -> int:
    import json

    from proxyd import adminclient

    body = b""
    if args.policy_command == "import":
        try:
            body = Path(args.file).read_bytes()
        except OSError as exc:
            print(f"proxyd policy import: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        target = _admin_target(args)
    except (ConfigError, PolicyError) as exc:
        return _problems(exc)
    try:
        base = "/v1/policy"
        if args.policy_command == "import":
            status, data = adminclient.request(target, "POST", base, body)
        elif args.policy_command == "get":
            status, data = adminclient.request(target, "GET", base)
        else:
            from urllib.parse import quote

            status, data = adminclient.request(target, "DELETE", f"{base}/{quote(args.name, safe='')}")
    except (ConfigError, PolicyError) as exc:
        return _problems(exc)
    except OSError as exc:
        print(f"proxyd policy: cannot reach the daemon's admin API at {target.describe()}: {exc}",
              file=sys.stderr)  # fmt: skip
        return 1
    if status != 200:
        for line in data.get("errors", [f"HTTP {status}"]):
            if args.policy_command == "import" and line.startswith(f"{IMPORT_SOURCE}:"):
                line = args.file + line[len(IMPORT_SOURCE) :]  # the problem is in the file given
            print(line, file=sys.stderr)
        if status in (401, 403) and target.socket is None and target.token is None:
            print("proxyd policy: changes need the admin socket (--socket, or admin.socket in --config) "
                  "or a token (--token-file)", file=sys.stderr)  # fmt: skip
        return 1
    if args.policy_command == "get":
        print(json.dumps(data, indent=2))
    else:
        print(f"Revision: {data['revision']}")
    return 0


def cmd_iptables(args: argparse.Namespace) -> int:
    from proxyd import iptables

    try:
        config = _load(args.config, Registry.load()) if args.config else None
        return iptables.run(args, config, sys.stdout)
    except ConfigError as exc:
        return _problems(exc)
    except iptables.IptablesError as exc:
        print(f"proxyd iptables: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proxyd", description="Transparent L7 proxy daemon")
    version = f"proxyd {__version__} (data path: {IMPLEMENTATION})"
    p.add_argument("--version", action="version", version=version)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the daemon",
        description="Run the daemon on a config file: ready once every listener is bound (and the admin "
        "/readyz answers 200). SIGHUP reloads config and policy, SIGUSR1 reopens the access log, "
        "SIGTERM/SIGINT stop accepting, drain open connections for up to limits.drain_timeout and exit 0.",
    )  # fmt: skip
    run.add_argument("--config", "-c", type=Path, required=True)
    run.set_defaults(func=cmd_run)
    check = sub.add_parser(
        "check", help="validate config and policy, then exit 0 or 1",
        description="Validate a config file and every policy document it names without starting "
        "anything. Prints one 'file:line: key: problem' line per problem and exits 1, or a summary and 0.",
    )  # fmt: skip
    check.add_argument("--config", "-c", type=Path, required=True)
    check.set_defaults(func=cmd_check)
    parsers = sub.add_parser(
        "parsers", help="list registered parsers",
        description="List the registered parsers (built-in and installed through the proxyd.parsers "
        "entry-point group), where each comes from, and its policy rule keys.",
    )  # fmt: skip
    parsers.add_argument("--all", action="store_true", help="also list the built-in test parsers (test.*)")
    parsers.set_defaults(func=cmd_parsers)
    exp = sub.add_parser(
        "explain", help="show the policy that applies to a connection",
        description="Show how the config's identities and policy treat a connection from --src to --dst: "
        "both endpoints' labels, the documents that select them, the L3/L4 verdict and the L7 rules.",
    )  # fmt: skip
    exp.add_argument("--config", "-c", type=Path, required=True)
    exp.add_argument("--src", required=True, help="client IP (or IP:PORT)")
    exp.add_argument("--dst", required=True, help="destination IP:PORT ([IPv6]:PORT)")
    exp.add_argument("--listener", help="listener name (default: the one serving the destination port)")
    exp.add_argument("--sni", help="the TLS server name (SNI) the client sends, for serverNames rules")
    exp.set_defaults(func=cmd_explain)
    pol = sub.add_parser("policy", help="manage the running daemon's imported policy (admin API)")
    pol.add_argument("--admin", help="admin address HOST:PORT (default: from --config, else 127.0.0.1:9901)")
    pol.add_argument("--config", "-c", type=Path, help="read the admin socket or address from this config")
    pol.add_argument("--socket", type=Path, help="the admin unix socket (changes need no token there)")
    pol.add_argument("--token-file", type=Path, help="file with the bearer token for changes over TCP")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    imp = psub.add_parser("import", help="add or replace policy documents (CNP YAML or a JSON rule list)")
    imp.add_argument("file")
    psub.add_parser("get", help="print the revision and every document in force")
    dele = psub.add_parser("delete", help="delete an imported document by name")
    dele.add_argument("name")
    pol.set_defaults(func=cmd_policy)
    from proxyd import iptables

    ipt = sub.add_parser(
        "iptables", help="print, apply or remove the nat redirect rules",
        description="Print (default), --apply or --remove the nat rules that send each listener's "
        "redirect: ports to it (docs/deployment.md explains every rule).",
    )  # fmt: skip
    ipt.add_argument("--config", "-c", type=Path, help="config file (not needed with --remove)")
    iptables.add_arguments(ipt)
    ipt.set_defaults(func=cmd_iptables)
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
