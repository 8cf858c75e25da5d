"""Who made a checkpoint or export: the identity record, and the error when it is not this model's.

Every ``.ckpt`` written by ``vlm fit`` and every ``vlm export`` carries a record under
:data:`CHECKPOINT_KEY`: format, method, module, backbone identity and backbone sha256. Loading
compares it with the model's own (:func:`check_identity`) and refuses a foreign file with
:class:`CheckpointMismatchError`, naming both sides. Its own module so that the Lightning modules
and the exporter both use it without importing each other.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

CHECKPOINT_KEY = "vlm"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not belong to this model (other backbone, method or tensors)."""


def check_identity(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], source: str) -> None:
    """Raise a clear error if a saved identity names another method or backbone."""
    if saved is None:
        raise CheckpointMismatchError(
            f"This {source} has no vlm identity record: it was not written by vlm. "
            "Use `vlm export` / `vlm fit` checkpoints."
        )
    if saved.get("method") != current["method"] or saved.get("module") != current["module"]:
        raise CheckpointMismatchError(
            f"The {source} was made by method {saved.get('method')!r} ({saved.get('module')}), "
            f"but the model is method {current['method']!r} ({current['module']})."
        )
    if saved.get("backbone") != current["backbone"] or saved.get("backbone_checksum") != current["backbone_checksum"]:
        raise CheckpointMismatchError(
            f"The {source} was made with backbone {saved.get('backbone')} "
            f"(sha256 {str(saved.get('backbone_checksum'))[:12]}), but the model has backbone "
            f"{current['backbone']} (sha256 {current['backbone_checksum'][:12]}). "
            "Use the backbone that produced it."
        )
