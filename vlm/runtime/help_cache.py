"""``vlm <subcommand> --help`` from a cache, so that it answers at once after the first time.

The help of ``vlm fit`` is LightningCLI's, which needs Lightning imported, and importing Lightning
(torch, torchmetrics, which imports transformers, torchvision and scipy) takes seconds however lazily
vlm imports its own code. The text depends only on the installed packages, vlm's own source, the
Python version and the terminal width, so it is kept after the first run in
``$XDG_CACHE_HOME/vlm/help`` (``~/.cache/vlm/help``) under a key made of exactly these: another
version of any package, any edit to a vlm source file (its size and modification time) or another
width makes a new entry. Only a bare ``vlm <subcommand> --help`` (or ``-h``) is cached; with a
``--config`` or any other argument the help is built as usual. ``VLM_HELP_CACHE=0`` turns it off.
Standard library only: this module is imported before Lightning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

#: Packages whose version changes the help text.
PACKAGES = ("lightning", "jsonargparse", "torch", "docstring-parser", "typeshed-client", "vlm")
HELP_FLAGS = ("-h", "--help")


def enabled() -> bool:
    return os.environ.get("VLM_HELP_CACHE", "1").strip().lower() not in ("0", "false", "no")


def cacheable(args: Sequence[str]) -> bool:
    """A bare ``<subcommand> --help``."""
    return len(args) == 2 and args[1] in HELP_FLAGS and not args[0].startswith("-")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlm" / "help"


def _source_roots() -> list[Path]:
    """vlm's package folders (vlm, and vlm.prompts/pruning/datamodules/kernels, which may live apart)."""
    import importlib.util

    roots = [Path(__file__).resolve().parents[1]]
    for name in ("vlm.prompts", "vlm.pruning", "vlm.datamodules", "vlm.kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    return list(dict.fromkeys(roots))


def _versions() -> list[str]:
    from importlib import metadata

    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name}==none")
    return out


def key(args: Sequence[str]) -> str:
    """The cache key: the arguments, package versions, vlm's source files, Python and the width."""
    h = hashlib.sha256()
    for part in (*args, sys.version, *_versions(), str(shutil.get_terminal_size().columns), str(sys.stdout.isatty())):
        h.update(part.encode() + b"\0")
    for name in sorted(k for k in os.environ if k.startswith("JSONARGPARSE_")):
        h.update(f"{name}={os.environ[name]}".encode() + b"\0")
    for root in _source_roots():
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode() + b"\0")
    return h.hexdigest()[:32]


def read(args: Sequence[str]) -> Optional[str]:
    if not (enabled() and cacheable(args)):
        return None
    try:
        return (cache_dir() / f"{key(args)}.txt").read_text(encoding="utf-8")
    except OSError:
        return None


def write(args: Sequence[str], text: str) -> None:
    """Keep ``text`` for ``args`` (best effort: a read-only home just means no cache)."""
    if not (enabled() and cacheable(args)) or not text.strip():
        return
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / f"{key(args)}.txt")
    except OSError:
        pass
