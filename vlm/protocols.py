"""What modules and methods may ask of a backbone, as typed protocols instead of attribute probes.

A classifier, a prompt learner's ``build`` and the build-time checks (token budget, image size,
hook compatibility) talk to a backbone only through these. ``ImageBackbone`` is any image encoder
run block by block (the open_clip and timm wrappers); ``ImageTextBackbone`` adds the text tower of a
CLIP-like model. A backbone satisfies a protocol by having the members (structural typing), so a
user's own wrapper works without subclassing ours; code tests it once with ``isinstance`` and then
reads plain attributes. The module is a leaf (it imports nothing of the project), so the runtime
checks and the method files may use it without an import cycle.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, Sequence, runtime_checkable

from torch import Tensor

from vlm.context import Tower


@runtime_checkable
class BlockRunner(Protocol):
    """A tower run block by block with hooks (``vlm.towers``): its depth and width, and a call
    that returns a ``TowerOutput`` (``.pooled``, ``.state``)."""

    num_layers: int
    heads: int
    width: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class ImageBackbone(Protocol):
    """What a module may ask of an image backbone.

    ``vision``: the vision tower's block runner (its ``num_layers`` is the number of blocks a
    pruner or prompt learner may address); ``image_size``: the square input size it requires, or
    None if it takes any size; ``patches_per_image``: the patch tokens a vision pruner sees per
    image, or None if unknown; ``feature_dim``: the width of ``encode_image``'s output;
    ``encode_image(images, hooks)``: pooled features of ``[B, 3, H, W]`` images with the hooks run
    in the vision tower; ``check_budget(pruner)``: raise if the pruner's budget cannot fit;
    ``identity()``/``checksum()``: what checkpoints and exports record."""

    vision: BlockRunner

    @property
    def image_size(self) -> Optional[int]: ...

    @property
    def patches_per_image(self) -> Optional[int]: ...

    @property
    def feature_dim(self) -> int: ...

    def encode_image(self, images: Tensor, hooks: Optional[Iterable[Any]] = None) -> Tensor: ...

    def check_budget(self, pruner: Any) -> None: ...

    def identity(self) -> dict[str, Any]: ...

    def checksum(self) -> str: ...


@runtime_checkable
class ImageTextBackbone(ImageBackbone, Protocol):
    """A CLIP-like backbone: an :class:`ImageBackbone` with a text tower.

    ``text``: the text tower's block runner (with ``token_embedding`` and ``token_types``);
    ``embed_dim``: the joint embedding width; ``logit_scale``: the learned temperature (log);
    ``tokenize(texts)``: ``[N, L]`` token ids; ``encode_text(tokens, hooks, embeds)``: pooled
    text features."""

    text: BlockRunner

    @property
    def embed_dim(self) -> int: ...

    @property
    def logit_scale(self) -> Tensor: ...

    def tokenize(self, texts: Sequence[str]) -> Tensor: ...

    def encode_text(self, tokens: Tensor, hooks: Optional[Iterable[Any]] = None, embeds: Optional[Tensor] = None,
                    normalize: bool = False) -> Tensor: ...  # fmt: skip


#: the backbones each protocol is met by in this package, for error messages
MET_BY = {
    "ImageBackbone": "vlm.backbones.ClipBackbone, HFClipBackbone (CLIP/SigLIP) or ViTBackbone (timm ViT, EVA, DINOv2/v3)",
    "ImageTextBackbone": "vlm.backbones.ClipBackbone (open_clip: CLIP, SigLIP, EVA-CLIP) or HFClipBackbone (HF CLIPModel/SiglipModel)",
}


def check_backbone(backbone: Any, protocol: type, who: str) -> None:
    """Raise a ``TypeError`` naming ``protocol`` and the backbones that meet it unless ``backbone``
    meets it (``who``: the module or method that needs it)."""
    if not isinstance(backbone, protocol):
        name = protocol.__name__
        raise TypeError(f"{who} needs a backbone that is an {name} (vlm.protocols); {type(backbone).__name__} is "
                        f"not one. Use {MET_BY.get(name, 'a backbone with its members')}.")


def tower_runner(backbone: Any, tower: Tower, who: str) -> BlockRunner:
    """The block runner of ``tower`` (vision or text) of ``backbone``, or a ``TypeError`` that says
    which protocol ``who`` needs."""
    need = ImageTextBackbone if tower is Tower.TEXT else ImageBackbone
    if not isinstance(backbone, need):
        raise TypeError(
            f"{who} needs a backbone with a {tower.value} tower run block by block ({need.__name__}: "
            f"vlm.protocols); {type(backbone).__name__} has none. Use {MET_BY[need.__name__]}."
        )
    return backbone.text if tower is Tower.TEXT else backbone.vision

