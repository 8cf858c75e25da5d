"""``VLMCLI``: LightningCLI for ``vlm fit|validate|test|predict`` (the command itself: vlm.runtime.cli).

Configs compose left to right (``--config backbone.yaml --config prompt.yaml --config data.yaml``)
and any field can be overridden (``--model.init_args.prompt_learner.init_args.n_ctx 8``). Model
and data are chosen by ``class_path`` (subclass mode); prompt learners and pruners accept a short
registry name (``class_path: <name>``, vlm.registry). Every ``test`` run writes ``results.json`` into
its log directory.

Everything here goes through LightningCLI's public seams: ``setup_parser``,
``add_core_arguments_to_parser`` (our model/data options before the trainer's in ``--help``),
``add_arguments_to_parser`` (links), ``parse_arguments``, ``before_instantiate_classes``,
``instantiate_classes``, ``instantiate_trainer``, ``trainer_defaults`` and ``before_/after_<subcommand>``.
One exception, pinned by tests/reliability/test_lightning_seams.py: :meth:`VLMCLI._parse_ckpt_path`
(LightningCLI has no public hook between parsing and its merge of ``--ckpt_path``'s
hyper-parameters into the model config; see its docstring).
"""

from __future__ import annotations

import contextlib
import enum
import io
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from vlm.runtime.results import write_results

#: Help flags: with one of them, every model and datamodule class is imported so ``--help`` lists them.
HELP_FLAGS = ("-h", "--help")


def _wants_help(args: Any) -> bool:
    if not isinstance(args, (list, tuple)):
        return False
    return any(a in HELP_FLAGS or str(a).startswith("--print_config") or str(a).endswith(".help") for a in args)


class VLMCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with results and resolved-config capture."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        from vlm.runtime.callbacks import StageConfigCallback
        from vlm.runtime.quiet import quiet_library_notices, quiet_lightning_tips
        from vlm.runtime.shortnames import install_short_name_loader

        quiet_library_notices()
        quiet_lightning_tips()
        install_short_name_loader()
        if _wants_help(sys.argv[1:] if args is None else args):
            _import_every_class()

        kwargs.setdefault("save_config_callback", StageConfigCallback)  # config_<stage>.yaml, never overwritten
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        # Lightning's own default (True) seeds 0 as well, with a "No seed found" warning on every run.
        kwargs.setdefault("seed_everything_default", 0)
        kwargs["trainer_defaults"] = dict(kwargs.get("trainer_defaults") or {})
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

    # -- the parser -------------------------------------------------------------------------------
    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        """LightningCLI's parser; ``test``/``validate`` default to ``--verbose false``: vlm prints their
        metrics once, in one table, after the run (:meth:`after_test`), where Lightning's table repeats
        a metric logged once per epoch across several loaders (base and new) under every loader."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            self.parser.set_defaults({"test.verbose": False, "validate.verbose": False})

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """Model, data and vlm's own options first, then the trainer's, so ``vlm fit --help`` shows ours first."""
        parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True)
        parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="vlm test: evaluate learned parts that no --ckpt_path or init_from restored")
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the model's template/num_classes/classnames from the data (vlm.runtime.links)."""
        from vlm.runtime.links import add_data_links

        add_data_links(parser)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """jsonargparse's parse, with: short learner/pruner names expanded (vlm.runtime.shortnames); a
        ``--config`` file that is not valid YAML named with its line (vlm.runtime.config_files); a
        parse error said in a few lines (the unknown key and the nearest valid one) instead of the
        usage and the union dump; and ``--ckpt_path last``/``best`` resolved to a file or refused
        (vlm.runtime.checkpoint_words)."""
        from jsonargparse import Namespace

        from vlm.runtime.config_files import ConfigFileError, check_config_args
        from vlm.runtime.parse_errors import explain_parse_error
        from vlm.runtime.shortnames import expand_args

        try:
            check_config_args(args if args is None or isinstance(args, (list, tuple)) else [])
        except ConfigFileError as err:
            sys.stderr.write(f"vlm: error: {err}\n")
            raise SystemExit(2) from err
        args = expand_args(sys.argv[1:] if args is None else args)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                # LightningCLI.parse_arguments warns whenever `args` is given while sys.argv has arguments,
                # which is every `vlm` run (main() passes sys.argv[1:] on); its parse is just this.
                self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        except SystemExit:
            sys.stderr.write(explain_parse_error(captured.getvalue()))
            raise
        sys.stderr.write(captured.getvalue())
        self._resolve_ckpt_path()

    def _resolve_ckpt_path(self) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        from vlm.runtime.checkpoint_words import WORDS, check_ckpt_path

        subcommand = self.config.get("subcommand")
        if not subcommand or "ckpt_path" not in self.config[subcommand]:
            return
        cfg = self.config[subcommand]
        given = cfg.get("ckpt_path")
        resolved = check_ckpt_path(given, cfg, subcommand)
        if given in WORDS:
            rank_zero_info(f"vlm {subcommand}: --ckpt_path {given} is {resolved}")
        cfg.ckpt_path = resolved

    def _parse_ckpt_path(self) -> None:
        """The one override of a LightningCLI private method (pinned: tests/reliability/test_lightning_seams.py).

        LightningCLI calls it right after ``parse_arguments`` to merge ``--ckpt_path``'s saved
        hyper-parameters into the model config, with no public hook around it. Its merge would break
        vlm's runs: it reads the file with a bare ``torch.load`` (a damaged file fails without naming
        it; a trusted pickled one, ``--weights_only false``, fails outright) and merges as
        ``dict_kwargs`` the values the CLI links from the data (vlm.runtime.links), which then reach
        the constructor as extra arguments (``num_classes`` into CLIPClassifier). This version reads
        the file with vlm.runtime.checkpoint_io (damage named with its fix; a refused pickle left to
        the Trainer's own, explicitly trusted, load) and drops the linked values: the data config is
        their one source."""
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

    # -- building ---------------------------------------------------------------------------------
    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Before anything is built: a configured plain ``CSVLogger`` becomes vlm's appending one
        (vlm.runtime.csv_logger), and the default callbacks this config does not choose itself are
        added through ``trainer_defaults`` (vlm.runtime.callbacks.default_callbacks)."""
        from jsonargparse import Namespace

        from vlm.runtime.callbacks import default_callbacks
        from vlm.runtime.csv_logger import appending_logger_config

        trainer = self._subconfig().get("trainer")
        if trainer is None:
            return
        trainer.logger = appending_logger_config(trainer.get("logger"))
        configured = trainer.get("callbacks") or []
        classes = [_import_class(c.get("class_path")) for c in configured if isinstance(c, (Namespace, dict))]
        self.trainer_defaults["callbacks"] = default_callbacks(self.subcommand, classes, trainer.as_dict())

    def instantiate_classes(self) -> None:
        from vlm.runtime.init_errors import constructor_error
        from vlm.runtime.links import check_linked_values

        try:
            super().instantiate_classes()
        except Exception as err:  # a constructor's own error, not jsonargparse's union dump (vlm.runtime.init_errors)
            original = constructor_error(err)
            if original is None:
                raise
            raise original.with_traceback(original.__traceback__) from None
        cfg = self._subconfig()
        check_linked_values(cfg.get("model", {}).get("init_args"), self.datamodule)
        resolved = cfg.as_dict()
        if hasattr(self.model, "run_config"):
            self.model.run_config = _plain({
                "seed_everything": resolved.get("seed_everything"),
                "model": resolved.get("model"),
                "data": resolved.get("data"),
                "trainer": _portable_trainer(resolved.get("trainer", {})),
            })

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The configured Trainer plus vlm's reliability defaults (vlm.runtime.preemption.install_defaults):
        a checkpoint on SIGTERM, generator states in checkpoints, atomic weights-only checkpoint IO;
        and no eval-mode warning for a frozen backbone (vlm.runtime.quiet.FrozenBackboneEvalMode)."""
        from vlm.runtime.preemption import install_defaults
        from vlm.runtime.quiet import FrozenBackboneEvalMode

        trainer = install_defaults(super().instantiate_trainer(**kwargs))
        trainer.callbacks.append(FrozenBackboneEvalMode())
        return trainer

    # -- running: LightningCLI's before_/after_<subcommand> hooks ---------------------------------
    def _quiet_foreign_checkpoint_dir(self) -> None:
        """Outside ``fit``, ModelCheckpoint's "The dirpath has changed from ..." says only that the
        ``--ckpt_path`` came from another run, which is how every ``vlm test`` starts (nothing is saved)."""
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")

    def before_test(self) -> None:
        from vlm.runtime.results import check_tested_weights

        self._quiet_foreign_checkpoint_dir()
        cfg = self.config[self.subcommand]
        check_tested_weights(self.model, cfg.get("ckpt_path"), bool(cfg.get("allow_untrained")))

    def before_validate(self) -> None:
        self._quiet_foreign_checkpoint_dir()

    def before_predict(self) -> None:
        self._quiet_foreign_checkpoint_dir()

    def _print_metrics(self, stage: str) -> None:
        from vlm.runtime.results import print_metrics

        if self.trainer.is_global_zero:  # the metrics this run logged, each once
            print_metrics([{k: float(v) for k, v in self.trainer.callback_metrics.items()}], title=f"{stage} results")

    def _config_path(self) -> Optional[str]:
        from vlm.runtime.callbacks import StageConfigCallback

        saved = [cb.saved_path for cb in self.trainer.callbacks if isinstance(cb, StageConfigCallback)]
        return next((str(p) for p in saved if p is not None and Path(p).exists()), None)

    def after_test(self) -> None:
        self._print_metrics("test")
        seed = self.config[self.subcommand].get("seed_everything")
        write_results(self.trainer, self.model, self._config_path(), seed if isinstance(seed, int) else None)

    def after_validate(self) -> None:
        self._print_metrics("validate")


class ParseOnlyCLI(VLMCLI):
    """Parses and validates configs (class paths, argument names and types) without building."""

    def instantiate_classes(self) -> None:
        self.model = self.datamodule = self.trainer = None  # type: ignore[assignment]


def _import_every_class() -> None:
    """Import every model and datamodule class vlm defines, so ``--help`` lists them as known subclasses
    (a run imports only what its config names)."""
    import importlib
    import pkgutil

    import vlm.datamodules
    import vlm.modules

    vlm.modules.import_all()
    for name in [f"vlm.datamodules.{m.name}" for m in pkgutil.iter_modules(vlm.datamodules.__path__)] + ["vlm.quickstart"]:
        try:
            importlib.import_module(name)
        except ImportError:  # a reader for an optional library (tfds, ...) that is not installed
            pass


def _import_class(class_path: Any) -> Optional[type]:
    import importlib

    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _plain(value: Any) -> Any:
    """``value`` with every leaf a str/int/float/bool/None (others, e.g. a DDP ``timeout`` timedelta,
    become their string form, which jsonargparse parses back), so checkpoints that hold the run
    config load with ``torch.load(weights_only=True)`` and export to YAML."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):  # an IntEnum (requeue_signal: SIGUSR1) is an int, but pickles as its class
        return value.name
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _portable_trainer(trainer: dict[str, Any]) -> dict[str, Any]:
    """The trainer section without run-specific objects (callbacks/loggers stay as config dicts)."""
    return {k: v for k, v in trainer.items() if v is not None}
