"""The README's command for a tiny random Qwen (no weights), run through ``vlm test`` for both
families: the README's configs as written (the random model of ``configs/qwen/random/``, the model
config's ``max_pixels``), with a local processor in place of the hub's that has Qwen's real special
token ids (so the random model's ``image_token_id`` 151655 is the processor's), and tiny POPE files."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.qwen.tiny import CHAT_TEMPLATES
from vlm.runtime.cli import main

REPO = Path(__file__).resolve().parents[2]
#: Qwen's special tokens and their ids (the same in Qwen2.5-VL's and Qwen3-VL's tokenizers)
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
           "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
#: the README names the Qwen2.5-VL pair; Qwen3-VL swaps both files
FAMILIES = {"qwen2_5_vl": {}, "qwen3_vl": {"qwen2_5_vl_3b.yaml": "qwen3_vl_2b.yaml", "random/qwen2_5_vl.yaml": "random/qwen3_vl.yaml"}}


def readme_command() -> list[str]:
    """The README's `vlm test` command with a random Qwen (its one block naming configs/qwen/random/)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "configs/qwen/random/" in b]
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:2] == ["vlm", "test"], argv[:2]
    return argv[1:]


def save_qwen_like_processor(kind: str, path: Path) -> None:
    """The family's processor class with Qwen's image settings (patch 14 or 16, merge 2) and chat
    template shape, over a word-level tokenizer holding the real special-token ids and ``w0..w63``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    vocab = {f"w{i}": i for i in range(64)} | {"<unk>": 64} | SPECIAL
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(list(SPECIAL))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    patch = 14 if kind == "qwen2_5_vl" else 16
    image = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_5_vl":
        proc = Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=CHAT_TEMPLATES[kind])
    else:
        proc = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(patch_size=16),
                                chat_template=CHAT_TEMPLATES[kind])
    proc.save_pretrained(str(path))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_readme_random_qwen_command_evaluates(family: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate([(120, 200), (90, 90), (300, 160)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"question_id": i, "image": f"{i}.png", "text": f"w{i} w{i + 1}", "label": "yes" if i % 2 else "no",
                      "category": "random"})
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    save_qwen_like_processor(family, tmp_path / "processor")
    argv = []
    for a in readme_command():
        for old, new in FAMILIES[family].items():
            a = a.replace(old, new)
        argv.append(str(REPO / a) if a.startswith("configs/") else a)
    argv += [
        "--model.init_args.backbone.init_args.processor", str(tmp_path / "processor"),
        "--data.init_args.question_file", str(tmp_path / "q.jsonl"),
        "--data.init_args.image_folder", str(tmp_path),
        "--data.init_args.answers_file", "null",
        "--data.init_args.batch_size", "2",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ]
    main(argv)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"test/pope_acc", "test/pope_f1", "test/visual_tokens"} <= set(results["metrics"])
    assert results["dataset"] == "pope" and results["backbone"] == {"family": family, "model": "random", "dtype": "float32"}
    assert results["metrics"]["test/visual_tokens"] > 0
