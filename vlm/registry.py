"""Name -> class registries for prompt learners and pruners.

``register("name")`` records a class under a short, lowercase name and publishes an alias subclass
with that ``__name__`` in an aliases module, so LightningCLI/jsonargparse accept
``class_path: name`` as well as the full class path (jsonargparse resolves bare names by
subclass ``__name__``).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists what is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, alias_module: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}
        self._alias_module_name = alias_module
        self._alias_module = sys.modules.setdefault(alias_module, types.ModuleType(alias_module))

    def register(self, name: str) -> Callable[[T], T]:
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lowercase; got {name!r}.")

        def deco(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._classes[name]}.")
            cls.name = name
            self._classes[name] = cls
            alias = type(name, (cls,), {"__module__": self._alias_module_name, "__doc__": cls.__doc__})
            alias.__qualname__ = name
            setattr(self._alias_module, name, alias)
            return cls

        return deco

    def available(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        key = name.lower()
        if key not in self._classes:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}. Available: {', '.join(self.available()) or '(none)'}. "
                f"Use one of these names, or a full class path."
            )
        return self._classes[key]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)
