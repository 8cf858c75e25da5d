"""Deep vision-language prompts on CLIP: the mechanics the deep vision-language learners share.

This module implements *where* prompts go; subclasses say *what* the prompt vectors of each layer
are by implementing :meth:`DeepVLPrompts.text_prompts` and :meth:`DeepVLPrompts.vision_prompts`.
The placement follows the CLIP of the released code of Khattak et al. (CVPR 2023, Sec. 3.2-3.3;
``clip/model.py``, its independent and coupled deep-prompt blocks); equations are that paper's:

Text tower (input ``W_0 = [SOS, P_1..P_b, w_1..w_N, EOT, pad]``, Eq. 4-5):
  * layer 0: the prompt text ``"<prefix> <classname>."`` is tokenized and embedded (frozen); the
    ``b = n_ctx_text`` token embeddings right after SOS (positions ``1..b``) are replaced by the
    learned context ``text_prompts(0)`` before the positional embedding (``text_inputs``);
  * layers ``1..depth_text-1``: before block ``i`` the outputs at positions ``1..b`` are discarded
    and replaced by ``text_prompts(i)`` (Eq. 5: ``[_, W_i] = L_i([P_{i-1}, W_{i-1}])``);
  * deeper layers process the previous layer's prompt outputs unchanged.
  The context slots get token type CTX, so a learner's attention spec can tell them apart.

Vision tower (input ``[CLS, E_1..E_M]`` plus positional embedding, Eq. 6-7):
  * layer 0: ``vision_prompts(0)`` is *appended* after the patch tokens, after the positional
    embedding and before ``ln_pre`` (``on_tower_start``); the prompts carry no positional embedding;
  * layers ``1..depth_vision-1``: the last ``n_ctx_vision`` tokens are replaced by
    ``vision_prompts(i)`` before block ``i``;
  * pooling reads the CLS token (or the mean of PATCH tokens), never the prompts (type PROMPT).

Prompt-text initialisation (as the released trainers do it): with ``ctx_init`` (e.g.
``"a photo of a"``) and ``n_ctx_text <= len(tokens(ctx_init))``, the prefix text is the whole
phrase and the context starts as the embeddings of its first ``n_ctx_text`` tokens; the remaining
phrase words stay as frozen tokens (2 learned tokens replace "a photo", and "of a" stays).
Otherwise the context is N(0, 0.02) and the prefix is ``n_ctx_text`` placeholders ``"X"``.

Public API for subclasses (kept stable: learners build on the learners built on this class):
  * ``text_prompts(layer) -> Tensor [n_ctx_text, D_text] | None``;
  * ``vision_prompts(layer) -> Tensor [n_ctx_vision, D_vision] | None`` (``None``: no prompt
    insertion or replacement at that layer);
  * ``n_ctx_text``, ``n_ctx_vision``, ``depth_text``, ``depth_vision``, ``prompt_prefix``;
  * ``text_inputs(classnames, template)`` -> :class:`~vlm.prompts.base.TextInputs`;
  * a frozen (prompt-free) pass is simply the backbone called without this hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Any, Optional

import torch
from torch import Tensor

from vlm.context import BlockContext, Tower, TowerContext
from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.text_context import TextCodec, TextContext
from vlm.protocols import tower_runner
from vlm.tokens import TokenState, TokenType, check
#: When ``ctx_init`` initialises the text context (see ``DeepVLPrompts.build_text_context``).
CTX_INIT_RULES = ("words", "released")
#: The released code uses ``ctx_init`` whenever the context has at most this many tokens.
RELEASED_CTX_INIT_MAX = 4
#: Token types that are learned prompts (vision or text); everything else is an "instance".
PROMPT_TYPES = (TokenType.PROMPT, TokenType.PROMPT_CLS, TokenType.PROMPT_IMG, TokenType.CTX)


def backbone_ref(backbone: Any) -> Tensor:
    """A parameter of the backbone, for the dtype and device of new prompt tensors."""
    return next(iter(backbone.parameters()))


def normal_(shape: tuple[int, ...], ref: Tensor, std: float) -> Tensor:
    """A new ``N(0, std)`` tensor with ``ref``'s dtype and device (the released deep-prompt init)."""
    return torch.empty(shape, dtype=ref.dtype, device=ref.device).normal_(std=std)


def is_prompt(types: Tensor) -> Tensor:
    """Bool mask of prompt tokens (PROMPT*, CTX) for a ``types`` tensor of any shape."""
    out = torch.zeros_like(types, dtype=torch.bool)
    for ty in PROMPT_TYPES:
        out |= types == int(ty)
    return out


class DeepVLPrompts(PromptLearner, ABC):
    """Base class: text context at layer 0 plus per-layer replacement in both towers.

    Args:
        n_ctx_text: number b of text context tokens (0 is not allowed: the text tower is always prompted).
        n_ctx_vision: number of vision prompt tokens (0: no vision prompts).
        depth_text: layers ``0..depth_text-1`` of the text tower get prompts (>= 1).
        depth_vision: layers ``0..depth_vision-1`` of the vision tower get prompts (0: none).
        ctx_init: phrase whose first ``n_ctx_text`` token embeddings initialise the text context.
        ctx_init_rule: when the phrase is used: ``"words"`` (it has at least ``n_ctx_text`` word
            tokens) or ``"released"`` (``n_ctx_text <= 4``, as the released Dassl-family code; see
            :meth:`build_text_context`).
        init_std: std of the N(0, std) init of every randomly initialised prompt (0.02 in the released code).
    """

    learns_text = True

    def __init__(
        self,
        n_ctx_text: int,
        n_ctx_vision: int,
        depth_text: int,
        depth_vision: int,
        ctx_init: Optional[str] = "a photo of a",
        init_std: float = 0.02,
        ctx_init_rule: str = "words",
    ) -> None:
        super().__init__()
        if ctx_init_rule not in CTX_INIT_RULES:
            raise ValueError(f"ctx_init_rule must be one of {CTX_INIT_RULES}; got {ctx_init_rule!r}.")
        if n_ctx_text < 1 or depth_text < 1:
            raise ValueError(f"{type(self).__name__} needs n_ctx_text >= 1 and depth_text >= 1 (got {n_ctx_text}, {depth_text}).")
        if n_ctx_vision < 0 or depth_vision < 0 or (n_ctx_vision == 0) != (depth_vision == 0):
            raise ValueError(
                f"{type(self).__name__}: n_ctx_vision and depth_vision must both be 0 (no vision prompts) or both >= 1 "
                f"(got {n_ctx_vision}, {depth_vision})."
            )
        self.n_ctx_text, self.n_ctx_vision = n_ctx_text, n_ctx_vision
        self.depth_text, self.depth_vision = depth_text, depth_vision
        self.ctx_init = (ctx_init or "").replace("_", " ").strip() or None
        self.init_std = init_std
        self.ctx_init_rule = ctx_init_rule
        self.towers = (Tower.VISION, Tower.TEXT) if n_ctx_vision > 0 else (Tower.TEXT,)
        self.context = TextContext(type(self).__name__)
        self.codec: Optional[TextCodec] = None

    # --- what subclasses provide ---------------------------------------------------------------
    @abstractmethod
    def text_prompts(self, layer: int) -> Optional[Tensor]:
        """``[n_ctx_text, D]`` prompt vectors entering text block ``layer`` (layer 0: word-embedding
        space, before the positional embedding), or ``None`` if the layer keeps its tokens."""

    @abstractmethod
    def vision_prompts(self, layer: int) -> Optional[Tensor]:
        """``[n_ctx_vision, D]`` prompt vectors entering vision block ``layer`` (layer 0: appended
        before ``ln_pre``), or ``None`` if the layer keeps its tokens."""

    # --- building ------------------------------------------------------------------------------
    def check_backbone(self, backbone: Any) -> None:
        """A CLIP-like backbone with block runners for both towers, deep enough for the depths;
        takes the text codec (tokenizer, token types, frozen embedding) from it."""
        self.codec = TextCodec.of(backbone, type(self).__name__)
        for tower, depth in ((Tower.TEXT, self.depth_text), (Tower.VISION, self.depth_vision)):
            layers = int(tower_runner(backbone, tower, type(self).__name__).num_layers)
            if depth > layers:
                raise ValueError(f"{type(self).__name__}: {tower.value} prompt depth {depth} exceeds the tower's {layers} layers.")

    def build_text_context(self, backbone: Any) -> Tensor:
        """The initial text context ``[n_ctx_text, D]``. ``ctx_init_rule="words"``: the first
        ``n_ctx_text`` word tokens of ``ctx_init`` when the phrase has that many; ``"released"``:
        the released code's rule, the phrase whenever ``n_ctx_text <= 4`` (token positions 1..n of
        the tokenized phrase). Otherwise N(0, init_std) with placeholder words."""
        codec = self.codec or TextCodec.of(backbone, type(self).__name__)
        self.codec = codec
        n = self.n_ctx_text
        if self.ctx_init and self.ctx_init_rule == "released" and n <= RELEASED_CTX_INIT_MAX:
            return self.context.use_released_phrase(codec, self.ctx_init, n)
        if self.ctx_init and self.ctx_init_rule == "words" and n <= len(codec.word_ids(self.ctx_init)):
            return self.context.use_phrase(codec, self.ctx_init, n)
        self.context.use_placeholders(self.n_ctx_text)
        return normal_((self.n_ctx_text, codec.width), codec.embedding.weight, self.init_std)

    @property
    def prompt_prefix(self) -> str:
        return self.context.prefix

    # --- text side -----------------------------------------------------------------------------
    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """``prefix + " " + classname + "."`` with underscores as spaces (as the released trainers)."""
        return self.context.prompt_texts(classnames)

    def text_inputs(self, classnames: list[str], template: str = "{}") -> TextInputs:
        """Tokens and embeddings ``[C, L, D]`` of ``[SOS, ctx_1..ctx_b, rest of prefix, CLASS, ".",
        EOT, pad]``; ``template`` is not used (the learned context replaces it)."""
        ctx = self.text_prompts(0)
        if ctx is None or self.codec is None:
            raise RuntimeError(f"{type(self).__name__}.text_inputs called before build(backbone).")
        tokens, embeds = self.context.inputs(self.codec, classnames, ctx.device)
        return TextInputs(tokens=tokens, embeds=self.context.splice(embeds, ctx))

    # --- hooks ---------------------------------------------------------------------------------
    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        """Text: mark the context slots (1..b after SOS; 0..b-1 without one) as CTX. Vision: append the layer-0 prompts."""
        if self.text_prompts(0) is None:
            raise RuntimeError(f"{type(self).__name__} used before build(backbone).")
        if ctx.tower is Tower.TEXT:
            n, s = self.n_ctx_text, self.context.start
            types = state.batch_types.clone()
            check(
                types[:, s : s + n] == int(TokenType.TEXT),
                f"{type(self).__name__}: text positions {s}..{s + n - 1} are not word tokens (use text_inputs()).",
            )
            types[:, s : s + n] = int(TokenType.CTX)
            return state.replace(types=types)
        prompts = self.vision_prompts(0)
        if prompts is None:
            return state
        if state.lengths is not None:
            raise ValueError(f"{type(self).__name__}: vision prompts are appended, which needs unpadded vision tokens.")
        x = state.x
        return state.insert(x.shape[1], prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1), TokenType.PROMPT)

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        """Layers >= 1: replace the previous layer's prompt outputs by this layer's prompts."""
        layer = ctx.layer
        if layer == 0:
            return state
        if ctx.tower is Tower.TEXT:
            prompts, start = self.text_prompts(layer), self.context.start
            if prompts is None:
                return state
            end = start + prompts.shape[0]
            kind = TokenType.CTX
        else:
            prompts = self.vision_prompts(layer)
            if prompts is None:
                return state
            end = state.x.shape[1]
            start = end - prompts.shape[0]
            kind = TokenType.PROMPT
        check(
            state.batch_types[:, start:end] == int(kind),
            f"{type(self).__name__}: the {ctx.tower.value} prompt tokens are no longer at their slots before layer {layer}.",
        )
        x = state.x
        new = prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return state.replace(x=torch.cat([x[:, :start], new, x[:, end:]], dim=1))

    def positional_tail(self) -> Optional[tuple[int, int]]:
        """The vision prompts are the last ``n_ctx_vision`` tokens, replaced before blocks
        ``1..depth_vision-1`` (none to replace below depth 2)."""
        return (self.n_ctx_vision, self.depth_vision - 1) if self.depth_vision >= 2 else None

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, n_ctx_text={self.n_ctx_text}, n_ctx_vision={self.n_ctx_vision}, "
            f"depth_text={self.depth_text}, depth_vision={self.depth_vision}, ctx_init={self.ctx_init!r}"
        )
