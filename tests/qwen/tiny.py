"""Tiny random Qwen2.5-VL / Qwen3-VL models (no download), their real processors over a word-level
tokenizer, and the batches the Qwen tests share.

Vocabulary: ``<pad> <s> </s> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|> <unk>
w0..w53 <|im_start|> <|im_end|>`` (ids 0..63), so the image token is 5; the processors carry a chat
template of each model's shape (:data:`CHAT_TEMPLATES`). Qwen2.5-VL: 14-px patches, 2x2 merge, windows of
56 px (2x2 merged tokens), full attention in block 1 of 4; Qwen3-VL: 16-px patches, a 4x4 learned
position table, DeepStack taps after vision blocks 0 and 2 (added after LLM layers 0 and 1).
"""

from __future__ import annotations

import numpy as np
import torch

PAD, BOS, EOS = 0, 1, 2
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = 3, 4, 5, 6
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"

TEXT_CONFIG = dict(
    hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    max_position_embeddings=512, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
)
TOKEN_IDS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                 vision_end_token_id=VISION_END)

QWEN2_5_CONFIG = dict(
    vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
    text_config=dict(TEXT_CONFIG, num_hidden_layers=2,
                     rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0}),
    **TOKEN_IDS,
)
QWEN3_CONFIG = dict(
    vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                       deepstack_visual_indexes=[0, 2]),
    text_config=dict(TEXT_CONFIG, num_hidden_layers=3, head_dim=8,
                     rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                      "rope_theta": 10000.0}),
    **TOKEN_IDS,
)
#: (config, patch size) per model
MODELS = {"qwen2_5_vl": (QWEN2_5_CONFIG, 14), "qwen3_vl": (QWEN3_CONFIG, 16)}


def tiny_model(kind: str, seed: int = 0, text_layers: int | None = None):
    """A random ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (SDPA, eval);
    ``text_layers`` overrides the language model's depth (2 and 3 by default)."""
    import transformers

    config, _ = MODELS[kind]
    if text_layers is not None:
        config = dict(config, text_config=dict(config["text_config"], num_hidden_layers=text_layers))
    names = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
             "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}[kind]
    cfg = getattr(transformers, names[0])(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, names[1])(cfg).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
    words += [f"w{i}" for i in range(54)] + ["<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # split out of the text like the vision tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )


_TURNS = (
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
)
#: ChatML templates of the two models' shape: Qwen2.5-VL opens with a default system turn when the
#: conversation has none, Qwen3-VL does not; an image entry is the placeholder run; the assistant's
#: turn is opened by ``add_generation_prompt``.
CHAT_TEMPLATES = {
    "qwen2_5_vl": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + _TURNS + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3_vl": "{% for message in messages %}" + _TURNS + "{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}


def tiny_processor(kind: str):
    """The model's real processor class (image, video and the word-level tokenizer, the chat
    template of :data:`CHAT_TEMPLATES`), built offline."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    _, patch = MODELS[kind]
    unit = (2 * patch) ** 2
    image = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, min_pixels=unit,
                                  max_pixels=64 * unit)
    if kind == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tiny_tokenizer(),
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATES[kind])
    return Qwen3VLProcessor(image_processor=image, tokenizer=tiny_tokenizer(),
                            video_processor=Qwen3VLVideoProcessor(patch_size=patch), chat_template=CHAT_TEMPLATES[kind])


def images(kind: str, shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    """Random RGB images; ``shapes`` in merged tokens ``(h', w')`` (times ``2 * patch`` pixels)."""
    _, patch = MODELS[kind]
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 255, (h * 2 * patch, w * 2 * patch, 3), dtype=np.uint8) for h, w in shapes]


#: three prompts: two images in the first, one in each of the others, images of different sizes
PROMPTS = [f"w1 w2 {IMAGE} w3 {IMAGE} w4 w5", f"w6 {IMAGE} w7 w8 w9 w10 w11 w12", f"w13 {IMAGE} w14"]
#: merged grids (h', w') of the four images: 3x5 and 4x4 (windows with and without a partial edge)
SHAPES = [(3, 5), (2, 2), (4, 4), (2, 6)]


def encode(kind: str, side: str, samples: slice = slice(None)) -> dict[str, torch.Tensor]:
    """The processor's output for ``PROMPTS[samples]`` and their images, padded on ``side``
    (input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)."""
    proc = tiny_processor(kind)
    proc.tokenizer.padding_side = side
    per = [p.count(IMAGE) for p in PROMPTS]
    owner = [i for i, n in enumerate(per) for _ in range(n)]
    chosen = range(len(PROMPTS))[samples]
    pictures = [img for img, o in zip(images(kind, SHAPES), owner) if o in chosen]
    return dict(proc(images=pictures, text=PROMPTS[samples], return_tensors="pt", padding=True))


def image_rows(samples: slice) -> list[int]:
    """The indices (in ``SHAPES``) of the images of ``PROMPTS[samples]``."""
    per = [p.count(IMAGE) for p in PROMPTS]
    chosen = range(len(PROMPTS))[samples]
    return [j for j, o in enumerate(i for i, n in enumerate(per) for _ in range(n)) if o in chosen]
