"""VQA metrics (exact LLaVA/EvalAI rules) and LlavaEval end to end on a tiny model and tiny data."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.llava.tiny import TINY_LLAVA_CONFIG, save_tiny_processor
from vlm import pruning
from vlm.backbones import LlavaBackbone
from vlm.datamodules.vqa import VQADataModule
from vlm.metrics_vqa import SCORERS, choice_letter, normalize_vqa_answer, pope_summary, pope_yes_no, vqa_soft_accuracy
from vlm.modules.llava_eval import LlavaEval


def test_vqa_normalisation_and_soft_accuracy():
    assert normalize_vqa_answer("Two  Dogs!") == "2 dogs"
    assert normalize_vqa_answer("The cat's toy.") == "cat 's toy"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000"
    # 3 matching humans of 10: nine leave-one-out subsets... 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3)
    assert vqa_soft_accuracy("two", ["2"] * 3 + ["x"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    assert vqa_soft_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_soft_accuracy("no", ["yes"] * 10) == 0.0


def test_gqa_pope_and_choice_rules():
    assert SCORERS["gqa"].score("Left.", "left") == 1.0 and SCORERS["gqa"].score("the left", "left") == 0.0
    assert pope_yes_no("No, there is no dog.") == "no" and pope_yes_no("There is not.") == "no"
    assert pope_yes_no("Yes. No doubt") == "yes" and pope_yes_no("") == "yes"
    s = pope_summary([("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes")])
    assert s["pope_acc"] == 50.0 and s["pope_f1"] == 50.0 and s["pope_yes_ratio"] == 50.0
    assert choice_letter("B") == "B" and choice_letter("C. a cat") == "C"
    assert choice_letter("The answer is D.") == "D" and choice_letter("maybe") == "FAILED"


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
        lines.append({"question_id": i, "image": f"{i}.png", "text": f"w{i} w{i + 1}", "label": "yes" if i % 2 else "no",
                      "category": "random" if i < 3 else "popular"})
    (root / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    save_tiny_processor(root / "processor")
    return root


@pytest.mark.parametrize("pruner", [None, "flowcut", "flowcut_llm"])
def test_llava_eval_reports_metrics_tokens_and_latency(pope_dir, pruner):
    torch.manual_seed(0)
    backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG, processor=str(pope_dir / "processor"))
    kwargs = {"layer": 0, "crop_tokens": 8} if pruner == "flowcut_llm" else {}  # 16 -> 8 in the ViT, 4 after LLM layer 0
    p = pruning.create(pruner, num_tokens=4, **kwargs) if pruner else None
    module = LlavaEval(backbone, pruner=p, max_new_tokens=3, prompt_template="<image> {question}")
    dm = VQADataModule(str(pope_dir / "q.jsonl"), str(pope_dir), metric="pope", dataset="pope", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.test(module, datamodule=dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["test/visual_tokens"] == (4 if pruner else 16)
    for key in ("pope_acc", "pope_f1", "pope_yes_ratio", "pope_acc/random", "pope_acc/popular"):
        assert 0.0 <= m[f"test/{key}"] <= 100.0
    # the metric is recomputed from the answers the module gives
    answers = module.answer([Image.open(pope_dir / f"{i}.png").convert("RGB") for i in range(5)], [f"w{i} w{i + 1}" for i in range(5)])[0]
    labels = ["yes" if i % 2 else "no" for i in range(5)]
    expected = pope_summary([(pope_yes_no(a), g) for a, g in zip(answers, labels)])
    assert m["test/pope_acc"] == pytest.approx(expected["pope_acc"])
    assert m["test/prefill_ms"] > 0 and m["test/decode_ms_per_token"] > 0


def test_packed_prefill_gives_the_same_answers(pope_dir):
    """The backbone option end to end: prompts of different lengths, pruned, answered packed and padded."""
    images = [Image.open(pope_dir / f"{i}.png").convert("RGB") for i in range(3)]
    questions = ["w0", "w1 w2 w3 w4 w5", "w2 w3"]
    answers = []
    for packed in (False, True):
        torch.manual_seed(0)
        backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG, processor=str(pope_dir / "processor"), packed_prefill=packed)
        assert backbone.runner.packed_prefill is packed
        module = LlavaEval(backbone, pruner=pruning.create("flowcut", num_tokens=4), max_new_tokens=4,
                           prompt_template="<image> {question}")
        answers.append(module.answer(images, questions)[0])
    assert answers[0] == answers[1] and any(answers[0]), answers


def test_llava_prompts_are_vicuna_v1_with_one_image_line_per_image(pope_dir):
    """The backbone's own conversation (``LlavaEval(prompt_template=None)``) is LLaVA's ``vicuna_v1``
    prompt for one image, and repeats the ``<image>`` line for a question about several images."""
    from vlm.modules.llava_eval import VICUNA_V1

    backbone = LlavaBackbone(config=TINY_LLAVA_CONFIG, processor=str(pope_dir / "processor"))
    assert backbone.prompts(["w1 w2"], [1]) == [VICUNA_V1.format(question="w1 w2")]
    (two,) = backbone.prompts(["w3"], [2])
    assert two.count("<image>\n") == 2 and two.endswith("<image>\n<image>\nw3 ASSISTANT:")
    with pytest.raises(ValueError, match="1 image placeholder"):
        backbone.prompts(["w3"], [2], "<image> {question}")
