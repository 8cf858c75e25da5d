"""Hugging Face LLaVA (``LlavaForConditionalGeneration``) driven by our own loop.

vision tower block by block (hooks: pruners) -> feature layer -> feature select (drop CLS) ->
projector on the kept tokens only -> LLM inputs built here (text embeddings with each image
placeholder run replaced by that image's kept tokens, attention mask, position ids) -> the HF
language model's own forward (its attention implementation, SDPA or flash, is untouched) -> lm_head.

With an LLM-stage pruner among the hooks (:class:`~vlm.llm_stage.LlmStage`) its
vision stage joins the vision hooks, and the language model runs layer by layer
through :class:`~vlm.towers.language_model.CutDecoder`, which cuts the visual tokens after the
pruner's layer (masks, positions and the per-layer KV cache are described there); the logits then
cover the cut sequence, laid out by ``LlmInputs.cut``. Without one, the path is the plain
``self.lm(...)`` call, or with ``packed_prefill=True`` that call on the batch packed into one row
(``vlm.towers.packed_prefill``: no compute on padding; attention by the varlen kernel).

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
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from vlm.hooks import TowerHook
from vlm.llm_stage import split_stages
from vlm.tokens import TokenType, kept_first
from vlm.towers.greedy import Generation, greedy_tokens, sync
from vlm.towers.hf_clip_vision import HFClipVisionRunner
from vlm.towers.language_model import CutDecoder, LayerGroup, LlmInputs, llm_stage, vision_hooks
from vlm.towers.packed_prefill import packed_prefill

POSITION_POLICIES = ("compact", "original")


@dataclass
class VisualTokens:
    """Projected kept tokens of each image: ``features [I, K, D]`` (valid first), ``counts [I]``,
    ``positions [I, K]`` (patch index in the image grid; -1 for CLS when it is kept),
    ``full_count`` (tokens per image without pruning: an int, or long ``[I]`` when images differ,
    as LLaVA-NeXT's anyres images do), and ``layout [I, K]`` (bool, or None for none): tokens that
    mark the layout rather than show the image (LLaVA-NeXT's ``image_newline``), which an LLM-stage
    cut keeps like text."""

    features: Tensor
    counts: Tensor
    positions: Tensor
    full_count: Union[int, Tensor]
    layout: Optional[Tensor] = None

    def full(self, image: int) -> int:
        """Tokens image ``image`` has without pruning."""
        return self.full_count if isinstance(self.full_count, int) else int(self.full_count[image])


def image_runs(ids: Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the maximal runs of ``image_token_id`` in the 1-D ``ids``."""
    is_img = (ids == image_token_id).int()
    edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends))


class LlavaRunner:
    """Holds references to a ``LlavaForConditionalGeneration``'s parts; owns no parameters."""

    def __init__(self, model: nn.Module, position_policy: str = "compact", packed_prefill: bool = False) -> None:
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
        self.packed_prefill = packed_prefill

    # --- vision -------------------------------------------------------------------------------
    def project_kept(
        self, pixel_values: Tensor, hooks: Optional[Iterable[TowerHook]] = None, image_index: Optional[Tensor] = None
    ) -> VisualTokens:
        """Vision tower to the feature layer (hooks may prune), select, project the kept tokens:
        one row per ``pixel_values`` entry (an image for LLaVA-1.5, a crop for LLaVA-NeXT, whose
        ``image_index [rows]`` names the image of each crop). An LLM-stage pruner among ``hooks``
        contributes its vision stage here."""
        state = self.vision.hidden_state(pixel_values, self.feature_layer, vision_hooks(hooks), image_index)
        keep = state.valid_mask()
        if self.drop_cls:
            keep = keep & (state.batch_types != int(TokenType.CLS))
        counts = keep.sum(1)
        index = kept_first(keep, int(counts.max()))
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
        seqs, poss, visuals, layouts = [], [], [], []
        image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][attention_mask[b].bool()]
            text = self.embed_tokens(ids).to(dtype)
            pieces, pos_pieces, vis_pieces, lay_pieces, cursor, pos = [], [], [], [], 0, 0
            for start, end in image_runs(ids, self.image_token_id):
                if image >= visual.features.shape[0]:
                    raise ValueError("More image placeholder runs in input_ids than images in pixel_values.")
                pieces.append(text[cursor:start])
                pos_pieces.append(torch.arange(pos, pos + start - cursor))
                pos += start - cursor
                k = int(visual.counts[image])
                pieces.append(visual.features[image, :k])
                vis_pieces += [torch.zeros(start - cursor, dtype=torch.bool), torch.ones(k, dtype=torch.bool)]
                lay = torch.zeros(k, dtype=torch.bool) if visual.layout is None else visual.layout[image, :k].cpu()
                lay_pieces += [torch.zeros(start - cursor, dtype=torch.bool), lay]
                if self.position_policy == "original":
                    pos_pieces.append(pos + visual.positions[image, :k].cpu())
                    pos += visual.full(image)
                else:
                    pos_pieces.append(torch.arange(pos, pos + k))
                    pos += k
                cursor = end
                image += 1
            pieces.append(text[cursor:])
            pos_pieces.append(torch.arange(pos, pos + len(ids) - cursor))
            vis_pieces.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
            lay_pieces.append(torch.zeros(len(ids) - cursor, dtype=torch.bool))
            seqs.append(torch.cat(pieces))
            poss.append(torch.cat(pos_pieces))
            visuals.append(torch.cat(vis_pieces))
            layouts.append(torch.cat(lay_pieces))
        if image != visual.features.shape[0]:
            raise ValueError(f"{visual.features.shape[0]} images but {image} image placeholder runs in input_ids.")
        inputs = self._pad(seqs, poss, visuals, padding_side)
        if visual.layout is None:
            return inputs
        layout = self._pad_flags(layouts, padding_side, inputs.embeds.shape[1], inputs.embeds.device)
        return replace(inputs, layout_mask=layout)

    @staticmethod
    def _pad_flags(flags: list[Tensor], side: str, length: int, device: torch.device) -> Tensor:
        """Per-sample bool rows, padded with False on ``side`` to ``length``."""
        out = torch.zeros(len(flags), length, dtype=torch.bool, device=device)
        for i, f in enumerate(flags):
            n = f.shape[0]
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            out[i, sl] = f.to(device)
        return out

    @staticmethod
    def _pad(seqs: list[Tensor], poss: list[Tensor], visuals: list[Tensor], side: str) -> LlmInputs:
        b, length = len(seqs), max(s.shape[0] for s in seqs)
        ref = seqs[0]
        embeds = ref.new_zeros(b, length, ref.shape[-1])
        mask = torch.zeros(b, length, dtype=torch.long, device=ref.device)
        pos = torch.ones(b, length, dtype=torch.long, device=ref.device)  # pads at 1, as transformers does
        is_visual = torch.zeros(b, length, dtype=torch.bool, device=ref.device)
        probe = torch.zeros(b, dtype=torch.long, device=ref.device)
        for i, (s, p, v) in enumerate(zip(seqs, poss, visuals)):
            n = s.shape[0]
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            embeds[i, sl], mask[i, sl], pos[i, sl], is_visual[i, sl] = s, 1, p.to(ref.device), v.to(ref.device)
            probe[i] = sl.stop - 1
        return LlmInputs(embeds, mask, pos, is_visual.sum(1), is_visual, probe)

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
    def decoder(self, hooks: Optional[Iterable[TowerHook]] = None) -> Optional[CutDecoder]:
        """The layer-by-layer decoder for the LLM-stage pruner among ``hooks``; None without one."""
        pruner = llm_stage(hooks)
        return None if pruner is None else CutDecoder(self.lm, pruner, self.position_policy, self.packed_prefill)

    def prefill(self, inputs: LlmInputs, decoder: Optional[CutDecoder], side: str, cache=None) -> tuple[Tensor, LlmInputs]:
        """Final-norm hidden states of the LLM over ``inputs`` (padded on ``side``), filling ``cache``
        if given: ``self.lm``'s own forward (packed when ``packed_prefill``; zeros on padding then),
        or ``decoder``'s cut (the inputs then get ``cut``)."""
        if decoder is None and self.packed_prefill:
            h = packed_prefill(self.lm, inputs.embeds, inputs.attention_mask, inputs.position_ids, cache)
            return h, inputs
        if decoder is None:
            h = self.lm(
                inputs_embeds=inputs.embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                cache=cache,
                use_cache=cache is not None,
            ).last_hidden_state
            return h, inputs
        h, cut = decoder.prefill(inputs, side, cache)
        return h, replace(inputs, cut=cut)

    def language_model(
        self, inputs: LlmInputs, hooks: Optional[Iterable[TowerHook]] = None, padding_side: str = "right"
    ) -> tuple[Tensor, LlmInputs]:
        """Logits of the LLM over ``inputs`` (padded on ``padding_side``), no cache. With an
        LLM-stage pruner among ``hooks`` they cover the cut sequence, laid out by the returned
        inputs' ``cut``."""
        h, inputs = self.prefill(inputs, self.decoder(hooks), padding_side, None)
        return self.lm_head(h), inputs

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        padding_side: str = "right",
        image_sizes: Optional[Tensor] = None,
    ) -> tuple[Tensor, LlmInputs]:
        """Logits ``[B, L, V]`` over the assembled sequence (over the cut one, ``inputs.cut``, with an
        LLM-stage pruner), and the inputs (for masks/positions)."""
        hooks = split_stages(hooks)  # once: vision hooks and the LLM stage
        inputs = self.prepare(input_ids, pixel_values, attention_mask, hooks, padding_side, image_sizes)
        return self.language_model(inputs, hooks, padding_side)

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
        """Greedy decoding with the LLM's KV cache; stops early when every sample hit EOS. With an
        LLM-stage pruner the layers before and after its cut hold caches of different lengths."""
        from transformers import DynamicCache

        device = pixel_values.device
        sync(device)
        t0 = time.perf_counter()
        hooks = split_stages(hooks)  # once: vision hooks and the LLM stage
        decoder = self.decoder(hooks)
        inputs = self.prepare(input_ids, pixel_values, attention_mask, hooks, "left", image_sizes)
        cache = DynamicCache(config=self.lm.config)
        h, inputs = self.prefill(inputs, decoder, "left", cache)
        first = self.lm_head(h[:, -1])
        if inputs.cut is None:
            groups = [LayerGroup(range(len(self.lm.layers)), inputs.attention_mask, inputs.position_ids)]
        else:
            groups = inputs.cut.groups
        sync(device)
        t1 = time.perf_counter()

        def step(tokens: Tensor) -> Tensor:
            nonlocal groups
            groups = [g.next_token() for g in groups]
            x = self.embed_tokens(tokens[:, None])
            if decoder is None:
                g = groups[0]
                h = self.lm(inputs_embeds=x, attention_mask=g.attention_mask, position_ids=g.position_ids, cache=cache,
                            use_cache=True).last_hidden_state
            else:
                h = decoder.decode(x, groups, cache)
            return self.lm_head(h[:, -1])

        tokens = greedy_tokens(first, step, max_new_tokens, eos_token_id, pad_token_id)
        sync(device)
        return Generation(tokens, inputs, t1 - t0, time.perf_counter() - t1)
