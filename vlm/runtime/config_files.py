"""Check the YAML files given to ``--config`` before jsonargparse reads them.

jsonargparse reports a YAML syntax error as ``Problems parsing config: ... in "<unicode string>",
line 3``: the line, but not which of the composed ``--config`` files holds it. This names the file,
the line and column, and the fix. It only reads files (``yaml.safe_load``); it never interprets them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


class ConfigFileError(ValueError):
    """A ``--config`` file that is missing or is not valid YAML."""


def config_paths(args: Sequence[str]) -> list[str]:
    """The values of every ``--config X`` / ``--config=X`` in a command line."""
    paths: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_file(path: str) -> None:
    """Raise ``ConfigFileError`` naming ``path`` (and the line) when it is missing or not valid YAML."""
    file = Path(path).expanduser()
    if not file.is_file():
        return  # jsonargparse accepts inline YAML after --config and names a missing file itself
    try:
        yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ConfigFileError(
            f"Config file '{file}' is not valid YAML{where}: {problem}"
            f"{f' ({context})' if context else ''}. Fix the YAML there: indent with spaces, consistently, "
            "put a space after each ':', and close every bracket and quote."
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"Config file '{file}' is not UTF-8 text ({err}): is it a YAML file?") from err


def check_config_args(args: Sequence[str] | None) -> None:
    """Check every ``--config`` file of ``args`` (``sys.argv[1:]`` when None)."""
    for path in config_paths(list(sys.argv[1:] if args is None else args)):
        check_config_file(path)
