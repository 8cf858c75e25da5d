"""CoOp: Context Optimization (Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language
Models", IJCV 2022).

The class prompt fed to the text encoder g(.) is (paper Eq. 2)

    t_i = [V]_1 [V]_2 ... [V]_M [CLASS]_i .

with M = ``n_ctx`` learned context vectors [V]_m of the word-embedding width. The prediction is
(Eq. 3) p(y=i|x) = exp(cos(g(t_i), f) / tau) / sum_j exp(cos(g(t_j), f) / tau), and only the
context vectors are trained. Class-specific context (CSC) gives every class its own
[V]^i_1..[V]^i_M. The class token may sit at the end (Eq. 2), in the middle or at the front
(Sec. 3.2 "Other variants"), exactly as CoOp's ``PromptLearner.forward`` concatenates them.

Mechanics (as in CoOp's code): the prompt text ``"X X ... X <classname>."`` (or ``"<ctx_init>
<classname>."``) is tokenized once; its token embeddings are frozen and the M placeholder slots
right after the start token (positions 1..M) are replaced by the learned context. The text tower
then adds its positional embedding, runs its blocks and pools where it always pools (EOT for
CLIP, mean or [CLS] for an HF BERT tower), so the token ids returned here fully define pooling.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.registry import register
from vlm.tokens import TokenType

#: The placeholder word CoOp tokenizes in place of each context vector.
PLACEHOLDER = "X"
POSITIONS = ("end", "middle", "front")


@register("coop")
class CoOp(PromptLearner):
    """Learned text context for CLIP-style text towers (open_clip built-in or HF BERT).

    Args:
        n_ctx: number M of context vectors (CoOp default 16). With ``ctx_init`` it is taken from
            the phrase; giving a different value then is an error.
        ctx_init: a phrase (e.g. ``"a photo of a"``) whose token embeddings initialise the context;
            M becomes its number of tokens. Empty/None: N(0, 0.02) init (CoOp's random init).
        class_specific: CSC, one context per class (``ctx [num_classes, M, D]``); else one shared
            context (``ctx [M, D]``).
        num_classes: required with ``class_specific``: the parameter is sized at ``build`` so that
            checkpoints load before any class list is seen; ``text_inputs`` then checks the count.
            (CoOp ignores CSC when ``ctx_init`` is set; here the phrase initialises every class.)
        class_token_position: ``"end"`` (Eq. 2), ``"middle"`` or ``"front"``.
        init_std: standard deviation of the random init.

    ``text_inputs(classnames, template)`` ignores ``template``: the learned context replaces it.
    """

    learns_text = True
    towers = ("text",)

    def __init__(
        self,
        n_ctx: Optional[int] = None,
        ctx_init: Optional[str] = None,
        class_specific: bool = False,
        num_classes: Optional[int] = None,
        class_token_position: str = "end",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}; got {class_token_position!r}.")
        if class_specific and (num_classes is None or num_classes < 1):
            raise ValueError("CoOp(class_specific=True) needs num_classes (the context is sized at build time).")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1; got {n_ctx}.")
        self.ctx_init = (ctx_init or "").replace("_", " ").strip() or None
        self.n_ctx: Optional[int] = n_ctx if (n_ctx is not None or self.ctx_init) else 16
        self.class_specific = class_specific
        self.num_classes = num_classes
        self.class_token_position = class_token_position
        self.init_std = init_std
        self.prompt_prefix = ""
        self.ctx: Optional[nn.Parameter]
        self.register_parameter("ctx", None)  # created by build()
        # Per class list: (token ids, frozen token embeddings, rearrangement index). Plain attribute,
        # so it never enters the state dict; moved lazily to the context's device.
        self._cache: dict[tuple[str, ...], tuple[Tensor, Tensor, Optional[Tensor]]] = {}

    # --- building -------------------------------------------------------------------------------
    def _text_tokens(self, text: str) -> Tensor:
        """Ids of the word tokens of ``text`` alone (no start/end/padding), by the tower's types."""
        ids = self.backbone.tokenize([text])
        types = self.backbone.text.token_types(ids)[0]
        return ids[0][types == int(TokenType.TEXT)]

    def build(self, backbone: Any) -> None:
        """Create ``ctx``: N(0, init_std) or the ``ctx_init`` phrase's token embeddings (CoOp Sec. 4.1)."""
        super().build(backbone)
        if not hasattr(backbone, "tokenize") or not hasattr(getattr(backbone, "text", None), "token_embedding"):
            raise TypeError("CoOp needs a backbone with a text tower (tokenize + text.token_embedding).")
        embedding: nn.Module = backbone.text.token_embedding
        weight = embedding.weight
        dim = weight.shape[1]
        self._cache.clear()
        if self.ctx_init:
            ids = self._text_tokens(self.ctx_init)
            if self.n_ctx is not None and self.n_ctx != len(ids):
                raise ValueError(
                    f"ctx_init {self.ctx_init!r} has {len(ids)} tokens but n_ctx={self.n_ctx}; "
                    "leave n_ctx unset to take it from the phrase."
                )
            self.n_ctx = len(ids)
            with torch.no_grad():
                vectors = embedding(ids.to(weight.device)).detach().clone()
            if self.class_specific:
                vectors = vectors.unsqueeze(0).repeat(self.num_classes, 1, 1)
            self.prompt_prefix = self.ctx_init
        else:
            shape = (self.num_classes, self.n_ctx, dim) if self.class_specific else (self.n_ctx, dim)
            vectors = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            nn.init.normal_(vectors, std=self.init_std)
            self.prompt_prefix = " ".join([PLACEHOLDER] * self.n_ctx)
        self.ctx = nn.Parameter(vectors)

    # --- prompts --------------------------------------------------------------------------------
    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """``prefix + " " + classname + "."`` with underscores as spaces (CoOp's prompt text)."""
        return [f"{self.prompt_prefix} {name.replace('_', ' ')}." for name in classnames]

    def _prepare(self, classnames: tuple[str, ...]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Tokenize the placeholder prompts, check the placeholder slots, embed them (frozen) and,
        for middle/front, build the index that moves the class-name tokens as CoOp does."""
        bb = self.backbone
        n = self.n_ctx
        tokens = bb.tokenize(self.prompt_texts(list(classnames)))
        types = bb.text.token_types(tokens)
        slot_ids = self._text_tokens(self.prompt_prefix).to(tokens.device)
        ok = len(slot_ids) == n and tokens.shape[1] > n + 1
        ok = ok and bool((types[:, 0] == int(TokenType.SOS)).all())
        ok = ok and bool((tokens[:, 1 : 1 + n] == slot_ids).all())
        ok = ok and bool((types[:, 1 : 1 + n] == int(TokenType.TEXT)).all())
        if not ok:
            raise ValueError(
                f"CoOp: the {n} context placeholder tokens of {self.prompt_prefix!r} must occupy token "
                f"positions 1..{n}, right after the start token, in every tokenized prompt; this tokenizer "
                f"({type(getattr(bb, 'tokenizer', bb)).__name__}) does not place them there."
            )
        with torch.no_grad():
            embeds = bb.text.token_embedding(tokens).detach()
        perm = None
        if self.class_token_position != "end":
            perm = self._rearrangement(classnames, tokens)
            tokens = torch.gather(tokens, 1, perm)
        return tokens, embeds, perm

    def _rearrangement(self, classnames: tuple[str, ...], tokens: Tensor) -> Tensor:
        """Index ``[C, L]`` into ``[SOS, V_1..V_M, CLASS, rest]`` giving CoOp's ``front``
        (``[SOS, CLASS, V_1..V_M, rest]``) or ``middle`` (``[SOS, V_1..V_h, CLASS, V_h+1..V_M, rest]``,
        h = M // 2) order. Positions after the class name (".", EOT, padding) do not move."""
        n, length = self.n_ctx, tokens.shape[1]
        half = n // 2
        rows = []
        for i, name in enumerate(classnames):
            name_ids = self._text_tokens(name.replace("_", " ")).to(tokens.device)
            k = len(name_ids)
            if 1 + n + k > length or not bool((tokens[i, 1 + n : 1 + n + k] == name_ids).all()):
                raise ValueError(f"CoOp: class name {name!r} is not tokenized right after the context (truncated?).")
            ctx = list(range(1, 1 + n))
            cls = list(range(1 + n, 1 + n + k))
            rest = list(range(1 + n + k, length))
            if self.class_token_position == "front":
                order = [0] + cls + ctx + rest
            else:
                order = [0] + ctx[:half] + cls + ctx[half:] + rest
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long, device=tokens.device)

    def _cached(self, classnames: list[str]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        key = tuple(classnames)
        if key not in self._cache:
            self._cache[key] = self._prepare(key)
        tokens, embeds, perm = self._cache[key]
        device = self.ctx.device
        if embeds.device != device:
            moved = tuple(None if t is None else t.to(device) for t in (tokens, embeds, perm))
            self._cache[key] = moved  # type: ignore[assignment]
            tokens, embeds, perm = moved
        return tokens, embeds, perm

    def text_inputs(self, classnames: list[str], template: str = "{}") -> TextInputs:
        """Token ids and embeddings ``[C, L, D]``: ``[SOS, ctx, CLASS, ".", EOT, pad]`` (Eq. 2),
        with the class tokens moved for ``middle``/``front``. ``template`` is not used."""
        if self.ctx is None:
            raise RuntimeError("CoOp.text_inputs called before build(backbone).")
        if self.class_specific and len(classnames) != self.num_classes:
            raise ValueError(
                f"Class-specific CoOp was built for {self.num_classes} classes but got {len(classnames)}; "
                "CSC context cannot be transferred to other class lists."
            )
        tokens, embeds, perm = self._cached(classnames)
        n_cls, n = len(classnames), self.n_ctx
        ctx = self.ctx.to(embeds.dtype)
        if not self.class_specific:
            ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
        prompts = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + n :]], dim=1)
        if perm is not None:
            prompts = torch.gather(prompts, 1, perm.unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))
        return TextInputs(tokens=tokens, embeds=prompts)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
            f"class_specific={self.class_specific}, class_token_position={self.class_token_position!r}"
        )
