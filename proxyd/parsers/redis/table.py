"""The Redis command table: names, arities, flags, ACL categories, key specs, subcommands.

The data (``commands.json`` beside this module) is generated from a real ``redis-server``'s
``COMMAND INFO`` and ``COMMAND DOCS`` by ``tools/gen_redis_commands.py``; a test compares it with
the server CI starts. :func:`normalize` is the one conversion from the server's answer to the
stored form, shared by the generator and that test.

Key positions follow Redis 7's key specs (``src/db.c`` ``getKeysUsingKeySpecs``, mirrored by
:func:`key_positions`): a *begin search* (``index`` N, or ``keyword`` K searched forward or
backward from ``startfrom``) then a *find keys* (``range`` lastkey/keystep/limit, or ``keynum``:
a number-of-keys argument, as in ``EVAL script numkeys key...`` and
``ZUNIONSTORE dst numkeys key...``). Specs the table marks ``unknown`` or ``incomplete`` are
where Redis falls back to a hand-written ``getkeys_proc``; :data:`CUSTOM_KEYS` ports the ones
for ``SORT``/``SORT_RO`` and ``MIGRATE``; any other command whose keys cannot be worked out is
judged with its keys unknown (see :class:`.rules.RedisRequest`).

Pub/Sub channels are not in Redis's key specs: :data:`CHANNELS` is Redis's own channel table
(``commands_with_channels`` in ``src/db.c``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

#: (first channel argument, count or -1 for all remaining): ``commands_with_channels``.
CHANNELS: dict[str, tuple[int, int]] = {
    "subscribe": (1, -1),
    "ssubscribe": (1, -1),
    "unsubscribe": (1, -1),
    "sunsubscribe": (1, -1),
    "psubscribe": (1, -1),
    "punsubscribe": (1, -1),
    "publish": (1, 1),
    "spublish": (1, 1),
}


class NeedArg(Exception):
    """Raised by an argument getter for an argument not parsed yet (its index in ``args[0]``)."""


class BadSpec(Exception):
    """The arguments do not fit the key spec (Redis's ``invalid_spec``): keys unknown."""


Getter = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One Redis 7 key spec, reduced to what key extraction needs."""

    bs_type: str  # index | keyword | unknown
    bs_index: int = 0
    bs_keyword: bytes = b""
    bs_startfrom: int = 0
    fk_type: str = "unknown"  # range | keynum | unknown
    lastkey: int = 0
    keystep: int = 1
    limit: int = 0
    keynumidx: int = 0
    firstkey: int = 0
    not_key: bool = False
    incomplete: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """One command or subcommand (``name`` is ``config|get`` for a subcommand)."""

    name: str
    arity: int
    flags: frozenset[str]
    categories: frozenset[str]  # without the '@'
    key_specs: tuple[KeySpec, ...]
    subcommands: dict[str, Command]  # by the lower-case subcommand word alone
    group: str
    #: ``(first, lastkey, step)`` when one ``index``/``range`` spec gives every key (the hot
    #: path of :func:`key_positions`: GET, SET, MSET, DEL, ...), else None.
    simple: tuple[int, int, int] | None = None

    @property
    def has_keys(self) -> bool:
        """Whether any argument of this command can be a key or a channel."""
        base = self.name.split("|", 1)[0]
        return bool(self.key_specs) or base in CHANNELS or "movablekeys" in self.flags

    @property
    def unknown_keys(self) -> bool:
        """Whether the key specs alone cannot give every key (``unknown``/``incomplete``)."""
        return any(s.bs_type == "unknown" or s.fk_type == "unknown" or s.incomplete for s in self.key_specs)


def _pairs(value: Any) -> dict[str, Any]:
    """A RESP2 flat ``[k, v, k, v]`` list (or a RESP3 map) as a dict."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    items = list(value)
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _spec(raw: Any) -> dict[str, Any]:
    d = _pairs(raw)
    out: dict[str, Any] = {"flags": sorted(str(f) for f in d.get("flags", []))}
    if "notes" in d:
        out["notes"] = str(d["notes"])
    for part in ("begin_search", "find_keys"):
        p = _pairs(d.get(part, []))
        spec = _pairs(p.get("spec", []))
        out[part] = {"type": str(p.get("type", "unknown")), "spec": {k: _plain(v) for k, v in spec.items()}}
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    return v


def _one(row: Sequence[Any], docs: dict[str, Any]) -> dict[str, Any]:
    name = str(row[0]).lower()
    entry: dict[str, Any] = {
        "arity": int(row[1]),
        "flags": sorted(str(f) for f in row[2]),
        "first": int(row[3]),
        "last": int(row[4]),
        "step": int(row[5]),
        "acl": sorted(str(c).lstrip("@") for c in row[6]),
        "key_specs": [_spec(s) for s in (row[8] if len(row) > 8 else [])],
        "group": str(_pairs(docs.get(name, [])).get("group", "")),
    }
    subs = row[9] if len(row) > 9 else []
    if subs:
        sub_docs = _pairs(_pairs(docs.get(name, [])).get("subcommands", []))
        entry["subcommands"] = {
            str(s[0]).lower(): _one(s, {str(k).lower(): v for k, v in sub_docs.items()}) for s in subs
        }
    return entry


def normalize(info_rows: Sequence[Any], docs: Any) -> dict[str, Any]:
    """The stored form of ``COMMAND INFO`` rows and the ``COMMAND DOCS`` answer (RESP2, decoded).

    Returns ``{name: entry}`` sorted by name; an entry holds ``arity``, ``flags``, ``first``,
    ``last``, ``step``, ``acl`` (categories without ``@``), ``key_specs``, ``group`` and, for
    container commands, ``subcommands`` keyed ``name|sub``.
    """
    doc_map = {str(k).lower(): v for k, v in _pairs(docs).items()}
    out = {str(row[0]).lower(): _one(row, doc_map) for row in info_rows if row}
    return dict(sorted(out.items()))


def _keyspec(d: dict[str, Any]) -> KeySpec:
    bs = d["begin_search"]
    fk = d["find_keys"]
    bss, fks = bs["spec"], fk["spec"]
    flags = set(d["flags"])
    return KeySpec(
        bs_type=bs["type"],
        bs_index=int(bss.get("index", 0)),
        bs_keyword=str(bss.get("keyword", "")).lower().encode(),
        bs_startfrom=int(bss.get("startfrom", 0)),
        fk_type=fk["type"],
        lastkey=int(fks.get("lastkey", 0)),
        keystep=int(fks.get("keystep", 1)),
        limit=int(fks.get("limit", 0)),
        keynumidx=int(fks.get("keynumidx", 0)),
        firstkey=int(fks.get("firstkey", 0)),
        not_key="not_key" in flags,
        incomplete="incomplete" in flags,
    )


def _simple(name: str, specs: tuple[KeySpec, ...]) -> tuple[int, int, int] | None:
    base = name.split("|", 1)[0]
    if len(specs) != 1 or base in CHANNELS or base in CUSTOM_KEYS:
        return None
    s = specs[0]
    if s.bs_type != "index" or s.fk_type != "range" or s.incomplete or s.not_key or s.limit or s.keystep <= 0:
        return None
    return (s.bs_index, s.lastkey, s.keystep)


def _build(name: str, d: dict[str, Any]) -> Command:
    subs = {full.split("|", 1)[1]: _build(full, sd) for full, sd in d.get("subcommands", {}).items()}
    specs = tuple(_keyspec(s) for s in d["key_specs"])
    return Command(
        name=name,
        arity=int(d["arity"]),
        flags=frozenset(d["flags"]),
        categories=frozenset(d["acl"]),
        key_specs=specs,
        subcommands=subs,
        group=d.get("group", ""),
        simple=_simple(name, specs),
    )


def _string2ll(b: bytes) -> int | None:
    """Redis's ``string2ll``: optional '-', no leading zeros, no '+', at most 20 chars."""
    if not b or len(b) > 20:
        return None
    neg = b[0:1] == b"-"
    digits = b[1:] if neg else b
    if not digits or not digits.isdigit() or not digits.isascii():
        return None
    if digits[0:1] == b"0" and (len(digits) > 1 or neg):
        return None
    v = -int(digits) if neg else int(digits)
    if v > (1 << 63) - 1 or v < -(1 << 63):
        return None
    return v


def _spec_positions(spec: KeySpec, argc: int, get: Getter, arity: int) -> list[int]:
    """Key positions from one spec (``getKeysUsingKeySpecs``); raises :class:`BadSpec`."""
    first = 0
    if spec.bs_type == "index":
        first = spec.bs_index
    elif spec.bs_type == "keyword":
        sf = spec.bs_startfrom
        start = sf if sf > 0 else argc + sf
        end = argc - 1 if sf > 0 else 1
        i = start
        while i != end:
            if i >= argc or i < 1:
                break
            if get(i).lower() == spec.bs_keyword:
                first = i + 1
                break
            i = i + 1 if start <= end else i - 1
        if not first:
            return []  # keyword not found: this spec gives no keys
    else:
        raise BadSpec("unknown begin_search")
    if spec.fk_type == "range":
        step = spec.keystep
        if spec.lastkey >= 0:
            last = first + spec.lastkey
        elif not spec.limit:
            last = argc + spec.lastkey
        else:
            last = first + ((argc - first) // spec.limit + spec.lastkey)
    elif spec.fk_type == "keynum":
        step = spec.keystep
        if spec.keynumidx >= argc or first + spec.keynumidx >= argc:
            raise BadSpec("numkeys out of range")
        numkeys = _string2ll(get(first + spec.keynumidx))
        if numkeys is None or numkeys < 0:
            raise BadSpec("bad numkeys")
        first += spec.firstkey
        last = first + numkeys - 1
    else:
        raise BadSpec("unknown find_keys")
    if last >= argc or last < first or first >= argc:
        raise BadSpec("keys out of range")
    if step <= 0:
        raise BadSpec("bad keystep")
    return list(range(first, last + 1, step))


def _sort_keys(argc: int, get: Getter, readonly: bool) -> list[int] | None:
    """``SORT``/``SORT_RO`` keys: the sorted key and the ``STORE`` destination, as both
    ``sortGetKeys`` and ``sortCommandGeneric`` find it (the union, so a quirk of one cannot
    hide a key). None when ``GET`` or a ``BY`` pattern with ``*`` names keys derived from data:
    Redis's own ACL then requires access to every key, and so does proxyd."""
    positions = [1]
    if not readonly:  # sortGetKeys: the last STORE, with its odd skipping
        skip = {b"limit": 2, b"get": 1, b"by": 1}
        store = 0
        i = 2
        while i < argc:
            word = get(i).lower()
            n = skip.get(word)
            if n is not None:
                i += n
            elif word == b"store" and i + 1 < argc:
                store = i + 1
            i += 1
        if store:
            positions.append(store)
    last_store = 0
    j = 2  # sortCommandGeneric's own parse
    while j < argc:
        word = get(j).lower()
        left = argc - j - 1
        if word in (b"asc", b"desc", b"alpha"):
            pass
        elif word == b"limit" and left >= 2:
            j += 2
        elif not readonly and word == b"store" and left >= 1:
            last_store = j + 1  # the last STORE wins, as in sortGetKeys
            j += 1
        elif word == b"by" and left >= 1:
            if b"*" in get(j + 1):
                return None
            j += 1
        elif word == b"get" and left >= 1:
            return None
        else:
            break  # a syntax error: the server refuses the command
        j += 1
    if last_store and last_store not in positions:
        positions.append(last_store)
    return positions


_MIGRATE_SKIP = {b"copy": 0, b"replace": 0, b"auth": 1, b"auth2": 2}


def _migrate_keys(argc: int, get: Getter) -> list[int] | None:
    """``migrateGetKeys``: argument 3, or every argument after ``KEYS`` when 3 is empty."""
    first, num = 3, 1
    if argc > 6:
        i = 6
        while i < argc:
            word = get(i).lower()
            if word == b"keys":
                if get(3):
                    return None  # a syntax error for the server; fail closed anyway
                first, num = i + 1, argc - i - 1
                break
            i += _MIGRATE_SKIP.get(word, 0) + 1
    if first >= argc:
        return None
    return list(range(first, first + num))


#: Commands whose specs are unknown/incomplete and whose ``getkeys_proc`` is ported here.
CUSTOM_KEYS: dict[str, Callable[[int, Getter], list[int] | None]] = {
    "sort": lambda argc, get: _sort_keys(argc, get, False),
    "sort_ro": lambda argc, get: _sort_keys(argc, get, True),
    "migrate": _migrate_keys,
}


def load_raw() -> dict[str, Any]:
    """The stored table as generated (``{"redis_version": ..., "commands": {...}}``)."""
    text = resources.files(__package__).joinpath("commands.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


_RAW = load_raw()
REDIS_VERSION: str = _RAW["redis_version"]
#: Top-level commands by lower-case name.
COMMANDS: dict[str, Command] = {n: _build(n, d) for n, d in _RAW["commands"].items()}
#: Every ACL category any command or subcommand is in.
CATEGORIES: frozenset[str] = frozenset(
    c for cmd in COMMANDS.values() for x in (cmd, *cmd.subcommands.values()) for c in x.categories
) | {"all"}
#: Every rule-nameable command: top-level names and ``name|sub``.
NAMES: frozenset[str] = frozenset(COMMANDS) | frozenset(
    s.name for cmd in COMMANDS.values() for s in cmd.subcommands.values()
)
del _RAW


def key_positions(cmd: Command, argc: int, get: Getter) -> list[int] | None:
    """The argument positions of ``cmd``'s keys and channels, in order, without repeats.

    ``get(i)`` returns argument ``i`` or raises :class:`NeedArg`. Returns None when the
    positions cannot be known (a spec Redis itself cannot follow, arguments that do not fit
    the spec): the caller then judges the command with its keys unknown.
    """
    simple = cmd.simple
    if simple is not None:
        first, lastkey, step = simple
        last = first + lastkey if lastkey >= 0 else argc + lastkey
        if last >= argc or last < first or first >= argc:
            return None
        return list(range(first, last + 1, step))
    base = cmd.name.split("|", 1)[0]
    positions: list[int] = []
    custom = CUSTOM_KEYS.get(base)
    if custom is not None:
        found = custom(argc, get)
        if found is None:
            return None
        positions.extend(found)
    else:
        try:
            for spec in cmd.key_specs:
                if spec.not_key and base in CHANNELS:
                    continue  # a shard channel, counted below as a channel
                found = _spec_positions(spec, argc, get, cmd.arity)
                if spec.incomplete:
                    return None
                positions.extend(found)
        except BadSpec:
            return None
    chan = CHANNELS.get(base)
    if chan is not None:
        start, count = chan
        end = argc if count < 0 else min(argc, start + count)
        positions.extend(range(start, end))
    seen: set[int] = set()
    out = []
    for p in positions:
        if p not in seen and 0 < p < argc:
            seen.add(p)
            out.append(p)
    return out


#: Raw command names seen on the wire (any case) -> top-level entry; bounded.
_SEEN: dict[bytes, tuple[str, Command | None]] = {}


def lookup(name: bytes, sub: bytes | None) -> tuple[str, Command | None]:
    """The policy name (``get``, ``config|get``) and table entry of a command, if known.

    ``sub`` is argument 1 when there is one. An unknown subcommand of a container command is
    the container itself (Redis answers it with an error).
    """
    hit = _SEEN.get(name)
    if hit is not None and (sub is None or hit[1] is None or not hit[1].subcommands):
        return hit
    lname = name.lower().decode("utf-8", "backslashreplace")
    top = COMMANDS.get(lname)
    if top is not None and len(_SEEN) < 4096:
        _SEEN[bytes(name)] = (top.name, top)
    cmd = COMMANDS.get(lname)
    if cmd is None:
        return lname, None
    if cmd.subcommands and sub is not None:
        sc = cmd.subcommands.get(sub.lower().decode("utf-8", "backslashreplace"))
        if sc is not None:
            return sc.name, sc
    return cmd.name, cmd
