"""Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``)
driven by our own loop: the vision tower block by block (``vlm.towers.qwen_vision``, hooks: pruners)
-> merged tokens -> LLM inputs built here -> the library's language model (its own attention, SDPA or
flash, untouched; or packed through ``vlm.kernels``' varlen call) -> ``lm_head``.

LLM inputs (:meth:`QwenRunner.build_inputs`), per sample, over its valid tokens:

* embeddings: the text embeddings, with each image's run of ``image_token_id`` tokens (the processor
  writes ``t h w / m^2`` of them between ``<|vision_start|>`` and ``<|vision_end|>``) replaced by that
  image's kept merged tokens; images are matched to runs in batch order;
* 3-D M-RoPE positions ``[3, B, L]`` (temporal, height, width), as transformers' ``get_rope_index``
  numbers the unpruned sequence: a text token at running position ``c`` gets ``(c, c, c)`` and
  advances ``c`` by one; an image starting at ``c`` with a merged grid ``t x h' x w'`` gives its
  token ``(ut, uh, uw)`` the position ``(c + ut, c + uh, c + uw)`` and advances ``c`` by
  ``max(h', w')``, so text resumes after the largest spatial position of the image;
* decoding (``rope_deltas``): the token generated at step ``s`` (0-based, the prefill's own output
  being the first) is fed at ``P + s`` on all three axes, ``P = 1 + max`` of the sample's prompt
  positions (``QwenLlmInputs.next_position``). With the prompt ending in text this is also what
  ``generate`` does (the last position plus one per step);
* the attention mask (1 = token), re-padded on ``padding_side``; pads get position 0;
* Qwen3-VL's DeepStack: the vision tower's DeepStack features of the kept tokens, at the same
  places (``visual_mask``), which the language model adds to its hidden states after decoder layer
  ``i`` for the ``i``-th feature (``visual_pos_masks`` / ``deepstack_visual_embeds``).

Position policies (after a vision hook pruned tokens):

* ``original`` (default): each kept token keeps the 3-D position it has in the unpruned sequence,
  and text after an image continues as if nothing were pruned (``c + max(h', w')``), so decoding
  continues at the unpruned ``rope_deltas``. Without pruning this is transformers' numbering.
* ``compact``: every token of the assembled sequence gets ``(i, i, i)``, ``i = 0..L-1`` (1-D
  numbering, what a port gets when it drops tokens and lets the model count them), and decoding
  continues at ``L``.

LLM-stage pruners (:class:`~vlm.llm_stage.LlmStage`): the stage's vision stage
(if any) joins the vision hooks (it cuts whole merge units), and the language model runs layer by
layer through :class:`~vlm.towers.language_model.CutDecoder`, as LLaVA's does: layers ``0..k`` on the
assembled sequence, the probe query (the last prompt token) re-projected as the layer's attention
computes it (input norm, ``q_proj``, Qwen3's per-head ``q_norm``, M-RoPE at the token's 3-D position),
the layer's own post-RoPE keys/values from the KV cache, then layers ``k+1..`` on the text and the kept
visual tokens. Under ``original`` (default) the kept tokens keep their 3-D positions and decoding
continues at the unpruned ``rope_deltas`` in every layer; ``compact`` renumbers the cut sequence
(every axis 0..L'-1) for the layers after the cut. Qwen3-VL's DeepStack features are added after their
layers on the assembled sequence before the cut and at the kept visual tokens only after it. Padded
or packed (``packed_prefill``) on both sides of the cut; the logits then cover the cut sequence,
laid out by ``inputs.cut``.

Parity contract (tests, fp32): with no hooks, logits and greedy tokens equal transformers' own,
fed what its processor returns (``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
``pixel_values``, ``image_grid_thw``); left or right padding; batches with several images per sample
and images of different sizes. With an LLM-stage cut: the kept set, logits and greedy tokens equal a
reference built from transformers' own modules (``tests/qwen/test_qwen_llm_cut.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from vlm.hooks import TowerHook
from vlm.llm_stage import split_stages
from vlm.towers.language_model import CutDecoder, LlmInputs
from vlm.towers.greedy import Generation, greedy_tokens, sync
from vlm.towers.llava import VisualTokens, image_runs
from vlm.towers.packed_prefill import (
    PackedLayout,
    repad_cache,
    run_packed,
    scratch_cache,
)
from vlm.towers.qwen_vision import QwenVisionRunner, unit_coords

POSITION_POLICIES = ("original", "compact")


@dataclass(kw_only=True)
class QwenVisualTokens(VisualTokens):
    """:class:`VisualTokens` of Qwen images: ``features [I, K, D]`` kept merged tokens in raster
    order, ``positions [I, K]`` their unit index in the image's ``t h' w'`` raster (-1 on padding),
    ``full_count [I]`` units per image; plus ``grids [I, 3]`` the merged grid ``(t, h', w')`` and
    ``deepstack [n, I, K, D]`` (Qwen3-VL's DeepStack features of the same tokens) or None."""

    grids: Tensor
    deepstack: Optional[Tensor] = None


@dataclass(kw_only=True)
class QwenLlmInputs(LlmInputs):
    """:class:`~vlm.towers.language_model.LlmInputs` for M-RoPE: ``position_ids`` is ``[3, B, L]``
    (temporal, height, width); ``next_position [B]`` the position of the first generated token
    (module docstring, decoding; after an LLM-stage cut under ``compact`` the layers after the cut
    continue from the cut's own positions, ``cut.groups``); ``deepstack [n, B, L, D]`` Qwen3-VL's
    DeepStack features placed at ``visual_mask`` (zeros elsewhere), or None."""

    next_position: Tensor


class QwenRunner:
    """Holds references to a Qwen2.5-VL / Qwen3-VL model's parts; owns no parameters."""

    def __init__(self, model: nn.Module, position_policy: str = "original", packed_prefill: bool = False) -> None:
        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy {position_policy!r} is not one of {POSITION_POLICIES}.")
        inner = getattr(model, "model", model)
        self.model = model
        self.vision = QwenVisionRunner(inner.visual)
        self.lm = inner.language_model
        self.lm_head = model.lm_head
        self.embed_tokens = self.lm.get_input_embeddings()
        self.image_token_id = int(model.config.image_token_id)
        self.merge = self.vision.merge
        self.position_policy = position_policy
        self.packed_prefill = packed_prefill

    # --- vision -------------------------------------------------------------------------------
    def encode_images(
        self, pixel_values: Tensor, image_grid_thw: Tensor, hooks: Optional[Iterable[TowerHook]] = None
    ) -> QwenVisualTokens:
        """Vision tower (hooks may prune whole merge units) -> merged tokens of every image, in the
        order of ``image_grid_thw``. An LLM-stage pruner among ``hooks`` contributes its vision stage."""
        stages = split_stages(hooks)
        out = self.vision.run(pixel_values, image_grid_thw, list(stages.hooks))
        grids = image_grid_thw.clone()
        grids[:, 1:] = grids[:, 1:] // self.merge
        return QwenVisualTokens(
            features=out.features, counts=out.counts, positions=out.units, full_count=out.full_counts,
            grids=grids.to(out.features.device), deepstack=out.deepstack,
        )

    # --- LLM inputs ---------------------------------------------------------------------------
    def image_positions(self, visual: QwenVisualTokens, image: int, start: int) -> tuple[Tensor, int]:
        """``[3, k]`` positions of image ``image``'s kept tokens placed at running position ``start``,
        and the running position after it (module docstring)."""
        k = int(visual.counts[image])
        t, hu, wu = (int(v) for v in visual.grids[image])
        if self.position_policy == "compact":
            return torch.arange(start, start + k).expand(3, k), start + k
        coords = unit_coords((t, hu * self.merge, wu * self.merge), self.merge)
        kept = coords[visual.positions[image, :k].cpu()]
        return (start + kept).T, start + max(hu, wu)

    def build_inputs(
        self,
        input_ids: Tensor,
        visual: QwenVisualTokens,
        attention_mask: Optional[Tensor] = None,
        padding_side: str = "right",
    ) -> QwenLlmInputs:
        """Embeddings, mask, 3-D positions and DeepStack features; module docstring."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        samples = []
        image = 0
        for b in range(input_ids.shape[0]):
            sample, image = self.assemble(input_ids[b][attention_mask[b].bool()], visual, image)
            samples.append(sample)
        if image != visual.features.shape[0]:
            raise ValueError(f"{visual.features.shape[0]} images but {image} image placeholder runs in input_ids.")
        return self._pad(samples, padding_side)

    def assemble(
        self, ids: Tensor, visual: QwenVisualTokens, image: int
    ) -> tuple[tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], int]:
        """One sample's valid ``ids``, its images starting at ``image``: embeddings ``[L, D]``,
        positions ``[3, L]``, visual flags ``[L]`` and DeepStack features ``[n, L, D]`` (or None);
        and the next image."""
        text = self.embed_tokens(ids).to(visual.features.dtype)
        ds = visual.deepstack
        pieces: list[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]] = []
        cursor, pos = 0, 0
        for start, end in [*image_runs(ids, self.image_token_id), (len(ids), len(ids))]:
            n = start - cursor  # the text before this image (or the trailing text)
            zeros = None if ds is None else ds.new_zeros(ds.shape[0], n, ds.shape[-1])
            flags = torch.zeros(n, dtype=torch.bool)
            pieces.append((text[cursor:start], torch.arange(pos, pos + n).expand(3, n), flags, zeros))
            pos += n
            if start == len(ids):
                break
            if image >= visual.features.shape[0]:
                raise ValueError("More image placeholder runs in input_ids than images in image_grid_thw.")
            if end - start != visual.full(image):
                raise ValueError(
                    f"Image {image} has {visual.full(image)} merged tokens (image_grid_thw) but its placeholder run in "
                    f"input_ids has {end - start} tokens; pass the processor's input_ids."
                )
            k = int(visual.counts[image])
            p, pos = self.image_positions(visual, image, pos)
            pieces.append((visual.features[image, :k], p, torch.ones(k, dtype=torch.bool),
                           None if ds is None else ds[:, image, :k]))
            cursor = end
            image += 1
        embeds, positions, flags, stacks = zip(*pieces)
        return (torch.cat(embeds), torch.cat(positions, 1), torch.cat(flags),
                None if ds is None else torch.cat(stacks, 1)), image

    @staticmethod
    def _pad(samples: list[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]], side: str) -> QwenLlmInputs:
        b, length = len(samples), max(s[0].shape[0] for s in samples)
        ref = samples[0][0]
        device = ref.device
        embeds = ref.new_zeros(b, length, ref.shape[-1])
        mask = torch.zeros(b, length, dtype=torch.long, device=device)
        pos = torch.zeros(3, b, length, dtype=torch.long, device=device)  # pads at 0, as get_rope_index leaves them
        visual = torch.zeros(b, length, dtype=torch.bool, device=device)
        probe = torch.zeros(b, dtype=torch.long, device=device)
        nxt = torch.zeros(b, dtype=torch.long, device=device)
        stacks = samples[0][3]
        deepstack = None if stacks is None else stacks.new_zeros(stacks.shape[0], b, length, stacks.shape[-1])
        for i, (e, p, v, d) in enumerate(samples):
            n = e.shape[0]
            sl = slice(length - n, length) if side == "left" else slice(0, n)
            embeds[i, sl], mask[i, sl], pos[:, i, sl], visual[i, sl] = e, 1, p.to(device), v.to(device)
            if deepstack is not None:
                deepstack[:, i, sl] = d
            probe[i] = sl.stop - 1
            nxt[i] = int(p.max()) + 1
        return QwenLlmInputs(embeds, mask, pos, visual.sum(1), visual, probe, next_position=nxt, deepstack=deepstack)

    def prepare(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        padding_side: str = "right",
    ) -> QwenLlmInputs:
        visual = self.encode_images(pixel_values, image_grid_thw, hooks)
        return self.build_inputs(input_ids, visual, attention_mask, padding_side)

    # --- language model -----------------------------------------------------------------------
    def deepstack_kwargs(self, inputs: QwenLlmInputs) -> dict:
        """The language model's DeepStack arguments: the mask of the visual tokens and, per tapped
        layer, their features in row-major order of that mask (empty for Qwen2.5-VL)."""
        if inputs.deepstack is None:
            return {}
        mask = inputs.visual_mask & inputs.attention_mask.bool()
        return dict(visual_pos_masks=mask, deepstack_visual_embeds=[d[mask] for d in inputs.deepstack])

    def decoder(self, hooks: Optional[Iterable[TowerHook]] = None) -> Optional[CutDecoder]:
        """The layer-by-layer decoder for the LLM-stage pruner among ``hooks``; None without one."""
        pruner = split_stages(hooks).llm
        return None if pruner is None else CutDecoder(self.lm, pruner, self.position_policy, self.packed_prefill)

    def prefill(
        self, inputs: QwenLlmInputs, decoder: Optional[CutDecoder] = None, side: str = "right", cache=None
    ) -> tuple[Tensor, QwenLlmInputs]:
        """Final-norm hidden states of the LLM over ``inputs`` (padded on ``side``), filling ``cache``
        if given: the language model's own forward, or packed (``packed_prefill``; zeros on padding),
        or ``decoder``'s cut (the returned inputs then carry ``cut``, which lays out the states)."""
        if decoder is not None:
            h, cut = decoder.prefill(inputs, side, cache)
            return h, replace(inputs, cut=cut)
        if self.packed_prefill:
            return self.packed(inputs, cache), inputs
        return self.lm(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
            cache=cache, use_cache=cache is not None, **self.deepstack_kwargs(inputs),
        ).last_hidden_state, inputs

    def packed(self, inputs: QwenLlmInputs, cache=None) -> Tensor:
        """The prefill with the batch packed into one row (``vlm.towers.packed_prefill``): every
        decoder layer on the real tokens only, attention as one varlen call per layer; the 3-D
        positions packed alike, DeepStack added after its layers at the packed visual tokens. A
        given (empty) ``cache`` gets every layer re-padded, ready for decoding."""
        if cache is not None and cache.get_seq_length() != 0:
            raise ValueError("The packed prefill fills an empty cache; this one already holds tokens.")
        layout = PackedLayout.from_mask(inputs.attention_mask)
        positions = layout.pack_positions(inputs.position_ids)  # [3, 1, T]
        adds = None if inputs.deepstack is None else layout.pack_stack(inputs.deepstack)
        scratch = None if cache is None else scratch_cache(self.lm)
        n_layers = len(self.lm.layers)
        h = run_packed(self.lm, range(n_layers), layout.pack(inputs.embeds), layout, positions, scratch, adds)
        if cache is not None:
            repad_cache(scratch, cache, layout, range(n_layers))
        return layout.unpack(self.lm.norm(h))

    def language_model(
        self, inputs: QwenLlmInputs, hooks: Optional[Iterable[TowerHook]] = None, padding_side: str = "right"
    ) -> tuple[Tensor, QwenLlmInputs]:
        """Logits of the LLM over ``inputs`` (padded on ``padding_side``), no cache. With an LLM-stage
        pruner among ``hooks`` they cover the cut sequence, laid out by the returned inputs' ``cut``."""
        h, inputs = self.prefill(inputs, self.decoder(hooks), padding_side)
        return self.lm_head(h), inputs

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        padding_side: str = "right",
    ) -> tuple[Tensor, QwenLlmInputs]:
        """Logits ``[B, L, V]`` over the assembled sequence (over the cut one, ``inputs.cut``, with an
        LLM-stage pruner) and the inputs (masks, positions)."""
        hooks = split_stages(hooks)  # once: vision hooks and the LLM stage
        inputs = self.prepare(input_ids, pixel_values, image_grid_thw, attention_mask, hooks, padding_side)
        return self.language_model(inputs, hooks, padding_side)

    __call__ = forward

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        attention_mask: Optional[Tensor] = None,
        hooks: Optional[Iterable[TowerHook]] = None,
        max_new_tokens: int = 16,
        eos_token_id: Optional[int] = None,
        pad_token_id: int = 0,
    ) -> Generation:
        """Greedy decoding with the LLM's KV cache (prompts left-padded); the generated tokens take
        the positions ``next_position + s`` (module docstring). Stops early when every sample hit EOS;
        ``pad_token_id`` after a sample's EOS. With an LLM-stage pruner the layers before and after its
        cut hold caches of different lengths, each group decoding at its own positions
        (``inputs.cut.groups``: the same ``next_position + s`` under ``original``)."""
        from transformers import DynamicCache

        device = pixel_values.device
        sync(device)
        t0 = time.perf_counter()
        hooks = split_stages(hooks)  # once: vision hooks and the LLM stage
        decoder = self.decoder(hooks)
        inputs = self.prepare(input_ids, pixel_values, image_grid_thw, attention_mask, hooks, "left")
        cache = DynamicCache(config=self.lm.config)
        h, inputs = self.prefill(inputs, decoder, "left", cache)
        first = self.lm_head(h[:, -1])
        sync(device)
        t1 = time.perf_counter()
        mask, position = inputs.attention_mask, inputs.next_position
        groups = None if inputs.cut is None else inputs.cut.groups

        def step(tokens: Tensor) -> Tensor:
            nonlocal mask, position, groups
            x = self.embed_tokens(tokens[:, None])
            if groups is not None:
                groups = [g.next_token() for g in groups]
                h = decoder.decode(x, groups, cache)
            else:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                h = self.lm(inputs_embeds=x, attention_mask=mask, cache=cache, use_cache=True,
                            position_ids=position.view(1, -1, 1).expand(3, -1, 1)).last_hidden_state
                position = position + 1
            return self.lm_head(h[:, -1])

        tokens = greedy_tokens(first, step, max_new_tokens, eos_token_id, pad_token_id)
        sync(device)
        return Generation(tokens, inputs, t1 - t0, time.perf_counter() - t1)
