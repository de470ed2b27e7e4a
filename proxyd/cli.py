"""The ``proxyd`` command line (argparse: the standard library's well-kept parser is enough)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxyd import __version__
from proxyd.errors import ConfigError, PolicyError
from proxyd.native import IMPLEMENTATION
from proxyd.registry import Registry, RegistryError

if TYPE_CHECKING:
    from proxyd.adminclient import AdminTarget
    from proxyd.config import Config


def _load(config: Path, registry: Registry) -> Config:
    from proxyd.config import load_config

    return load_config(config, registry)


def cmd_run(args: argparse.Namespace) -> int:
    import gc

    import uvloop

    from proxyd.server import run_daemon

    # Loading builds millions of objects and no cyclic garbage: the cycle collector would walk
    # the growing heap again and again. run_daemon turns it back on once loading is done.
    gc.disable()
    try:
        registry = Registry.load()
        config = _load(args.config, registry)  # validate before anything binds
    except (ConfigError, PolicyError) as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    try:
        if config.workers > 1:
            from proxyd.workers import run_control

            gc.enable()
            return uvloop.run(run_control(args.config, config, registry))
        # The config just validated is the one the daemon runs (read once: 100,000 identities
        # take seconds to parse).
        return uvloop.run(run_daemon(args.config, config, registry))
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

        store = PolicyStore(registry, config.policy.paths, config.policy.state_dir,
                            kubernetes=config.kubernetes is not None)  # fmt: skip
        if config.admin is not None and config.admin.token_file is not None:
            from proxyd.admin import read_token

            read_token(config.admin.token_file)  # as the daemon will, at start
    except (ConfigError, PolicyError) as exc:
        return _problems(exc)
    for warning in getattr(store, "warnings", lambda: [])():
        print(f"warning: {warning}", file=sys.stderr)
    from proxyd.policy.loader import selector_key_warnings

    # With a kubernetes source the labels come from the cluster, which check does not ask.
    identity_warnings = [] if config.kubernetes is not None else (
        selector_key_warnings(store.current.documents, config.identities))  # fmt: skip
    for warning in identity_warnings:
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


def _problems(exc: ConfigError | PolicyError) -> int:
    for line in exc.problems:
        print(line, file=sys.stderr)
    return 1


def _explain_targets(args: argparse.Namespace, config: Config | None) -> tuple[list[AdminTarget], str | None]:
    """Where to ask the daemon (in order), or why nowhere: ``--socket``/``--admin``, else the
    config's socket and then its TCP address (an explain is a read: both answer it)."""
    from proxyd import adminclient

    if args.socket or args.admin:
        target = adminclient.resolve(admin=args.admin, socket_path=args.socket, token_file=None,
                                     config=None, config_path=None)  # fmt: skip
        return [target], None
    if config is None or config.admin is None:
        return [], "the config has no admin address or socket"
    adm = config.admin
    targets = [adminclient.AdminTarget(socket=adm.socket)] if adm.socket is not None else []
    if adm.host is not None:
        targets.append(adminclient.AdminTarget(host=adm.host, port=adm.port))
    return targets, None


def _ask_daemon(args: argparse.Namespace, config: Config | None) -> tuple[int | None, str]:
    """Ask the running daemon (GET /v1/explain) and print its answer: (exit code, "") when it
    answered, else (None, why it did not)."""
    from urllib.parse import urlencode

    from proxyd import adminclient

    try:
        targets, why = _explain_targets(args, config)
    except ConfigError as exc:
        return _problems(exc), ""
    params = {"src": args.src, "dst": args.dst}
    if args.listener:
        params["listener"] = args.listener
    if args.sni is not None:
        params["sni"] = args.sni
    failures = [why] if why else []
    for target in targets:
        try:
            status, data = adminclient.request(target, "GET", f"/v1/explain?{urlencode(params)}")
        except OSError as exc:
            failures.append(f"no daemon answers at {target.describe()} ({exc.strerror or exc})")
            continue
        if status == 404:  # a daemon from before /v1/explain
            failures.append(f"the daemon at {target.describe()} has no GET /v1/explain (an older proxyd)")
            continue
        if status != 200:
            for line in data.get("errors", [f"HTTP {status}"]):
                print(f"proxyd explain: {line}", file=sys.stderr)
            return 2, ""
        for warning in data.get("warnings", []):
            print(f"proxyd explain: warning: {warning}", file=sys.stderr)
        runs = data.get("config")
        if args.config is not None and runs and Path(runs).resolve() != args.config.resolve():
            print(f"proxyd explain: the daemon at {target.describe()} runs {runs}, not {args.config}; "
                  "this is its answer", file=sys.stderr)  # fmt: skip
        print(data["text"], end="")
        return 0, ""
    return None, "; ".join(failures)


def cmd_explain(args: argparse.Namespace) -> int:
    from proxyd.explainer import ExplainRefused, explain_connection, parse_dst, parse_src
    from proxyd.policy.identity import IdentityMap
    from proxyd.policy.store import PolicyStore

    try:
        dst = parse_dst(args.dst)
    except ValueError as exc:
        print(f"proxyd explain: --dst: {exc} (IP:PORT or [IPv6]:PORT)", file=sys.stderr)
        return 2
    try:
        src = parse_src(args.src)
    except ValueError as exc:
        print(f"proxyd explain: --src: {exc} (IP, IP:PORT or [IPv6]:PORT)", file=sys.stderr)
        return 2
    if args.config is None and (args.files or not (args.socket or args.admin)):
        print("proxyd explain: give --config (the daemon's config file), or --socket / --admin to ask "
              "a running daemon", file=sys.stderr)  # fmt: skip
        return 2
    config = None
    if args.config is not None:
        try:
            config = _load(args.config, Registry.load())
        except (ConfigError, PolicyError) as exc:
            return _problems(exc)
    why = ""
    if not args.files:
        rc, why = _ask_daemon(args, config)
        if rc is not None:
            return rc
        if config is None:
            print(f"proxyd explain: cannot reach the daemon's admin API: {why}", file=sys.stderr)
            return 1
    assert config is not None
    try:
        store = PolicyStore(Registry.load(), config.policy.paths, config.policy.state_dir,
                            kubernetes=config.kubernetes is not None)  # fmt: skip
    except PolicyError as exc:
        return _problems(exc)
    try:
        answer = explain_connection(config.listeners, store, IdentityMap.from_entries(config.identities),
                                    src, dst, listener=args.listener, sni=args.sni,
                                    default_mode=config.policy.mode)  # fmt: skip
    except ExplainRefused as exc:
        print(f"proxyd explain: {exc}", file=sys.stderr)
        return 2
    if why:
        print(f"proxyd explain: answering from the files alone ({args.config}, its policy.paths and "
              f"policy.state_dir), not from the running daemon: {why}", file=sys.stderr)  # fmt: skip
    for warning in answer.warnings:
        print(f"proxyd explain: warning: {warning}", file=sys.stderr)
    print(answer.as_json()["text"], end="")
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
    parsers.set_defaults(func=cmd_parsers)
    exp = sub.add_parser(
        "explain", help="show the policy that applies to a connection",
        description="Show how identities and policy treat a connection from --src to --dst: both "
        "endpoints' labels, the documents that select them, the L3/L4 verdict and the L7 rules. The "
        "running daemon answers when its admin API is reachable (its live policy, imports included); "
        "otherwise the answer comes from the files alone, and a line on stderr says so.",
    )  # fmt: skip
    exp.add_argument("--config", "-c", type=Path,
                     help="the daemon's config: where its admin API is, and the files to read without it")
    exp.add_argument("--src", required=True, help="client IP (or IP:PORT)")
    exp.add_argument("--dst", required=True, help="destination IP:PORT ([IPv6]:PORT): the original "
                     "destination, or the listener's fixed upstream")  # fmt: skip
    exp.add_argument("--listener", help="listener name (default: the one that judges the destination)")
    exp.add_argument("--socket", type=Path, help="ask the daemon on this admin unix socket")
    exp.add_argument("--admin", help="ask the daemon on this admin address HOST:PORT")
    exp.add_argument("--files", action="store_true",
                     help="answer from the config's files alone, without asking the daemon")
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
