"""Bad input is found early and named with its fix: one test per case (README table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from tests.datamodules.toydata import make_dataset
from tests.helpers import tiny_clip_cfg
from tests.reliability.helpers import coop_module, toy_datamodule, trainer, write_cli_config
from vlm import pruning
from vlm.backbones import ClipBackbone
from vlm.runtime.cli import main, parse_configs
from vlm.datamodules.transforms import CorruptImageError
from vlm.runtime.export import WEIGHTS, export_checkpoint, load_exported
from vlm.modules import CLIPClassifier, ViTClassifier
from vlm.runtime.identity import CheckpointMismatchError
from vlm.prompts import create
from vlm.registry import UnknownNameError
from vlm.runtime.reliability import IncompatibleHooksError, TokenBudgetError


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "toy")


def test_missing_dataset_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Dataset root .*missing.* does not exist.*Set `root`"):
        toy_datamodule(tmp_path / "missing")


def test_misspelled_dataset_name_lists_split_files(toy: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split_zhou_Toyy\.json' not found.*found in that folder: \['split_zhou_Toy\.json'\]"):
        toy_datamodule(toy, dataset="Toyy")


def test_split_names_missing_images(toy: Path) -> None:
    (toy / "images" / "dog" / "train_0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ images listed in the split are missing.*dog/train_0\.png.*point `root`/`image_dir`"):
        toy_datamodule(toy, num_shots=0).prepare_data()


def test_class_count_mismatch_between_data_and_head(toy: Path, tmp_path: Path) -> None:
    model = ViTClassifier(ClipBackbone("tiny", model_cfg=tiny_clip_cfg()), num_classes=7)
    with pytest.raises(ValueError, match=r"The data has 3 classes but the head has 7: set model.init_args.num_classes=3"):
        trainer(tmp_path / "run", max_steps=1).fit(model, datamodule=toy_datamodule(toy))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:40])


def test_corrupt_image_fails_by_default(toy: Path) -> None:
    _truncate(toy / "images" / "cat" / "test_0.png")
    dm = toy_datamodule(toy, test_subsets=["base"])
    dm.setup("test")
    with pytest.raises(CorruptImageError, match=r"Cannot decode image '.*cat/test_0\.png'.*on_corrupt='skip'"):
        list(dm.test_dataloader()[0])


def test_corrupt_image_skipped_and_counted_in_results(toy: Path, tmp_path: Path) -> None:
    _truncate(toy / "images" / "cat" / "test_0.png")
    cfg = write_cli_config(tmp_path, toy, tmp_path / "run", on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"Skipping corrupt image '.*cat/test_0\.png'"):
        main(["test", "--config", str(cfg), "--allow_untrained", "true"])
    results = json.loads((tmp_path / "run" / "v0" / "results.json").read_text())
    assert results["data"]["on_corrupt"] == "skip" and results["data"]["skipped_images"] == 1
    assert results["data"]["skipped_paths"][0].endswith("cat/test_0.png")


def test_too_few_images_for_strict_shots(toy: Path) -> None:
    with pytest.raises(ValueError, match=r"Class 4 \('eel'\) has only 2 train examples, fewer than num_shots=4\. Lower num_shots"):
        toy_datamodule(toy, num_shots=4, strict_shots=True).prepare_data()


@pytest.mark.parametrize("registry,name", [("prompts", "coopp"), ("pruning", "flowcutt")])
def test_unknown_learner_or_pruner_lists_registered(registry: str, name: str) -> None:
    import vlm.prompts
    import vlm.pruning

    module = vlm.prompts if registry == "prompts" else vlm.pruning
    with pytest.raises(UnknownNameError) as err:
        module.create(name)
    message = str(err.value)
    assert f"{name!r}" in message and all(n in message for n in module.available())


def test_unknown_learner_name_in_config(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cli_config(tmp_path, toy, tmp_path / "run")
    with pytest.raises(SystemExit):
        parse_configs([str(cfg)], ["--model.init_args.prompt_learner", "coopp"])
    err = capsys.readouterr().err
    import vlm.prompts
    import vlm.pruning

    assert "coopp" in err
    assert f"Registered prompt learners: {', '.join(vlm.prompts.available())}." in err
    assert f"Registered pruners: {', '.join(vlm.pruning.available())}." in err


def test_yaml_key_typo_is_named(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cli_config(tmp_path, toy, tmp_path / "run")
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        parse_configs([str(cfg), str(typo)])
    assert "max_epoch" in capsys.readouterr().err


def test_token_budget_larger_than_tokens(tiny_clip: ClipBackbone) -> None:
    with pytest.raises(TokenBudgetError, match=r"num_tokens=100 patch tokens, but the backbone produces only 16 per image.*<= 16"):
        CLIPClassifier(tiny_clip, create("coop", n_ctx=2), pruner=pruning.create("cls_attention", num_tokens=100))


def _fit_one_step(module: CLIPClassifier, toy: Path, root: Path) -> Path:
    t = trainer(root, max_steps=1, enable_checkpointing=False)
    t.fit(module, datamodule=toy_datamodule(toy))
    path = root / "one.ckpt"
    t.save_checkpoint(path)
    return path


def test_ckpt_from_other_method_or_backbone(toy: Path, tmp_path: Path) -> None:
    ckpt = _fit_one_step(coop_module(), toy, tmp_path / "a")
    other_method = CLIPClassifier(ClipBackbone("tiny", model_cfg=tiny_clip_cfg()), create("vpt", num_tokens=2))
    with pytest.raises(CheckpointMismatchError, match=r"made by method 'coop'.*but the model is method 'vpt'"):
        trainer(tmp_path / "b").test(other_method, datamodule=toy_datamodule(toy), ckpt_path=ckpt)
    other_backbone = CLIPClassifier(ClipBackbone("tiny", model_cfg=tiny_clip_cfg(width=32, head_width=16)), create("coop", n_ctx=4))
    with pytest.raises(CheckpointMismatchError, match=r"made with backbone .*Use the backbone that produced it"):
        trainer(tmp_path / "c").test(other_backbone, datamodule=toy_datamodule(toy), ckpt_path=ckpt)


def test_export_with_missing_or_extra_tensors(toy: Path, tmp_path: Path) -> None:
    ckpt = _fit_one_step(coop_module(), toy, tmp_path / "a")
    out = export_checkpoint(ckpt, tmp_path / "export")
    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(out / WEIGHTS))
    save_file({**tensors, "prompt_learner.extra": torch.zeros(2)}, str(out / WEIGHTS), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors \['prompt_learner.extra'\]"):
        load_exported(coop_module(), out)
    save_file({"prompt_learner.other": torch.zeros(2)}, str(out / WEIGHTS), metadata=meta)
    with pytest.raises(CheckpointMismatchError, match=r"missing learned tensors \['prompt_learner.ctx'\]"):
        load_exported(coop_module(), out)


def test_deep_vl_prompts_with_per_sample_pruning_is_rejected(tiny_clip: ClipBackbone) -> None:
    with pytest.raises(IncompatibleHooksError, match=r"'ivlp' replaces its vision prompts by position.*'flowcut'.*block\(s\) \[0\]"):
        CLIPClassifier(tiny_clip, create("ivlp", n_ctx_vision=2, depth_vision=2, depth_text=1), pruner=pruning.create("flowcut", num_tokens=4))


def test_llm_stage_pruner_on_a_classifier_is_rejected(tiny_clip: ClipBackbone) -> None:
    with pytest.raises(IncompatibleHooksError, match=r"'flowcut_llm' cuts tokens inside a language model.*LlavaEval"):
        CLIPClassifier(tiny_clip, create("coop", n_ctx=2), pruner=pruning.create("flowcut_llm", num_tokens=4))


@pytest.mark.parametrize(
    "learner,pruner",
    [
        (("coop", {"n_ctx": 2}), ("flowcut", {"num_tokens": 4})),  # text-only learner: any pruner
        (("vpt", {"num_tokens": 2, "deep": True}), ("flowcut", {"num_tokens": 4})),  # slots after CLS stay put
        (("ivlp", {"n_ctx_vision": 2, "depth_vision": 2, "depth_text": 1}), ("cls_attention", {"num_tokens": 4, "layer": 0})),
        (("ivlp", {"n_ctx_vision": 2, "depth_vision": 1, "depth_text": 1}), ("flowcut", {"num_tokens": 4})),  # no deep replacement
    ],
)
def test_compatible_combinations_build_and_run(tiny_clip: ClipBackbone, learner: tuple, pruner: tuple) -> None:
    module = CLIPClassifier(tiny_clip, create(learner[0], **learner[1]), classnames=["cat", "dog"], pruner=pruning.create(pruner[0], **pruner[1]))
    torch.manual_seed(1)
    logits = module(torch.randn(3, 3, 32, 32))["logits"]
    assert logits.shape == (3, 2) and bool(torch.isfinite(logits).all())
