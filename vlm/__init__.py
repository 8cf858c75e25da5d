"""vlm: one Lightning framework for prompt learning and visual-token pruning on CLIP, ViT and LLaVA."""

__version__ = "0.1.0"
