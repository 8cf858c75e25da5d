"""Versions of the packages a result or export depends on."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("vlm", "torch", "torchvision", "lightning", "open_clip_torch", "timm", "transformers", "triton", "safetensors")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
