"""The nat rules that send a listener's destination ports to it (``proxyd iptables``).

Why this module exists: getting transparent redirection right by hand is where deployments break.
The rules must never loop proxyd's own upstream connections back into proxyd, must be applied
atomically, must survive being applied twice, and must come off again without touching anybody
else's rules (Docker, kube-proxy, a CNI). So proxyd owns two chains in the ``nat`` table and
nothing else:

- ``PROXYD_PREROUTING`` (jumped to from ``PREROUTING``): inbound traffic arriving on an interface;
- ``PROXYD_OUTPUT`` (jumped to from ``OUTPUT``): outbound traffic from local processes.

Each chain holds, per listener and destination port, ``RETURN`` rules for the excluded sources and
destinations and then one ``REDIRECT --to-ports LISTENER_PORT``. In ``PROXYD_OUTPUT`` every port
also first returns for loopback destinations (``127.0.0.0/8``, ``::1``: local-to-local traffic is
outside the network policy, and it is where a redirected connection already points) and for
proxyd's own upstream sockets, matched by owner uid (``-m owner --uid-owner``) and/or by the
``SO_MARK`` the daemon sets when ``upstream_mark`` is configured (``-m mark --mark``). An outbound
redirect without either exclusion is refused: it would loop (see docs/deployment.md).

How it is applied, and why that way: ``iptables-restore --noflush`` applies a whole ``*nat`` block
as one transaction, and a chain declared in it (``:PROXYD_OUTPUT - [0:0]``) is created when absent
and flushed when present, so re-applying replaces proxyd's rules atomically. The jump from the
built-in chain is the one line that restore format cannot make idempotent: ``-I`` duplicates it and
``-D`` aborts the transaction when it is absent. So :func:`apply` first reads ``iptables-save -t
nat``, and the restore input inserts the jump only where none exists (and deletes duplicates a
crashed hand-run may have left). A concurrent writer between the read and the restore can at worst
leave a duplicate jump, which the next apply removes. :func:`remove` reads the table the same way
and deletes exactly the rules that jump into ``PROXYD_*`` chains and those chains; the chain prefix
``PROXYD_`` is reserved for proxyd.

The jump is inserted first in its built-in chain so proxyd sees a connection before another nat
rule (kube-proxy's service DNAT, Docker's port mapping) rewrites it: in the nat table the first
NAT target that matches wins.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TextIO

from proxyd.errors import ProxydError

__all__ = [
    "CHAINS",
    "DIRECTIONS",
    "IptablesError",
    "Redirect",
    "add_arguments",
    "apply",
    "families_of",
    "read_nat",
    "redirects_from_listeners",
    "remove",
    "render",
    "render_remove",
    "resolve_uid",
    "run",
]

DIRECTIONS = ("inbound", "outbound", "both")
#: proxyd's chains, keyed by the built-in chain that jumps into them.
CHAINS = {"PREROUTING": "PROXYD_PREROUTING", "OUTPUT": "PROXYD_OUTPUT"}
CHAIN_PREFIX = "PROXYD_"
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_IFACE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/=+-]")
#: ``PROXYD_IPTABLES_MODE=legacy`` (or ``nft``) picks that variant of the tools explicitly, for a
#: container whose default differs from the host's: both backends must not be mixed on one host.
MODE_ENV = "PROXYD_IPTABLES_MODE"


class IptablesError(ProxydError):
    """The redirect rules could not be rendered or applied; the message carries the tool's stderr."""


@dataclass(frozen=True, slots=True)
class Redirect:
    """Destination ports of one direction that iptables sends to one listener."""

    listener: str
    to_port: int
    ports: tuple[int, ...]
    direction: str
    interfaces: tuple[str, ...] = ()
    exclude_src: tuple[str, ...] = ()
    exclude_dst: tuple[str, ...] = ()
    ipv4: bool = True
    ipv6: bool = False

    def __post_init__(self) -> None:
        where = f"listener {self.listener!r}: redirect"
        if self.direction not in DIRECTIONS:
            raise IptablesError(f"{where}: direction must be one of {', '.join(DIRECTIONS)}")
        if not self.ports:
            raise IptablesError(f"{where}: ports: at least one port is needed")
        for p in (*self.ports, self.to_port):
            if not 1 <= p <= 65535:
                raise IptablesError(f"{where}: port {p} out of range 1-65535")
        if self.to_port in self.ports:
            raise IptablesError(f"{where}: ports include the listener's own port {self.to_port}")
        if len(set(self.ports)) != len(self.ports):
            raise IptablesError(f"{where}: ports: duplicate port")
        if self.interfaces and self.direction == "outbound":
            raise IptablesError(f"{where}: interfaces apply to inbound traffic only")
        for i in self.interfaces:
            if not _IFACE.match(i):
                raise IptablesError(f"{where}: interfaces: bad interface name {i!r}")
        for c in (*self.exclude_src, *self.exclude_dst):
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError as exc:
                raise IptablesError(f"{where}: bad CIDR {c!r}: {exc}") from exc
        if not (self.ipv4 or self.ipv6):
            raise IptablesError(f"{where}: neither IPv4 nor IPv6")

    @property
    def inbound(self) -> bool:
        return self.direction in ("inbound", "both")

    @property
    def outbound(self) -> bool:
        return self.direction in ("outbound", "both")


def families_of(host: str) -> tuple[bool, bool]:
    """(ipv4, ipv6) served by a listener bound to ``host``: ``0.0.0.0`` or an IPv4 address gives
    IPv4 only, ``::`` both (a dual-stack socket), any other IPv6 address IPv6 only."""
    addr = ipaddress.ip_address(host.strip("[]"))
    if addr.version == 4:
        return True, False
    return addr == ipaddress.IPv6Address("::"), True


class RedirectLike(Protocol):
    @property
    def ports(self) -> tuple[int, ...]: ...
    @property
    def direction(self) -> str: ...
    @property
    def interfaces(self) -> tuple[str, ...]: ...
    @property
    def exclude_src(self) -> tuple[str, ...]: ...
    @property
    def exclude_dst(self) -> tuple[str, ...]: ...


class ListenerLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def redirect(self) -> RedirectLike | None: ...


class ConfigLike(Protocol):
    @property
    def listeners(self) -> Sequence[ListenerLike]: ...
    @property
    def upstream_mark(self) -> int | None: ...


def redirects_from_listeners(listeners: Iterable[ListenerLike]) -> list[Redirect]:
    """The :class:`Redirect` of every listener that has a ``redirect`` block. Raises
    :class:`IptablesError` on a bad block or when two listeners claim the same port and direction."""
    out: list[Redirect] = []
    for lc in listeners:
        red = lc.redirect
        if red is None:
            continue
        v4, v6 = families_of(lc.host)
        out.append(
            Redirect(
                listener=lc.name,
                to_port=lc.port,
                ports=tuple(int(p) for p in red.ports),
                direction=red.direction,
                interfaces=tuple(red.interfaces),
                exclude_src=tuple(red.exclude_src),
                exclude_dst=tuple(red.exclude_dst),
                ipv4=v4,
                ipv6=v6,
            )
        )
    _check_conflicts(out)
    return out


def _check_conflicts(redirects: Iterable[Redirect]) -> None:
    seen: dict[tuple[str, int, int], str] = {}
    for r in redirects:
        for chain in _chains_of(r):
            for fam in _families(r):
                for port in r.ports:
                    other = seen.setdefault((chain, fam, port), r.listener)
                    if other != r.listener:
                        raise IptablesError(
                            f"listeners {other!r} and {r.listener!r} both redirect port {port} "
                            f"({'inbound' if chain == 'PREROUTING' else 'outbound'}, IPv{fam})"
                        )


def _chains_of(r: Redirect) -> list[str]:
    return [c for c, on in (("PREROUTING", r.inbound), ("OUTPUT", r.outbound)) if on]


def _families(r: Redirect) -> list[int]:
    return [f for f, on in ((4, r.ipv4), (6, r.ipv6)) if on]


def _cidrs(cidrs: Iterable[str], family: int) -> list[str]:
    nets = (ipaddress.ip_network(c, strict=False) for c in cidrs)
    return [str(n) for n in nets if n.version == family]


def _comment(listener: str) -> str:
    return f'-m comment --comment "proxyd:{_COMMENT_UNSAFE.sub("_", listener)[:200]}"'


def _rule(chain: str, port: int, target: str, *, src: str = "", dst: str = "", iface: str = "",
          match: str = "", comment: str = "") -> str:  # fmt: skip
    # Option order is iptables-save's canonical order, so rendered rules and saved rules compare
    # equal line by line (the root tests rely on it; so can an operator's diff).
    parts = [f"-A {chain}"]
    if src:
        parts.append(f"-s {src}")
    if dst:
        parts.append(f"-d {dst}")
    if iface:
        parts.append(f"-i {iface}")
    parts.append(f"-p tcp -m tcp --dport {port}")
    if match:
        parts.append(match)
    if comment:
        parts.append(comment)
    parts.append(f"-j {target}")
    return " ".join(parts)


def _chain_rules(redirects: Sequence[Redirect], builtin: str, family: int,
                 uid: int | None, mark: int | None) -> list[str]:  # fmt: skip
    chain = CHAINS[builtin]
    rules: list[str] = []
    for r in redirects:
        if family not in _families(r) or builtin not in _chains_of(r):
            continue
        c = _comment(r.listener)
        for port in r.ports:
            if builtin == "OUTPUT":
                rules.append(_rule(chain, port, "RETURN", dst=_LOOPBACK[family], comment=c))
                if uid is not None:
                    rules.append(_rule(chain, port, "RETURN", match=f"-m owner --uid-owner {uid}", comment=c))
                if mark is not None:
                    rules.append(_rule(chain, port, "RETURN", match=f"-m mark --mark {mark:#x}", comment=c))
            for s in _cidrs(r.exclude_src, family):
                rules.append(_rule(chain, port, "RETURN", src=s, comment=c))
            for d in _cidrs(r.exclude_dst, family):
                rules.append(_rule(chain, port, "RETURN", dst=d, comment=c))
            target = f"REDIRECT --to-ports {r.to_port}"
            if builtin == "PREROUTING" and r.interfaces:
                rules.extend(_rule(chain, port, target, iface=i, comment=c) for i in r.interfaces)
            else:
                rules.append(_rule(chain, port, target, comment=c))
    return rules


def render(
    redirects: Sequence[Redirect],
    *,
    family: int,
    uid: int | None,
    mark: int | None,
    existing_jumps: dict[str, int] | None = None,
) -> str:
    """``iptables-restore --noflush`` input (``ip6tables-restore`` for ``family=6``) that creates or
    flushes proxyd's chains, fills them, and jumps into them from PREROUTING and OUTPUT.

    ``existing_jumps`` counts the jumps already present per built-in chain (from :func:`read_nat`):
    a missing jump is inserted at position 1, duplicates are deleted. ``None`` assumes a table
    without proxyd's jumps, which is right for a first application and for reading.
    Raises :class:`IptablesError` for an outbound redirect without a ``uid`` or ``mark`` exclusion
    (it would loop) or for a bad uid or mark.
    """
    if family not in (4, 6):
        raise IptablesError(f"family must be 4 or 6, not {family!r}")
    if uid is not None and not 0 <= uid < 2**32:
        raise IptablesError(f"uid {uid} out of range")
    if mark is not None and not 0 < mark < 2**32:
        raise IptablesError(f"mark {mark} out of range 1-0xffffffff (0 would match every unmarked packet)")
    redirects = list(redirects)
    _check_conflicts(redirects)
    if any(r.outbound for r in redirects) and uid is None and mark is None:
        names = ", ".join(r.listener for r in redirects if r.outbound)
        raise IptablesError(
            f"outbound redirect ({names}) needs --uid or --mark (upstream_mark) to exclude proxyd's own "
            "upstream connections; without it they would be redirected back to proxyd in a loop"
        )
    lines = ["*nat"]
    # Chains in iptables-save's order (by name), so the rendered rules read like the saved ones.
    order = sorted(CHAINS, key=CHAINS.__getitem__)
    lines += [f":{CHAINS[b]} - [0:0]" for b in order]
    for builtin in order:
        lines += _chain_rules(redirects, builtin, family, uid, mark)
    for builtin, chain in CHAINS.items():
        have = (existing_jumps or {}).get(builtin, 0)
        if have == 0:
            lines.append(f"-I {builtin} 1 -j {chain}")
        lines += [f"-D {builtin} -j {chain}"] * max(0, have - 1)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class NatState:
    """What proxyd needs to know of a saved nat table: its chains and the rules jumping into them."""

    chains: tuple[str, ...]
    jumps: tuple[tuple[str, str], ...]  # (chain holding the rule, rule spec after "-A CHAIN ")
    rules: tuple[str, ...]  # every "-A" line, in order

    def jump_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CHAINS, 0)
        for chain, spec in self.jumps:
            if chain in counts and spec == f"-j {CHAINS[chain]}":
                counts[chain] += 1
        return counts


def parse_nat(saved: str) -> NatState:
    """Parse ``iptables-save -t nat`` output."""
    chains: list[str] = []
    jumps: list[tuple[str, str]] = []
    rules: list[str] = []
    in_nat = False
    for line in saved.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif not in_nat:
            continue
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            rules.append(line)
            _, chain, spec = line.split(" ", 2)
            target = re.search(r"(?:^| )-[jg] (\S+)", spec)
            if target and target.group(1).startswith(CHAIN_PREFIX) and not chain.startswith(CHAIN_PREFIX):
                jumps.append((chain, spec))
    return NatState(tuple(chains), tuple(jumps), tuple(rules))


def render_remove(state: NatState) -> str | None:
    """Restore input deleting proxyd's jumps and chains from ``state``; None when there are none."""
    ours = [c for c in state.chains if c.startswith(CHAIN_PREFIX)]
    if not ours and not state.jumps:
        return None
    lines = ["*nat"]
    lines += [f"-D {chain} {spec}" for chain, spec in state.jumps]
    lines += [f"-F {c}" for c in ours]
    lines += [f"-X {c}" for c in ours]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _tool(family: int, verb: str) -> str:
    mode = os.environ.get(MODE_ENV, "")
    if mode not in ("", "nft", "legacy"):
        raise IptablesError(f"{MODE_ENV} must be 'nft' or 'legacy', not {mode!r}")
    base = "iptables" if family == 4 else "ip6tables"
    return f"{base}-{mode}-{verb}" if mode else f"{base}-{verb}"


def _wrap(cmd: list[str], netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd] if netns else cmd


def _run(cmd: list[str], netns: str | None, stdin: str | None = None) -> str:
    full = _wrap(cmd, netns)
    if shutil.which(full[0]) is None:
        raise IptablesError(f"{full[0]} not found on PATH")
    try:
        proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IptablesError(f"{' '.join(full)}: {exc}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise IptablesError(f"{' '.join(cmd)} failed: {detail}" + (f"\ninput was:\n{stdin}" if stdin else ""))
    return proc.stdout


def read_nat(family: int = 4, *, netns: str | None = None) -> NatState:
    """The current nat table of ``family`` (via ``iptables-save``). Raises :class:`IptablesError`."""
    return parse_nat(_run([_tool(family, "save"), "-t", "nat"], netns))


def _restore(family: int, text: str, netns: str | None) -> None:
    _run([_tool(family, "restore"), "-w", "--noflush"], netns, stdin=text)


def apply(
    redirects: Sequence[Redirect],
    uid: int | None,
    mark: int | None,
    *,
    ipv6: bool,
    netns: str | None = None,
) -> None:
    """Install the rules for ``redirects`` atomically per family (IPv4 always; IPv6 when ``ipv6``),
    replacing whatever proxyd installed before. With ``ipv6`` false, proxyd's IPv6 chains from an
    earlier configuration are removed where ip6tables works. ``netns`` runs the tools inside that
    named network namespace (``ip netns exec``). Raises :class:`IptablesError` with the tool's stderr.
    """
    redirects = list(redirects)
    families = [4, 6] if ipv6 else [4]
    # Render everything first: a bad configuration changes nothing.
    for fam in families:
        render(redirects, family=fam, uid=uid, mark=mark)
    for fam in families:
        state = read_nat(fam, netns=netns)
        _restore(fam, render(redirects, family=fam, uid=uid, mark=mark,
                             existing_jumps=state.jump_counts()), netns)  # fmt: skip
    if not ipv6:
        _remove_family(6, netns, best_effort=True)


def _remove_family(family: int, netns: str | None, *, best_effort: bool) -> None:
    try:
        text = render_remove(read_nat(family, netns=netns))
    except IptablesError:
        if best_effort:  # no ip6tables, or IPv6 disabled in the kernel: nothing of ours there
            return
        raise
    if text is not None:
        _restore(family, text, netns)


def remove(*, ipv6: bool = True, netns: str | None = None) -> None:
    """Delete proxyd's jumps and chains (IPv4, and IPv6 where ip6tables works when ``ipv6``),
    leaving every other rule as it was. Doing it when nothing is installed is a no-op.
    Raises :class:`IptablesError` with the tool's stderr."""
    _remove_family(4, netns, best_effort=False)
    if ipv6:
        _remove_family(6, netns, best_effort=True)


def resolve_uid(value: str) -> int:
    """A uid given as a number or a user name. Raises :class:`IptablesError` for an unknown user."""
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError as exc:
        raise IptablesError(f"--uid: no such user {value!r}") from exc


# --- command line (``proxyd iptables``; wired by proxyd.cli) -----------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``proxyd iptables`` (``--config`` is the CLI's own and optional with --remove)."""
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="install the rules (iptables-restore)")
    action.add_argument("--remove", action="store_true", help="remove proxyd's chains and jumps")
    excl = parser.add_argument_group("loop exclusion for outbound redirects")
    excl.add_argument("--uid", help="user (name or number) whose connections are never redirected")
    excl.add_argument(
        "--mark", type=lambda s: int(s, 0),
        help="SO_MARK of proxyd's upstream sockets (default: the config's upstream_mark)",
    )  # fmt: skip
    parser.add_argument("--netns", help="run iptables inside this named network namespace")


NO_REDIRECT_HINT = (
    "proxyd iptables: no listener has a redirect: block, so no port is redirected (the PROXYD_ chains "
    "stay empty); add redirect: {ports: [...]} to the listeners iptables should feed (docs/deployment.md)"
)


def run(args: argparse.Namespace, config: ConfigLike | None, out: TextIO) -> int:
    """Carry out ``proxyd iptables``: print the restore input (default), ``--apply`` or ``--remove``.
    ``config`` may be None only with ``--remove``. Raises :class:`IptablesError`; returns 0."""
    if args.remove:
        remove(netns=args.netns)
        return 0
    if config is None:
        raise IptablesError("--config is required unless --remove")
    uid = resolve_uid(args.uid) if args.uid is not None else None
    mark = args.mark if args.mark is not None else config.upstream_mark
    redirects = redirects_from_listeners(config.listeners)
    if not redirects:
        print(NO_REDIRECT_HINT, file=sys.stderr)
    ipv6 = any(r.ipv6 for r in redirects)
    if args.apply:
        apply(redirects, uid, mark, ipv6=ipv6, netns=args.netns)
        return 0
    out.write("# IPv4: iptables-restore -w --noflush\n")
    out.write(render(redirects, family=4, uid=uid, mark=mark))
    if ipv6:
        out.write("# IPv6: ip6tables-restore -w --noflush\n")
        out.write(render(redirects, family=6, uid=uid, mark=mark))
    return 0
