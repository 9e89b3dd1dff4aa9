"""One registry per kind of component: names in YAML map to classes here.

Config strings are only ever looked up in these dictionaries; they never reach
``eval`` or import machinery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: its constructor and the schema of its arguments."""

    name: str
    factory: Callable[..., T]
    params: type[BaseModel]
    help: str


class Registry(Generic[T]):
    """A named mapping from YAML names to constructors with typed arguments."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[BaseModel], help: str = "") -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``factory`` under ``name`` with argument schema ``params``."""

        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = help or (factory.__doc__ or "").strip().splitlines()[0:1]
            self._entries[name] = Entry(name, factory, params, doc if isinstance(doc, str) else (doc[0] if doc else ""))
            return factory

        return wrap

    def get(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise KeyError with the known names."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def build(self, name: str, args: dict[str, Any] | BaseModel, **context: Any) -> T:
        """Validate ``args`` against the schema and call the factory."""
        entry = self.get(name)
        params = args if isinstance(args, BaseModel) else entry.params(**args)
        return entry.factory(params, **context)


STRATEGIES: Registry[Any] = Registry("strategy")
STREAMS: Registry[Any] = Registry("stream")
GENERATORS: Registry[Any] = Registry("generator")


def load_builtin_components() -> None:
    """Import the built-in packages so that their components register themselves."""
    from cl_proxyfda import benchmarks, generators, strategies  # noqa: F401
