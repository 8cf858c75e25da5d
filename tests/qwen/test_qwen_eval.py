"""The VQA evaluation on Qwen (issue 25, item 5): ``vlm test`` / ``vlm predict`` with a shipped Qwen
config, on a tiny random model saved to a local directory (the hub-id code path) and a tiny VQA set
written here, with and without a pruner. The answers equal :meth:`QwenRunner.generate`'s on the same
inputs: the processor's chat template applied to one user turn per question (an image entry per
image, then the question), the same batches, left padding.

Every answer is checked twice: ``vlm predict`` writes them (``predictions.jsonl``), and the question
file's gold answers are the reference answers, so ``vlm test`` scores 100 % exactly when each answer
matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.qwen.tiny import MODELS, tiny_model, tiny_processor
from vlm import pruning
from vlm.backbones import Qwen2_5VLBackbone, Qwen3VLBackbone
from vlm.runtime.cli import main
from vlm.towers.qwen import QwenRunner

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"qwen2_5_vl": REPO / "configs/qwen/qwen2_5_vl_3b.yaml", "qwen3_vl": REPO / "configs/qwen/qwen3_vl_2b.yaml"}
BACKBONES = {"qwen2_5_vl": Qwen2_5VLBackbone, "qwen3_vl": Qwen3VLBackbone}
#: (image files, question): the second question is about two images; sizes in merged tokens
QUESTIONS = [(["a.png"], "w3 w4 w5"), (["b.png", "c.png"], "w6"), (["c.png"], "w7 w8 w9 w10 w11")]
SHAPES = {"a.png": (3, 5), "b.png": (2, 2), "c.png": (4, 3)}
#: seeds of tiny models whose greedy answers differ between the questions (at seed 0 the random
#: Qwen2.5-VL answers every question alike), so that matching answers mean something
SEEDS = {"qwen2_5_vl": 1, "qwen3_vl": 0}
BATCH = 2
BUDGET = 3  # merged tokens per image; the images have 15, 4 and 12
MAX_NEW = 4


def write_images(root: Path, kind: str) -> None:
    _, patch = MODELS[kind]
    rng = np.random.default_rng(0)
    for name, (h, w) in SHAPES.items():
        Image.fromarray(rng.integers(0, 255, (h * 2 * patch, w * 2 * patch, 3), dtype=np.uint8)).save(root / name)


def chat_prompt(processor, images: int, question: str) -> str:
    """The reference prompt, written with the processor's own chat template."""
    messages = [{"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference(model, processor, root: Path, hooks: list) -> tuple[list[str], list[int]]:
    """``QwenRunner.generate``'s answers and visual-token counts, batch by batch as the datamodule
    batches the questions."""
    processor.tokenizer.padding_side = "left"
    runner = QwenRunner(model)
    texts, counts = [], []
    for start in range(0, len(QUESTIONS), BATCH):
        batch = QUESTIONS[start : start + BATCH]
        prompts = [chat_prompt(processor, len(files), q) for files, q in batch]
        images = [Image.open(root / f).convert("RGB") for files, _ in batch for f in files]
        enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        gen = runner.generate(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"],
                              hooks, max_new_tokens=MAX_NEW, eos_token_id=processor.tokenizer.eos_token_id)
        decoded = processor.tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)
        texts += [t.strip() for t in decoded]
        counts += gen.inputs.visual_counts.tolist()
    return texts, counts


@pytest.fixture(scope="module")
def eval_model(kind):
    return tiny_model(kind, seed=SEEDS[kind])


@pytest.fixture(scope="module")
def saved(kind, eval_model, tmp_path_factory) -> Path:
    """The tiny model and its processor (with a chat template) saved as a model directory, and
    the images of the VQA set."""
    root = tmp_path_factory.mktemp(f"{kind}_eval")
    eval_model.save_pretrained(root / "model")
    tiny_processor(kind).save_pretrained(root / "model")
    write_images(root, kind)
    return root


def write_questions(root: Path, answers: list[str]) -> Path:
    path = root / "questions.jsonl"
    lines = [{"question_id": i, "image": files if len(files) > 1 else files[0], "text": q, "answer": a}
             for i, ((files, q), a) in enumerate(zip(QUESTIONS, answers))]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def cli(subcommand: str, kind: str, root: Path, questions: Path, out: Path, pruner: str | None) -> None:
    argv = [subcommand, "--config", str(CONFIGS[kind])]
    if pruner is not None:
        argv += ["--config", str(REPO / f"configs/llava/pruner/{pruner}.yaml"),
                 "--model.init_args.pruner.init_args.num_tokens", str(BUDGET)]
    argv += [
        "--model.init_args.backbone.init_args.model", str(root / "model"),
        "--model.init_args.backbone.init_args.dtype", "float32",
        "--model.init_args.max_new_tokens", str(MAX_NEW),
        "--data", "vlm.datamodules.vqa.VQADataModule",
        "--data.init_args.question_file", str(questions),
        "--data.init_args.image_folder", str(root),
        "--data.init_args.metric", "gqa",
        "--data.init_args.dataset", "tiny_vqa",
        "--data.init_args.batch_size", str(BATCH),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out),
    ]
    main(argv)


@pytest.mark.parametrize("pruner", [None, "flowcut"])
def test_vlm_test_and_predict_answer_as_the_runner_generates(kind, eval_model, saved, pruner, tmp_path):
    processor = tiny_processor(kind)
    hooks = [] if pruner is None else [pruning.create(pruner, num_tokens=BUDGET)]
    answers, counts = reference(eval_model, processor, saved, hooks)
    assert len(set(answers)) > 1, "the answers do not depend on the question: pick another seed"
    assert counts == ([BUDGET, 2 * BUDGET, BUDGET] if pruner else [15, 4 + 12, 12])  # visual tokens per question
    questions = write_questions(tmp_path, answers)

    cli("predict", kind, saved, questions, tmp_path / "predict", pruner)
    rows = [json.loads(x) for x in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == list(range(len(QUESTIONS)))
    assert [r["text"] for r in rows] == answers

    cli("test", kind, saved, questions, tmp_path / "test", pruner)
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert results["metrics"]["test/gqa_acc"] == 100.0  # every answer is the reference's
    assert results["metrics"]["test/visual_tokens"] == pytest.approx(sum(counts) / len(counts))
    assert results["method"] == (pruner or "none") and results["backbone"]["family"] == kind


def test_prompts_are_the_chat_template_with_one_image_entry_per_image(kind):
    config, _ = MODELS[kind]
    backbone = BACKBONES[kind](config=config)
    backbone.processor = tiny_processor(kind)
    prompts = backbone.prompts(["w3", "w4 w5"], [1, 2])
    processor = tiny_processor(kind)
    assert prompts == [chat_prompt(processor, 1, "w3"), chat_prompt(processor, 2, "w4 w5")]
    assert [p.count(backbone.image_placeholder) for p in prompts] == [1, 2]
    assert prompts[1].endswith("<|im_start|>assistant\n")
    assert ("You are a helpful assistant." in prompts[0]) == (kind == "qwen2_5_vl")  # Qwen3-VL adds no system turn
    # an explicit template is the whole prompt, and must show every image
    template = "w1 " + backbone.image_placeholder + " {question}"
    assert backbone.prompts(["w2"], [1], template) == ["w1 " + backbone.image_placeholder + " w2"]
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        backbone.prompts(["w2"], [2], template)
    backbone.processor.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        backbone.prompts(["w2"], [1])


def test_max_pixels_sets_the_processor_resolution_and_the_budget(kind, saved):
    _, patch = MODELS[kind]
    unit = (2 * patch) ** 2
    backbone = BACKBONES[kind](model=str(saved / "model"), max_pixels=6 * unit)
    assert backbone.patches_per_image == 6
    grid = backbone.encode(["w1 " + backbone.image_placeholder],
                           [Image.open(saved / "a.png").convert("RGB")])["image_grid_thw"]  # 3 x 5 merged tokens
    assert int(grid[0].prod()) // 4 <= 6
    with pytest.raises(ValueError, match="min_pixels"):
        BACKBONES[kind](model=str(saved / "model"), min_pixels=4 * unit, max_pixels=2 * unit)
