"""Name -> class registries for prompt learners and pruners, and short ``class_path`` names.

``register("name")`` records a class under a short, lowercase name. Configs may then write
``class_path: myprompt`` instead of ``class_path: vlm.prompts.myprompt.MyPrompt``: the ``vlm`` CLI expands a
short name to the class's full import path in every mapping it reads, before jsonargparse checks the
config (:func:`expand_short_names`), so the class that is built is the registered class itself and
the resolved config (``config_fit.yaml``) records its full path. Nothing is added to ``sys.modules``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T", bound=type)

#: The packages whose import registers every prompt learner and pruner (their method modules
#: call ``register`` when imported). Short names are looked up after importing these.
REGISTRY_PACKAGES: tuple[str, ...] = ("vlm.prompts", "vlm.pruning")


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (``path``: its ``__path__``), so each method file's
    ``@register`` runs: a new method is one file, with no import line to add anywhere."""
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists what is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Short lowercase names for the classes of one kind (``"prompt learner"``, ``"pruner"``)."""

    #: Every registry created, in creation order (what :func:`registries` returns).
    _all: list["Registry[Any]"] = []

    def __init__(self, kind: str, _unused: Optional[str] = None) -> None:
        # The second argument (once the name of a generated alias module) is accepted and ignored.
        self.kind = kind
        self._classes: dict[str, type] = {}
        Registry._all.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lowercase; got {name!r}.")

        def deco(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._classes[name]}.")
            cls.name = name
            self._classes[name] = cls
            return cls

        return deco

    def available(self) -> list[str]:
        return sorted(self._classes)

    def find(self, name: str) -> Optional[type]:
        """The class registered under ``name`` (case-insensitive), or None."""
        return self._classes.get(name.lower())

    def get(self, name: str) -> type:
        cls = self.find(name)
        if cls is None:
            raise UnknownNameError(
                f"Unknown {self.kind} {name!r}. Available: {', '.join(self.available()) or '(none)'}. "
                f"Use one of these names, or a full class path."
            )
        return cls

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)


def registries() -> list[Registry[Any]]:
    """Every registry, after importing :data:`REGISTRY_PACKAGES` so that each is complete."""
    for package in REGISTRY_PACKAGES:
        importlib.import_module(package)
    return list(Registry._all)


def import_path(cls: type) -> str:
    """``module.QualName``: the full ``class_path`` of ``cls``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_short_name(name: str) -> Optional[str]:
    """The full class path registered under ``name`` in any registry, or None. Only a lowercase name
    without a dot can be one (class names and import paths are left to jsonargparse), so other names
    import nothing."""
    if not isinstance(name, str) or "." in name or name != name.lower() or not name:
        return None
    for registry in registries():
        cls = registry.find(name)
        if cls is not None:
            return import_path(cls)
    return None


def expand_short_names(value: Any) -> Any:
    """``value`` with every ``class_path: <registered short name>`` (at any depth, in mappings and
    lists) replaced by the class's full import path; anything else is returned unchanged (the
    same objects where nothing changed)."""
    if isinstance(value, Mapping):
        out = {k: expand_short_names(v) for k, v in value.items()}
        full = resolve_short_name(out.get("class_path")) if "class_path" in out else None
        if full is not None:
            out["class_path"] = full
        return out if any(out[k] is not value[k] for k in out) else value
    if isinstance(value, list):
        items = [expand_short_names(v) for v in value]
        return items if any(a is not b for a, b in zip(items, value)) else value
    return value


def short_names() -> dict[str, list[str]]:
    """``{kind: [names]}`` of every registry (for error messages)."""
    return {r.kind: r.available() for r in registries()}
