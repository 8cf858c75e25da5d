"""A config the parser refuses, said in a few lines: the key, the nearest valid one, the fix.

jsonargparse answers an unknown key with the whole usage (80 lines of ``--trainer.*`` options) and,
inside a subclass (``model.init_args.prompt_learner.init_args.n_ctxx``), with a dump of every Union
alternative it tried. :func:`explain_parse_error` keeps the ``error:`` part and, for the cases it
knows, replaces it with one sentence that names the key and the nearest valid one (difflib):

* ``Subcommand 'fit' does not accept option 'trainer.max_epoch'`` (a key the parser does not have);
* ``Option 'n_ctxx' is not accepted`` inside ``class_path 'vlm.prompts.<module>.<Class>'`` (an argument the
  configured class does not take; the valid ones are its constructor's);
* a flat datamodule key of earlier versions (``data.init_args.batch_size``): the grouped key that
  replaced it (``data.init_args.loader.batch_size``, :mod:`vlm.datamodules.settings`);
* ``Expected a dot import path string: coopp`` (a ``class_path`` that is neither an import path nor
  a registered short name: the registered names are listed, since they are what it could have been).

With ``--debug`` (or ``VLM_DEBUG=1``) jsonargparse's own message is printed as it was.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from typing import Any, Optional

_NOT_ACCEPTED = re.compile(r"does not accept (?:option|nested key)s? '([^']+)'")
_IN_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*(?:Option|Key) '([^']+)' is not (?:accepted|expected)")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_NO_IMPORT = re.compile(r"Expected a dot import path string: (\S+)")
_SUBCOMMAND = re.compile(r"^usage: vlm \[options\] (\w+)", re.M)


def debug_enabled() -> bool:
    return os.environ.get("VLM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def nearest(word: str, choices: list[str]) -> Optional[str]:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def _signature(fn: Any) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _valid_keys(parent: str, subcommand: Optional[str]) -> list[str]:
    """The keys a ``vlm <subcommand>`` config may hold under ``parent`` ("" or "trainer")."""
    import lightning as L

    if parent == "trainer":
        return [f"trainer.{k}" for k in _signature(L.Trainer.__init__)]
    if parent:
        return []
    method = _signature(getattr(L.Trainer, subcommand)) if subcommand in ("fit", "validate", "test", "predict") else []
    return ["seed_everything", "trainer", "model", "data", "allow_untrained", *(m for m in method if m not in ("model", "datamodule", "dataloaders", "train_dataloaders", "val_dataloaders"))]


def _init_arguments(class_path: str) -> list[str]:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return []
    return _signature(cls.__init__)


def _moved_setting(option: str, valid: list[str]) -> Optional[str]:
    """Where a flat datamodule key of earlier versions (``batch_size``) lives now (``loader.batch_size``),
    if the class takes the grouped settings; else None."""
    from vlm.datamodules.settings import MOVED_KEYS

    moved = MOVED_KEYS.get(option)
    return moved if moved is not None and moved.split(".")[0] in valid else None


def _unknown_key(message: str, subcommand: Optional[str]) -> Optional[str]:
    inner = _IN_CLASS.search(message)
    if inner:
        class_path, option = inner.groups()
        before = message[: inner.start()]
        path = [k for k in _PARSER_KEY.findall(before)]
        key = ".init_args.".join([*path, option]) if path else option
        valid = _init_arguments(class_path)
        moved = _moved_setting(option, valid)
        if moved:
            new_key = key[: len(key) - len(option)] + moved
            return (
                f"unknown key '{key}': {class_path} groups its image and loader settings; write '{new_key}' "
                f"(in YAML: {moved.split('.')[0]}: {{{moved.split('.')[1]}: ...}}; vlm.datamodules.settings)."
            )
        guess = nearest(option, valid)
        hint = f" Did you mean '{guess}'?" if guess else ""
        return (
            f"unknown key '{key}': {class_path} takes no argument '{option}'.{hint} "
            f"Its arguments: {', '.join(valid) or '(none)'}."
        )
    outer = _NOT_ACCEPTED.search(message)
    if outer:
        key = outer.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        guess = nearest(key, _valid_keys(parent, subcommand))
        hint = f" Did you mean '{guess}'?" if guess else ""
        return f"unknown key '{key}'.{hint}"
    return None


def _unknown_name(message: str) -> Optional[str]:
    found = _NO_IMPORT.search(message)
    if not found:
        return None
    name = found.group(1)
    from vlm.registry import short_names

    names = short_names()
    every = [n for listed in names.values() for n in listed]
    guess = nearest(name.lower(), every)
    hint = f" Did you mean '{guess}'?" if guess else ""
    keys = [k for k in _PARSER_KEY.findall(message)]
    where = f" (at {'.init_args.'.join(keys)})" if keys else ""
    listed = " ".join(f"Registered {kind}s: {', '.join(n)}." for kind, n in names.items())
    return f"unknown class_path '{name}'{where}: not an import path nor a registered name.{hint} {listed} Use one of these names or a full class path."


def explain_parse_error(message: str) -> str:
    """What to print for jsonargparse's error output ``message`` (stderr of a failed parse)."""
    if debug_enabled() or not message.strip():
        return message
    found = _SUBCOMMAND.search(message)
    subcommand = found.group(1) if found else None
    error = message[message.find("error:") :] if "error:" in message else message
    tip = next((line for line in message.splitlines() if line.startswith("tip:")), None)
    short = _unknown_key(error, subcommand) or _unknown_name(error)
    prog = f"vlm {subcommand}" if subcommand else "vlm"
    if short is None:
        return f"{prog}: {error.rstrip()}\n" + (f"{tip}\n" if tip else "")
    return f"{prog}: error: {short}\n" + (f"{tip}\n" if tip else "") + "(the parser's full message: add --debug)\n"
