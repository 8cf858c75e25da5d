"""VPT: Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, ECCV 2022).

Learned prompt tokens P of the vision width are inserted into the ViT's token sequence, after the
class token (and register tokens) and before the patch embeddings E:

* VPT-Shallow (paper Eq. 4-6): ``[x_1, Z_1, E_1] = L_1([x_0, P, E_0])``, then the layers run as
  usual; the prompt outputs Z_i flow on to the end.
* VPT-Deep (Eq. 7-8): every layer i gets its own prompts P_{i-1}:
  ``[x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])``; the previous layer's prompt outputs are
  discarded and replaced.

Initialisation follows the official code: uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + dim))
(Xavier-uniform over a patch-shaped fan-in), and prompt dropout is applied to the prompt
embeddings before insertion. Prompts have type PROMPT and position -1; the towers pool by token
type (CLS token, or the mean over PATCH tokens), so prompts never enter the pooled feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlm.context import BlockContext, Tower, TowerContext
from vlm.prompts.base import PromptLearner
from vlm.prompts.registry import register
from vlm.tokens import TokenState, TokenType, check, prefix_length



def patch_size(runner: Any) -> tuple[int, int]:
    """The patch size of a vision runner's library model (open_clip ``visual`` or timm ViT)."""
    model = getattr(runner, "visual", None)
    if model is None:
        model = getattr(runner, "model", None)
    for path in ("patch_embed.patch_size", "patch_size", "conv1.kernel_size", "patch_embed.proj.kernel_size",
                 "embeddings.patch_size", "trunk.patch_embed.patch_size", "config.patch_size"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            size = (obj, obj) if isinstance(obj, int) else tuple(obj)
            return int(size[0]), int(size[1])
    raise TypeError(f"VPT: cannot find the patch size of {type(model).__name__}.")


@register("vpt")
class VPT(PromptLearner):
    """Visual prompts on the vision tower.

    Args:
        num_tokens: number of prompt tokens per layer (VPT's ``NUM_TOKENS``).
        deep: VPT-Deep (fresh prompts before every layer) instead of VPT-Shallow.
        dropout: prompt dropout probability (VPT's ``PROMPT.DROPOUT``), active in training mode.

    Parameters (created by ``build``): ``prompt_embeddings [1, num_tokens, D]`` for layer 0 and,
    if ``deep``, ``deep_prompt_embeddings [num_layers - 1, num_tokens, D]`` for layers 1.., as
    named in the official code.
    """

    towers = (Tower.VISION,)

    def __init__(self, num_tokens: int = 5, deep: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"VPT needs num_tokens >= 1; got {num_tokens}.")
        self.num_tokens = num_tokens
        self.deep = deep
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_embeddings: nn.Parameter | None
        self.deep_prompt_embeddings: nn.Parameter | None
        self.register_parameter("prompt_embeddings", None)
        self.register_parameter("deep_prompt_embeddings", None)

    def build(self, backbone: Any) -> None:
        """Prompts of the vision width, uniform(+-sqrt(6 / (3 * patch_h * patch_w + dim)))."""
        super().build(backbone)
        runner = backbone.vision
        dim, layers = int(runner.width), int(runner.num_layers)
        ph, pw = patch_size(runner)
        bound = math.sqrt(6.0 / float(3 * ph * pw + dim))
        ref = next(iter(backbone.parameters()))
        kw = dict(dtype=ref.dtype, device=ref.device)
        self.prompt_embeddings = nn.Parameter(torch.empty(1, self.num_tokens, dim, **kw).uniform_(-bound, bound))
        if self.deep and layers > 1:
            deep = torch.empty(layers - 1, self.num_tokens, dim, **kw).uniform_(-bound, bound)
            self.deep_prompt_embeddings = nn.Parameter(deep)
        else:
            self.deep_prompt_embeddings = None

    def _prompts(self, p: Tensor, batch: int) -> Tensor:
        """``dropout(P)`` expanded to the batch (per-sample dropout masks, as in VPT)."""
        return self.prompt_dropout(p.expand(batch, -1, -1))

    @dataclass
    class PassState:
        """``prefix``: where the prompts were inserted (the CLS/register prefix length)."""

        prefix: Optional[int] = None

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        """Insert the layer-0 prompts after the CLS/register prefix (Eq. 4 / Eq. 7 for i = 1)."""
        if self.prompt_embeddings is None:
            raise RuntimeError("VPT used before build(backbone).")
        index = prefix_length(state.batch_types, "VPT")
        ctx.state(self).prefix = index
        prompts = self._prompts(self.prompt_embeddings, state.x.shape[0])
        return state.insert(index, prompts, TokenType.PROMPT)

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        """VPT-Deep: replace the previous layer's prompt outputs by this layer's prompts (Eq. 7)."""
        layer = ctx.layer
        if not self.deep or layer == 0 or self.deep_prompt_embeddings is None:
            return state
        if layer - 1 >= self.deep_prompt_embeddings.shape[0]:
            built = self.deep_prompt_embeddings.shape[0] + 1
            raise ValueError(f"VPT-Deep was built for {built} layers; got layer {layer}.")
        start = ctx.state(self).prefix
        if start is None:
            raise ValueError(f"VPT-Deep: the prompt tokens are no longer at their slots before layer {layer}.")
        end = start + self.num_tokens
        check(
            state.batch_types[:, start:end] == int(TokenType.PROMPT),
            f"VPT-Deep: the prompt tokens are no longer at their slots before layer {layer}.",
        )
        x = state.x
        prompts = self._prompts(self.deep_prompt_embeddings[layer - 1], x.shape[0]).to(x.dtype)
        return state.replace(x=torch.cat([x[:, :start], prompts, x[:, end:]], dim=1))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_tokens={self.num_tokens}, deep={self.deep}, dropout={self.prompt_dropout.p}"
