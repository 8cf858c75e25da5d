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

from vlm.context import Tower
from vlm.prompts.base import PromptLearner, TextInputs
from vlm.prompts.registry import register
from vlm.prompts.released import DasslLayout, Rule
from vlm.prompts.text_context import PLACEHOLDER, TextCodec, TextContext

__all__ = ["CoOp", "PLACEHOLDER", "POSITIONS"]

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
        num_classes: with ``class_specific``, the class count, used only when the module does not
            bind the training classes (the CLI always does, from the data: ``bind_classes``);
            the parameter is sized at ``build`` so that checkpoints load before any test.
            (CoOp ignores CSC when ``ctx_init`` is set; here the phrase initialises every class.)
        class_token_position: ``"end"`` (Eq. 2), ``"middle"`` or ``"front"``.
        init_std: standard deviation of the random init.

    ``text_inputs(classnames, template)`` ignores ``template``: the learned context replaces it.
    """

    learns_text = True
    towers = (Tower.TEXT,)
    #: KaiyangZhou/CoOp ``trainers/coop.py`` (KgCoOp the same): Dassl registers the prompt learner
    #: itself, so the context is ``ctx`` (``[M, D]``, CSC ``[num_classes, M, D]``), no prefix.
    released_layout = DasslLayout(
        model_name="prompt_learner",
        rules=(Rule("ctx", "prompt_learner.ctx"),),
        settings=lambda s: {"n_ctx": int(s["ctx"].shape[-2]), "class_specific": s["ctx"].dim() == 3} if "ctx" in s else {},
        also=("KgCoOp",),
    )

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
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"CoOp: num_classes must be >= 1; got {num_classes}.")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1; got {n_ctx}.")
        self.ctx_init = (ctx_init or "").replace("_", " ").strip() or None
        self.n_ctx: Optional[int] = n_ctx if (n_ctx is not None or self.ctx_init) else 16
        self.class_specific = class_specific
        self.num_classes = num_classes
        #: the training classes a class-specific context belongs to (``bind_classes``), in label order
        self.trained_classnames: Optional[list[str]] = None
        self.class_token_position = class_token_position
        self.init_std = init_std
        self.ctx: Optional[nn.Parameter]
        self.register_parameter("ctx", None)  # created by build()
        self.context = TextContext("CoOp")
        self.codec: Optional[TextCodec] = None
        # Per class list: the index that moves the class-name tokens (middle/front) and the moved
        # token ids; never in the state dict.
        self._perm: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}

    # --- building -------------------------------------------------------------------------------
    def bind_classes(self, classnames: list[str]) -> None:
        """Class-specific context: one context per training class, sized from the data's class list."""
        if not self.class_specific:
            return
        if self.num_classes is not None and self.num_classes != len(classnames):
            raise ValueError(
                f"CoOp(class_specific=True): num_classes={self.num_classes} but the data has {len(classnames)} "
                "training classes. Remove prompt_learner.init_args.num_classes: the count comes from the data."
            )
        self.num_classes = len(classnames)
        self.trained_classnames = list(classnames)

    def check_classes(self, classnames: list[str]) -> None:
        """A class-specific context scores only the classes it was trained on, in their order."""
        if not self.class_specific:
            return
        if len(classnames) != self.num_classes or (
            self.trained_classnames is not None and list(classnames) != self.trained_classnames
        ):
            raise ValueError(
                f"CoOp(class_specific=True) learned one context per training class ({self.num_classes} classes), so it "
                f"cannot score another class list ({len(classnames)} classes, e.g. the 'new' subset of base-to-new). "
                "Test on the training classes only, or train with class_specific: false (a shared context transfers)."
            )

    def build(self, backbone: Any) -> None:
        """Create ``ctx``: N(0, init_std) or the ``ctx_init`` phrase's token embeddings (CoOp Sec. 4.1)."""
        if self.class_specific and self.num_classes is None:
            raise ValueError(
                "CoOp(class_specific=True) needs the training classes before build: run it in a classifier that "
                "links the data's classnames (the CLI does), or give num_classes."
            )
        codec = self.codec = TextCodec.of(backbone, "CoOp")
        weight = codec.embedding.weight
        self._perm.clear()
        if self.ctx_init:
            n_words = len(codec.word_ids(self.ctx_init))
            if self.n_ctx is not None and self.n_ctx != n_words:
                raise ValueError(
                    f"ctx_init {self.ctx_init!r} has {n_words} tokens but n_ctx={self.n_ctx}; "
                    "leave n_ctx unset to take it from the phrase."
                )
            self.n_ctx = n_words
            vectors = self.context.use_phrase(codec, self.ctx_init, n_words)
            if self.class_specific:
                vectors = vectors.unsqueeze(0).repeat(self.num_classes, 1, 1)
        else:
            self.context.use_placeholders(self.n_ctx)
            shape = (self.num_classes, self.n_ctx, codec.width) if self.class_specific else (self.n_ctx, codec.width)
            vectors = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            nn.init.normal_(vectors, std=self.init_std)
        self.ctx = nn.Parameter(vectors)

    @property
    def prompt_prefix(self) -> str:
        return self.context.prefix

    # --- prompts --------------------------------------------------------------------------------
    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """``prefix + " " + classname + "."`` with underscores as spaces (CoOp's prompt text)."""
        return self.context.prompt_texts(classnames)

    def _rearrangement(self, classnames: tuple[str, ...], tokens: Tensor) -> Tensor:
        """Index ``[C, L]`` into ``[SOS, V_1..V_M, CLASS, rest]`` giving CoOp's ``front``
        (``[SOS, CLASS, V_1..V_M, rest]``) or ``middle`` (``[SOS, V_1..V_h, CLASS, V_h+1..V_M, rest]``,
        h = M // 2) order. Positions after the class name (".", EOT, padding) do not move."""
        n, length, s = self.n_ctx, tokens.shape[1], self.context.start
        half = n // 2
        rows = []
        for i, name in enumerate(classnames):
            name_ids = self.codec.word_ids(name.replace("_", " ")).to(tokens.device)
            k = len(name_ids)
            if s + n + k > length or not bool((tokens[i, s + n : s + n + k] == name_ids).all()):
                raise ValueError(f"CoOp: class name {name!r} is not tokenized right after the context (truncated?).")
            start = list(range(s))  # the start token, if the tokenizer has one
            ctx = list(range(s, s + n))
            cls = list(range(s + n, s + n + k))
            rest = list(range(s + n + k, length))
            if self.class_token_position == "front":
                order = start + cls + ctx + rest
            else:
                order = start + ctx[:half] + cls + ctx[half:] + rest
            rows.append(order)
        return torch.tensor(rows, dtype=torch.long, device=tokens.device)

    def text_inputs(self, classnames: list[str], template: str = "{}") -> TextInputs:
        """Token ids and embeddings ``[C, L, D]``: ``[SOS, ctx, CLASS, ".", EOT, pad]`` (Eq. 2),
        with the class tokens moved for ``middle``/``front``. ``template`` is not used."""
        if self.ctx is None or self.codec is None:
            raise RuntimeError("CoOp.text_inputs called before build(backbone).")
        self.check_classes(classnames)
        tokens, embeds = self.context.inputs(self.codec, classnames, self.ctx.device)
        prompts = self.context.splice(embeds, self.ctx)
        if self.class_token_position == "end":
            return TextInputs(tokens=tokens, embeds=prompts)
        key = tuple(classnames)
        cached = self._perm.get(key)
        if cached is None or cached[0].device != tokens.device:
            perm = self._rearrangement(key, tokens)
            cached = self._perm[key] = (perm, torch.gather(tokens, 1, perm))
        perm, moved = cached
        prompts = torch.gather(prompts, 1, perm.unsqueeze(-1).expand(-1, -1, prompts.shape[-1]))
        return TextInputs(tokens=moved, embeds=prompts)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
            f"class_specific={self.class_specific}, class_token_position={self.class_token_position!r}"
        )
