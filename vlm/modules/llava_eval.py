"""LLaVA evaluation on VQA-style sets: greedy answers, the benchmark's metric, token and latency counts.

``test`` logs, under ``test/``: the metric(s) of the data's kind (``vqa_acc``, ``gqa_acc``,
``pope_acc/precision/recall/f1/yes_ratio``, ``mc_acc``, in percent), ``visual_tokens`` (mean
visual tokens per sample entering the LLM, or after the cut with an LLM-stage pruner), ``prefill_ms``
(vision + projector + LLM prefill per batch) and ``decode_ms_per_token``. POPE metrics are also logged per ``category``. Evaluate on one
device: records are not gathered across processes (and DDP samplers would pad with duplicates).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import lightning as L

from vlm.backbones.llava import LlavaBackbone
from vlm.metrics_vqa import scorer
from vlm.pruning import TokenPruner

#: LLaVA-1.5's ``vicuna_v1`` conversation with the image before the question.
VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:"
)


class LlavaEval(L.LightningModule):
    """Args:
    backbone: the LLaVA (or LLaVA-NeXT) model (hub id or path) and its processor.
    pruner: a visual-token pruner (``vlm.pruning.available()``: vision-tower pruners, or an
        LLM-stage one, :class:`~vlm.hooks.LlmStage`) or None.
    metric: ``vqa``, ``gqa``, ``pope`` or ``mc``; None takes the datamodule's ``metric``.
    max_new_tokens: greedy decoding length (LLaVA uses 128 for short-answer sets).
    prompt_template: the conversation, with ``{question}``.
    """

    def __init__(
        self,
        backbone: LlavaBackbone,
        pruner: Optional[TokenPruner] = None,
        metric: Optional[str] = None,
        max_new_tokens: int = 128,
        prompt_template: str = VICUNA_V1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "pruner"])
        self.backbone = backbone
        self.pruner = pruner
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.method_name = pruner.name if pruner is not None else "none"
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, list[Any]] = defaultdict(list)
        self.visual_tokens: list[int] = []
        self.prefill_s: list[float] = []
        self.decode_s = 0.0
        self.decode_tokens = 0

    @property
    def hooks(self) -> list[TokenPruner]:
        return [self.pruner] if self.pruner is not None else []

    def setup(self, stage: str) -> None:
        if self.metric is None:
            self.metric = getattr(getattr(self.trainer, "datamodule", None), "metric", None) or "vqa"

    def answer(self, images: list[Any], questions: list[str]) -> tuple[list[str], Any]:
        prompts = [self.prompt_template.format(question=q) for q in questions]
        enc = {k: v.to(self.device) for k, v in self.backbone.encode(prompts, images).items()}
        tok = self.backbone.processor.tokenizer
        gen = self.backbone.runner.generate(
            enc["input_ids"], enc["pixel_values"], enc["attention_mask"], self.hooks,
            max_new_tokens=self.max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
            image_sizes=enc.get("image_sizes"),
        )
        texts = [t.strip() for t in tok.batch_decode(gen.tokens, skip_special_tokens=True)]
        return texts, gen

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        texts, gen = self.answer(batch["image"], batch["text"])
        score = scorer(self.metric).score
        for text, ans, cat in zip(texts, batch["answer"], batch["category"]):
            record = score(text, ans)
            self.records["all"].append(record)
            if self.metric == "pope":
                self.records[cat].append(record)
        cut = gen.inputs.cut  # an LLM-stage pruner: count what the layers after its cut see
        self.visual_tokens += (gen.inputs.visual_counts if cut is None else cut.visual_counts).tolist()
        self.prefill_s.append(gen.prefill_s)
        self.decode_s += gen.decode_s
        self.decode_tokens += max(gen.tokens.shape[1] - 1, 0)

    def on_test_epoch_start(self) -> None:
        self._reset()

    def on_test_epoch_end(self) -> None:
        reduce = scorer(self.metric).reduce
        for group, records in self.records.items():
            for name, value in reduce(records).items():
                key = f"test/{name}" if group == "all" else f"test/{name}/{group}"
                self.log(key, value)
        n = max(len(self.visual_tokens), 1)
        self.log("test/visual_tokens", sum(self.visual_tokens) / n)
        self.log("test/prefill_ms", 1000.0 * sum(self.prefill_s) / max(len(self.prefill_s), 1))
        self.log("test/decode_ms_per_token", 1000.0 * self.decode_s / max(self.decode_tokens, 1))

    def predict_step(self, batch: dict[str, list[Any]], batch_idx: int) -> list[dict[str, Any]]:
        texts, _ = self.answer(batch["image"], batch["text"])
        return [{"question_id": q, "text": t} for q, t in zip(batch["question_id"], texts)]

    def configure_optimizers(self) -> None:
        return None
