"""What the image classifiers share: a frozen backbone, one prompt learner and one pruner as hooks,
and one supervised loss with its guard and logs.

:class:`HookedClassifier` is the base of :class:`~vlm.modules.CLIPClassifier` and
:class:`~vlm.modules.ViTClassifier`. They differ only in how logits are made (text features vs a
linear head) and in how test subsets are scored; building the learner, checking that learner and
pruner can work together, the hook order, the loss (cross-entropy plus the learner's own terms) and
its NaN guard and logs live here once.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from vlm.hooks import TowerHook
from vlm.modules.base import LearnedOnlyModule, accuracy_percent
from vlm.modules.optim import OptimConfig
from vlm.prompts import PromptLearner
from vlm.protocols import ImageBackbone, check_backbone
from vlm.pruning.base import Pruner
from vlm.runtime.reliability import check_hooks


class HookedClassifier(LearnedOnlyModule):
    """A :class:`LearnedOnlyModule` whose backbone runs ``prompt_learner`` then ``pruner`` as hooks.

    Subclasses call :meth:`attach` in ``__init__`` (before creating their own learned layers) and
    :meth:`restore` at its end; ``method_name`` is the learner's registry name, or ``no_learner``.
    """

    #: ``method_name`` without a prompt learner (``zeroshot`` for CLIP, ``linear`` for a probe).
    no_learner: str = "none"
    #: what the module needs of its backbone (``vlm.protocols``); checked in :meth:`attach`, so the
    #: ``backbone`` argument is typed with the base class and any backbone meeting it is accepted.
    backbone_protocol: type = ImageBackbone

    def attach(
        self,
        backbone: nn.Module,
        prompt_learner: Optional[PromptLearner],
        pruner: Optional[Pruner],
        optim: Optional[OptimConfig],
        init_from: Optional[str],
    ) -> None:
        """Build the learner for ``backbone`` and check the learner/pruner pair (vlm.runtime.reliability)."""
        check_backbone(backbone, self.backbone_protocol, type(self).__name__)
        self.backbone = backbone
        self.prompt_learner = prompt_learner
        self.pruner = pruner
        if prompt_learner is not None:
            prompt_learner.build(backbone)
        check_hooks(backbone, prompt_learner, pruner)
        self.method_name = prompt_learner.name if prompt_learner is not None else self.no_learner
        self.optim = optim or OptimConfig()
        self.init_from = init_from
        self.test_acc = nn.ModuleDict()

    def restore(self) -> None:
        """Load ``init_from`` (a ``vlm export`` directory) once every learned tensor exists."""
        if self.init_from:
            self.load_exported(self.init_from)

    @property
    def hooks(self) -> list[TowerHook]:
        """Hooks in order: the prompt learner, then the pruner (which acts on the vision tower only,
        keeps CLS and prompts, and leaves ``lengths`` right for pooling)."""
        return [h for h in (self.prompt_learner, self.pruner) if h is not None]

    def loss_outputs(self, out: dict[str, Tensor], batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        """What the learner's ``losses`` read: the forward outputs, plus what a subclass adds."""
        return out

    def supervised_loss(self, out: dict[str, Tensor], batch: dict[str, Tensor], stage: str) -> Tensor:
        """``cross_entropy(logits, label)`` plus the learner's terms; every term is checked finite and
        logged as ``<stage>/<term>``, with the total ``<stage>/loss`` and ``<stage>/acc``."""
        ce = F.cross_entropy(out["logits"], batch["label"])
        extra = self.prompt_learner.losses(self.loss_outputs(out, batch, stage), batch, self.backbone) if self.prompt_learner else {}
        self.check_finite({"ce": ce, **extra}, stage)
        loss = ce + sum(extra.values()) if extra else ce
        bs = batch["label"].shape[0]
        for name, value in {"ce": ce, **extra}.items():
            self.log(f"{stage}/{name}", value, batch_size=bs)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train", batch_size=bs)
        self.log(f"{stage}/acc", accuracy_percent(out["logits"], batch["label"]), prog_bar=True, batch_size=bs)
        return loss
