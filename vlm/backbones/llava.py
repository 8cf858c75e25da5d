"""LLaVA through Hugging Face transformers, frozen, driven by :class:`~vlm.towers.llava.LlavaRunner`.

Weights come from a hub id or a local directory (``model``); tests build a tiny random model from
``config`` (a ``LlavaConfig`` dict) instead. The LLM keeps the attention implementation named by
``attn_implementation`` (``sdpa`` by default, or ``flash_attention_2``), except in a packed prefill
(``packed_prefill``), whose attention is ``vlm.kernels.attention``'s varlen call; the vision tower's
attention always goes through ``vlm.kernels.attention`` in the runner.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vlm.backbones.base import Backbone
from vlm.towers.llava import LlavaRunner

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LlavaBackbone(Backbone):
    """Args:
    model: hub id (e.g. ``llava-hf/llava-1.5-7b-hf``) or local path of a LlavaForConditionalGeneration.
    config: a ``LlavaConfig`` as a dict, for a randomly initialised model (tests, benchmarks).
    dtype: ``float32``, ``float16`` or ``bfloat16``.
    attn_implementation: the LLM's attention (transformers' name).
    position_policy: ``compact`` (renumber after pruning, the default) or ``original``.
    packed_prefill: run the LLM prefill on the batch packed into one row (no compute on padding;
        attention by ``vlm.kernels``' varlen kernel, ``vlm.towers.packed_prefill``); decoding
        continues with ``attn_implementation``. An LLM-stage cut runs packed on both sides.
    processor: hub id or path of the processor (tokenizer + image processor); default ``model``.
    """

    family = "llava"
    #: transformers classes (model, config) and our runner; LLaVA-NeXT's subclass swaps them.
    model_class, config_class = "LlavaForConditionalGeneration", "LlavaConfig"
    runner_class: type[LlavaRunner] = LlavaRunner

    def __init__(
        self,
        model: Optional[str] = None,
        config: Optional[dict[str, Any]] = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        position_policy: str = "compact",
        packed_prefill: bool = False,
        processor: Optional[str] = None,
        freeze: bool = True,
    ) -> None:
        super().__init__(freeze=freeze)
        import transformers
        from transformers import AutoProcessor

        model_cls, config_cls = getattr(transformers, self.model_class), getattr(transformers, self.config_class)
        if (model is None) == (config is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of `model` (hub id or path) and `config`.")
        self.model_name, self.dtype_name = model or "random", dtype
        if model is not None:
            self.model = model_cls.from_pretrained(
                model, dtype=_DTYPES[dtype], attn_implementation=attn_implementation
            )
        else:
            cfg = config_cls(**config)
            cfg._attn_implementation = attn_implementation
            self.model = model_cls(cfg).to(_DTYPES[dtype])
        source = processor or model
        self.processor = AutoProcessor.from_pretrained(source) if source is not None else None
        if self.processor is not None:
            self.processor.tokenizer.padding_side = "left"  # generation pads on the left
        self.runner = self.runner_class(self.model, position_policy=position_policy, packed_prefill=packed_prefill)
        self._apply_freeze()

    def identity(self) -> dict[str, Any]:
        return {"family": self.family, "model": self.model_name, "dtype": self.dtype_name}

    def encode(self, prompts: list[str], images: list[Any]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``pixel_values`` (and LLaVA-NeXT's ``image_sizes``)
        from the model's processor."""
        if self.processor is None:
            raise RuntimeError("This LlavaBackbone has no processor (built from a config); pass one or a model path.")
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in enc}
