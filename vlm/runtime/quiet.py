"""Silence, at their source and nothing else, the messages that vlm's own choices cause.

* transformers' load report for an HF text tower that open_clip builds without BERT's pooler
  (mean pooling: ``add_pooling_layer=False``), so the checkpoint's ``pooler.*`` tensors are
  "UNEXPECTED"; that is by design. :func:`quiet_hf_text_load` drops exactly that report (any
  other key or status, e.g. a MISSING weight, is still shown) and the weight-loading progress bar.
* Lightning's "Found N module(s) in eval mode at the start of training" for a frozen backbone,
  which vlm keeps in eval mode on purpose (dropout off, as the papers do).
  :class:`FrozenBackboneEvalMode` ignores that warning only when its N is exactly the number of
  frozen modules (no trainable parameter) that ``train()`` leaves in eval mode, so a module that
  trains while in eval mode is still reported.
* Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, printed on every ``fit``
  (:func:`quiet_lightning_tips`: a ``logging`` filter on Lightning's rank-zero loggers that drops
  exactly the records starting with ``💡 Tip:``), and its note that the trainer "already" has a
  model summary when that summary is vlm's default one.
* Two notices every ``vlm`` run would print that say nothing about the run
  (:func:`quiet_library_notices`): Lightning's "``tensorboardX`` has been removed ... will use
  ``CSVLogger``" (vlm's logs are CSV by design: ``metrics.csv``, ``results.json``) and torch's
  deprecation of ``LeafSpec`` raised from Lightning's own ``utilities/_pytree.py`` (the pinned
  Lightning against the pinned torch; nothing a user can change).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_pooler_only_report(message: str) -> bool:
    """True for a transformers LOAD REPORT whose every row is an UNEXPECTED ``pooler.*`` key."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text:
        return False
    rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if "|" in line]
    rows = [r for r in rows if r[0] and r[0] != "Key" and not set(r[0]) <= {"-", "+"}]
    return bool(rows) and all(r[0].startswith("pooler.") and len(r) > 1 and r[1] == "UNEXPECTED" for r in rows)


class _DropPoolerReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_pooler_only_report(record.getMessage())


@contextlib.contextmanager
def quiet_hf_text_load() -> Iterator[None]:
    """Around building an open_clip HF text tower: no pooler-only load report, no loading bar."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # no transformers, no HF tower
        yield
        return
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropPoolerReport()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    logger.addFilter(drop)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if bars_were_on:
            hf_logging.enable_progress_bar()


#: (message regex, module regex) of each notice :func:`quiet_library_notices` drops.
LIBRARY_NOTICES: tuple[tuple[str, str], ...] = (
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", r"lightning\.pytorch\..*"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
)


#: The loggers Lightning's ``rank_zero_info`` writes to (the last one imported sets it).
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning_utilities.core.rank_zero")
LIGHTNING_TIP = "\N{ELECTRIC LIGHT BULB} Tip:"


#: Lightning's note when a config (here: vlm's default, vlm.runtime.callbacks.default_callbacks) has its
#: own model summary; said on every run, about a choice vlm made, so dropped for vlm's own class only.
OWN_SUMMARY_NOTE = "Trainer already configured with model summary callbacks: [<class 'vlm.runtime.callbacks.ModelSummaryNoFlops'>]"


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(LIGHTNING_TIP) or message.startswith(OWN_SUMMARY_NOTE))


_TIPS = _DropLightningTips()


def quiet_lightning_tips() -> None:
    """Drop Lightning's advertising tips (records starting with ``💡 Tip:``), and its note about vlm's own
    default model summary, from its info loggers."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIPS not in logger.filters:
            logger.addFilter(_TIPS)


def quiet_library_notices() -> None:
    """Ignore exactly the :data:`LIBRARY_NOTICES` (message and the module that warns), process-wide."""
    for message, module in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, module=module)


def frozen_eval_modules(model: nn.Module) -> int:
    """How many modules stay in eval mode when ``model.train()`` runs, if all of them are frozen
    (no parameter that requires grad): vlm's frozen towers. 0 when there are none, or when some
    module left in eval mode still trains (then Lightning's warning is a real one)."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        held = [m for m in model.modules() if not m.training]
        return 0 if any(p.requires_grad for m in held for p in m.parameters()) else len(held)
    finally:
        for m, training in modes.items():
            m.training = training


class FrozenBackboneEvalMode(L.Callback):
    """Ignore Lightning's eval-mode warning when its count is exactly that of vlm's frozen eval-mode modules."""

    def __init__(self) -> None:
        self._filter: tuple[Any, ...] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = frozen_eval_modules(pl_module)
        if n == 0:
            return
        warnings.filterwarnings(
            "ignore", message=rf"Found {n} module\(s\) in eval mode at the start of training", category=PossibleUserWarning
        )
        self._filter = warnings.filters[0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._filter is not None and self._filter in warnings.filters:
            warnings.filters.remove(self._filter)  # an "ignore" entry caches nothing, so removing it is enough
        self._filter = None
