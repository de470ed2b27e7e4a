"""Parser registry: the built-in parsers plus those installed through entry points.

Registration is explicit (a table here, and the ``proxyd.parsers`` entry-point group for
third-party packages), never an import side effect; a name registered twice is an error at
start-up rather than a silent override.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from proxyd.parser import ParserFactory

ENTRY_POINT_GROUP = "proxyd.parsers"

#: name -> "module:attribute" of a ParserFactory class, imported on load.
BUILTINS: dict[str, str] = {
    "r2d2": "proxyd.parsers.r2d2:R2d2Factory",
    "memcache": "proxyd.parsers.memcache:MemcacheFactory",
    "cassandra": "proxyd.parsers.cassandra:CassandraFactory",
    "redis": "proxyd.parsers.redis:RedisFactory",
    "http": "proxyd.parsers.http:HttpFactory",
    "kafka": "proxyd.parsers.kafka:KafkaFactory",
}
# proxyd.parsers.testparsers is not here: the test suite registers those parsers itself, through
# the entry-point group (tests/parser_plugins/README.md), so a real daemon never offers them.


class RegistryError(Exception):
    """A parser could not be registered (duplicate name, bad entry point, import failure)."""


class UnknownParserError(KeyError):
    """No parser of that name is registered."""


@dataclass(frozen=True, slots=True)
class Registered:
    factory: ParserFactory
    origin: str  # "built-in" or "entry point NAME = VALUE (dist X y.z)"


def _instantiate(obj: object, what: str) -> ParserFactory:
    factory = obj() if isinstance(obj, type) else obj
    if not isinstance(factory, ParserFactory):
        raise RegistryError(f"{what} is not a proxyd.parser.ParserFactory")
    return factory


class Registry:
    """Name -> factory map; build it with :meth:`load`."""

    def __init__(self) -> None:
        self._by_name: dict[str, Registered] = {}

    def register(self, name: str, factory: ParserFactory, origin: str) -> None:
        if name in self._by_name:
            raise RegistryError(
                f"parser {name!r} registered twice: {self._by_name[name].origin} and {origin}"
            )
        if factory.name and factory.name != name:
            raise RegistryError(f"parser registered as {name!r} calls itself {factory.name!r} ({origin})")
        factory.name = name
        self._by_name[name] = Registered(factory, origin)

    @classmethod
    def load(cls, *, entry_point_plugins: bool = True) -> Registry:
        """The built-ins plus every installed ``proxyd.parsers`` entry point."""
        reg = cls()
        for name, target in BUILTINS.items():
            module, _, attr = target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            reg.register(name, _instantiate(obj, target), "built-in")
        if entry_point_plugins:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                dist = f" (dist {ep.dist.name} {ep.dist.version})" if ep.dist else ""
                origin = f"entry point {ep.name} = {ep.value}{dist}"
                try:
                    obj = ep.load()
                except Exception as exc:
                    raise RegistryError(f"cannot load {origin}: {type(exc).__name__}: {exc}") from exc
                reg.register(ep.name, _instantiate(obj, origin), origin)
        return reg

    def get(self, name: str) -> ParserFactory:
        try:
            return self._by_name[name].factory
        except KeyError:
            raise UnknownParserError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def items(self) -> list[tuple[str, Registered]]:
        return sorted(self._by_name.items())
