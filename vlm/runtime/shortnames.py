"""Short ``class_path`` names (``class_path: <name>``) in everything the ``vlm`` CLI reads.

jsonargparse resolves a ``class_path`` without a dot only to an imported subclass of that very
``__name__`` (the class name), so a registry name (vlm.registry) is expanded to the class's full
import path before jsonargparse checks anything:

* in config files and inline YAML/JSON values, by jsonargparse's public loader hook
  (``jsonargparse.set_loader``): the ``yaml`` loader is wrapped so that every mapping it returns goes
  through :func:`vlm.registry.expand_short_names` (only a ``class_path`` that is a registered name
  changes; the file is still read by jsonargparse, from its own folder);
* in command-line values given as a bare name (``--model.init_args.prompt_learner <name>``,
  ``--model.init_args.pruner.class_path <name>``), by :func:`expand_args`;
* in a dict or Namespace config passed to the CLI from Python, by :func:`expand_args`.
"""

from __future__ import annotations

from typing import Any, Callable

from vlm.registry import expand_short_names, resolve_short_name

#: The last key of a command-line option whose bare value may be a registered short name.
NAME_KEYS = ("class_path", "prompt_learner", "pruner")

_installed: dict[str, Callable[..., Any]] = {}


def install_short_name_loader(mode: str = "yaml") -> None:
    """Wrap jsonargparse's loader for ``mode`` (once) so loaded mappings have short names expanded."""
    import yaml
    from jsonargparse import get_loader, set_loader

    current = get_loader(mode)
    if getattr(current, "_vlm_short_names", False):
        return
    _installed[mode] = current

    def load(value: str) -> Any:
        return expand_short_names(current(value))

    load._vlm_short_names = True  # type: ignore[attr-defined]
    set_loader(mode, load, (yaml.YAMLError,))


def _expand_option(key: str, value: str) -> str:
    if key.rsplit(".", 1)[-1] in NAME_KEYS and not value.startswith(("-", "{", "[")):
        return resolve_short_name(value) or value
    return value


def expand_args(args: Any) -> Any:
    """``args`` (a command line, or a dict/Namespace config) with registered short names expanded."""
    from jsonargparse import Namespace

    if isinstance(args, Namespace):
        return expand_short_names(args.as_dict())  # parse_object takes the dict
    if isinstance(args, dict):
        return expand_short_names(args)
    if not isinstance(args, (list, tuple)):
        return args
    out = list(args)
    for i, arg in enumerate(out):
        if not isinstance(arg, str) or not arg.startswith("--"):
            continue
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            out[i] = f"--{key}={_expand_option(key, value)}"
        elif i + 1 < len(out) and isinstance(out[i + 1], str):
            out[i + 1] = _expand_option(arg[2:], out[i + 1])
    return out
