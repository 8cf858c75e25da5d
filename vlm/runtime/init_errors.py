"""Show an error raised inside a configured class's ``__init__`` as itself.

When a model, datamodule or prompt learner constructor raises (``ValueError: n_ctx must be >= 1``,
``FileNotFoundError: Dataset root ... does not exist``), jsonargparse re-raises it as
``ValueError: Does not validate against any of the Union subtypes``, followed by a dump of every
init argument, with the real message buried in the middle. :func:`constructor_error` digs the
original out of the exception chain so the CLI can raise it, with its own traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import jsonargparse

_JSONARGPARSE = str(Path(jsonargparse.__file__).parent)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_JSONARGPARSE)


def constructor_error(err: BaseException) -> Optional[BaseException]:
    """The first exception in ``err``'s chain that jsonargparse did not raise itself, if ``err`` is one
    of jsonargparse's wrappers; ``None`` when ``err`` is already the original."""
    if not _raised_in_jsonargparse(err):
        return None
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not _raised_in_jsonargparse(current):
            return current
        current = current.__cause__ or current.__context__
    return None
