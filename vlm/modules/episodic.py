"""Episodic few-shot classification (N-way K-shot) with an optional prompt learner.

Per episode (a batch from :mod:`vlm.datamodules.episodic`): every image is encoded by the frozen
ViT with the learner's hooks; the class prototype is the mean of the L2-normalised support
features; query logits are cosine similarities to the prototypes divided by a temperature
(0.2, as the SP/SAA family); the loss is the cross-entropy of the queries.

Learners that use class text (``needs_class_text``) get the text embeddings of the *episode's*
classes, in episode order, through ``set_class_text``: every image, support or query, sees
all the episode's classes, so no query label leaks. Text comes from a frozen CLIP text tower
(``text_encoder``, or the backbone itself when it is a CLIP), prompt ``template``, unit-normalised
and cached once.

Testing reports the protocol of the papers: the mean accuracy over the (fixed) test episodes and
the 95 % interval ``1.96 * std / sqrt(n)`` (``std`` the sample standard deviation over episodes;
:func:`vlm.metrics.mean_ci95`), logged as ``test/acc`` and ``test/ci95``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.backbones.base import Backbone
from vlm.protocols import ImageTextBackbone, check_backbone
from vlm.datamodules.protocols import EpisodicData, data_of
from vlm.datamodules.templates import DEFAULT_TEMPLATE
from vlm.metrics import mean_ci95
from vlm.modules.hooked import HookedClassifier
from vlm.modules.optim import OptimConfig
from vlm.prompts import PromptLearner


def episode_logits(features: Tensor, way: int, shot: int, temperature: float) -> Tensor:
    """Cosine-prototype logits ``[way * query, way]`` of the query rows of one episode's features."""
    f = F.normalize(features.float(), dim=-1)
    support, query = f[: way * shot], f[way * shot :]
    protos = F.normalize(support.view(way, shot, -1).mean(1), dim=-1)
    return query @ protos.T / temperature


class EpisodicClassifier(HookedClassifier):
    """Prototype classifier over episodes, with an optional vision prompt learner (built, checked,
    hooked and trained with its loss terms as every :class:`HookedClassifier`).

    Args:
        backbone: the frozen ViT (timm) or CLIP (image tower; its text tower gives the class text).
        prompt_learner: a registered learner (``vlm.prompts.available()``); ``None`` is the frozen-feature prototype baseline.
        text_encoder: a CLIP whose text tower encodes class names (default: the backbone, if CLIP).
        template: class-name prompt for the text tower; ``None`` takes the datamodule's ``template``
            (else "a photo of a {}.").
        temperature: cosine-logit temperature.
        optim: optimiser and schedule.
        cache_eval_features: during validation/test, encode each image once per episode class set
            (exact; see ``_cached_features``) instead of once per episode.
    """

    no_learner = "prototype"

    def __init__(
        self,
        backbone: Backbone,
        prompt_learner: Optional[PromptLearner] = None,
        text_encoder: Optional[Backbone] = None,
        template: Optional[str] = None,
        temperature: float = 0.2,
        optim: Optional[OptimConfig] = None,
        cache_eval_features: bool = True,
    ) -> None:
        super().__init__()
        # template is left out: the episodic datamodule logs its own (Lightning refuses differing duplicates)
        self.save_hyperparameters(ignore=["backbone", "prompt_learner", "text_encoder", "optim", "template"])
        self.text_encoder = text_encoder
        if text_encoder is not None:
            check_backbone(text_encoder, ImageTextBackbone, f"{type(self).__name__}.text_encoder")
            text_encoder.requires_grad_(False)
        text_model = text_encoder if text_encoder is not None else (backbone if isinstance(backbone, ImageTextBackbone) else None)
        if prompt_learner is not None and prompt_learner.needs_class_text and prompt_learner.class_text_width is None and text_model is not None:
            prompt_learner.class_text_width = text_model.embed_dim
        self.attach(backbone, prompt_learner, None, optim or OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0), None)
        self.template, self.temperature = template, temperature
        self.optim = optim or OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0)
        self.classnames: list[str] = []
        self._text: Optional[Tensor] = None
        self._accs: dict[str, list[Tensor]] = {"val": [], "test": []}
        self.episode_accuracies: dict[str, list[float]] = {}  # last report per stage, for results.json
        self.cache_eval_features = cache_eval_features
        self._feature_cache: dict[tuple[int, ...], dict[int, Tensor]] = {}

    def _text_model(self) -> Optional[ImageTextBackbone]:
        if self.text_encoder is not None:
            return self.text_encoder
        return self.backbone if isinstance(self.backbone, ImageTextBackbone) else None

    def setup(self, stage: str) -> None:
        data = data_of(self.trainer, EpisodicData)
        if data is not None and data.classnames:
            self.classnames = list(data.classnames)
        if self.template is None:
            self.template = (data.template if data is not None else None) or DEFAULT_TEMPLATE

    @torch.no_grad()
    def class_text(self) -> Tensor:
        """Unit-norm text embeddings ``[num_classes, E]`` of ``template.format(classname)`` (cached)."""
        if self._text is None or self._text.device != self.device:
            model = self._text_model()
            if model is None:
                raise ValueError("This prompt learner needs class text: pass a CLIP text_encoder.")
            if not self.classnames:
                raise ValueError("No class names: use an episodic datamodule (it provides classnames).")
            tokens = model.tokenize([(self.template or DEFAULT_TEMPLATE).format(c) for c in self.classnames]).to(self.device)
            self._text = F.normalize(model.encode_text(tokens).float(), dim=-1)
        return self._text

    def episode_forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Query logits ``[way * query, way]`` and query targets of one episode."""
        way, shot, _ = (int(v) for v in batch["episode"])
        if self.prompt_learner is not None and self.prompt_learner.needs_class_text:
            episode_classes = batch["label"][: way * shot : shot]  # one support row per class, in order
            self.prompt_learner.set_class_text(self.class_text()[episode_classes])
        if self.training or not self.cache_eval_features or "index" not in batch:
            feats = self.backbone.encode_image(batch["image"], self.hooks)
        else:
            feats = self._cached_features(batch, way, shot)
        return episode_logits(feats, way, shot, self.temperature), batch["episode_label"][way * shot :]

    def _cached_features(self, batch: dict[str, Tensor], way: int, shot: int) -> Tensor:
        """Evaluation features, each image encoded once per episode class *set*.

        Exact: in eval mode an image's feature depends only on the image and, through the class
        prompts, on the set of the episode's classes (the prompts are key/value tokens, so their
        order does not matter). Saves the re-encoding of images shared by many test episodes.
        """
        classes = tuple(sorted(int(c) for c in batch["label"][: way * shot : shot]))
        learner = self.prompt_learner
        uses_text = learner is not None and learner.needs_class_text
        key = classes if uses_text else ()
        cache = self._feature_cache.setdefault(key, {})
        index = [int(i) for i in batch["index"]]
        todo = sorted({i for i in index if i not in cache})
        if todo:
            pos = {i: index.index(i) for i in todo}
            feats = self.backbone.encode_image(batch["image"][[pos[i] for i in todo]], self.hooks)
            cache.update(zip(todo, feats.detach()))
        return torch.stack([cache[i] for i in index])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of the query rows against their episode labels, plus the learner's terms."""
        logits, target = self.episode_forward(batch)
        return self.supervised_loss({"logits": logits}, {**batch, "label": target}, "train")

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        logits, target = self.episode_forward(batch)
        self._accs[stage].append((logits.argmax(-1) == target).float().mean().detach() * 100)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _report(self, stage: str) -> None:
        accs = torch.stack(self._accs[stage]) if self._accs[stage] else torch.zeros(0, device=self.device)
        self._accs[stage] = []
        if self.trainer is not None and self.trainer.world_size > 1:
            accs = self.all_gather(accs).reshape(-1)
        if accs.numel() == 0:
            return
        accs = accs.float().cpu()
        self.episode_accuracies[stage] = accs.tolist()
        mean, ci = mean_ci95(accs)
        self.log(f"{stage}/acc", mean, prog_bar=True, sync_dist=False, rank_zero_only=True)
        self.log(f"{stage}/ci95", ci, sync_dist=False, rank_zero_only=True)
        self.log(f"{stage}/episodes", float(accs.numel()), sync_dist=False, rank_zero_only=True)

    def result_extras(self) -> dict[str, list[float]]:
        """Per-episode test accuracies (%) for ``results.json``, in test order (rank-major under
        DDP): two methods tested on the same fixed episodes can then be compared paired."""
        return {"episode_acc": self.episode_accuracies.get("test", [])}

    def on_validation_epoch_start(self) -> None:
        self._feature_cache = {}  # the learned prompts change between validations

    def on_test_epoch_start(self) -> None:
        self._feature_cache = {}

    def on_validation_epoch_end(self) -> None:
        self._report("val")
        self._feature_cache = {}

    def on_test_epoch_end(self) -> None:
        self._report("test")
        self._feature_cache = {}
