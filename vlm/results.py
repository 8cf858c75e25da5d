"""``results.json``: what every ``vlm test`` run writes into its log directory (CONTRACTS.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L

from vlm.versions import package_versions


def collect_results(trainer: L.Trainer, model: L.LightningModule, config_path: Optional[str], seed: Optional[int]) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    dm = getattr(trainer, "datamodule", None)
    backbone = getattr(model, "backbone", None)
    extra = getattr(dm, "result_extras", None)
    model_extra = getattr(model, "result_extras", None)
    return {
        "metrics": metrics,
        "seed": seed if seed is not None else _env_seed(),
        "method": getattr(model, "method_name", type(model).__name__),
        "dataset": getattr(dm, "dataset", None) or (type(dm).__name__ if dm is not None else None),
        "backbone": backbone.identity() if backbone is not None else None,
        "config": config_path,
        "versions": package_versions(),
        **({"data": extra() if callable(extra) else extra} if extra else {}),
        **({"model": model_extra()} if callable(model_extra) else {}),
    }


def _env_seed() -> Optional[int]:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


def write_results(trainer: L.Trainer, model: L.LightningModule, config_path: Optional[str] = None, seed: Optional[int] = None) -> Path:
    """Write ``results.json`` into ``trainer.log_dir`` (or ``default_root_dir``) on rank 0."""
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    path = log_dir / "results.json"
    if trainer.is_global_zero:
        log_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(collect_results(trainer, model, config_path, seed), indent=1))
        tmp.replace(path)
    return path
