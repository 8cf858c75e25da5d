"""Hugging Face LLaVA (``LlavaForConditionalGeneration``) driven by our own loop.

vision tower block by block (hooks: pruners) -> feature layer -> feature select (drop CLS) ->
projector on the kept tokens only -> LLM inputs built here (text embeddings with each image
placeholder run replaced by that image's kept tokens, attention mask, position ids) -> the HF
language model's own forward (its attention implementation, SDPA or flash, is untouched) -> lm_head.

Parity contract: with no hooks, :meth:`LlavaRunner.forward` logits equal transformers' forward
and :meth:`LlavaRunner.generate` equals ``model.generate(do_sample=False)`` (tests, fp32).

Placeholders: each image is one *run* of consecutive ``image_token_id`` tokens in a sample (a single
``<image>`` token, or the processor's expanded run of ``image_seq_length`` tokens); runs are matched
to ``pixel_values`` in batch order. Padding may be left or right on input (``attention_mask``); the
output is re-padded on ``padding_side`` (generation always uses left padding).

Position policies for the LLM's position ids (rotary embedding):
* ``compact`` (default; what LLaVA does after pruning): 0..L-1 over the assembled sequence.
* ``original``: a kept visual token keeps the position it had in the unpruned sequence, and text
  after an image continues as if no token were pruned (gaps where tokens were dropped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from vlm.hooks import TowerHook
from vlm.tokens import TokenType
from vlm.towers.hf_clip_vision import HFClipVisionRunner
from vlm.towers.runner import valid_mask

POSITION_POLICIES = ("compact", "original")


@dataclass
class VisualTokens:
    """Projected kept tokens of each image: ``features [I, K, D]`` (valid first), ``counts [I]``,
    ``positions [I, K]`` (patch index in the image grid; -1 for CLS when it is kept), and
    ``full_count`` (tokens per image without pruning: an int, or long ``[I]`` when images differ,
    as LLaVA-NeXT's anyres images do)."""

    features: Tensor
    counts: Tensor
    positions: Tensor
    full_count: Union[int, Tensor]

    def full(self, image: int) -> int:
        """Tokens image ``image`` has without pruning."""
        return self.full_count if isinstance(self.full_count, int) else int(self.full_count[image])


@dataclass
class LlmInputs:
    """``embeds [B, L, D]``, ``attention_mask [B, L]`` (1 = token), ``position_ids [B, L]``, and
    ``visual_counts [B]`` (visual tokens each sample carries)."""

    embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    visual_counts: Tensor


@dataclass
class Generation:
    """Greedy output ``tokens [B, T]`` (``pad_token_id`` after EOS), the LLM inputs, and wall
    times of the vision+prefill step and of the decode steps (seconds)."""

    tokens: Tensor
    inputs: LlmInputs
    prefill_s: float
    decode_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_runs(ids: Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the maximal runs of ``image_token_id`` in the 1-D ``ids``."""
    is_img = (ids == image_token_id).int()
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


class LlavaRunner:
    """Holds references to a ``LlavaForConditionalGeneration``'s parts; owns no parameters."""

    def __init__(self, model: nn.Module, position_policy: str = "compact") -> None:
        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy {position_policy!r} is not one of {POSITION_POLICIES}.")
        inner = getattr(model, "model", model)
        cfg = model.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise TypeError("LlavaRunner supports one vision feature layer (an int), as LLaVA-1.5 and NeXT use.")
        self.model = model
        self.vision = HFClipVisionRunner(inner.vision_tower)
        self.projector = inner.multi_modal_projector
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.embed_tokens = self.lm.get_input_embeddings()
        self.image_token_id = int(cfg.image_token_id)
        self.feature_layer = int(cfg.vision_feature_layer)
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.position_policy = position_policy

    # --- vision -------------------------------------------------------------------------------
    def project_kept(self, pixel_values: Tensor, hooks: Optional[Iterable[TowerHook]] = None) -> VisualTokens:
        """Vision tower to the feature layer (hooks may prune), select, project the kept tokens:
        one row per ``pixel_values`` entry (an image for LLaVA-1.5, a crop for LLaVA-NeXT)."""
        state = self.vision.hidden_state(pixel_values, self.feature_layer, hooks)
        keep = valid_mask(state)
        if self.drop_cls:
            keep = keep & (state.batch_types != int(TokenType.CLS))
        counts = keep.sum(1)
        index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : int(counts.max())]
        x = torch.gather(state.x, 1, index[..., None].expand(-1, -1, state.x.shape[-1]))
        positions = torch.gather(state.positions, 1, index) - 1  # sequence index -> patch index (CLS: -1)
        full = self.vision.model.embeddings.num_patches + (0 if self.drop_cls else 1)
        if not self.drop_cls:
            positions = positions + 1
        return VisualTokens(self.projector(x), counts, positions, full)

    def encode_images(
        self, pixel_values: Tensor, hooks: Optional[Iterable[TowerHook]] = None, image_sizes: Optional[Tensor] = None
    ) -> VisualTokens:
        """LLaVA-1.5: one 336-px view per image, so the kept tokens of each view are the image's.
        ``image_sizes`` is LLaVA-NeXT's (see ``vlm.towers.llava_next``) and must be None here."""
        if image_sizes is not None:
            raise ValueError("LLaVA-1.5 takes no image_sizes; use LlavaNextRunner for anyres models.")
        return self.project_kept(pixel_values, hooks)

    # --- LLM inputs ---------------------------------------------------------------------------
    def build_inputs(
        self,
        input_ids: Tensor,
        visual: VisualTokens,
        attention_mask: Optional[Tensor] = None,
        padding_side: str = "right",
    ) -> LlmInputs:
        """Assemble embeddings, mask and position ids; see the module docstring."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        dtype = visual.features.dtype
        seqs, poss, vis_counts = [], [], []
        image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            text = self.embed_tokens(ids).to(dtype)
            pieces, pos_pieces, cursor, pos, nvis = [], [], 0, 0, 0
            for start, end in image_runs(ids, self.image_token_id):
                if image >= visual.features.shape[0]:
                    raise ValueError("More image placeholder runs in input_ids than images in pixel_values.")
                pieces.append(text[cursor:start])
                pos_pieces.append(torch.arange(pos, pos + start - cursor))
                pos += start - cursor
                k = int(visual.counts[image])
                pieces.append(visual.features[image, :k])
                if self.position_policy == "original":
                    pos_pieces.append(pos + visual.positions[image, :k].cpu())
                    pos += visual.full(image)
                else:
                    pos_pieces.append(torch.arange(pos, pos + k))
                    pos += k
                nvis += k
                cursor = end
                image += 1
            pieces.append(text[cursor:])
            pos_pieces.append(torch.arange(pos, pos + len(ids) - cursor))
            seqs.append(torch.cat(pieces))
            poss.append(torch.cat(pos_pieces))
            vis_counts.append(nvis)
        if image != visual.features.shape[0]:
            raise ValueError(f"{visual.features.shape[0]} images but {image} image placeholder runs in input_ids.")
        return self._pad(seqs, poss, vis_counts, padding_side)

    @staticmethod
    def _pad(seqs: list[Tensor], poss: list[Tensor], vis_counts: list[int], side: str) -> LlmInputs:
        b, length = len(seqs), max(s.shape[0] for s in seqs)
        ref = seqs[0]
        embeds = ref.new_zeros(b, length, ref.shape[-1])
        mask = torch.zeros(b, length, dtype=torch.long, device=ref.device)
        pos = torch.ones(b, length, dtype=torch.long, device=ref.device)  # pads at 1, as transformers does
        for i, (s, p) in enumerate(zip(seqs, poss)):
            n = s.shape[0]
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            embeds[i, sl], mask[i, sl], pos[i, sl] = s, 1, p.to(ref.device)
        return LlmInputs(embeds, mask, pos, torch.tensor(vis_counts, device=ref.device))

    def prepare(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        padding_side: str = "right",
        image_sizes: Optional[Tensor] = None,
    ) -> LlmInputs:
        visual = self.encode_images(pixel_values, hooks, image_sizes)
        return self.build_inputs(input_ids, visual, attention_mask, padding_side)

    # --- language model -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        padding_side: str = "right",
        image_sizes: Optional[Tensor] = None,
    ) -> tuple[Tensor, LlmInputs]:
        """Logits ``[B, L, V]`` over the assembled sequence, and the inputs (for masks/positions)."""
        inputs = self.prepare(input_ids, pixel_values, attention_mask, hooks, padding_side, image_sizes)
        h = self.lm(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.lm_head(h), inputs

    __call__ = forward

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        max_new_tokens: int = 16,
        eos_token_id: Optional[int] = None,
        pad_token_id: int = 0,
        image_sizes: Optional[Tensor] = None,
    ) -> Generation:
        """Greedy decoding with the LLM's KV cache; stops early when every sample hit EOS."""
        from transformers import DynamicCache

        device = pixel_values.device
        _sync(device)
        t0 = time.perf_counter()
        inputs = self.prepare(input_ids, pixel_values, attention_mask, hooks, "left", image_sizes)
        cache = DynamicCache(config=self.lm.config)
        mask, pos = inputs.attention_mask, inputs.position_ids[:, -1:]
        h = self.lm(inputs_embeds=inputs.embeds, attention_mask=mask, position_ids=inputs.position_ids, cache=cache, use_cache=True)
        nxt = self.lm_head(h.last_hidden_state[:, -1]).argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        out = [nxt]
        done = torch.zeros_like(nxt, dtype=torch.bool) if eos_token_id is None else nxt == eos_token_id
        while len(out) < max_new_tokens and not bool(done.all()):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = pos + 1
            h = self.lm(inputs_embeds=self.embed_tokens(nxt[:, None]), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            nxt = self.lm_head(h.last_hidden_state[:, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            out.append(nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
        _sync(device)
        return Generation(torch.stack(out, 1), inputs, t1 - t0, time.perf_counter() - t1)
