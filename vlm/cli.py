"""The ``vlm`` command: ``vlm fit|validate|test|predict`` (LightningCLI) and ``vlm export``.

Configs compose left to right (``--config backbone.yaml --config prompt.yaml --config data.yaml``)
and any field can be overridden (``--model.init_args.prompt_learner.init_args.n_ctx 8``). Model
and data are chosen by ``class_path`` (subclass mode); prompt learners accept a short registry
name (``class_path: coop``). Every ``test`` run writes ``results.json`` into its log directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

import vlm.datamodules  # noqa: F401  (registers datamodule subclasses for class_path resolution)
import vlm.modules  # noqa: F401
import vlm.prompts  # noqa: F401
from vlm.results import write_results


class VLMCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with results and resolved-config capture."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """jsonargparse's parse, plus the registered short names when a learner or pruner is unknown
        (jsonargparse itself only says that the name is not an import path)."""
        import contextlib
        import io

        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                super().parse_arguments(parser, args)
        except SystemExit:
            message = captured.getvalue()
            sys.stderr.write(message)
            if "prompt_learner" in message or "pruner" in message:
                from vlm import prompts, pruning

                sys.stderr.write(
                    f"Registered prompt learners: {', '.join(prompts.available())}. Registered pruners: "
                    f"{', '.join(pruning.available())}. Use one of these names or a full class path.\n"
                )
            raise
        sys.stderr.write(captured.getvalue())

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus vlm's reliability defaults (vlm.preemption.install_defaults):
        a checkpoint on SIGTERM, generator states in checkpoints, atomic weights-only checkpoint IO."""
        from vlm.preemption import install_defaults

        return install_defaults(super().instantiate_trainer(**kwargs))

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        resolved = cfg.as_dict()
        if hasattr(self.model, "run_config"):
            self.model.run_config = _plain({
                "seed_everything": resolved.get("seed_everything"),
                "model": resolved.get("model"),
                "data": resolved.get("data"),
                "trainer": _portable_trainer(resolved.get("trainer", {})),
            })

    def _config_path(self) -> Optional[str]:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        path = Path(log_dir) / "config.yaml"
        return str(path) if path.exists() else None

    def after_test(self) -> None:
        seed = self.config[self.subcommand].get("seed_everything")
        write_results(self.trainer, self.model, self._config_path(), seed if isinstance(seed, int) else None)


class _ParseOnlyCLI(VLMCLI):
    """Parses and validates configs (class paths, argument names and types) without building."""

    def instantiate_classes(self) -> None:
        self.model = self.datamodule = self.trainer = None  # type: ignore[assignment]


def parse_configs(paths: list[str], overrides: Optional[list[str]] = None) -> Any:
    """Validate composed config files as ``vlm fit`` would, without instantiating anything."""
    args = [a for p in paths for a in ("--config", str(p))] + list(overrides or [])
    return _ParseOnlyCLI(args=args, run=False).config


def _plain(value: Any) -> Any:
    """``value`` with every leaf a str/int/float/bool/None (others, e.g. a DDP ``timeout`` timedelta,
    become their string form, which jsonargparse parses back), so checkpoints that hold the run
    config load with ``torch.load(weights_only=True)`` and export to YAML."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _portable_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The trainer section without run-specific objects (callbacks/loggers stay as config dicts)."""
    return {k: v for k, v in trainer.items() if v is not None}


def export_main(argv: list[str]) -> None:
    """``vlm export --ckpt X --out DIR [--trust]``."""
    import argparse

    from vlm.export import export_checkpoint

    p = argparse.ArgumentParser(prog="vlm export", description="Write the learned tensors of a checkpoint as safetensors.")
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `vlm fit`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--trust", action="store_true", help="allow full pickle loading of the checkpoint (only for files you trust)")
    a = p.parse_args(argv)
    out = export_checkpoint(a.ckpt, a.out, trust=a.trust)
    print(f"exported to {out}; evaluate with: vlm test --config {out / 'config.yaml'}")


def release_process_group() -> None:
    """Tear down the default process group, if any, before the interpreter exits.

    Lightning keeps the group alive after ``fit``/``test`` so that a later stage can reuse it.
    Left to interpreter shutdown, gloo's worker threads and the TCP store's daemon are destroyed
    in arbitrary order, which aborts the process ("terminate called without an active exception",
    exit -6) after a successful run, and SLURM then reports the job as failed. Releasing it here,
    after every rank has finished its last collective, makes a clean exit deterministic.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    VLMCLI(args=argv)
    release_process_group()


if __name__ == "__main__":
    main()
