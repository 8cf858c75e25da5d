"""Hugging Face ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` as an image-text backbone, for
weights in HF format (a hub id or a ``save_pretrained`` folder) instead of open_clip's.

Examples::

    HFClipBackbone("openai/clip-vit-base-patch16")                     # hub id (HF cache)
    HFClipBackbone("/data/siglip-base-patch16-224")                    # local folder
    HFClipBackbone("tiny", config={"model_type": "clip", ...}, tokenizer="open_clip")  # random weights

Parity contract: with no hooks, ``encode_image`` equals the model's ``get_image_features`` and
``encode_text`` its ``get_text_features`` (tests: 1e-5, fp32). ``logit_scale`` is the model's own
log temperature, so ``logit_scale.exp() * cos`` are CLIP's logits; SigLIP adds ``logit_bias``
(exposed, and left out of classification logits: a constant shift changes no softmax).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vlm.backbones.base import TwoTowerBackbone
from vlm.datamodules.transforms import CLIP_MEAN, CLIP_STD
from vlm.towers.hf_clip_text import HFClipImageRunner, HFClipTextRunner
from vlm.towers.hf_siglip import SiglipTextRunner, SiglipVisionRunner

#: ``config.model_type`` -> the family ``identity()`` records.
FAMILIES = {"clip": "hf_clip", "siglip": "hf_siglip", "siglip2": "hf_siglip2"}
#: SigLIP's image normalisation (its processors' ``image_mean`` / ``image_std``).
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
#: The configuration keys ``identity()`` records per tower (what fixes the architecture).
ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
             "vocab_size", "max_position_embeddings", "eos_token_id", "image_size", "patch_size", "num_patches",
             "projection_size", "vision_use_head")  # fmt: skip

Tokenizer = Callable[[list[str]], Tensor]


def build_hf_model(model_name: str, config: Optional[dict[str, Any]] = None) -> nn.Module:
    """``AutoModel.from_pretrained(model_name)`` (fp32), or a random model of the inline ``config``
    (a dict with ``model_type`` and the config's fields, e.g. ``text_config``/``vision_config``)."""
    import transformers

    if config is None:
        model = transformers.AutoModel.from_pretrained(model_name, dtype=torch.float32)
    else:
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if model_type not in FAMILIES:
            raise ValueError(f"HFClipBackbone(config=...) needs model_type, one of {sorted(FAMILIES)}; got {model_type!r}.")
        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **fields))
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise TypeError(
            f"HFClipBackbone runs CLIPModel, SiglipModel or Siglip2Model; {model_name!r} is a {type(model).__name__} "
            f"(model_type {model_type!r}). Use ClipBackbone for open_clip weights and ViTBackbone for a timm ViT."
        )
    return model


class HFTokenizer:
    """An HF tokenizer as ``texts -> [N, context_length]`` ids, padded to the context length and
    truncated (what SigLIP was trained with; the CLIP text tower trims the padding again)."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts: list[str]) -> Tensor:
        out = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt")  # fmt: skip
        return out["input_ids"]


def build_tokenizer(spec: Union[str, Tokenizer, None], model_name: str, family: str, context_length: int,
                    inline: bool) -> tuple[Tokenizer, str]:  # fmt: skip
    """The tokenizer and the name ``identity()`` records: ``"open_clip"`` (its CLIP BPE, for CLIP
    only), a callable, or an HF tokenizer from a path (default: ``model_name``'s own)."""
    if callable(spec):
        return spec, f"{getattr(spec, '__module__', '')}.{getattr(spec, '__qualname__', type(spec).__qualname__)}"
    if spec == "open_clip":
        if family != "hf_clip":
            raise ValueError(f"tokenizer='open_clip' is CLIP's BPE; a {family} model has its own vocabulary. "
                             "Leave tokenizer unset to load the model's own tokenizer, or give its folder.")
        import open_clip

        return open_clip.SimpleTokenizer(context_length=context_length), "open_clip"
    if spec is None and inline:
        raise ValueError("HFClipBackbone(config=...) has no tokenizer to load: pass tokenizer='open_clip' (CLIP), a "
                         "tokenizer folder or hub id, or a callable texts -> ids.")
    from transformers import AutoTokenizer

    path = spec or model_name
    return HFTokenizer(AutoTokenizer.from_pretrained(path), context_length), path


def special_id(tokenizer: Any, text_config: Any, name: str) -> Optional[int]:
    """The tokenizer's ``name`` id (it may say None), else the text config's if within the vocabulary."""
    value = getattr(tokenizer, name) if hasattr(tokenizer, name) else getattr(text_config, name, None)
    return int(value) if value is not None and 0 <= int(value) < int(text_config.vocab_size) else None


class HFClipBackbone(TwoTowerBackbone):
    """A Hugging Face CLIP or SigLIP (1 or 2) model run block by block, frozen by default.

    An :class:`~vlm.protocols.ImageTextBackbone` like :class:`~vlm.backbones.clip.ClipBackbone` (the
    same public surface), so every module and method that needs one takes this.

    Args:
        model_name: hub id or local folder of a ``CLIPModel``/``SiglipModel``/``Siglip2Model``; with
            ``config`` only a label.
        config: an inline config (``{"model_type": "clip" | "siglip" | "siglip2", "text_config":
            {...}, "vision_config": {...}, ...}``) for a model with random weights.
        tokenizer: None (the model's own, from ``model_name``), ``"open_clip"`` (open_clip's CLIP
            BPE: same vocabulary and SOT/EOT ids as OpenAI CLIP's HF tokenizer), another tokenizer
            folder or hub id, or a callable ``texts -> [N, L]`` ids.
        freeze: freeze all weights and keep the model in eval mode.
        trim_text: CLIP: run the text tower only up to the batch's last EOS (exact under the causal
            mask). SigLIP attends to every position and pools the last one, so it never trims.
    """

    family = "hf_clip"

    def __init__(
        self,
        model_name: str = "openai/clip-vit-base-patch16",
        config: Optional[dict[str, Any]] = None,
        tokenizer: Union[str, Tokenizer, None] = None,
        freeze: bool = True,
        trim_text: bool = True,
    ) -> None:
        super().__init__(freeze=freeze)
        self.model_name, self.inline_config = model_name, config
        self.model = build_hf_model(model_name, config)
        cfg = self.model.config
        self.family = FAMILIES[cfg.model_type]
        context = int(cfg.text_config.max_position_embeddings)
        self.tokenizer, self.tokenizer_name = build_tokenizer(tokenizer, model_name, self.family, context, config is not None)
        if self.family == "hf_clip":
            self.vision = HFClipImageRunner(self.model.vision_model, self.model.visual_projection)
            self.text = HFClipTextRunner(self.model.text_model, self.model.text_projection, trim=trim_text)
        else:
            self.vision = SiglipVisionRunner(self.model.vision_model)
            bos, eos = (special_id(self.tokenizer, cfg.text_config, f"{k}_token_id") for k in ("bos", "eos"))
            self.text = SiglipTextRunner(self.model.text_model, bos_id=bos, eos_id=eos)
            text_width = int(self.text.model.head.out_features)
            if text_width != self.vision.width:
                raise ValueError(f"SigLIP text head width {text_width} differs from the vision width {self.vision.width}; "
                                 "set text_config.projection_size to vision_config.hidden_size.")
        self._apply_freeze()

    # --- identity -----------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        cfg = self.model.config
        towers = {name: getattr(cfg, f"{name}_config") for name in ("text", "vision")}
        arch: dict[str, Any] = {n: {k: getattr(c, k) for k in ARCH_KEYS if hasattr(c, k)} for n, c in towers.items()}
        if hasattr(cfg, "projection_dim") and self.family == "hf_clip":
            arch["projection_dim"] = int(cfg.projection_dim)
        return {
            "family": self.family,
            "model_name": self.model_name,
            "model_type": cfg.model_type,
            "inline_config": self.inline_config is not None,
            "config": arch,
            "tokenizer": self.tokenizer_name,
        }

    @property
    def image_size(self) -> int:
        return int(self.vision.image_size)

    @property
    def patches_per_image(self) -> Optional[int]:
        """Patch tokens per image: (image size / patch size) squared."""
        return (self.image_size // int(self.vision.patch_size)) ** 2

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(CLIP_MEAN) if self.family == "hf_clip" else SIGLIP_MEAN

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(CLIP_STD) if self.family == "hf_clip" else SIGLIP_STD

    @property
    def embed_dim(self) -> int:
        if self.family == "hf_clip":
            return int(self.model.config.projection_dim)
        return int(self.vision.width)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`encode_image`'s output: the joint embedding width."""
        return self.embed_dim

    # --- forward pieces -----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts)).to(self.logit_scale.device)

    @property
    def logit_scale(self) -> Tensor:
        """The log temperature: logits are ``logit_scale.exp() * cos`` (CLIP and SigLIP alike)."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> Optional[Tensor]:
        """SigLIP's logit bias (its sigmoid loss adds it to every logit); None for CLIP."""
        return getattr(self.model, "logit_bias", None)
