"""One registry per kind of component: names in YAML map to classes here.

Strategies register their plugin class, which declares its options as ``Params`` and
is built with ``Plugin.from_params(params, run=context)``; an entry may stand for
several plugins (a recipe: ``Plugin.build_plugins(params, run)``, see
:meth:`Registry.build_plugins`); streams and generators
register a factory ``factory(params, **context)`` with its params type.

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
    """A registered component: its class or factory and the schema of its arguments."""

    name: str
    factory: Callable[..., T]
    params: type[BaseModel]
    help: str


class Registry(Generic[T]):
    """A named mapping from YAML names to constructors with typed arguments."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[BaseModel] | None = None, help: str = "") -> Callable[[Any], Any]:
        """Decorator: register ``factory`` (a function or a class) under ``name``; the
        argument schema is ``params``, by default the class's own ``Params``."""

        def wrap(factory: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            schema = params if params is not None else getattr(factory, "Params", None)
            if schema is None:
                raise ValueError(f"{self.kind} {name!r} declares no Params type")
            doc = help or (factory.__doc__ or "").strip().splitlines()[0:1]
            self._entries[name] = Entry(name, factory, schema, doc if isinstance(doc, str) else (doc[0] if doc else ""))
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
        """Validate ``args`` against the schema (unless already parsed) and build: a
        class with ``from_params`` gets ``from_params(params, **context)``."""
        entry = self.get(name)
        params = args if isinstance(args, BaseModel) else entry.params(**args)
        from_params = getattr(entry.factory, "from_params", None)
        if from_params is not None:
            return from_params(params, **context)
        return entry.factory(params, **context)

    def build_plugins(self, name: str, args: dict[str, Any] | BaseModel, run: Any = None) -> list[Any]:
        """The plugins of one strategy entry (one, or a recipe's parts), built as the
        runner builds them: ``factory.build_plugins(params, run)``."""
        entry = self.get(name)
        params = args if isinstance(args, BaseModel) else entry.params(**args)
        expand = getattr(entry.factory, "build_plugins", None)
        return list(expand(params, run)) if expand is not None else [self.build(name, params, run=run)]


STRATEGIES: Registry[Any] = Registry("strategy")
STREAMS: Registry[Any] = Registry("stream")
GENERATORS: Registry[Any] = Registry("generator")


def load_builtin_components() -> None:
    """Import the built-in packages so that their components register themselves."""
    from cl_proxyfda import benchmarks, generators, strategies  # noqa: F401
