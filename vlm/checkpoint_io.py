"""The checkpoint IO the ``vlm`` CLI installs: atomic writes, weights-only reads.

Writes. Lightning 2.6's ``_atomic_save`` serialises into memory and writes through an fsspec
transaction; on a local filesystem fsspec stages the bytes in the *system* temp folder
(``tempfile.mkstemp()``) and commits with ``shutil.move``. That is a rename only when ``/tmp`` and
the checkpoint folder share a filesystem; across filesystems (node-local ``/tmp``, checkpoints on
a shared filesystem, the usual cluster layout) ``shutil.move`` copies straight into the final
name, so a kill during the copy leaves a truncated checkpoint where the previous good one was.
:class:`SafeCheckpointIO` writes ``<dir>/.<name>.tmp-<pid>`` beside the target, fsyncs it, and
``os.replace``-s it over the target (atomic on POSIX), then fsyncs the folder. Any failure
removes the temporary file and leaves the previous checkpoint untouched. Remote URLs keep
Lightning's own path.

Reads. Every load uses ``torch.load(weights_only=True)`` (no pickle code execution), whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, unless the user asked for a full load explicitly:
``vlm fit --ckpt_path X --weights_only false`` (Lightning's own flag). A refused file fails with a
message that names that flag. Checkpoints written by vlm load weights-only (their hyper-parameters
are plain types; tests/reliability checks it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is fsynced before the rename and the folder after it, so after a crash
    ``path`` is either the complete old file or the complete new one.
    """
    target = Path(str(path).removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class UnsafeCheckpointError(ValueError):
    """A checkpoint that cannot be loaded without unpickling arbitrary objects."""


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder atomic writes and weights-only loading (module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        full = weights_only is False  # only an explicit `--weights_only false` unpickles objects
        try:
            with fs.open(path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=not full)
        except Exception as err:
            if full or "weights_only" not in str(err).lower() and "unpickl" not in str(err).lower():
                raise
            raise UnsafeCheckpointError(
                f"Refused to load {path} with weights_only=True: it holds pickled objects "
                f"({str(err).splitlines()[0]}). Checkpoints written by vlm never do. If you trust this "
                "file, pass `--weights_only false` to `vlm fit/test` (or weights_only=False to the Trainer)."
            ) from err
