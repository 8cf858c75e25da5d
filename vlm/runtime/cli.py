"""The ``vlm`` command: ``vlm fit|validate|test|predict`` (LightningCLI), ``vlm export`` and ``vlm import``.

This module is the entry point (``vlm = vlm.runtime.cli:main``) and imports nothing heavy: ``vlm
--help`` and ``vlm export`` answer without Lightning, and Lightning (with the model code a config
names) is imported only to run ``fit|validate|test|predict`` (vlm.runtime.lightning_cli.VLMCLI).

* ``vlm --help`` lists the subcommands, ``export`` included (:func:`top_level_parser`).
* ``vlm export ...`` is a plain subcommand: :func:`export_main`, with its own parser, runs before
  any LightningCLI is built; so is ``vlm import`` (:func:`import_main`, released Dassl checkpoints).
* ``vlm <subcommand> --help`` is LightningCLI's, kept after the first time (vlm.runtime.help_cache).
* Errors: our own errors (vlm's error classes, and the ``ValueError``/``FileNotFoundError`` that vlm's
  code raises with a fix in its message: dataset layout, corrupt image or checkpoint, mismatch,
  budget, untrained model, linked value, ...) print as ``vlm <subcommand>: error: <message>``, without
  a traceback, and exit with status 1; ``--debug`` (anywhere on the command line) or ``VLM_DEBUG=1``
  shows the traceback. Called from Python with an argument list, :func:`main` raises them instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

#: ``vlm --help``'s one line per subcommand (LightningCLI's own come from the Trainer's docstrings).
SUBCOMMANDS = {
    "fit": "Train the model's learned parts (prompts, heads) on the data's training set.",
    "validate": "Evaluate on the validation set.",
    "test": "Evaluate on the test set(s); writes results.json into the run's log folder.",
    "predict": "Predict a class and its score for every image; writes predictions.jsonl into the log folder.",
    # The same text as vlm.runtime.export.EXPORT_HELP (tests/test_cli.py checks), without importing it.
    "export": "Write the learned tensors of a checkpoint as safetensors, with the config to re-test them.",
    # The same text as vlm.runtime.released.IMPORT_HELP (tests/released checks), without importing it.
    "import": "Convert a released Dassl checkpoint (model.pth.tar-N) of a prompt learner into a vlm export.",
}
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_FLAG = "--debug"


def __getattr__(name: str) -> Any:
    """``VLMCLI`` and ``ParseOnlyCLI`` (they import Lightning), loaded when first asked for."""
    if name in ("VLMCLI", "ParseOnlyCLI"):
        from vlm.runtime import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_configs(paths: list[str], overrides: Optional[list[str]] = None) -> Any:
    """Validate composed config files as ``vlm fit`` would, without instantiating anything."""
    from vlm.runtime.lightning_cli import ParseOnlyCLI

    args = [a for p in paths for a in ("--config", str(p))] + list(overrides or [])
    return ParseOnlyCLI(args=args, run=False).config


def top_level_parser() -> Any:
    """``vlm``'s own parser: the subcommands and ``--debug`` (argparse: nothing heavy to import)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vlm",
        description="Prompt learning and visual-token pruning on CLIP, ViT and LLaVA (a LightningCLI).",
        epilog="Configs compose left to right: vlm fit --config a.yaml --config b.yaml --model.init_args.x 1",
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error (or set VLM_DEBUG=1)")
    subcommands = parser.add_subparsers(
        title="subcommands", dest="subcommand", metavar="{" + ",".join(SUBCOMMANDS) + "}",
        description="For more details of each subcommand, add it as an argument followed by --help.",
    )  # fmt: skip
    for name, text in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=text, add_help=False)
    return parser


def export_main(argv: list[str]) -> None:
    """``vlm export --ckpt X --out DIR [--overwrite] [--trust]`` (vlm.runtime.export.export_parser)."""
    from vlm.runtime.export import export_checkpoint, export_parser

    a = export_parser().parse_args(argv)
    if a.format == "dassl":
        from vlm.runtime.released import export_dassl

        target = export_dassl(a.ckpt, a.out, epoch=a.epoch, trust=a.trust, overwrite=a.overwrite)
        epoch = target.name.rpartition("-")[2]
        print(f"exported to {target}; load it with the released code: --model-dir {a.out} --load-epoch {epoch} --eval-only")
        return
    out = export_checkpoint(a.ckpt, a.out, trust=a.trust, overwrite=a.overwrite)
    print(f"exported to {out}; evaluate with: vlm test --config {out / 'config.yaml'}")


def import_main(argv: list[str]) -> None:
    """``vlm import --from dassl --method M --ckpt model.pth.tar-N --config RUN.yaml --out DIR`` (vlm.runtime.released)."""
    from vlm.runtime.released import import_dassl, import_parser

    a = import_parser().parse_args(argv)
    out = import_dassl(a.ckpt, a.config, a.out, a.method, overwrite=a.overwrite)
    print(f"imported to {out}; evaluate with: vlm test --config {out / 'config.yaml'}")


def release_process_group() -> None:
    """Tear down the default process group, if any, before the interpreter exits.

    Lightning keeps the group alive after ``fit``/``test`` so that a later stage can reuse it.
    Left to interpreter shutdown, gloo's worker threads and the TCP store's daemon are destroyed
    in arbitrary order, which aborts the process ("terminate called without an active exception",
    exit -6) after a successful run, and SLURM then reports the job as failed. Releasing it here,
    after every rank has finished its last collective, makes a clean exit deterministic.
    """
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _lightning(args: list[str]) -> None:
    """``vlm fit|validate|test|predict``: LightningCLI (its ``--help`` from the cache when it can)."""
    from vlm.runtime import help_cache

    cached = help_cache.read(args)
    if cached is not None:
        sys.stdout.write(cached)
        raise SystemExit(0)
    from vlm.runtime.lightning_cli import VLMCLI

    if not help_cache.cacheable(args):
        VLMCLI(args=args)
        release_process_group()
        return
    import contextlib
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            VLMCLI(args=args)
    except SystemExit as done:
        sys.stdout.write(out.getvalue())
        if done.code in (0, None):
            help_cache.write(args, out.getvalue())
        raise
    sys.stdout.write(out.getvalue())


def run(argv: list[str]) -> None:
    """Run one ``vlm`` command line (without the program name); errors propagate as raised."""
    args = [a for a in argv if a != DEBUG_FLAG]
    if len(args) != len(argv):
        os.environ["VLM_DEBUG"] = "1"
    first = next((a for a in args if not a.startswith("-")), None)
    if not args or args[0] in ("-h", "--help") or first is None:
        top_level_parser().parse_args(args or ["--help"])
        return
    if args[0] == "export":
        export_main(args[1:])
        return
    if args[0] == "import":
        import_main(args[1:])
        return
    if first not in LIGHTNING_SUBCOMMANDS and args[0] == first:
        top_level_parser().parse_args(args)  # names the unknown subcommand and lists the valid ones
        return
    _lightning(args)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of our own errors, whose message names the problem and the fix: an
    instance of a class defined in vlm, or a ``ValueError``/``OSError``/``KeyError`` raised by vlm's own
    code (the innermost frame of its traceback is in a vlm source file)."""
    if not isinstance(err, Exception):
        return False
    if (type(err).__module__ or "").split(".")[0] == "vlm":
        return True
    if not isinstance(err, (ValueError, OSError, KeyError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and _in_vlm(tb.tb_frame.f_code.co_filename)


def _in_vlm(filename: str) -> bool:
    roots = []
    for name in ("vlm", "vlm.prompts", "vlm.pruning", "vlm.datamodules", "vlm.kernels"):
        module = sys.modules.get(name)
        roots += [os.path.realpath(p) for p in getattr(module, "__path__", [])]
    path = os.path.realpath(filename)
    return any(path.startswith(root + os.sep) for root in roots)


def console(argv: list[str]) -> int:
    """The ``vlm`` command: :func:`run`, with our own errors shown as their message (the fix
    included) and exit status 1 instead of a traceback, unless ``--debug``/``VLM_DEBUG=1``."""
    from vlm.runtime.parse_errors import debug_enabled

    try:
        run(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Exception as err:
        if debug_enabled() or not is_user_error(err):
            raise
        subcommand = next((a for a in argv if not a.startswith("-")), None)
        prog = f"vlm {subcommand}" if subcommand in SUBCOMMANDS else "vlm"
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: error: {type(err).__name__}: {err}\n(for the traceback: add --debug, or set VLM_DEBUG=1)\n")
        return 1
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    """The ``vlm`` entry point. Without ``argv`` (the command): :func:`console`, exiting with its status.
    With ``argv`` (from Python): :func:`run`, which raises errors as they are."""
    if argv is not None:
        run(list(argv))
        return
    code = console(sys.argv[1:])
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
