"""The ``vlm`` command: ``vlm fit|validate|test|predict`` (LightningCLI) and ``vlm export``.

Configs compose left to right (``--config backbone.yaml --config prompt.yaml --config data.yaml``)
and any field can be overridden (``--model.init_args.prompt_learner.init_args.n_ctx 8``). Model
and data are chosen by ``class_path`` (subclass mode); prompt learners accept a short registry
name (``class_path: <name>``). Every ``test`` run writes ``results.json`` into its log directory.
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
from vlm.runtime.results import write_results


class VLMCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with results and resolved-config capture."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        from vlm.runtime.callbacks import StageConfigCallback
        from vlm.runtime.quiet import quiet_library_notices

        quiet_library_notices()

        kwargs.setdefault("save_config_callback", StageConfigCallback)  # config_<stage>.yaml, never overwritten
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # Lightning's own default (True) seeds 0 as well, with a "No seed found" warning on every run.
        kwargs.setdefault("seed_everything_default", 0)
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

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the model's template/num_classes/classnames from the data (vlm.runtime.links), and add
        ``--allow_untrained`` (``vlm test`` of learned parts that no checkpoint restored)."""
        from vlm.runtime.links import add_data_links

        add_data_links(parser)
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="vlm test: evaluate learned parts that no --ckpt_path or init_from restored")

    def before_test(self) -> None:
        from vlm.runtime.results import check_tested_weights

        cfg = self.config[self.subcommand]
        check_tested_weights(self.model, cfg.get("ckpt_path"), bool(cfg.get("allow_untrained")))

    def _run_subcommand(self, subcommand: str) -> None:
        """LightningCLI's run, with two changes to what it prints outside ``fit``. ``test``/``validate``
        print their metrics once, in one table (vlm.runtime.results.print_metrics): Lightning's table repeats
        each metric under every dataloader when a metric is logged once per epoch across several
        loaders (base and new). And ModelCheckpoint's "dirpath has changed" warning is dropped: a
        ``--ckpt_path`` from another run is how every ``vlm test`` starts, and nothing is saved."""
        import warnings

        from vlm.runtime.results import print_metrics

        before_fn = getattr(self, f"before_{subcommand}", None)
        if callable(before_fn):
            before_fn()
        fn = getattr(self, subcommand, getattr(self.trainer, subcommand))
        fn_kwargs = self._prepare_subcommand_kwargs(subcommand)
        own_table = subcommand in ("test", "validate") and fn_kwargs.get("verbose") is True
        if own_table:
            fn_kwargs["verbose"] = False
        with warnings.catch_warnings():
            if subcommand != "fit":
                warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
            output = fn(**fn_kwargs)
        if own_table and self.trainer.is_global_zero:
            print_metrics(output, title=f"{subcommand} results")
        after_fn = getattr(self, f"after_{subcommand}", None)
        if callable(after_fn):
            after_fn()

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """jsonargparse's parse, plus the registered short names when a learner or pruner is unknown
        (jsonargparse itself only says that the name is not an import path). A ``--config`` file that is
        not valid YAML is named with its line first (vlm.runtime.config_files)."""
        import contextlib
        import io

        from jsonargparse import Namespace

        from vlm.runtime.config_files import ConfigFileError, check_config_args

        try:
            check_config_args(args if args is None or isinstance(args, (list, tuple)) else [])
        except ConfigFileError as err:
            sys.stderr.write(f"vlm: error: {err}\n")
            raise SystemExit(2) from err
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                # LightningCLI.parse_arguments warns whenever `args` is given while sys.argv has arguments,
                # which is every `vlm` run (main() passes sys.argv[1:] on); its parse is just this.
                self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's merge of ``--ckpt_path``'s hyper-parameters into the model config, with two
        changes. The file is read by vlm.runtime.checkpoint_io, so a damaged one is named with its fix (a
        trusted pickled one, ``--weights_only false``, is left to the Trainer's own load). And the
        values the CLI links from the data (vlm.runtime.links) are dropped: the data config is their one
        source, and merged as ``dict_kwargs`` they would also let a link reach a model that lacks
        the argument (``num_classes`` into CLIPClassifier)."""
        from vlm.runtime.checkpoint_io import UnsafeCheckpointError, torch_load
        from vlm.runtime.links import DATA_LINKS

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            ckpt = torch_load(ckpt_path, map_location="cpu", weights_only=True)
        except UnsafeCheckpointError:
            if cfg.get("weights_only") is False:
                return
            raise
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        for attr in DATA_LINKS:
            hparams.pop(attr, None)
        if not hparams:
            return
        model = {"class_path": class_path, "init_args": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyper-parameters saved in {ckpt_path} failed.\n")
            raise

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        """LightningCLI's subcommands, plus ``export`` so that ``vlm --help`` lists it (main() runs it)."""
        from vlm.runtime.export import EXPORT_HELP, export_parser

        super()._add_subcommands(parser, **kwargs)
        parser._subcommands_action.add_subcommand("export", export_parser(), help=EXPORT_HELP)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus vlm's reliability defaults (vlm.runtime.preemption.install_defaults):
        a checkpoint on SIGTERM, generator states in checkpoints, atomic weights-only checkpoint IO;
        no eval-mode warning for a frozen backbone (vlm.runtime.quiet.FrozenBackboneEvalMode); and CSV logs
        that append instead of deleting an earlier stage's (vlm.runtime.csv_logger.make_appending)."""
        from vlm.runtime.preemption import install_defaults
        from vlm.runtime.quiet import FrozenBackboneEvalMode

        from vlm.runtime.csv_logger import make_appending

        trainer = install_defaults(super().instantiate_trainer(**kwargs))
        trainer.callbacks.append(FrozenBackboneEvalMode())
        for logger in trainer.loggers:
            make_appending(logger)
        return trainer

    def instantiate_classes(self) -> None:
        from vlm.runtime.init_errors import constructor_error

        try:
            super().instantiate_classes()
        except Exception as err:  # a constructor's own error, not jsonargparse's union dump (vlm.runtime.init_errors)
            original = constructor_error(err)
            if original is None:
                raise
            raise original.with_traceback(original.__traceback__) from None
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        from vlm.runtime.links import check_linked_values

        check_linked_values(cfg.get("model", {}).get("init_args"), self.datamodule)
        resolved = cfg.as_dict()
        if hasattr(self.model, "run_config"):
            self.model.run_config = _plain({
                "seed_everything": resolved.get("seed_everything"),
                "model": resolved.get("model"),
                "data": resolved.get("data"),
                "trainer": _portable_trainer(resolved.get("trainer", {})),
            })

    def _config_path(self) -> Optional[str]:
        from vlm.runtime.callbacks import StageConfigCallback

        saved = [cb.saved_path for cb in self.trainer.callbacks if isinstance(cb, StageConfigCallback)]
        return next((str(p) for p in saved if p is not None and Path(p).exists()), None)

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
    """``vlm export --ckpt X --out DIR [--overwrite] [--trust]`` (vlm.runtime.export.export_parser)."""
    from vlm.runtime.export import export_checkpoint, export_parser

    a = export_parser().parse_args(argv)
    out = export_checkpoint(a.ckpt, a.out, trust=a.trust, overwrite=a.overwrite)
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
