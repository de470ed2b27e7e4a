"""The daemon configuration (docs/configuration.md): loaded once, validated whole, frozen.

Every problem is reported as ``file:line: key: problem`` and all of them are collected before
:class:`ConfigError` is raised, so an operator fixes a file in one pass and the daemon never
starts half-configured. Listener ``parser_config`` is validated by the parser's own factory.
"""

from __future__ import annotations

import codecs
import ipaddress
import locale
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyd.errors import ConfigError, ParserConfigError
from proxyd.policy.identity import LabelInterner, fast_cidr
from proxyd.policy.model import ENTITIES
from proxyd.registry import Registry
from proxyd.yamlsrc import LList, LMap, TextParts, Where, YamlSyntaxError, load_one

DIRECTIONS = ("ingress", "egress")
POLICY_MODES = ("enforce", "audit")
LOG_REQUESTS = ("all", "denied", "none")
REDIRECT_DIRECTIONS = ("inbound", "outbound", "both")
#: admin.idle_timeout's default: far longer than an answer takes, short enough that idle clients
#: do not hold the admin API's few connections for long (a scraper that waits longer reconnects).
ADMIN_IDLE_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """Which destination ports iptables sends to a listener (see ``proxyd iptables``)."""

    ports: tuple[int, ...]
    direction: str = "inbound"
    interfaces: tuple[str, ...] = ()
    exclude_src: tuple[str, ...] = ()
    exclude_dst: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    l7proto: str | None = None
    upstream: tuple[str, int] | None = None  # None: the original destination
    direction: str = "ingress"
    parser_config: Mapping[str, Any] = field(default_factory=dict)
    parser_settings: Any = None  # what the factory's validate_config returned
    policy_mode: str | None = None  # None: the global mode
    redirect: RedirectConfig | None = None
    idle_timeout: float | None = None  # None: limits.idle_timeout; 0: off
    request_timeout: float | None = None  # None: limits.request_timeout; 0: off

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    paths: tuple[Path, ...] = ()
    mode: str = "enforce"
    state_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"
    requests: str = "all"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str | None = "127.0.0.1"  # None: no TCP address (the unix socket only)
    port: int = 9901
    allow_remote: bool = False
    #: Unix socket serving the whole API, changes included (mode 0600: its permissions are
    #: the access control).
    socket: Path | None = None
    #: File holding the bearer token that allows changes over the TCP address too.
    token_file: Path | None = None
    #: An admin connection with no request in progress for this long is closed (keep-alive
    #: included), so a few idle clients cannot hold the admin API's few connections.
    idle_timeout: float = ADMIN_IDLE_TIMEOUT


@dataclass(frozen=True, slots=True)
class Limits:
    buffer_bytes: int = 1 << 20
    max_connections: int = 10000
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    idle_timeout: float = 3600.0  # no byte either way for this long: close (0: off)
    request_timeout: float = 30.0  # a partial request waiting on MORE this long: close (0: off)


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """Where to read identities and policies from a cluster (docs/kubernetes.md)."""

    kubeconfig: Path | None = None  # None: in-cluster (service-account token and CA)
    cluster_name: str = "default"
    node_name: str | None = None  # None: $NODE_NAME when the daemon starts, else no node is `host`
    identities: bool = True
    policies: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    identities: tuple[tuple[str, Mapping[str, str]], ...] = ()
    policy: PolicyConfig = PolicyConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    admin: AdminConfig | None = None
    limits: Limits = Limits()
    upstream_mark: int | None = None
    #: Worker processes (docs/configuration.md "workers"); 1 is the single-process daemon.
    workers: int = 1
    source: Path | None = None
    kubernetes: KubernetesConfig | None = None

    def listener(self, name: str) -> ListenerConfig:
        for lc in self.listeners:
            if lc.name == name:
                return lc
        raise KeyError(name)


# --- parsing helpers -------------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, where: Where, key: str, problem: str) -> None:
        self.lines.append(f"{where}: {key}: {problem}")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
}  # fmt: skip


def parse_duration(value: Any) -> float:
    """Seconds from ``5``, ``1.5``, ``"500ms"``, ``"10s"``, ``"2m"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 5s or 500ms")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"must be a duration such as 5s or 500ms, not {value!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a size in bytes")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"must be a size such as 1048576 or 1MiB, not {value!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_port(value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a port number")
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a port number, not {value!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def parse_bind(value: Any) -> tuple[str, int]:
    """A listen address; port 0 picks a free port (tests use it)."""
    return parse_hostport(value, allow_zero=True)


def parse_hostport(value: Any, *, allow_name: bool = False, allow_zero: bool = False) -> tuple[str, int]:
    """``"1.2.3.4:80"``, ``"[::1]:80"`` (and ``"name:80"`` when allowed) -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string HOST:PORT, not {value!r}")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be [IPv6]:PORT, not {value!r}")
        ipaddress.IPv6Address(host)
        return host, parse_port(rest, allow_zero=allow_zero)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, not {value!r}")
    if ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port}")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not allow_name:
            raise ValueError(f"{host!r} is not an IP address") from None
    return host, parse_port(port, allow_zero=allow_zero)


def _section(parent: LMap, key: str, problems: _Problems, path: str, known: tuple[str, ...]) -> LMap | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, LMap):
        problems.add(parent.where_of(key), path, "must be a mapping")
        return None
    for k in value:
        if k not in known:
            problems.add(value.where_of(k), f"{path}.{k}", f"unknown key (known: {', '.join(known)})")
    return value


def _get(
    m: LMap,
    key: str,
    path: str,
    problems: _Problems,
    conv: Callable[[Any], Any],
    default: Any,
) -> Any:
    if key not in m or m[key] is None:
        return default
    try:
        return conv(m[key])
    except (ValueError, TypeError) as exc:
        problems.add(m.where_of(key), f"{path}.{key}" if path else key, str(exc))
        return default


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}, not {v!r}")
        return str(v)

    return conv


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, not {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {v!r}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be an integer, not {v!r}")
    return v


def _positive(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(v: Any) -> Any:
        out = conv(v)
        if out <= 0:
            raise ValueError("must be greater than 0")
        return out

    return wrapped


#: More workers than this is a typo, not a machine: each one is a whole process.
MAX_WORKERS = 1024


def parse_workers(v: Any) -> int:
    """``workers``: a count, or ``auto`` for the CPUs this process may run on (its affinity
    mask, which honours taskset and a container's cpuset; not the machine's core count)."""
    if v == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be a number of worker processes or auto, not {v!r}")
    if not 1 <= v <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS} (or auto), not {v}")
    return v


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("must be a list of strings")
    return tuple(v)


def _cidr_list(v: Any) -> tuple[str, ...]:
    out = _str_list(v)
    for c in out:
        ipaddress.ip_network(c, strict=False)
    return out


def _port_list(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError("must be a non-empty list of ports")
    return tuple(parse_port(p) for p in v)


def _log_path_problem(path: Path) -> str | None:
    """Why the access log cannot be a file at ``path``, or None.

    The daemon creates the file, never its directory: a directory that does not exist is a typo
    or a missing volume, and one created by a root-started daemon would belong to root.
    """
    parent = path.parent
    if not parent.exists():
        return f"the directory {parent} does not exist (proxyd creates the log file, not its directory)"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if path.is_dir():
        return f"{path} is a directory; name a file in it"
    return None


def _line_of(problem: str) -> int:
    parts = problem.split(":", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


# --- the loader ------------------------------------------------------------------------------

_TOP = (
    "listeners", "identities", "policy", "access_log", "admin", "limits", "upstream_mark", "workers",
    "kubernetes",
)  # fmt: skip
_KUBERNETES = ("kubeconfig", "cluster_name", "node_name", "identities", "policies")
_LISTENER = (
    "name", "address", "l7proto", "upstream", "direction", "parser_config", "policy_mode", "redirect",
    "idle_timeout", "request_timeout",
)  # fmt: skip


def load_config(path: str | Path, registry: Registry | None = None) -> Config:
    """Read and validate a config file. Raises :class:`ConfigError` listing every problem."""
    path = Path(path)
    try:
        text = read_parts(path)
    except OSError as exc:
        raise ConfigError([f"{path}:0: cannot read config: {exc.strerror or exc}"]) from exc
    return parse_config(text, path, registry or Registry.load())


#: Bytes decoded per call by :func:`read_parts`.
READ_SLICE = 1 << 16


def read_parts(path: Path) -> TextParts:
    """The file's text as :meth:`Path.read_text` gives it (the locale's encoding, universal
    newlines), decoded a slice at a time and kept in parts. A large config (100,000 identities:
    7 MB) is never one string: decoding or joining it is one call that writes 7 MB of memory
    the process touches for the first time, holding the interpreter lock for 10-20 ms and so
    stalling the event loop while a SIGHUP reload reads it on a worker thread."""
    decoder = codecs.getincrementaldecoder(locale.getpreferredencoding(False))()
    parts: list[str] = []
    carry = ""  # a CR at the end of a slice: the next may start with its LF
    with path.open("rb") as f:
        while True:
            data = f.read(READ_SLICE)
            final = not data
            part = carry + decoder.decode(data, final)
            carry = "\r" if part.endswith("\r") and not final else ""
            if carry:
                part = part[:-1]
            if "\r" in part:
                part = part.replace("\r\n", "\n").replace("\r", "\n")
            if part:
                parts.append(part)
            if final:
                return TextParts(parts)


def read_text(path: Path) -> str:
    """The file's text as :meth:`Path.read_text` gives it, read as :func:`read_parts` reads it."""
    return str(read_parts(path))


def parse_config(text: str | TextParts, path: Path, registry: Registry) -> Config:
    file = str(path)
    try:
        doc = load_one(text, file)
    except YamlSyntaxError as exc:
        raise ConfigError([str(exc)]) from exc
    p = _Problems()
    if not isinstance(doc, LMap):
        raise ConfigError([f"{file}:1: (top): the config must be a mapping with a 'listeners' list"])
    for k in doc:
        if k not in _TOP:
            p.add(doc.where_of(k), k, f"unknown key (known: {', '.join(_TOP)})")
    base = path.parent

    listeners = _listeners(doc, p, registry)
    identities = _identities(doc, p)

    pol = _section(doc, "policy", p, "policy", ("paths", "mode", "state_dir"))
    policy = PolicyConfig()
    if pol is not None:
        paths = _get(pol, "paths", "policy", p, _str_list, ())
        state_dir = _get(pol, "state_dir", "policy", p, _str, None)
        raw_paths = pol.get("paths")
        for i, x in enumerate(paths):
            if not (base / x).exists() and isinstance(raw_paths, LList):
                p.add(raw_paths.where_of(i), f"policy.paths[{i}]", f"no such file or directory: {base / x}")
        policy = PolicyConfig(
            paths=tuple(base / x for x in paths),
            mode=_get(pol, "mode", "policy", p, _choice(POLICY_MODES), "enforce"),
            state_dir=(base / state_dir) if state_dir else None,
        )

    alog = _section(doc, "access_log", p, "access_log", ("path", "requests"))
    access_log = AccessLogConfig()
    if alog is not None:
        lp = _get(alog, "path", "access_log", p, _str, "-")
        if lp != "-":
            problem = _log_path_problem(base / lp)
            if problem:
                p.add(alog.where_of("path"), "access_log.path", problem)
        access_log = AccessLogConfig(
            path=lp if lp == "-" else str(base / lp),
            requests=_get(alog, "requests", "access_log", p, _choice(LOG_REQUESTS), "all"),
        )

    adm = _section(
        doc, "admin", p, "admin", ("address", "allow_remote", "socket", "token_file", "idle_timeout")
    )
    admin: AdminConfig | None = None
    if adm is not None and (adm.get("address") is not None or adm.get("socket") is not None):
        host: str | None = None
        port = 9901
        if adm.get("address") is not None:
            host, port = _get(adm, "address", "admin", p, parse_bind, ("127.0.0.1", 9901))
        allow_remote = _get(adm, "allow_remote", "admin", p, _bool, False)
        if host is not None and not allow_remote and not ipaddress.ip_address(host).is_loopback:
            p.add(
                adm.where_of("address"),
                "admin.address",
                f"{host} is not a loopback address; set admin.allow_remote: true to expose the admin API",
            )
        sock = _get(adm, "socket", "admin", p, _str, None)
        token = _get(adm, "token_file", "admin", p, _str, None)
        # Read when the admin server starts (not here: `proxyd iptables` and the CLI load this
        # file as users who need not be able to read the token).
        token_file = (base / token) if token else None
        idle = _get(adm, "idle_timeout", "admin", p, _positive(parse_duration), ADMIN_IDLE_TIMEOUT)
        admin = AdminConfig(host, port, allow_remote, (base / sock) if sock else None, token_file, idle)
    elif adm is not None and adm.get("token_file") is not None:
        p.add(adm.where_of("token_file"), "admin.token_file", "needs admin.address (the token guards it)")

    lim = _section(
        doc, "limits", p, "limits",
        ("buffer_bytes", "max_connections", "connect_timeout", "drain_timeout", "idle_timeout",
         "request_timeout"),
    )  # fmt: skip
    limits = Limits()
    if lim is not None:
        limits = Limits(
            buffer_bytes=_get(lim, "buffer_bytes", "limits", p, _positive(parse_size), 1 << 20),
            max_connections=_get(lim, "max_connections", "limits", p, _positive(_int), 10000),
            connect_timeout=_get(lim, "connect_timeout", "limits", p, _positive(parse_duration), 5.0),
            drain_timeout=_get(lim, "drain_timeout", "limits", p, parse_duration, 10.0),
            idle_timeout=_get(lim, "idle_timeout", "limits", p, parse_duration, 3600.0),
            request_timeout=_get(lim, "request_timeout", "limits", p, parse_duration, 30.0),
        )
    mark = _get(doc, "upstream_mark", "", p, _positive(_int), None)
    kubernetes = _kubernetes(doc, p, base)
    workers = _get(doc, "workers", "", p, parse_workers, 1)
    zero = [lc.name for lc in listeners if lc.port == 0]
    if workers > 1 and zero:
        # Each worker binds the address itself: port 0 would give each a different port.
        p.add(doc.where_of("workers"), "workers",
              f"listeners {', '.join(zero)} have port 0; more than one worker needs fixed ports")  # fmt: skip
    dismantle(doc.get("identities"))
    if p.lines:
        raise ConfigError(sorted(p.lines, key=_line_of))
    return Config(
        listeners=tuple(listeners),
        identities=tuple(identities),
        policy=policy,
        access_log=access_log,
        admin=admin,
        limits=limits,
        upstream_mark=mark,
        workers=workers,
        source=path,
        kubernetes=kubernetes,
    )


def _kubernetes(doc: LMap, p: _Problems, base: Path) -> KubernetesConfig | None:
    if "kubernetes" in doc and doc.get("kubernetes") is None:
        return KubernetesConfig()  # `kubernetes:` alone: every default (in-cluster)
    kube = _section(doc, "kubernetes", p, "kubernetes", _KUBERNETES)
    if kube is None:
        return None
    kubeconfig = _get(kube, "kubeconfig", "kubernetes", p, _str, None)
    if kubeconfig is not None and not (base / kubeconfig).is_file():
        p.add(kube.where_of("kubeconfig"), "kubernetes.kubeconfig", f"no such file: {base / kubeconfig}")
    return KubernetesConfig(
        kubeconfig=(base / kubeconfig) if kubeconfig else None,
        cluster_name=_get(kube, "cluster_name", "kubernetes", p, _str, "default"),
        node_name=_get(kube, "node_name", "kubernetes", p, _str, None),
        identities=_get(kube, "identities", "kubernetes", p, _bool, True),
        policies=_get(kube, "policies", "kubernetes", p, _bool, True),
    )


def _listeners(doc: LMap, p: _Problems, registry: Registry) -> list[ListenerConfig]:
    raw = doc.get("listeners")
    if not isinstance(raw, LList) or not raw:
        p.add(doc.where_of("listeners") if "listeners" in doc else doc.where, "listeners",
              "required: a non-empty list of listeners")  # fmt: skip
        return []
    out: list[ListenerConfig] = []
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    for i, item in enumerate(raw):
        path = f"listeners[{i}]"
        if not isinstance(item, LMap):
            p.add(raw.where_of(i), path, "must be a mapping")
            continue
        name = _get(item, "name", path, p, _str, None)
        if name is None and "name" not in item:
            p.add(item.where, f"{path}.name", "required")
        elif name in names:
            p.add(item.where_of("name"), f"{path}.name", f"duplicate listener name {name!r}")
        elif name is not None:
            names.add(name)
            path = f"listeners[{name}]"
        for k in item:
            if k not in _LISTENER:
                p.add(item.where_of(k), f"{path}.{k}", f"unknown key (known: {', '.join(_LISTENER)})")
        if "address" not in item:
            p.add(item.where, f"{path}.address", "required")
        hostport = _get(item, "address", path, p, parse_bind, None)
        if hostport is not None:
            if hostport in addresses and hostport[1] != 0:
                p.add(item.where_of("address"), f"{path}.address", "another listener uses this address")
            addresses.add(hostport)
        l7proto = _get(item, "l7proto", path, p, _str, None)
        settings: Any = None
        pconf = item.get("parser_config") or LMap()
        if not isinstance(pconf, dict):
            p.add(item.where_of("parser_config"), f"{path}.parser_config", "must be a mapping")
            pconf = LMap()
        if l7proto is not None:
            if l7proto not in registry:
                known = ", ".join(n for n, _ in registry.items())
                p.add(
                    item.where_of("l7proto"),
                    f"{path}.l7proto",
                    f"unknown parser {l7proto!r} (known: {known})",
                )
            else:
                try:
                    settings = registry.get(l7proto).validate_config(dict(pconf))
                except ParserConfigError as exc:
                    key = f"{path}.parser_config" + (f".{exc.key}" if exc.key else "")
                    where = pconf.where_of(exc.key) if isinstance(pconf, LMap) and exc.key else (
                        item.where_of("parser_config"))  # fmt: skip
                    p.add(where, key, str(exc))
        elif pconf:
            p.add(item.where_of("parser_config"), f"{path}.parser_config", "needs an l7proto")
        upstream_raw = item.get("upstream", "original-destination")
        upstream: tuple[str, int] | None = None
        if upstream_raw != "original-destination":
            upstream = _get(item, "upstream", path, p, lambda v: parse_hostport(v, allow_name=True), None)
        red = _section(
            item, "redirect", p, f"{path}.redirect",
            ("ports", "direction", "interfaces", "exclude_src", "exclude_dst"),
        )  # fmt: skip
        redirect: RedirectConfig | None = None
        if red is not None:
            rpath = f"{path}.redirect"
            if "ports" not in red:
                p.add(red.where, f"{rpath}.ports", "required")
            redirect = RedirectConfig(
                ports=_get(red, "ports", rpath, p, _port_list, ()),
                direction=_get(red, "direction", rpath, p, _choice(REDIRECT_DIRECTIONS), "inbound"),
                interfaces=_get(red, "interfaces", rpath, p, _str_list, ()),
                exclude_src=_get(red, "exclude_src", rpath, p, _cidr_list, ()),
                exclude_dst=_get(red, "exclude_dst", rpath, p, _cidr_list, ()),
            )
        if hostport is None or name is None:
            continue
        out.append(
            ListenerConfig(
                name=name,
                host=hostport[0],
                port=hostport[1],
                l7proto=l7proto,
                upstream=upstream,
                direction=_get(item, "direction", path, p, _choice(DIRECTIONS), "ingress"),
                parser_config=dict(pconf),
                parser_settings=settings,
                policy_mode=_get(item, "policy_mode", path, p, _choice(POLICY_MODES), None),
                redirect=redirect,
                idle_timeout=_get(item, "idle_timeout", path, p, parse_duration, None),
                request_timeout=_get(item, "request_timeout", path, p, parse_duration, None),
            )
        )
    return out


def dismantle(value: Any) -> None:
    """Empty a large parsed list item by item. Dropped whole, 100,000 identities' parsed text
    (a million objects) is freed in one C call that holds the interpreter lock for a tenth of
    a second, stalling the event loop while a reload runs on a worker thread."""
    if isinstance(value, list):
        while value:
            value.pop()
    if isinstance(value, LList):
        while value.item_lines:
            value.item_lines.pop()


_IDENTITY_KEYS = frozenset(("cidr", "labels", "entity"))


def _identities(doc: LMap, p: _Problems) -> list[tuple[str, Mapping[str, str]]]:
    raw = doc.get("identities")
    if raw is None:
        return []
    if not isinstance(raw, LList):
        p.add(doc.where_of("identities"), "identities", "must be a list of {cidr, labels}")
        return []
    out: list[tuple[str, Mapping[str, str]]] = []
    intern = LabelInterner()  # 100,000 pods share a few hundred label sets
    #: label sets already validated (all strings, no entity) -> their interned mapping
    checked: dict[frozenset[tuple[str, Any]], Mapping[str, str]] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, LMap):
            p.add(raw.where_of(i), f"identities[{i}]", "must be a mapping with cidr and labels and/or entity")
            continue
        path = f"identities[{i}]"
        for k in item:
            if k not in _IDENTITY_KEYS:
                p.add(item.where_of(k), f"{path}.{k}", "unknown key (known: cidr, labels, entity)")
        cidr = item.get("cidr")
        labels = item.get("labels")
        if "entity" not in item and isinstance(labels, LMap) and isinstance(cidr, str) and fast_cidr(cidr):
            # The common entry (a pod: an IPv4 address and labels seen before) in one look-up.
            try:
                known = checked.get(frozenset(labels.items()))
            except TypeError:  # a list or mapping as a label value: reported below
                known = None
            if known is not None:
                out.append((cidr if "/" in cidr else f"{cidr}/32", known))
                continue
        if isinstance(cidr, str) and fast_cidr(cidr) is not None:
            net_text = cidr if "/" in cidr else f"{cidr}/32"
        else:
            try:
                net_text = str(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError as exc:
                p.add(item.where_of("cidr"), f"{path}.cidr", f"bad CIDR: {exc}")
                continue
        # An entity is Cilium's reserved identity for what is not a pod; it becomes the label
        # reserved:<entity>, which only proxyd assigns (policy selects it with fromEntities).
        entity = item.get("entity")
        if entity is not None and entity not in ENTITIES:
            p.add(item.where_of("entity"), f"{path}.entity",
                  f"must be one of {', '.join(ENTITIES)}, not {entity!r}")  # fmt: skip
            continue
        if labels is None and entity is not None:
            labels = {}
        if not isinstance(labels, dict) or (not labels and entity is None):
            p.add(item.where_of("labels"), f"{path}.labels",
                  "must be a non-empty mapping of labels (or give an entity)")  # fmt: skip
            continue
        bad = [k for k, v in labels.items() if not isinstance(v, (str, int, bool))]
        if bad:
            p.add(item.where_of("labels"), f"{path}.labels.{bad[0]}", "label values must be scalars")
            continue
        reserved = [k for k in labels if str(k).startswith("reserved:")]
        if reserved:
            p.add(item.where_of("labels"), f"{path}.labels.{reserved[0]}",
                  "reserved: labels are proxyd's own; give `entity:` instead")  # fmt: skip
            continue
        if entity == "world" and labels:
            p.add(item.where_of("entity"), f"{path}.entity",
                  "world is outside every endpoint: it cannot also have labels")  # fmt: skip
            continue
        out_labels = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in labels.items()}
        if entity is not None:
            out_labels[f"reserved:{entity}"] = ""
        interned = intern(out_labels)
        if entity is None and all(type(k) is str and type(v) is str for k, v in labels.items()):
            checked[frozenset(labels.items())] = interned
        out.append((net_text, interned))
    intern.dismantle()  # what they hold is freed one at a time (see dismantle above)
    while checked:
        checked.popitem()
    return out
