"""LLaVA through Hugging Face transformers, frozen, driven by :class:`~vlm.towers.llava.LlavaRunner`.

Weights come from a hub id or a local directory (``model``); tests build a tiny random model from
``config`` (a ``LlavaConfig`` dict) instead. The LLM keeps the attention implementation named by
``attn_implementation`` (``sdpa`` by default, or ``flash_attention_2``), except in a packed prefill
(``packed_prefill``), whose attention is ``vlm.kernels.attention``'s varlen call; the vision tower's
attention always goes through ``vlm.kernels.attention`` in the runner.

Answering a question (what ``LlavaEval`` calls) is the backbone's, so that each model family says in
one place how its prompts look and how its runner generates: :meth:`LlavaBackbone.prompts` writes
the family's conversation (LLaVA-1.5 and NeXT: Vicuna v1 with one ``<image>`` line per image; the Qwen
backbones override :meth:`~LlavaBackbone.conversation` with the processor's chat template),
:meth:`~LlavaBackbone.generate` calls the family's runner with what its processor returned, and
:meth:`~LlavaBackbone.answer` strings them together (prompts, processor with left padding, greedy
decoding, text up to the first stop token).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from vlm.backbones.base import Backbone
from vlm.towers.greedy import Generation
from vlm.towers.llava import LlavaRunner

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: LLaVA-1.5's ``vicuna_v1`` system line (LLaVA-NeXT Vicuna uses the same conversation).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
#: The ``vicuna_v1`` prompt of one image before the question (what LLaVA's eval scripts build).
VICUNA_V1 = VICUNA_V1_SYSTEM + " USER: <image>\n{question} ASSISTANT:"


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
    #: the text that stands for one image in a prompt (the processor expands it)
    image_placeholder = "<image>"
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

    @property
    def patches_per_image(self) -> int:
        """Patch tokens of one vision-tower image at the feature layer: ``(image_size // patch_size)**2``
        of the vision config (576 for LLaVA-1.5's 336 px / 14 px CLIP; the CLS token is extra)."""
        vision = self.model.config.vision_config
        return (int(vision.image_size) // int(vision.patch_size)) ** 2

    @property
    def budget_note(self) -> str:
        vision = self.model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        return (f"{type(self).__name__}: a {side}x{side} patch grid of {vision.image_size} px / {vision.patch_size} px "
                f"at vision feature layer {self.model.config.vision_feature_layer}")

    def encode(self, prompts: list[str], images: list[Any]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``pixel_values`` (and LLaVA-NeXT's ``image_sizes``)
        from the model's processor."""
        if self.processor is None:
            raise RuntimeError("This LlavaBackbone has no processor (built from a config); pass one or a model path.")
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in enc}

    # --- answering questions (the family's prompt format and runner call) ------------------------
    def conversation(self, question: str, num_images: int) -> str:
        """The prompt LLaVA-1.5/NeXT were tuned on: ``vicuna_v1`` with one ``<image>\\n`` per image
        before the question (for one image, :data:`VICUNA_V1`)."""
        images = (self.image_placeholder + "\n") * num_images
        return f"{VICUNA_V1_SYSTEM} USER: {images}{question} ASSISTANT:"

    def prompts(self, questions: Sequence[str], num_images: Sequence[int], template: Optional[str] = None) -> list[str]:
        """One prompt per question: the family's :meth:`conversation`, or ``template`` (a format
        string with ``{question}`` that holds :attr:`image_placeholder` once per image) when given.
        A template whose placeholders do not match the images is refused here, before the processor
        would pair images with the wrong text."""
        if template is None:
            return [self.conversation(q, n) for q, n in zip(questions, num_images)]
        out = [template.format(question=q) for q in questions]
        for text, n in zip(out, num_images):
            if text.count(self.image_placeholder) != n:
                raise ValueError(
                    f"{type(self).__name__}: the prompt template gives {text.count(self.image_placeholder)} image "
                    f"placeholder(s) {self.image_placeholder!r} for a question with {n} image(s): {template!r}. Write the "
                    "placeholder once per image, or leave prompt_template unset for the model's own conversation."
                )
        return out

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's EOS and the model's ``generation_config``
        EOS ids (Qwen's instruct models list ``<|im_end|>`` and ``<|endoftext|>``)."""
        ids: list[int] = []
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and tok.eos_token_id is not None:
            ids.append(int(tok.eos_token_id))
        config = getattr(self.model, "generation_config", None)
        extra = getattr(config, "eos_token_id", None)
        for i in extra if isinstance(extra, (list, tuple)) else [extra]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        return ids

    def generate(self, enc: dict[str, Tensor], hooks: list[Any], max_new_tokens: int) -> Generation:
        """Greedy decoding by the runner on the processor's (left-padded) output ``enc``; it stops
        early on the tokenizer's EOS."""
        tok = self.processor.tokenizer
        return self.runner.generate(
            enc["input_ids"], enc["pixel_values"], enc["attention_mask"], hooks,
            max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
            image_sizes=enc.get("image_sizes"),
        )

    def decode(self, tokens: Tensor) -> list[str]:
        """Each row's text up to its first stop token (:attr:`stop_token_ids`), special tokens
        dropped, stripped."""
        stops = torch.tensor(self.stop_token_ids, device=tokens.device, dtype=tokens.dtype)
        rows = []
        for row in tokens:
            hit = torch.isin(row, stops).nonzero()
            rows.append(row[: int(hit[0])] if hit.numel() else row)
        tok = self.processor.tokenizer
        return [t.strip() for t in tok.batch_decode([r.tolist() for r in rows], skip_special_tokens=True)]

    def answer(
        self,
        questions: Sequence[str],
        images: Sequence[Any],
        hooks: Iterable[Any] = (),
        max_new_tokens: int = 128,
        template: Optional[str] = None,
    ) -> tuple[list[str], Generation]:
        """Greedy answers to ``questions``, each about ``images[i]`` (one image, or a list of them):
        :meth:`prompts`, the processor (left padding), :meth:`generate` with ``hooks`` (pruners) and
        :meth:`decode`; and the :class:`~vlm.towers.llava.Generation` (kept counts, timings)."""
        per_question = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        prompts = self.prompts(questions, [len(p) for p in per_question], template)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in self.encode(prompts, [im for p in per_question for im in p]).items()}
        gen = self.generate(enc, list(hooks), max_new_tokens)
        return self.decode(gen.tokens), gen
