"""The one way a plugin reaches a service of the strategy it joined (the teacher bank,
class similarity, the synthetic-loss channel): ``CLStrategy`` holds each as a typed
field; any other Avalanche strategy gets a fresh one attached on first use."""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def service_of(strategy: Any, name: str, cls: type[T]) -> T:
    """``strategy.<name>`` when it is a ``cls``; else a new ``cls()`` attached there."""
    service = getattr(strategy, name, None)
    if not isinstance(service, cls):
        service = cls()
        setattr(strategy, name, service)
    return service
