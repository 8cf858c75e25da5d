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

Damaged files. An empty, foreign or truncated ``.ckpt`` or ``.safetensors`` raises
:class:`CorruptCheckpointError` naming the file, what is wrong with it (empty, not a checkpoint,
cut short) and what to do, instead of torch's bare ``EOFError``/``KeyError`` or safetensors'
header errors, which name neither.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
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


class CorruptCheckpointError(ValueError):
    """A checkpoint or safetensors file that is empty, not of its format, or cut short."""


_FIX = (
    "It was probably cut short by a crash, a full disk or an interrupted copy: copy it again, "
    "or use another checkpoint (last.ckpt, or an earlier epoch's)."
)

_FOREIGN_FIX = (
    "Point --ckpt_path (or --ckpt) at a .ckpt written by `vlm fit`; an export's learned.safetensors is "
    "evaluated with `vlm test --config EXPORT_DIR/config.yaml`."
)


def _head(path: Any, size: int = 64) -> bytes:
    fs = get_filesystem(path)
    with fs.open(path, "rb") as f:
        return f.read(size)


def _size(path: Any) -> int:
    return int(get_filesystem(path).size(path))


def _is_refusal(err: BaseException) -> bool:
    """True when torch refused to unpickle an object under ``weights_only=True`` (not damage)."""
    text = str(err).lower()
    return isinstance(err, pickle.UnpicklingError) and "weights_only" in text


def torch_file_problem(path: Any) -> Optional[str]:
    """What is wrong with a ``.ckpt``, judged from its bytes; ``None`` when it is a whole archive."""
    size = _size(path)
    if size == 0:
        return "is empty (0 bytes)"
    head = _head(path)
    if head.startswith(b"PK\x03\x04"):
        with get_filesystem(path).open(path, "rb") as f:
            whole = zipfile.is_zipfile(io.BytesIO(f.read()))
        return None if whole else f"is truncated ({size} bytes; the end of its zip archive is missing)"
    if head[:1] == b"\x80":
        return None  # a legacy (pre-zip) torch pickle: only unpickling can judge it
    return f"is not a PyTorch checkpoint ({size} bytes, starting with {head[:16]!r}; a .ckpt is a zip archive starting with b'PK')"


def checkpoint_load_error(path: Any, err: BaseException) -> ValueError:
    """The error to raise when ``torch.load(path)`` failed with ``err``: damage or a pickle refusal, each with its fix."""
    reason = (str(err).splitlines() or [""])[0] or type(err).__name__
    try:
        problem = torch_file_problem(path)
    except OSError as os_err:
        problem = f"could not be read ({os_err})"
    if problem is None and _is_refusal(err):
        return UnsafeCheckpointError(
            f"Refused to load {path} with weights_only=True: it holds pickled objects ({reason}). "
            "Checkpoints written by vlm never do. If you trust this file, pass `--weights_only false` to "
            "`vlm fit/test` (or weights_only=False to the Trainer)."
        )
    problem = problem or "is damaged: its archive is whole but its contents could not be read"
    cause = type(err).__name__ if reason == type(err).__name__ else f"{type(err).__name__}: {reason}"
    fix = _FOREIGN_FIX if problem.startswith("is not a PyTorch") else _FIX
    return CorruptCheckpointError(f"Checkpoint {path} {problem} ({cause}). {fix}")


def torch_load(path: Any, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` of a local or fsspec path; a missing, refused or damaged file raises an error naming it."""
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        with fs.open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        if not weights_only and torch_file_problem(path) is None:
            raise  # an intact file whose trusted full unpickling failed (e.g. a missing class): show it as it is
        raise checkpoint_load_error(path, err) from err


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a ``.safetensors`` file; an empty, foreign or truncated one raises
    :class:`CorruptCheckpointError` naming the file (safetensors' own error names no file)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as err:
        size = path.stat().st_size
        detail = str(err).removeprefix("Error while deserializing header: ")
        problem = (
            "is empty (0 bytes)" if size == 0
            else f"is truncated ({size} bytes; its header promises more data)" if "not fully covered" in detail
            else f"is not a safetensors file ({size} bytes; {detail})"
        )  # fmt: skip
        raise CorruptCheckpointError(
            f"{path} {problem}. It was probably cut short by a crash, a full disk or an interrupted copy: copy it "
            "again, or write it anew (an export: `vlm export --ckpt RUN.ckpt --out DIR --overwrite`)."
        ) from err


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-folder atomic writes and weights-only loading (module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = lambda storage, loc: storage, weights_only: Optional[bool] = None) -> dict[str, Any]:
        full = weights_only is False  # only an explicit `--weights_only false` unpickles objects
        return torch_load(path, map_location=map_location, weights_only=not full)
