"""Qwen2.5-VL and Qwen3-VL through Hugging Face transformers, frozen, driven by
:class:`~vlm.towers.qwen.QwenRunner` (no patching: the runner drives the library's modules).

Weights come from a hub id (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``, ``Qwen/Qwen3-VL-8B-Instruct``) or a
local directory (``model``); tests build a tiny random model from ``config`` (a ``Qwen2_5_VLConfig`` /
``Qwen3VLConfig`` dict). The LLM keeps ``attn_implementation`` (``sdpa`` by default, or
``flash_attention_2``) except in a packed prefill; the vision tower's attention always goes through
``vlm.kernels.attention`` (one varlen call per block).

Token budget: a vision pruner on Qwen keeps merged tokens (what reaches the LLM: one per ``m x m``
patches), so ``patches_per_image`` counts merged tokens: the most one image can have, from the image
processor's pixel limit (``max_pixels``, i.e. ``size["longest_edge"]``) over ``(patch_size *
spatial_merge_size)^2`` pixels per merged token. Without a processor (or ``max_pixels``) it is
unknown and no budget is checked.

Image size: ``max_pixels`` (and ``min_pixels``) set the processor's resize bounds, so a config states
the resolution it evaluates at (the pruning papers' Qwen ports use ``max_pixels = 1280 * 28 * 28``
for Qwen2.5-VL: at most 1280 merged tokens per image; ``configs/qwen/`` keeps that cap of 1280
merged tokens for Qwen3-VL's 32-px tokens, ``1280 * 32 * 32``).

Prompts: the processor's chat template (:meth:`QwenVLBackbone.conversation`): one user turn with an
image entry per image, then the question, and the assistant's turn opened; generation pads on the
left and decodes with the exact 3-D positions (:meth:`~vlm.towers.qwen.QwenRunner.generate`).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from vlm.backbones.llava import LlavaBackbone
from vlm.llm_stage import LlmStage
from vlm.pruning.base import TokenPruner
from vlm.runtime.reliability import IncompatibleHooksError
from vlm.towers.greedy import Generation
from vlm.towers.qwen import QwenRunner


class QwenVLBackbone(LlavaBackbone):
    """Args (as :class:`~vlm.backbones.llava.LlavaBackbone`, plus):
    position_policy: ``original`` (kept tokens keep their 3-D M-RoPE positions; the default) or
        ``compact`` (1-D renumbering of the assembled sequence); ``vlm.towers.qwen``.
    max_pixels: the most pixels per image: set on the processor (larger images are resized down,
        keeping the aspect ratio, to at most ``max_pixels / (patch_size * merge)^2`` merged tokens)
        and used by the budget check; default: the processor's own.
    min_pixels: the fewest pixels per image (smaller images are resized up), set on the processor;
        default: the processor's own.
    """

    family = "qwen_vl"
    runner_class = QwenRunner
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(
        self,
        model: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        position_policy: str = "original",
        packed_prefill: bool = False,
        processor: Optional[str] = None,
        max_pixels: Optional[int] = None,
        min_pixels: Optional[int] = None,
        freeze: bool = True,
    ) -> None:
        if max_pixels is not None and min_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}).")
        super().__init__(model=model, config=config, dtype=dtype, attn_implementation=attn_implementation,
                         position_policy=position_policy, packed_prefill=packed_prefill, processor=processor,
                         freeze=freeze)
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self._set_pixel_bounds()

    def _set_pixel_bounds(self) -> None:
        """Write ``min_pixels`` / ``max_pixels`` into the image processor's ``size`` (its
        ``shortest_edge`` / ``longest_edge``, which its resize reads as pixel counts)."""
        image = getattr(self.processor, "image_processor", None)
        if image is None or (self.max_pixels is None and self.min_pixels is None):
            return
        from transformers.image_utils import SizeDict

        size = image.size
        low = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        high = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
        low = int(self.min_pixels) if self.min_pixels is not None else low
        high = int(self.max_pixels) if self.max_pixels is not None else high
        if low is not None and high is not None and low > high:
            raise ValueError(f"{type(self).__name__}: min_pixels {low} is larger than max_pixels {high}.")
        image.size = SizeDict(shortest_edge=low, longest_edge=high)

    @property
    def pixels_per_token(self) -> int:
        """Pixels of one merged token: ``(patch_size * spatial_merge_size)^2``."""
        vision = self.model.config.vision_config
        return (int(vision.patch_size) * int(vision.spatial_merge_size)) ** 2

    @property
    def pixel_limit(self) -> Optional[int]:
        """``max_pixels`` if given, else the image processor's ``size["longest_edge"]`` (its max_pixels)."""
        if self.max_pixels is not None:
            return int(self.max_pixels)
        image = getattr(self.processor, "image_processor", None)
        size = getattr(image, "size", None)  # a dict or transformers' SizeDict
        limit = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
        limit = limit if limit is not None else getattr(image, "max_pixels", None)
        return None if limit is None else int(limit)

    @property
    def patches_per_image(self) -> Optional[int]:
        """The most merged tokens one image can have (module docstring); None if the limit is unknown."""
        limit = self.pixel_limit
        return None if limit is None else limit // self.pixels_per_token

    @property
    def budget_note(self) -> str:
        vision = self.model.config.vision_config
        return (f"{type(self).__name__}: merged tokens of {vision.patch_size} px patches merged "
                f"{vision.spatial_merge_size}x{vision.spatial_merge_size}, at most {self.pixel_limit} pixels per image")

    def check_budget(self, pruner: Any) -> None:
        """Also refuse a vision pruner (or an LLM stage's vision stage) that cannot run on merge units
        (``runs_on_merge_units`` False: it needs a CLS row or the patch grid), naming the ones that can."""
        stage = pruner.vision_stage if isinstance(pruner, LlmStage) else pruner
        if isinstance(stage, TokenPruner) and not stage.runs_on_merge_units:
            from vlm.pruning import available, create

            usable = [n for n in available() if not isinstance(p := create(n), TokenPruner) or p.runs_on_merge_units]
            raise IncompatibleHooksError(
                f"Pruner {stage.name!r} needs a vision tower with a CLS token and a fixed patch grid; "
                f"{type(self).__name__}'s tower has neither (dynamic resolution, patches merged in "
                f"{self.model.config.vision_config.spatial_merge_size}x{self.model.config.vision_config.spatial_merge_size} units). "
                f"Use one of: {', '.join(usable)}."
            )
        super().check_budget(pruner)

    def encode(self, prompts: list[str], images: list[Any]) -> dict[str, Tensor]:
        """The processor's ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``
        (flattened patches) and ``image_grid_thw``; prompts hold the model's image placeholder
        (``<|vision_start|><|image_pad|><|vision_end|>``), one per image, in order."""
        if self.processor is None:
            raise RuntimeError(
                f"This {type(self).__name__} has no processor (built from a config); pass one or a model path."
            )
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        return {k: enc[k] for k in keys if k in enc}

    def conversation(self, question: str, num_images: int) -> str:
        """The processor's chat template over one user turn (an image entry per image, then the
        question), with the assistant's turn opened (``add_generation_prompt``): the model's own
        prompt, system line included where its template adds one (Qwen2.5-VL's default)."""
        if self.processor is None or not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"{type(self).__name__}: the processor has no chat template, so the model's prompt format is unknown. "
                "Load a processor that has one (the model's hub id or directory), or give LlavaEval a prompt_template "
                f"with {{question}} and {self.image_placeholder!r} once per image."
            )
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, enc: dict[str, Tensor], hooks: list[Any], max_new_tokens: int) -> Generation:
        """:meth:`QwenRunner.generate` on the processor's (left-padded) output: the 3-D positions
        from ``image_grid_thw``; it stops early on the tokenizer's EOS."""
        tok = self.processor.tokenizer
        return self.runner.generate(
            enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"], enc["attention_mask"], hooks,
            max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
        )


class Qwen2_5VLBackbone(QwenVLBackbone):
    """Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration`` (windowed vision tower)."""

    family = "qwen2_5_vl"
    model_class, config_class = "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"


class Qwen3VLBackbone(QwenVLBackbone):
    """Qwen3-VL: ``Qwen3VLForConditionalGeneration`` (learned position table, DeepStack)."""

    family = "qwen3_vl"
    model_class, config_class = "Qwen3VLForConditionalGeneration", "Qwen3VLConfig"
