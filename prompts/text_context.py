"""Learned text context, shared by every learner whose text prompt starts with learned vectors.

The prompt text of class c is ``"<prefix> <c>."`` (underscores as spaces), where ``prefix`` is the
``ctx_init`` phrase or ``n`` placeholder words ``"X"``. It is tokenized once per class list; its
token embeddings are frozen, and the ``n`` slots right after the start token (positions 1..n; 0..n-1
for a tokenizer without one, such as SigLIP's) are replaced by the learned context before the positional embedding (``t_i = [V]_1..[V]_n [CLASS]_i .``;
layer 0 of the deep learners). The released trainers of that family build their prompts this way.

:class:`TextCodec` is what a learner takes from the backbone to do this (the tokenizer, the
tower's token types, the frozen token-embedding table), taken once at ``build``: a typed value,
not a reference to the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vlm.protocols import ImageTextBackbone
from vlm.tokens import TokenType

#: The placeholder word tokenized in place of each randomly initialised context vector.
PLACEHOLDER = "X"


@dataclass(frozen=True)
class TextCodec:
    """A text tower's tokenizer, token types and frozen token embedding."""

    tokenize: Callable[[list[str]], Tensor]
    token_types: Callable[[Tensor], Tensor]
    embedding: nn.Module

    @property
    def start(self) -> int:
        """Where a prompt's first word sits: 1 after a start token (CLIP's SOS), else 0 (SigLIP)."""
        return int(self.token_types(self.tokenize([PLACEHOLDER]))[0, 0] == int(TokenType.SOS))

    @classmethod
    def of(cls, backbone: Any, who: str) -> "TextCodec":
        """The codec of a CLIP-like ``backbone`` (``tokenize`` and ``text.token_embedding``)."""
        if not isinstance(backbone, ImageTextBackbone) or not hasattr(backbone.text, "token_embedding"):
            raise TypeError(
                f"{who} needs a CLIP-like backbone with a text tower (vlm.protocols.ImageTextBackbone, whose "
                f"text runner has a token_embedding); {type(backbone).__name__} has none. Use ClipBackbone (open_clip "
                "CLIP, SigLIP, EVA-CLIP) or HFClipBackbone (HF CLIPModel/SiglipModel)."
            )
        text = backbone.text
        return cls(backbone.tokenize, text.token_types, text.token_embedding)

    @property
    def width(self) -> int:
        return int(self.embedding.weight.shape[1])

    def word_ids(self, text: str) -> Tensor:
        """Ids of the word tokens of ``text`` alone (no start/end/padding), by the tower's types."""
        ids = self.tokenize([text])
        return ids[0][self.token_types(ids)[0] == int(TokenType.TEXT)]

    @torch.no_grad()
    def embed(self, ids: Tensor) -> Tensor:
        """Frozen token embeddings of ``ids`` (a detached copy, on the embedding's device)."""
        return self.embedding(ids.to(self.embedding.weight.device)).detach().clone()


class TextContext:
    """The prompt prefix, its ``n`` learned slots, and a per-class-list cache of frozen inputs.

    ``who`` names the learner in errors. Not an ``nn.Module``: it holds no parameters, and the
    cache never enters a state dict.
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self.prefix = ""
        self.n = 0
        #: how many of the n slots hold the prefix's own word tokens (checked after tokenizing)
        self.word_slots = 0
        #: the first slot's position (1 after a start token, 0 without one), set from the codec
        self.start = 1
        self._cache: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}

    def use_phrase(self, codec: TextCodec, phrase: str, n: int) -> Tensor:
        """Prefix ``phrase``; returns the embeddings ``[n, D]`` of its first ``n`` word tokens."""
        ids = codec.word_ids(phrase)
        if n > len(ids):
            raise ValueError(f"{self.who}: ctx_init {phrase!r} has {len(ids)} tokens, fewer than the {n} context slots.")
        self._reset(phrase, n, n)
        return codec.embed(ids[:n])

    def use_released_phrase(self, codec: TextCodec, phrase: str, n: int) -> Tensor:
        """The released code's rule: prefix ``phrase`` and the embeddings of token positions
        1..n of the tokenized phrase, whatever they are. With fewer words than ``n`` the last slots
        learn from the EOT/padding embeddings and cover the first tokens of the class name."""
        ids = codec.tokenize([phrase])[0]
        self._reset(phrase, n, min(n, len(codec.word_ids(phrase))))
        self.start = codec.start
        return codec.embed(ids[self.start : self.start + n])

    def use_placeholders(self, n: int) -> None:
        """Prefix of ``n`` placeholder words (randomly initialised context)."""
        self._reset(" ".join([PLACEHOLDER] * n), n, n)

    def _reset(self, prefix: str, n: int, word_slots: int) -> None:
        self.prefix, self.n, self.word_slots = prefix, int(n), int(word_slots)
        self._cache.clear()

    def prompt_texts(self, classnames: list[str]) -> list[str]:
        """``prefix + " " + classname + "."`` with underscores as spaces (as the released trainers)."""
        return [f"{self.prefix} {name.replace('_', ' ')}." for name in classnames]

    def inputs(self, codec: TextCodec, classnames: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Token ids ``[C, L]`` and frozen embeddings ``[C, L, D]`` of the class prompts, cached per
        class list and moved to ``device`` once."""
        key = tuple(classnames)
        if key not in self._cache:
            self._cache[key] = self._prepare(codec, list(classnames))
        tokens, embeds = self._cache[key]
        if embeds.device != device:
            tokens, embeds = tokens.to(device), embeds.to(device)
            self._cache[key] = (tokens, embeds)
        return tokens, embeds

    def _prepare(self, codec: TextCodec, classnames: list[str]) -> tuple[Tensor, Tensor]:
        """Tokenize, check that the prefix's words sit at positions start..start+word_slots-1 (right
        after the start token, or first without one), embed (frozen)."""
        n, w, s = self.n, self.word_slots, codec.start
        self.start = s
        tokens = codec.tokenize(self.prompt_texts(classnames))
        types = codec.token_types(tokens)
        slot_ids = codec.word_ids(self.prefix)[:w].to(tokens.device)
        ok = len(slot_ids) == w and tokens.shape[1] > n + s
        ok = ok and bool((types[:, :s] == int(TokenType.SOS)).all())
        ok = ok and bool((tokens[:, s : s + w] == slot_ids).all())
        ok = ok and bool((types[:, s : s + w] == int(TokenType.TEXT)).all())
        if not ok:
            where = f"{s}..{s + n - 1}" + (", right after the start token," if s else ", first,")
            raise ValueError(
                f"{self.who}: the {n} context tokens of {self.prefix!r} must occupy token positions {where} in "
                "every tokenized prompt; this tokenizer does not place them there."
            )
        return tokens, codec.embed(tokens)

    def splice(self, embeds: Tensor, ctx: Tensor) -> Tensor:
        """``embeds [C, L, D]`` with slots start..start+n-1 replaced by ``ctx`` (``[n, D]`` shared or
        ``[C, n, D]``)."""
        ctx = ctx.to(embeds.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(embeds.shape[0], -1, -1)
        s = self.start
        return torch.cat([embeds[:, :s], ctx, embeds[:, s + self.n :]], dim=1)
