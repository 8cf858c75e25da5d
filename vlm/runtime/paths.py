"""Paths that a config file holds relative to itself, so that a folder of config and files can move.

A ``vlm export`` writes ``model.init_args.init_from: .`` into its ``config.yaml``: the export is the
folder that holds that file, wherever it has been copied or moved. jsonargparse parses a config file
with that file's folder as the working directory, so :class:`ExportDir`'s parser resolves a relative
value there; on the command line it resolves against the working directory, as any path does. The
constructor always receives an absolute plain ``str``, so the resolved config (``config_test.yaml``),
the checkpoint's hyper-parameters and ``results.json`` record where the tensors really came from.
"""

from __future__ import annotations

import os
from typing import Any

from jsonargparse.typing import register_type


class ExportDir(str):
    """The type of ``init_from``: a ``vlm export`` directory, relative paths in a config file taken
    from that file's folder. Only a parsing hint: the value a constructor gets is a plain ``str``."""


def absolute_dir(value: Any) -> str:
    """``value`` as an absolute path (``~`` expanded) against the current working directory, which is
    the config file's folder while jsonargparse parses one."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"expected a path to a vlm export directory, got {type(value).__name__}")
    return os.path.abspath(os.path.expanduser(os.fspath(value)))


# type_check always False: every value, also an already absolute one from a checkpoint's
# hyper-parameters or a dumped config, goes through absolute_dir (idempotent) and comes out a str.
register_type(ExportDir, serializer=str, deserializer=absolute_dir, type_check=lambda value, cls: False)
