"""timm's Eva family, timm attention pooling and open_clip's timm-backed towers through our block
loop: with no hooks, image (and text) features equal the libraries' own forwards (fp32, 1e-5).

Every model is tiny and random (no download): timm models by their registered names with small
``model_kwargs``; open_clip's SigLIP, SigLIP2 and EVA02-CLIP configs with their trunks shrunk
through two test-only timm names that call timm's own entry points with small sizes; and
open_clip's native ViT configs at every size, shrunk (``shrink``). Weights are perturbed so that
every path (layer scale, q/v biases, gates of a SwiGLU) carries signal. One test checks that the
Eva runner rotates q and k by each token's original position when a hook inserts prompt tokens
and prunes (against timm's own block fed rows gathered by position), and that the result does
not depend on where prompts go; two prompt learners train through the timm-backed towers.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import timm
import torch
from timm.models import register_model
from timm.models.eva import eva02_base_patch16_clip_224
from timm.models.vision_transformer import vit_base_patch16_siglip_224

from vlm.backbones import ClipBackbone, ViTBackbone
from vlm.backbones.clip import tag_preprocess
from vlm.context import BlockContext, Tower, TowerContext
from vlm.hooks import TowerHook
from vlm.kernels import AttnOutput
from vlm.modules import CLIPClassifier
from vlm.prompts import create
from vlm.tokens import TokenState, TokenType
from vlm.towers.eva import EvaRunner
from vlm.towers.timm_trunk import timm_runner_for
from vlm.towers.vit import TimmViTRunner

TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


# --- timm: Eva family, DINOv2, SigLIP towers -------------------------------------------------------
TIMM_MODELS = {
    # name: (timm model, model_kwargs, runner class)
    "eva02_rope_swiglu": ("eva02_base_patch14_224", {**TINY, "ref_feat_shape": (4, 4)}, EvaRunner),
    "eva02_fused_qkv_bias": ("eva02_base_patch14_224", {**TINY, "qkv_fused": True, "scale_mlp": False}, EvaRunner),
    "dinov3_registers": ("vit_small_patch16_dinov3", {**TINY, "global_pool": "token"}, EvaRunner),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", TINY, EvaRunner),
    "pe_map_pool": ("vit_pe_core_tiny_patch16_384", {**TINY, "ref_feat_shape": (4, 4)}, EvaRunner),
    "eva_post_norm": ("eva02_enormous_patch14_clip_224", TINY, EvaRunner),
    "rope_gqa": ("vit_small_patch16_rope_224", {**TINY, "num_heads": 4, "num_kv_heads": 2, "qkv_fused": False}, EvaRunner),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", TINY, TimmViTRunner),
    "siglip_map": ("vit_base_patch16_siglip_224", TINY, TimmViTRunner),
    "map_with_prefix": ("test_vit3", TINY, TimmViTRunner),  # registers, pool_include_prefix
}


def timm_backbone(variant: str) -> ViTBackbone:
    name, kwargs, _ = TIMM_MODELS[variant]
    torch.manual_seed(0)
    bb = ViTBackbone(name, model_kwargs=kwargs)
    perturb(bb.model)
    return bb


@pytest.mark.parametrize("variant", list(TIMM_MODELS))
def test_timm_family_parity(variant):
    bb = timm_backbone(variant)
    assert type(bb.vision) is TIMM_MODELS[variant][2]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = bb.vision.forward_features(images)
        ref = bb.model.forward_features(images)
        torch.testing.assert_close(ours.x, ref, **TOL)
        pooled = bb.model.forward_head(ref, pre_logits=True)
        torch.testing.assert_close(bb.vision.forward_head(ours, pre_logits=True), pooled, **TOL)
        torch.testing.assert_close(bb.encode_image(images), pooled, **TOL)
    assert bb.patches_per_image == 16 and bb.vision.num_prefix_tokens == bb.model.num_prefix_tokens
    assert bb.image_size == (None if bb.model.dynamic_img_size else 32)


@pytest.mark.parametrize("variant", ["siglip_map", "map_with_prefix", "pe_map_pool"])
def test_attention_pool_reads_only_the_towers_own_tokens(variant):
    """Prompt tokens inserted anywhere, and padding, do not change timm's attention pooling."""
    bb = timm_backbone(variant)
    with torch.no_grad():
        state = bb.vision.forward_features(torch.randn(2, 3, 32, 32))
        pooled = bb.vision.pool(state)
        prompts = torch.randn(1, 3, state.x.shape[-1])
        at_front = state.insert(bb.vision.num_prefix_tokens, prompts, TokenType.PROMPT)
        padded = TokenState(torch.cat([state.x, torch.randn(2, 2, state.x.shape[-1])], 1),
                            torch.cat([state.types, torch.full((2,), int(TokenType.PAD), dtype=torch.int8)]),
                            lengths=torch.tensor([state.x.shape[1]] * 2),
                            positions=torch.cat([state.positions, torch.full((2, 2), -1)], 1))  # fmt: skip
        for other in (at_front, state.insert(state.x.shape[1], prompts, TokenType.PROMPT), padded):
            torch.testing.assert_close(bb.vision.pool(other), pooled, atol=1e-6, rtol=1e-6)


def test_timm_runner_for_names_the_supported_classes():
    with pytest.raises(TypeError, match=r"VisionTransformer.*Eva"):
        timm_runner_for(torch.nn.Linear(2, 2))


# --- rotary embedding by original position under insertion and pruning --------------------------
class InsertAndPrune(TowerHook):
    """Inserts prompt tokens at ``index`` (position -1); before block 1 scores with the block's own
    q (as a scoring hook does), then keeps the tokens ``order`` (indices into the state entering
    block 1; None keeps all), and records what block 1 gets and gives."""

    towers = (Tower.VISION,)

    def __init__(self, prompts: torch.Tensor, index: int, order: torch.Tensor | None = None) -> None:
        super().__init__()
        self.prompts, self.index, self.order = prompts, index, order
        self.uncut: TokenState | None = None
        self.scored_q: torch.Tensor | None = None
        self.block_in: TokenState | None = None
        self.block_out: TokenState | None = None

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        return state.insert(self.index, self.prompts, TokenType.PROMPT)

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        if ctx.layer == 1:
            self.uncut = state
            self.scored_q = ctx.block.qkv(ctx.block.attn_input(state.x))[0]  # positions tracked by the runner
            if self.order is not None:
                state = state.select(self.order.expand(state.x.shape[0], -1))
            self.block_in = state
        return state

    def after_block(self, ctx: BlockContext, state: TokenState, attn: AttnOutput) -> TokenState:
        if ctx.layer == 1:
            self.block_out = state
        return state


def timm_block_by_position(model, block_index: int, state: TokenState) -> torch.Tensor:
    """timm's own block on ``state`` (CLS first) with the rotary row of each later token taken at
    its original index (identity row ``sin 0 | cos 1`` for inserted tokens), as a per-token table."""
    table = model.rope.get_embed()  # [Np, 2d] of the patch grid, in timm's order
    npt = model.num_prefix_tokens
    assert npt == 1 and bool((state.positions[:, 0] == 0).all()), "the test keeps CLS first"
    d = table.shape[-1] // 2
    identity = torch.cat([torch.zeros(d), torch.ones(d)])
    rows = torch.stack([
        torch.stack([table[p - npt] if p >= npt else identity for p in row.tolist()]) for row in state.positions[:, 1:]
    ])  # fmt: skip
    return model.blocks[block_index](state.x, rope=rows[:, None])


def test_eva_rope_follows_original_positions_under_insertion_and_pruning():
    bb = timm_backbone("eva02_rope_swiglu")
    block = bb.vision.blocks[1]
    images, prompts = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 64)
    torch.manual_seed(3)
    order = torch.cat([torch.arange(4), 4 + torch.randperm(16)[:10]])  # CLS, 3 prompts, 10 patches shuffled
    with torch.no_grad():
        hook = InsertAndPrune(prompts, index=1, order=order)
        bb.vision.forward_features(images, [hook])
        cut = hook.block_in
        assert cut.x.shape[1] == 14 and bool((cut.positions[:, 1:4] == -1).all())
        expected = timm_block_by_position(bb.model, 1, cut)
        torch.testing.assert_close(hook.block_out.x, expected, **TOL)
        # rows by slot instead of by original position would give another block output
        by_slot = timm_block_by_position(bb.model, 1, cut.replace(positions=torch.arange(14).expand(2, 14)))
        assert not torch.allclose(by_slot, expected, atol=1e-4), "the test cannot tell positions from slots"
        # a scoring hook's q (no positions given) is the block's q at the state's positions
        uncut = hook.uncut
        q = block.qkv(block.attn_input(uncut.x), uncut.positions)[0]
        torch.testing.assert_close(hook.scored_q, q, atol=0, rtol=0)
        # where prompts are inserted changes only the order of the outputs
        at_front, at_end = InsertAndPrune(prompts, index=1), InsertAndPrune(prompts, index=17)
        front = bb.vision.forward_features(images, [at_front]).x
        end = bb.vision.forward_features(images, [at_end]).x
        torch.testing.assert_close(front[:, [0, *range(4, 20), 1, 2, 3]], end, **TOL)


# --- open_clip: SigLIP, SigLIP2, EVA02-CLIP (timm-backed image towers) ---------------------------
SIGLIP_TRUNK, EVA_TRUNK = "vlm_test_tiny_siglip_vit", "vlm_test_tiny_eva02_clip"

if not timm.is_model(SIGLIP_TRUNK):

    @register_model
    def vlm_test_tiny_siglip_vit(pretrained: bool = False, **kwargs):
        """timm's SigLIP B/16 tower (attention pooling, no CLS), tiny."""
        return vit_base_patch16_siglip_224(pretrained=False, **{**TINY, **kwargs})

    @register_model
    def vlm_test_tiny_eva02_clip(pretrained: bool = False, **kwargs):
        """timm's EVA02-CLIP B/16 tower (rope, SwiGLU, inner attention norm), tiny."""
        return eva02_base_patch16_clip_224(pretrained=False, **{**TINY, "ref_feat_shape": (4, 4), **kwargs})


def siglip_cfg(version: int) -> dict:
    """open_clip's ViT-B-16-SigLIP(2).json with the trunk and text tower shrunk, no HF tokenizer."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP2" if version == 2 else "ViT-B-16-SigLIP"))
    cfg["embed_dim"] = 64  # = the trunk's width: timm_proj "none"
    cfg["vision_cfg"].update(image_size=32, timm_model_name=SIGLIP_TRUNK)
    text = cfg["text_cfg"]
    for key in ("hf_tokenizer_name", "tokenizer_kwargs"):
        text.pop(key)
    text.update(vocab_size=49408, context_length=16, width=64, heads=2, layers=1)
    return cfg


def eva02_clip_cfg() -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config("EVA02-B-16"))
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(image_size=32, timm_model_name=EVA_TRUNK)
    cfg["text_cfg"].update(width=64, heads=2, layers=1)
    return cfg


OPEN_CLIP_TIMM = {"siglip": lambda: siglip_cfg(1), "siglip2": lambda: siglip_cfg(2), "eva02_clip": eva02_clip_cfg}


@pytest.mark.parametrize("variant", list(OPEN_CLIP_TIMM))
def test_open_clip_timm_towers_parity(variant):
    cfg = OPEN_CLIP_TIMM[variant]()
    torch.manual_seed(0)
    bb = ClipBackbone(variant, model_cfg=cfg)
    perturb(bb.model, 0.05)
    assert type(bb.model).__name__ == "CustomTextCLIP" and type(bb.vision).__name__ == "OpenClipTimmVisionRunner"
    if variant == "siglip2":
        assert bb.model.text.transformer.resblocks[0].mlp.gelu.approximate == "tanh"
    images = torch.randn(2, 3, 32, 32)
    tokens = bb.tokenize(["a photo of a cat.", "a dog", "x " * 40])
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), bb.model.encode_image(images), **TOL)
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), **TOL)
    siglip = variant.startswith("siglip")
    assert (bb.image_size, bb.patches_per_image, bb.embed_dim) == (32, 16, cfg["embed_dim"])
    assert bb.encode_image(images).shape[-1] == bb.embed_dim == bb.feature_dim
    assert bb.mean == ((0.5,) * 3 if siglip else tuple(open_clip.OPENAI_DATASET_MEAN))
    assert (bb.logit_bias is not None) == siglip
    assert bb.text.prefix_length(tokens) is None if siglip else bb.text.prefix_length(tokens) < tokens.shape[1]


def test_registry_names_with_a_local_file_get_their_tags_normalisation():
    assert tag_preprocess("ViT-B-16-SigLIP") == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert tag_preprocess("EVA02-B-16")["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert tag_preprocess("no-such-model") is None


# --- open_clip native towers at every size -------------------------------------------------------
NATIVE = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"]


def shrink(name: str) -> dict:
    """open_clip's config of ``name`` with 2 vision blocks of width 64 (head width 16, its own
    ``mlp_ratio``, ``patch_size`` and ``quick_gelu``), a 2x2 patch grid (3x3 for 336 px), and 1 text
    block of width 64."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    grid = 3 if vision["image_size"] > 224 else 2
    vision.update(image_size=vision["patch_size"] * grid, width=64, layers=2, head_width=16)
    text.update(width=64, heads=4, layers=1)
    cfg["embed_dim"] = 32
    return cfg


@pytest.mark.parametrize("name", NATIVE)
def test_open_clip_native_towers_at_every_size(name):
    cfg = shrink(name)
    torch.manual_seed(0)
    bb = ClipBackbone(name, model_cfg=cfg)
    perturb(bb.model, 0.02)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size)
    tokens = bb.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_image(images), bb.model.encode_image(images), **TOL)
        torch.testing.assert_close(bb.encode_text(tokens), bb.model.encode_text(tokens), **TOL)
    assert bb.image_size == size and bb.patches_per_image == (size // cfg["vision_cfg"]["patch_size"]) ** 2


@pytest.mark.parametrize("variant,name,kwargs", [("siglip", "maple", {"n_ctx": 2, "depth": 1}),
                                                 ("eva02_clip", "ivlp", {"depth_text": 1, "depth_vision": 2})])  # fmt: skip
def test_prompt_learners_train_on_open_clip_timm_towers(variant, name, kwargs):
    """Deep vision prompts go into the timm trunk (attention pooling, rotary blocks) and learn."""
    torch.manual_seed(0)
    model = CLIPClassifier(ClipBackbone(variant, model_cfg=OPEN_CLIP_TIMM[variant]()), create(name, **kwargs),
                           classnames=["cat", "dog", "sea lion"])  # fmt: skip
    learned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached: logging is skipped
        loss = model.training_step({"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}, 0)
    loss.backward()
    assert learned and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned.values())
