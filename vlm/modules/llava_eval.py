"""VQA-style evaluation of a LLaVA, LLaVA-NeXT, Qwen2.5-VL or Qwen3-VL backbone: greedy answers, the
benchmark's metric, token and latency counts.

The module is the same for every family: the backbone writes the prompts in its own format and calls
its own runner (:meth:`~vlm.backbones.llava.LlavaBackbone.answer`; LLaVA: Vicuna v1, Qwen: the
processor's chat template), so nothing here branches on the model.

``test`` logs, under ``test/``: the metric(s) of the data's kind (``vqa_acc``, ``gqa_acc``,
``pope_acc/precision/recall/f1/yes_ratio``, ``mc_acc``, in percent), ``visual_tokens`` (mean
visual tokens per sample entering the LLM, or after the cut with an LLM-stage pruner), ``prefill_ms``
(vision + projector + LLM prefill per batch) and ``decode_ms_per_token``. POPE metrics are also logged per ``category``.
Under DDP (``--trainer.devices N --trainer.strategy ddp``) each rank answers an unpadded share of the
questions (``VQADataModule``'s ``exact_eval_sampler``) and the per-sample records, token counts and
timings are gathered to every rank before reducing, so each sample is scored exactly once and N
processes report the one-process metrics (``tests/distributed/test_llava_ddp.py``).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Any, Optional

import lightning as L
import torch.distributed as dist

from vlm.backbones.llava import VICUNA_V1, LlavaBackbone
from vlm.datamodules.protocols import QuestionData, data_of
from vlm.metrics_vqa import scorer
from vlm.pruning.base import Pruner

__all__ = ["LlavaEval", "VICUNA_V1"]


class LlavaEval(L.LightningModule):
    """Args:
    backbone: the model (hub id or path) and its processor: ``LlavaBackbone``, ``LlavaNextBackbone``,
        ``Qwen2_5VLBackbone`` or ``Qwen3VLBackbone``.
    pruner: a visual-token pruner (``vlm.pruning.available()``: vision-tower pruners, or an
        LLM-stage one, :class:`~vlm.llm_stage.LlmStage`) or None. Its budget is checked here, once,
        against the backbone's patches (``Backbone.check_budget``: per image for LLaVA-1.5, per crop
        for LLaVA-NeXT, merged tokens per image at the processor's ``max_pixels`` for Qwen; an
        LLM-stage budget against the most visual tokens that reach its cut with one image per
        question, which a question with several images only exceeds): a budget that would keep every
        token is a ``TokenBudgetError`` instead of an unpruned result labelled with the pruner's name.
    metric: ``vqa``, ``gqa``, ``pope`` or ``mc``; None takes the datamodule's ``metric``.
    max_new_tokens: greedy decoding length (LLaVA uses 128 for short-answer sets).
    prompt_template: None (the default) for the backbone's own conversation (LLaVA: Vicuna v1;
        Qwen: the processor's chat template); or a format string with ``{question}`` and the
        backbone's image placeholder once per image (``<image>`` for LLaVA,
        ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen), used as the whole prompt.
    """

    def __init__(
        self,
        backbone: LlavaBackbone,
        pruner: Optional[Pruner] = None,
        metric: Optional[str] = None,
        max_new_tokens: int = 128,
        prompt_template: Optional[str] = None,
    ) -> None:
        super().__init__()
        backbone.check_budget(pruner)
        self.save_hyperparameters(ignore=["backbone", "pruner"])
        self.backbone = backbone
        self.pruner = pruner
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.prompt_template = prompt_template
        self.method_name = pruner.name if pruner is not None else "none"
        self._reset()

    def _reset(self) -> None:
        self.samples: list[tuple[Any, str]] = []  # (score record, category) per sample, in loader order
        self.visual_tokens: list[int] = []
        self.prefill_s: list[float] = []
        self.decode_s = 0.0
        self.decode_tokens = 0

    @property
    def hooks(self) -> list[Pruner]:
        return [self.pruner] if self.pruner is not None else []

    def setup(self, stage: str) -> None:
        if self.metric is None:
            data = data_of(self.trainer, QuestionData)
            self.metric = data.metric if data is not None else "vqa"

    def answer(self, images: list[Any], questions: list[str]) -> tuple[list[str], Any]:
        """Greedy answers to ``questions`` (``images[i]``: one image or a list of them) and the
        :class:`~vlm.towers.llava.Generation`; the backbone builds the prompts and runs its runner."""
        return self.backbone.answer(questions, images, self.hooks, self.max_new_tokens, self.prompt_template)

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int) -> None:
        texts, gen = self.answer(batch["image"], batch["text"])
        score = scorer(self.metric).score
        for text, ans, cat in zip(texts, batch["answer"], batch["category"]):
            self.samples.append((score(text, ans), cat))
        cut = gen.inputs.cut  # an LLM-stage pruner: count what the layers after its cut see
        self.visual_tokens += (gen.inputs.visual_counts if cut is None else cut.visual_counts).tolist()
        self.prefill_s.append(gen.prefill_s)
        self.decode_s += gen.decode_s
        self.decode_tokens += max(gen.tokens.shape[1] - 1, 0)

    def on_test_epoch_start(self) -> None:
        self._reset()

    def _gather(self) -> None:
        """Every rank's samples, token counts and timings, on every rank (a no-op in one process).

        The eval sampler (``exact_eval_sampler``) gives rank ``r`` the samples ``r, r + N, r + 2N, ...``,
        so the ``k``-th sample of rank ``r`` is sample ``k * N + r``: the gathered samples are put back in
        the dataset's order, and the sums below add in the one-process order (bit-equal metrics)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        world = dist.get_world_size()
        mine = (self.samples, self.visual_tokens, self.prefill_s, self.decode_s, self.decode_tokens)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, mine)
        self._reset()
        order = sorted((k * world + r, r, k) for r, part in enumerate(parts) for k in range(len(part[0])))
        self.samples = [parts[r][0][k] for _, r, k in order]
        if all(len(part[1]) == len(part[0]) for part in parts):  # one count per sample
            self.visual_tokens = [parts[r][1][k] for _, r, k in order]
        else:
            self.visual_tokens = [v for part in parts for v in part[1]]
        for _, visual, prefill, decode_s, decode_tokens in parts:
            self.prefill_s += prefill
            self.decode_s += decode_s
            self.decode_tokens += decode_tokens

    def on_test_epoch_end(self) -> None:
        self._gather()
        reduce = scorer(self.metric).reduce
        groups: dict[str, list[Any]] = defaultdict(list)
        for record, cat in self.samples:
            groups["all"].append(record)
            if self.metric == "pope":
                groups[cat].append(record)
        # Every rank holds the same gathered values: synced with max (exact on equal numbers; a mean
        # of N equal floats is not always bit-equal).
        log = partial(self.log, sync_dist=True, reduce_fx="max")
        for group, records in groups.items():
            for name, value in reduce(records).items():
                key = f"test/{name}" if group == "all" else f"test/{name}/{group}"
                log(key, value)
        n = max(len(self.visual_tokens), 1)
        log("test/visual_tokens", sum(self.visual_tokens) / n)
        log("test/prefill_ms", 1000.0 * sum(self.prefill_s) / max(len(self.prefill_s), 1))
        log("test/decode_ms_per_token", 1000.0 * self.decode_s / max(self.decode_tokens, 1))

    def predict_step(self, batch: dict[str, list[Any]], batch_idx: int) -> list[dict[str, Any]]:
        texts, _ = self.answer(batch["image"], batch["text"])
        return [{"question_id": q, "text": t} for q, t in zip(batch["question_id"], texts)]

    def configure_optimizers(self) -> None:
        return None
