"""A tiny random LLaVA (no download) and batch helpers for the LLaVA and pruning tests."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 5
PAD = 0
EOS = 2


def tiny_llava(seed: int = 0, image_size: int = 32, patch_size: int = 8, vision_layers: int = 4, **cfg):
    """CLIP vision (hidden 32, 4 heads, 16 patches) + Llama (hidden 32, 2 layers, vocab 64), SDPA."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=vision_layers,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=32,
        ),
        text_config=dict(
            model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1,
            max_position_embeddings=256,
        ),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **cfg,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model


def prompt(text_before: list[int], text_after: list[int], n_image: int) -> list[int]:
    return text_before + [IMAGE_TOKEN] * n_image + text_after


def pad_batch(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask`` padded with PAD on ``side``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


TINY_LLAVA_CONFIG = dict(
    vision_config=dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32,
    ),
    text_config=dict(
        model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1,
        max_position_embeddings=256,
    ),
    image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)


def save_tiny_processor(path, newline: bool = False) -> str:
    """A word-level tokenizer (``<pad> <s> </s> <unk> x <image> w0..w57``, so ``<image>`` is id 5) and
    a 32-px CLIP image processor, saved as a LlavaProcessor directory. ``newline``: a token for
    ``\n`` in place of w57 (LLaVA writes ``<image>\n`` per image; without it two images' tokens
    would run together)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "x", "<image>"] + [f"w{i}" for i in range(57 if newline else 58)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["\n"] * newline)}, unk_token="<unk>"))
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                 pre_tokenizers.Split(Regex(" +"), "removed")])
                        if newline else pre_tokenizers.WhitespaceSplit())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(str(path))
    return str(path)


def write_tiny_pope(root, size: tuple[int, int] = (32, 32), count: int = 4) -> None:
    """``count`` random images and a POPE question/label file pair in LLaVA's layout under ``root``
    (answers alternate no/yes), for the CLI tests on local files."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    questions, labels = [], []
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(root / f"{i}.png")
        questions.append({"question_id": i, "image": f"{i}.png", "text": f"w{i} w{i + 1}", "category": "random"})
        labels.append({"question_id": i, "label": "yes" if i % 2 else "no"})
    (root / "questions.jsonl").write_text("\n".join(json.dumps(q) for q in questions))
    (root / "labels.jsonl").write_text("\n".join(json.dumps(x) for x in labels))
