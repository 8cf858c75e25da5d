"""The tiny task's functions: images made from each document's seeds (no image files are shipped),
the question as the prompt, and POPE's yes/no accuracy with vlm's own parser."""

from __future__ import annotations

from typing import Any

SIZE = (40, 48)  # height, width: the CLIP processor resizes and crops it to 32 px


def make_image(seed: int, size: tuple[int, int] = SIZE) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [make_image(s) for s in doc["seeds"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from vlm.metrics_vqa import pope_yes_no

    return {"pope_acc": float(pope_yes_no(results[0]) == doc["answer"])}
