"""MaPLe: Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan, Khan, CVPR 2023).

Language prompts are learned and the vision prompts are *functions of them* (vision-language
coupling, Sec. 3.3):

* layer 0: text context ``P = ctx`` ``[b, D_t]`` replaces the tokens after SOS (Eq. 4, as in
  CoOp); the vision prompts are ``P~ = F(P)`` with ``F = proj``, a ``Linear(D_t -> D_v)`` (Eq. 8),
  appended after the patch tokens before ``ln_pre``;
* layers ``i = 1..J-1`` (``J = depth``): new text prompts ``P_i = compound_text[i-1]`` replace the
  text slots (Eq. 5) and the vision prompts ``F_i(P_i) = compound_proj[i-1](P_i)`` replace the
  last ``b`` vision tokens (Eq. 6-7, the "compound prompts"), one coupling function per layer;
* from layer J on, both towers process the previous prompt outputs unchanged (Eq. 3 after J).

The coupling functions are ``nn.Linear`` with PyTorch's default init. The released code builds
one ``Linear`` and deep-copies it for the J-1 deeper layers (``_get_clones``), so those start
identical; that is the default here (``coupling_init="cloned"``), ``"independent"`` initialises
each one on its own. The text prompts are N(0, 0.02),
and ``ctx`` starts from the embeddings of the first ``b`` tokens of ``ctx_init`` (the remaining
words of the phrase stay as frozen tokens: with b = 2 and "a photo of a", the prompt text is
"a photo of a <class>." and "a photo" is learned), exactly as in the MaPLe repository.

Defaults are the paper's / ``vit_b16_c2_ep5_batch4_2ctx.yaml``: b = 2, J = 9, "a photo of a"
(SGD lr 0.0035, batch 4, 5 epochs; cross-dataset/DG config: J = 3, lr 0.0026, 2 epochs).

Public API (stable; DAPT subclasses this class):
  * class ``MaPLe``; registry name ``"maple"``;
  * parameters ``ctx`` ``[b, D_t]``, ``compound_text`` ``[J-1, b, D_t]`` (None if J = 1);
    modules ``proj`` and ``compound_proj`` (``ModuleList`` of J-1 ``Linear(D_t, D_v)``);
  * ``text_prompts(layer)`` and ``vision_prompts(layer)`` (the projected vectors) give the prompts
    entering block ``layer`` (``None`` where nothing is inserted); override them to transform prompts;
  * a prompt-free frozen pass: call the backbone without this hook.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import Tensor, nn

from vlm.prompts._deep import DeepVLPrompts, backbone_ref, normal_
from vlm.prompts.registry import register
from vlm.prompts.released import DasslLayout, Rule


#: How the J-1 deeper coupling functions start: deep copies of one Linear (released code) or each its own.
COUPLING_INITS = ("cloned", "independent")


def _released_settings(state: dict) -> dict:
    """n_ctx and depth of a released checkpoint (depth = 1 + its compound text prompts)."""
    if "prompt_learner.ctx" not in state:
        return {}
    deep = [k for k in state if k.startswith("prompt_learner.compound_prompts_text.")]
    return {"n_ctx": int(state["prompt_learner.ctx"].shape[0]), "depth": 1 + len(deep)}


@register("maple")
class MaPLe(DeepVLPrompts):
    """Multi-modal coupled deep prompts on a CLIP backbone.

    Args:
        n_ctx: prompt tokens b per tower (``N_CTX``; the vision tower gets the same count).
        depth: prompt depth J in both towers (``PROMPT_DEPTH``, >= 1; 1 = shallow MaPLe).
        ctx_init: phrase initialising the text context (used when b <= its token count).
        init_std: std of the N(0, std) init of the random text prompts.
        ctx_init_rule: ``"words"`` or the released code's ``"released"`` (``DeepVLPrompts``).
        coupling_init: ``"cloned"`` (the J-1 deeper couplings start as copies of one Linear, as
            released) or ``"independent"`` (each initialised on its own).
    """

    #: muzairkhattak/multimodal-prompt-learning ``trainers/maple.py``: Dassl registers the whole
    #: CustomCLIP (frozen CLIP saved too). Compound text prompt i enters block i + 1 (our row i).
    released_layout = DasslLayout(
        model_name="MultiModalPromptLearner",
        rules=(
            Rule("prompt_learner.ctx", "prompt_learner.ctx"),
            Rule("prompt_learner.proj.{0}", "prompt_learner.proj.{0}"),
            Rule("prompt_learner.compound_prompts_text.{row}", "prompt_learner.compound_text", row_offset=0),
            Rule("prompt_learner.compound_prompt_projections.{0}.{1}", "prompt_learner.compound_proj.{0}.{1}"),
        ),
        settings=_released_settings,
        frozen=("image_encoder.", "text_encoder.", "logit_scale"),
    )

    def __init__(
        self,
        n_ctx: int = 2,
        depth: int = 9,
        ctx_init: Optional[str] = "a photo of a",
        init_std: float = 0.02,
        coupling_init: str = "cloned",
        ctx_init_rule: str = "words",
    ) -> None:
        super().__init__(n_ctx, n_ctx, depth, depth, ctx_init, init_std, ctx_init_rule)
        if coupling_init not in COUPLING_INITS:
            raise ValueError(f"coupling_init must be one of {COUPLING_INITS}; got {coupling_init!r}.")
        self.n_ctx, self.depth = n_ctx, depth
        self.coupling_init = coupling_init
        self.register_parameter("ctx", None)
        self.register_parameter("compound_text", None)
        self.proj: Optional[nn.Linear] = None
        self.compound_proj: Optional[nn.ModuleList] = None

    def build(self, backbone: Any) -> None:
        """Create ``ctx``, the compound text prompts and the per-layer couplings ``Linear(D_t, D_v)``."""
        super().build(backbone)
        self.check_backbone(backbone)
        ref = backbone_ref(backbone)
        ctx = self.build_text_context(backbone)
        self.ctx = nn.Parameter(ctx)
        dc, dt, dv = ctx.shape[1], int(backbone.text.width), int(backbone.vision.width)
        kw = dict(dtype=ref.dtype, device=ref.device)
        self.proj = nn.Linear(dc, dv, **kw)
        if self.depth > 1:
            self.compound_text = nn.Parameter(normal_((self.depth - 1, self.n_ctx, dt), ref, self.init_std))
            if self.coupling_init == "cloned":  # one Linear, deep-copied (the released _get_clones)
                first = nn.Linear(dt, dv, **kw)
                self.compound_proj = nn.ModuleList(copy.deepcopy(first) for _ in range(self.depth - 1))
            else:
                self.compound_proj = nn.ModuleList(nn.Linear(dt, dv, **kw) for _ in range(self.depth - 1))

    def text_prompts(self, layer: int) -> Optional[Tensor]:
        if layer == 0:
            return self.ctx
        if layer < self.depth and self.compound_text is not None:
            return self.compound_text[layer - 1]
        return None

    def vision_prompts(self, layer: int) -> Optional[Tensor]:
        """``F_i(P_i)``: the text prompts of layer ``i`` through that layer's coupling function."""
        if layer == 0:
            return None if self.ctx is None or self.proj is None else self.proj(self.ctx)
        if layer < self.depth and self.compound_text is not None and self.compound_proj is not None:
            return self.compound_proj[layer - 1](self.compound_text[layer - 1])
        return None

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, n_ctx={self.n_ctx}, depth={self.depth}, ctx_init={self.ctx_init!r}, "
            f"coupling_init={self.coupling_init!r}"
        )
