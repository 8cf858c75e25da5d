"""The README's "Using it" commands, read from README.md and run in-process on a tiny layout.

`readme_commands()` takes the `vlm fit|test|export` lines of the first bash block under "## Using
it". `readme_flow(dataset, tmp)` turns them into argument lists for one dataset: the documented
`--config` stack with `configs/data/<dataset>.yaml` in place of the README's data config, plus one
override file that swaps in a tiny random open_clip model, points the data at a layout written by
`tests.data.layouts.write_layout`, and trains one step on the CPU; `...same configs...` becomes
that stack, and the checkpoint and export paths become the run's own.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.data.layouts import write_layout
from tests.helpers import tiny_clip_cfg
from vlm.runtime.cli import main

REPO = Path(__file__).resolve().parents[2]

#: The CoOp base-to-novel datasets (scripts/slurm/sweep.sh's default list).
COOP_DATASETS = [
    "oxford_pets", "oxford_flowers", "food101", "fgvc_aircraft", "dtd", "eurosat",
    "ucf101", "caltech101", "stanford_cars", "sun397", "imagenet",
]  # fmt: skip

TINY_BACKBONE = {
    "class_path": "vlm.backbones.ClipBackbone",
    "init_args": {"model_name": "tiny", "model_cfg": tiny_clip_cfg(), "pretrained": None, "quick_gelu": False},
}


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The `vlm ...` commands of the first bash block of README's "Using it", as argument lists
    (continuation lines joined, comments dropped, `vlm` removed)."""
    text = readme.read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README 'Using it' has no bash block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    return [c[1:] for c in commands if c and c[0] == "vlm"]


@dataclass
class Flow:
    """The README's commands for one dataset, and where their outputs land."""

    commands: list[list[str]]
    configs: list[str]
    runs: Path
    export: Path


def tiny_override(dataset: str, tmp: Path, **trainer: Any) -> Path:
    """The override appended to the documented stack: tiny CLIP, tiny layout, one CPU step."""
    root = tmp / "data"
    if not root.exists():
        write_layout(dataset, root)
    override = {
        "model": {"init_args": {"backbone": TINY_BACKBONE, "prompt_learner": {"init_args": {"n_ctx": 2}}}},
        "data": {"init_args": {"root": str(root), "transforms": {"image_size": 32},
                               "loader": {"batch_size": 2, "eval_batch_size": 8, "num_workers": 0}}},
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "max_steps": 1, "default_root_dir": str(tmp / "runs"),
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "runs")}},
            **trainer,
        },
    }  # fmt: skip
    path = tmp / "tiny_override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def _config_args(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]


def readme_flow(dataset: str, tmp: Path, **trainer: Any) -> Flow:
    """The README's commands for `dataset` (see the module doc). Checkpoint paths stay placeholders
    (`<CKPT>`) until the fit has written one: :func:`resolve` fills them in."""
    fit, *rest = readme_commands()
    assert fit[0] == "fit", fit
    override = str(tiny_override(dataset, tmp, **trainer))
    data_configs = [c for c in _config_args(fit) if c.startswith("configs/data/")]
    assert len(data_configs) == 1, f"the README's fit must name one data config, got {data_configs}"
    stack = [f"configs/data/{dataset}.yaml" if c in data_configs else c for c in _config_args(fit)]
    configs = [a for c in stack for a in ("--config", str(REPO / c))] + ["--config", override]
    export = tmp / "export"
    readme_export = next(c[c.index("--out") + 1] for c in rest if c[0] == "export")
    commands = [["fit", *configs]]
    for cmd in rest:
        out: list[str] = [cmd[0]]
        args = iter(cmd[1:])
        for a in args:
            if a == "--config":
                value = next(args)
                if value == "...same":  # "--config ...same configs..." (shlex splits the dots off)
                    next(args)
                    out += configs
                else:
                    out += ["--config", str(export / Path(value).relative_to(readme_export))]
            elif a in ("--ckpt_path", "--ckpt"):
                next(args)
                out += [a, "<CKPT>"]
            elif a == "--out":
                next(args)
                out += [a, str(export)]
            else:
                out.append(a)
        commands.append(out)
    return Flow(commands, configs, tmp / "runs", export)


def resolve(command: list[str], ckpt: Path) -> list[str]:
    return [str(ckpt) if a == "<CKPT>" else a for a in command]


def versions(runs: Path) -> list[Path]:
    """The CSVLogger's version folders under the run root, oldest first."""
    return sorted((runs / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def results(version: Path) -> dict[str, Any]:
    return json.loads((version / "results.json").read_text())


def run(args: list[str]) -> None:
    main(list(args))
