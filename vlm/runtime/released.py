"""Released prompts: read and write the Dassl checkpoints that prompt-learning repositories publish.

``vlm import --from dassl --method NAME --ckpt model.pth.tar-N --config RUN.yaml --out DIR`` turns a
published checkpoint into a vlm export (``vlm test --config DIR/config.yaml`` evaluates it);
``vlm export --format dassl --ckpt RUN.ckpt|EXPORT_DIR --out DIR`` writes the other direction,
``DIR/<model name>/model.pth.tar-N``, which the official ``load_model(DIR, epoch=N)`` loads
(``--model-dir DIR --load-epoch N --eval-only``).

Dassl's ``save_model`` writes ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``,
the state dict of the module given to ``register_model``. Which tensors a learner's official code
saves, and under which names, is the learner's own declaration (``released_layout``, a
:class:`vlm.prompts.released.DasslLayout` in the learner's file); this module only applies those
rules, so the learners with a layout are the ``--method`` choices (:func:`methods`).

Official ``load_model`` deletes ``token_prefix``/``token_suffix`` before ``load_state_dict(strict=False)``
(they are recomputed from the class names), so they are checked here (their width and the context
length) but not converted, and not written back. The frozen CLIP weights are skipped. CoCoOp
(``meta_net.*``) is refused: its image-conditioned meta-network is not a learner of this package.

Dassl's checkpoints also pickle the LR scheduler, and a warmup scheduler holds its successor
*object*; ``torch.load(weights_only=True)`` refuses those. :func:`load_dassl` stays weights-only:
each refused class is replaced by an inert placeholder (no code of the file runs) and only the
tensors of ``state_dict`` are used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

IMPORT_HELP = "Convert a released Dassl checkpoint (model.pth.tar-N) of a prompt learner into a vlm export."
#: Keys of the learner's buffers that official ``load_model`` deletes.
TOKEN_BUFFERS = ("token_prefix", "token_suffix")
#: CLIP's text context length (1 start token + context + class name and end, padded).
CONTEXT_LENGTH = 77


def layouts() -> dict[str, Any]:
    """``{learner name: DasslLayout}`` for the registered learners whose class declares one (a
    subclass that does not declare its own has none: its released files differ)."""
    from vlm.prompts.registry import PROMPTS

    out = {}
    for name in PROMPTS.available():
        layout = vars(PROMPTS.get(name)).get("released_layout")
        if layout is not None:
            out[name] = layout
    return out


def methods() -> tuple[str, ...]:
    """The ``--method`` choices: learners with a released layout."""
    return tuple(layouts())


def _described(name: str, layout: Any) -> str:
    return name + (f" ({', '.join(layout.also)} too)" if layout.also else "")


class ReleasedCheckpointError(ValueError):
    """A released checkpoint that does not fit the method or config it is converted for."""


class _Ignored:
    """Stands for a pickled object outside ``state_dict`` (an optimizer or scheduler); inert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")


def load_dassl(path: str | Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a Dassl checkpoint; refused classes become :class:`_Ignored`."""
    import pickle

    import torch

    from vlm.runtime.checkpoint_io import checkpoint_load_error, torch_file_problem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    placeholders: list[tuple[Any, str]] = []
    for _ in range(64):
        try:
            with torch.serialization.safe_globals(placeholders), open(path, "rb") as f:
                data = torch.load(f, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as err:
            found = _GLOBAL.search(str(err))
            name = found and (found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}")
            if name is None or torch_file_problem(path) is not None or any(n == name for _, n in placeholders):
                raise checkpoint_load_error(path, err) from err
            placeholders.append((_Ignored, name))
        except Exception as err:
            raise checkpoint_load_error(path, err) from err
    else:
        raise ReleasedCheckpointError(f"{path}: too many pickled classes outside its state_dict.")
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise ReleasedCheckpointError(
            f"{path} is not a Dassl checkpoint: it has no 'state_dict' (keys: {sorted(data)[:8] if isinstance(data, dict) else type(data).__name__}). "
            "Pass the model.pth.tar-N file found under <output>/<model name>/ of a Dassl run of a released prompt learner."
        )
    state = data["state_dict"]
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ReleasedCheckpointError(f"{path}: state_dict entries {bad[:5]} are not tensors.")
    return data


def _strip_module(key: str) -> str:
    return key[7:] if key.startswith("module.") else key


def detect_method(state: dict[str, Any]) -> Optional[str]:
    """The learner whose released layout explains ``state``'s prompt tensors best (``cocoop`` for
    ``meta_net.*``), or None: the layout that covers every key that is neither a token buffer nor
    a frozen weight of it, and the most keys; ties are none."""
    keys = [k for k in state if k.split(".")[-1] not in TOKEN_BUFFERS]
    if any("meta_net." in k for k in keys):
        return "cocoop"
    best: list[tuple[int, str]] = []
    for name, layout in layouts().items():
        covered = [k for k in keys if layout.match(k) is not None]
        if covered and all(layout.match(k) is not None or layout.is_frozen(k) for k in keys):
            best.append((len(covered), name))
    best.sort(reverse=True)
    if not best or (len(best) > 1 and best[0][0] == best[1][0]):
        return None
    return best[0][1]


def _settings(method: str, state: dict[str, Any]) -> str:
    """The learner settings the checkpoint was trained with, as a config line (for error messages)."""
    layout = layouts().get(method)
    found = layout.settings(state) if layout is not None else {}
    if not found:
        return "(not readable from the checkpoint)"
    args = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in found.items())
    return f"prompt_learner: {{class_path: {method}, init_args: {{{args}}}}}"


def check_method(method: str, state: dict[str, Any]) -> None:
    """Refuse CoCoOp, a ``method`` without a released layout, and a checkpoint whose keys belong to
    another learner's layout."""
    state = {_strip_module(k): v for k, v in state.items()}
    found = detect_method(state)
    known = layouts()
    listed = "; ".join(_described(n, lay) for n, lay in known.items())
    if found == "cocoop":
        raise ReleasedCheckpointError(
            "This is a CoCoOp checkpoint (it has meta_net.* tensors: the image-conditioned meta-network). CoCoOp is not "
            "implemented as a prompt learner in vlm (vlm.prompts.available() lists those that are), so it cannot be "
            f"converted. Learners with a released layout: {listed}."
        )
    if method not in known:
        raise ReleasedCheckpointError(f"--method must be a learner with a released layout ({listed}); got {method!r}.")
    if found is not None and found != method:
        raise ReleasedCheckpointError(
            f"The checkpoint holds {found} tensors ({_settings(found, state)}) but --method is {method!r}. "
            f"Pass --method {found} and a config whose prompt_learner is {found}."
        )


def to_vlm(method: str, state: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Map a released ``state_dict`` of ``method`` onto our learner's tensors ``expected`` (name -> shape).

    Every learned tensor of ours must come from the checkpoint with its shape, and every checkpoint
    key must be a prompt tensor we use, a token buffer or a frozen CLIP weight; otherwise
    :class:`ReleasedCheckpointError` names the key, the method and the fix.
    """
    import torch

    state = {_strip_module(k): v for k, v in state.items()}
    check_method(method, state)
    fix = f"Set the learner of --config to the checkpoint's settings: {_settings(method, state)}."
    out: dict[str, Any] = {}
    used: set[str] = set()

    def take(official: str, ours: str, index: Optional[int] = None) -> None:
        if ours not in expected:
            raise ReleasedCheckpointError(
                f"Checkpoint key {official!r} ({method}) has no place in the config's learner (no {ours!r}"
                f"{'' if index is None else f' row {index}'}: its prompts are shallower or absent). {fix}"
            )
        shape = tuple(expected[ours]) if index is None else tuple(expected[ours])[1:]
        if index is not None and index >= tuple(expected[ours])[0]:
            raise ReleasedCheckpointError(
                f"Checkpoint key {official!r} ({method}) is a deep prompt beyond the config's learner, whose {ours} has "
                f"{tuple(expected[ours])[0]} rows (its depth is smaller). {fix}"
            )
        if tuple(state[official].shape) != shape:
            raise ReleasedCheckpointError(
                f"Checkpoint key {official!r} ({method}) has shape {list(state[official].shape)}, but the config's learner "
                f"expects {list(shape)} for {ours}{'' if index is None else f'[{index}]'}. {fix} A different width means "
                "another backbone: the released checkpoints are for CLIP ViT-B/16."
            )
        used.add(official)
        if index is None:
            out[ours] = state[official]
        else:
            out.setdefault(ours, {})[index] = state[official]

    layout = layouts()[method]
    for k in list(state):
        found = layout.match(k)
        if found is None:
            continue
        ours, row = found
        if row is not None and row < 0:
            raise ReleasedCheckpointError(f"Checkpoint key {k!r}: a deep prompt before the first prompted block does not exist in {method}. {fix}")
        take(k, ours, row)
    p = "prompt_learner."
    # token buffers: checked, not converted; frozen CLIP: skipped; anything else: unknown
    n_ctx = None
    for k, v in state.items():
        if k in used:
            continue
        base = k.split(".")[-1]
        if base in TOKEN_BUFFERS and k.count(".") <= 1:
            used.add(k)
            if base == "token_suffix" and (p + "ctx") in out:
                n_ctx = out[p + "ctx"].shape[-2]
                if v.shape[-1] != out[p + "ctx"].shape[-1]:
                    raise ReleasedCheckpointError(f"Checkpoint key {k!r} has width {v.shape[-1]}, but ctx has {out[p + 'ctx'].shape[-1]}.")
                if v.shape[1] + 1 + n_ctx != CONTEXT_LENGTH:
                    raise ReleasedCheckpointError(
                        f"Checkpoint key {k!r} has shape {list(v.shape)}: 1 + n_ctx + {v.shape[1]} != CLIP's {CONTEXT_LENGTH} tokens, "
                        f"so ctx (n_ctx={n_ctx}) is not the context it was saved with. {fix}"
                    )
        elif layout.is_frozen(k):
            used.add(k)
    unknown = sorted(set(state) - used)
    if unknown:
        raise ReleasedCheckpointError(
            f"Checkpoint keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''} are not part of the released {method} layout "
            f"(its learner's released_layout). Check --method ({'; '.join(_described(n, lay) for n, lay in layouts().items())}) and the file."
        )
    for ours, rows in list(out.items()):
        if isinstance(rows, dict):
            n = tuple(expected[ours])[0]
            missing = sorted(set(range(n)) - set(rows))
            if missing:
                raise ReleasedCheckpointError(
                    f"The checkpoint has no deep prompts for {ours} rows {missing} (the config's learner is deeper). {fix}"
                )
            out[ours] = torch.stack([rows[i] for i in range(n)])
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ReleasedCheckpointError(
            f"The checkpoint has no tensors for {missing[:6]} of the config's {method} learner. {fix}"
        )
    return out


def from_vlm(method: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`to_vlm`: our learner's tensors as the released ``state_dict`` (no buffers)."""
    layout = layouts()[method]
    out: dict[str, Any] = {}
    for k, v in tensors.items():
        released = layout.released(k, v.detach().cpu().contiguous().clone())
        if released is None:
            raise ReleasedCheckpointError(f"Tensor {k!r} has no place in the released {method} layout.")
        out.update(released)
    return out


# --- vlm import ----------------------------------------------------------------------------------
def build_module(configs: list[str], overrides: Optional[list[str]] = None) -> Any:
    """The model of a ``vlm fit/test`` config (built as ``vlm test`` builds it, with the run config recorded)."""
    from vlm.runtime.lightning_cli import VLMCLI

    args = [a for c in configs for a in ("--config", str(c))] + list(overrides or [])
    cli = VLMCLI(args=args, run=False)
    return cli.model


def import_dassl(ckpt: str | Path, configs: list[str], out: str | Path, method: str, overwrite: bool = False,
                 overrides: Optional[list[str]] = None) -> Path:
    """Write a vlm export at ``out`` from a released Dassl checkpoint and a config naming backbone, data and learner."""
    from safetensors.torch import save_file

    from vlm.runtime.export import CLASSNAMES, CONFIG, MARKER, METADATA, SELF, WEIGHTS, check_out_folder
    from vlm.runtime.hashing import sha256_file
    from vlm.runtime.versions import package_versions

    ckpt, out = Path(ckpt), Path(out)
    check_out_folder(out, overwrite)
    data = load_dassl(ckpt)
    state = data["state_dict"]
    check_method(method, state)  # CoCoOp, or another method's keys: refused before building anything
    module = build_module(configs, overrides)
    learner = getattr(module, "prompt_learner", None)
    if learner is None or learner.name != method:
        raise ReleasedCheckpointError(
            f"--config builds prompt learner {getattr(learner, 'name', None)!r}, but --method is {method!r}: the config must "
            f"name the released method's learner ({_settings(method, {_strip_module(k): v for k, v in state.items()})})."
        )
    own = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    converted = to_vlm(method, state, expected)
    tensors = {k: converted[k].to(own[k].dtype).contiguous().clone() for k in own}
    module.load_state_dict(tensors)  # the module accepts them (same check as loading an export)
    identity = module.identity()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("Written by `vlm import`: a self-contained export converted from a released checkpoint.\n")
    meta = {"identity": json.dumps(identity, sort_keys=True), "versions": json.dumps(package_versions(), sort_keys=True)}
    save_file(tensors, str(out / WEIGHTS), metadata=meta)
    import yaml

    config = json.loads(json.dumps(module.run_config or {}))
    config.setdefault("model", {}).setdefault("init_args", {})["init_from"] = SELF
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    names = list(getattr(module, "classnames", None) or []) or None
    tests = dict(getattr(module, "test_classnames", None) or {}) or None
    (out / CLASSNAMES).write_text(json.dumps({"classnames": names, "test_classnames": tests}, indent=1))
    (out / METADATA).write_text(json.dumps({
        **identity,
        "versions": package_versions(),
        "source_checkpoint": os.path.abspath(ckpt),
        "source_sha256": sha256_file(ckpt),
        "source_format": f"dassl/{method}",
        "epoch": data.get("epoch"),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }, indent=1))
    return out


def import_parser() -> Any:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="vlm import", description=IMPORT_HELP, default_env=False)
    p.add_argument("--from", choices=["dassl"], default="dassl", help="checkpoint format (Dassl's model.pth.tar-N)")
    p.add_argument("--method", required=True, choices=list(methods()),
                   help="the learner whose released layout the file has: " + "; ".join(_described(n, lay) for n, lay in layouts().items()))
    p.add_argument("--ckpt", required=True, help="the released model.pth.tar-N")
    p.add_argument("--config", required=True, action="append", help="a vlm fit/test config (repeatable) naming backbone, data and learner")
    p.add_argument("--out", required=True, help="output export directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    return p


# --- vlm export --format dassl -------------------------------------------------------------------
def _learned_of(source: Path, trust: bool) -> tuple[str, dict[str, Any], Optional[int]]:
    """(method, tensors, epoch) of a vlm ``.ckpt`` or an export directory."""
    from vlm.runtime.checkpoint_io import read_safetensors
    from vlm.runtime.export import METADATA, WEIGHTS, load_checkpoint_file
    from vlm.runtime.identity import CHECKPOINT_KEY, CheckpointMismatchError

    if source.is_dir():
        tensors, meta = read_safetensors(source / WEIGHTS)
        identity = json.loads(meta.get("identity", "{}"))
        extra = json.loads((source / METADATA).read_text()) if (source / METADATA).is_file() else {}
        return identity.get("method"), tensors, extra.get("epoch")
    data = load_checkpoint_file(source, trust=trust)
    record = data.get(CHECKPOINT_KEY)
    if record is None:
        raise CheckpointMismatchError(f"{source} was not written by a vlm module (no '{CHECKPOINT_KEY}' record).")
    return record.get("method"), data["state_dict"], data.get("epoch")


def export_dassl(source: str | Path, out: str | Path, epoch: Optional[int] = None, trust: bool = False, overwrite: bool = False) -> Path:
    """Write ``out/<model name>/model.pth.tar-<epoch>`` in the released layout; returns that file."""
    import torch

    from vlm.runtime.checkpoint_io import atomic_write

    source = Path(source)
    method, tensors, saved_epoch = _learned_of(source, trust)
    if method not in layouts():
        raise ReleasedCheckpointError(
            f"{source} is a {method!r} run; only the learners with a released Dassl layout can be written in it: "
            f"{'; '.join(_described(n, lay) for n, lay in layouts().items())}."
        )
    if epoch is None:
        epoch = saved_epoch if isinstance(saved_epoch, int) and saved_epoch > 0 else 1
    state = from_vlm(method, tensors)
    target = Path(out) / layouts()[method].model_name / f"model.pth.tar-{epoch}"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists. Choose another --out, or pass --overwrite to replace it.")
    # Dassl's save_checkpoint fields; load_model reads state_dict and epoch only.
    record = {"state_dict": state, "epoch": int(epoch), "optimizer": None, "scheduler": None, "val_result": None}
    atomic_write(target, lambda f: torch.save(record, f))
    return target
