"""TCPA: Token Coordinated Prompt Attention (Liu, Zou, Hua, Zhou; ICML 2025, arXiv 2505.02406).

Every layer l gets two fresh pools of key/value-only prompts, inserted after the CLS/register
prefix: ``M_c`` CLS prompts and ``M_i`` image prompts, each ``Lp`` tokens long, each prompt with a
learnable key (``keys [L, M, D]``, ``prompts [L, M * Lp, D]``, U(-1, 1) as the official code).

* R-TCPA (role level): the CLS query may attend only CLS prompts, image-token queries only image
  prompts (paper Fig. 2, Mask 1 / Mask 2).
* T-TCPA (token level, Eq. 9-11): each token t is matched to its ``top-k`` prompts of its role's
  pool by cosine similarity between the *pre-LN residual* token and the layer's keys,
  ``S(t) = TopK_m cos(t, k_m)``; it may attend only those. During the first ``random_epochs``
  training epochs the sets are uniformly random k-subsets (seeded draws); evaluation always matches.
* Attention: softmax over *all* keys (CLS, every prompt, patches); the 0/1 mask then multiplies the
  probabilities with no renormalisation (``A' = A (x) Mask``, ``o = A' V``), so a row sums to one
  minus the mass of its disallowed prompts. ``renormalize=True`` is the -inf-masked ablation.
  Both go through ``AttnSpec(row_subset=..., normalize="all_keys"|"softmax")``, so the fused kernel
  serves them; prompts get no query row and no MLP and are dropped after the block (``kv_only``).
* Key-pull loss (T-TCPA only): ``lambda * sum_l (d_cls^l + d_img^l)`` with ``d^l = mean over
  matched (token, key) pairs of (1 - cos(t, k_m))``, also during the random warm-up (official
  code). R-TCPA (``role_only``) has no pull term: the official RDVP-only path returns no distance.
  The official ``Pool.forward`` takes the cosine on the live residual tokens, so the pull's gradient
  reaches the tokens (and through them the earlier layers' prompts) as well as the keys;
  ``pull_detach_tokens=False`` (default) does the same, ``True`` stops it at the tokens (a variant).

Bases (the paper plugs TCPA onto several prompt methods): ``base="vpt"`` inserts the pool prompts
as they are (VPT-Deep + TCPA); ``base="vfpt"`` (the released code) applies prompt dropout and then
the Fourier transform ``Re(FFT_seq(FFT_hidden(P)))`` over the concatenated CLS+image block.

Group layout handed to the kernel: key groups CLS=0, other tokens=1, the pools=2 (one group,
CLS pool first); ``row_subset`` bits index group 2, so a CLS row's bits lie in the CLS pool and an
image row's in the image pool: role and token masks in one bitmask.

Explicit choices where the paper/code are silent or ViT-B-specific: any non-CLS query token
(patches, registers) has the image role; the random draws use a generator reseeded with
``seed + epoch`` at every training epoch. Sizes come from the backbone (width, depth), never
197/768/12. Not implemented: the input-space conv prompter (``IPrompt_TCPA``) that the official
CUB script enables (see ``configs/experiments/tcpa/cub.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.kernels import AttnSpec
from vlm.context import BlockContext, Tower, TowerContext
from vlm.prompts.base import Encoder, PromptLearner
from vlm.prompts.registry import register
from vlm.prompts.vfpt import fourier_prompts
from vlm.tokens import TokenState, TokenType, check, check_prefix, prefix_length

GROUP_CLS, GROUP_TOKENS, GROUP_PROMPTS = 0, 1, 2


def pack_bits(sel: Tensor) -> Tensor:
    """Bool ``[..., S]`` -> int64 bitmask ``[...]`` (S <= 64) or ``[..., W]`` words (S > 64)."""
    s = sel.shape[-1]
    words = math.ceil(s / 64)
    pad = torch.zeros(*sel.shape[:-1], words * 64 - s, dtype=torch.bool, device=sel.device)
    chunks = torch.cat([sel, pad], dim=-1).view(*sel.shape[:-1], words, 64).long()
    weights = torch.ones(64, dtype=torch.long, device=sel.device) << torch.arange(64, device=sel.device)
    packed = (chunks * weights).sum(-1)  # distinct bits: the sum is an OR (wraps at bit 63)
    return packed[..., 0] if words == 1 else packed


def random_subset(shape: tuple[int, ...], m: int, k: int, generator: torch.Generator) -> Tensor:
    """Bool ``[*shape, m]`` with exactly ``k`` uniformly random True entries per row."""
    scores = torch.rand(*shape, m, generator=generator)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(*shape, m, dtype=torch.bool).scatter_(-1, idx, True)


def topk_subset(sim: Tensor, k: int) -> Tensor:
    """Bool ``[..., M]``: the ``k`` largest similarities of each row (ties: lower index first)."""
    idx = sim.topk(k, dim=-1).indices
    return torch.zeros_like(sim, dtype=torch.bool).scatter_(-1, idx, True)


@register("tcpa")
class TCPA(PromptLearner):
    """Token Coordinated Prompt Attention on a ViT (timm) or CLIP image tower.

    Args:
        pool_size_cls: CLS-prompt pool size M_c per layer (official scripts: 18; Dogs 16).
        pool_size_img: image-prompt pool size M_i per layer (18; Dogs 16).
        prompt_length: tokens per prompt Lp (1).
        topk_cls: prompts matched per CLS token (10).
        topk_img: prompts matched per image token (10).
        role_only: R-TCPA only: every CLS row sees the whole CLS pool, every image row the whole
            image pool (equal to ``topk = pool size``).
        random_epochs: training epochs with random k-subsets instead of matching (10).
        pull_weight: lambda of the key-pull loss (0.01 in every official script).
        renormalize: -inf-masked softmax over the allowed keys (ablation) instead of the paper's
            post-softmax mask without renormalisation.
        base: ``vfpt`` (Fourier-transformed prompts, the released code) or ``vpt``.
        fourier_fraction: share of the prompt block that is Fourier-transformed (``vfpt`` only).
        dropout: prompt dropout before insertion (0.1 in the released code).
        seed: seed of the random warm-up draws.
        pull_detach_tokens: stop the pull loss's gradient into the tokens (a variant; the official
            code does not detach them, see the module docstring).
    """

    towers = (Tower.VISION,)

    def __init__(
        self,
        pool_size_cls: int = 18,
        pool_size_img: int = 18,
        prompt_length: int = 1,
        topk_cls: int = 10,
        topk_img: int = 10,
        role_only: bool = False,
        random_epochs: int = 10,
        pull_weight: float = 0.01,
        renormalize: bool = False,
        base: Literal["vfpt", "vpt"] = "vfpt",
        fourier_fraction: float = 1.0,
        dropout: float = 0.1,
        seed: int = 0,
        pull_detach_tokens: bool = False,
    ) -> None:
        super().__init__()
        if min(pool_size_cls, pool_size_img, prompt_length) < 1:
            raise ValueError("TCPA pool sizes and prompt_length must be >= 1.")
        if not (1 <= topk_cls <= pool_size_cls and 1 <= topk_img <= pool_size_img):
            raise ValueError(f"TCPA top-k must lie in [1, pool size]; got {topk_cls}/{pool_size_cls}, {topk_img}/{pool_size_img}.")
        if base not in ("vfpt", "vpt"):
            raise ValueError(f"TCPA base must be 'vfpt' or 'vpt'; got {base!r}.")
        self.pool_size_cls, self.pool_size_img, self.prompt_length = pool_size_cls, pool_size_img, prompt_length
        self.topk_cls, self.topk_img, self.role_only = topk_cls, topk_img, role_only
        self.random_epochs, self.pull_weight, self.renormalize = random_epochs, pull_weight, renormalize
        self.base, self.fourier_fraction, self.seed = base, fourier_fraction, seed
        self.pull_detach_tokens = pull_detach_tokens
        self.prompt_dropout = nn.Dropout(dropout)
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(seed)
        self._pull: list[Tensor] = []
        for name in ("keys_cls", "keys_img", "prompts_cls", "prompts_img"):
            self.register_parameter(name, None)

    # --- construction ---------------------------------------------------------------------------
    def build(self, backbone: Any) -> None:
        """Per-layer pools sized to the vision tower (width D, depth L), U(-1, 1) init."""
        super().build(backbone)
        runner = backbone.vision
        dim, layers = int(runner.width), int(runner.num_layers)
        ref = next(iter(backbone.parameters()))
        kw = dict(dtype=ref.dtype, device=ref.device)
        lp = self.prompt_length

        def u(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **kw).uniform_(-1.0, 1.0))

        self.keys_cls, self.keys_img = u(layers, self.pool_size_cls, dim), u(layers, self.pool_size_img, dim)
        self.prompts_cls = u(layers, self.pool_size_cls * lp, dim)
        self.prompts_img = u(layers, self.pool_size_img * lp, dim)

    @property
    def num_prompt_tokens(self) -> int:
        return (self.pool_size_cls + self.pool_size_img) * self.prompt_length

    # --- schedule -------------------------------------------------------------------------------
    def on_train_epoch_start(self, epoch: int) -> None:
        """Record the epoch (random phase while ``epoch < random_epochs``) and reseed the draws."""
        self.epoch = int(epoch)
        self.generator.manual_seed(self.seed + self.epoch)

    @property
    def random_phase(self) -> bool:
        return self.training and self.epoch < self.random_epochs

    # --- matching -------------------------------------------------------------------------------
    def match(self, x: Tensor, is_cls: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Selections for tokens ``x [B, N, D]`` at ``layer``.

        Returns ``sel_cls [B, N, M_c]`` and ``sel_img [B, N, M_i]`` (each row's matched prompts in
        its own role's pool; the other pool's selection is all False) and the cosine similarities
        ``sim [B, N, M_c + M_i]`` (for the pull loss).
        """
        keys = torch.cat([self.keys_cls[layer], self.keys_img[layer]], 0)
        tok = x.detach() if self.pull_detach_tokens else x
        sim = F.normalize(tok.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # [B, N, Mc + Mi]
        mc, mi = self.pool_size_cls, self.pool_size_img
        b, n = x.shape[:2]
        if self.role_only:
            sel_c = torch.ones(b, n, mc, dtype=torch.bool, device=x.device)
            sel_i = torch.ones(b, n, mi, dtype=torch.bool, device=x.device)
        elif self.random_phase:
            sel_c = random_subset((b, n), mc, self.topk_cls, self.generator).to(x.device)
            sel_i = random_subset((b, n), mi, self.topk_img, self.generator).to(x.device)
        else:
            sel_c = topk_subset(sim[..., :mc].detach(), self.topk_cls)
            sel_i = topk_subset(sim[..., mc:].detach(), self.topk_img)
        cls_row = is_cls[..., None]
        return sel_c & cls_row, sel_i & ~cls_row, sim

    def _pull_term(self, sim: Tensor, sel: Tensor, rows: Tensor) -> Tensor:
        """``mean over (row, m in S(row)) of 1 - cos`` for rows ``rows [B, N]``; 0 if none."""
        w = (sel & rows[..., None]).to(sim.dtype)
        return ((1.0 - sim) * w).sum() / w.sum().clamp(min=1.0)

    # --- hooks ----------------------------------------------------------------------------------
    @dataclass
    class PassState:
        """``prefix``: the pools' insertion index (found in the first block); ``bits``: this block's
        packed pool selection; ``groups``: (types shape, q_groups, k_groups), built once per pass."""

        prefix: Optional[int] = None
        bits: Optional[Tensor] = None
        groups: Optional[tuple[tuple[int, ...], Tensor, Tensor]] = None

    def on_tower_start(self, ctx: TowerContext, state: TokenState) -> TokenState:
        """Reset the pull terms (handed to :meth:`losses` after the pass, so an attribute: the rule
        in ``vlm.hooks``)."""
        if self.keys_cls is None:
            raise RuntimeError("TCPA used before build(backbone).")
        self._pull = []
        return state

    def layer_prompts(self, layer: int, batch: int) -> Tensor:
        """The layer's prompt block ``[B, (M_c + M_i) Lp, D]``: dropout, then the base's transform."""
        p = torch.cat([self.prompts_cls[layer], self.prompts_img[layer]], 0)
        p = self.prompt_dropout(p.unsqueeze(0).expand(batch, -1, -1))
        return fourier_prompts(p, self.fourier_fraction) if self.base == "vfpt" else p

    def before_block(self, ctx: BlockContext, state: TokenState) -> TokenState:
        """Match every query token, record the pull terms, insert the fresh key/value-only pools."""
        layer = ctx.layer
        if layer >= self.keys_cls.shape[0]:
            raise ValueError(f"TCPA was built for {self.keys_cls.shape[0]} layers; got layer {layer}.")
        if state.kv_only is not None:
            check(~state.kv_only, "TCPA must be the first hook to insert key/value-only tokens in a block.")
        st = ctx.state(self)
        types = state.batch_types
        if st.prefix is None:  # the insertion index, found in the first block (one sync per pass)
            st.prefix = prefix_length(types, "TCPA")
        else:  # later blocks only check it
            check_prefix(types, st.prefix, "TCPA")
        index = st.prefix
        is_cls = types == int(TokenType.CLS)
        sel_c, sel_i, sim = self.match(state.x, is_cls, layer)
        valid = torch.ones_like(is_cls)
        if state.lengths is not None:
            valid = torch.arange(types.shape[1], device=types.device)[None] < state.lengths[:, None]
        mc = self.pool_size_cls
        if self.pull_weight and not self.role_only:
            pull = self._pull_term(sim[..., :mc], sel_c, is_cls & valid)
            pull = pull + self._pull_term(sim[..., mc:], sel_i, ~is_cls & valid)
            self._pull.append(pull)
        sel = torch.cat([sel_c, sel_i], -1).repeat_interleave(self.prompt_length, dim=-1)
        st.bits = pack_bits(sel)
        lp = self.prompt_length
        ptypes = torch.tensor(
            [int(TokenType.PROMPT_CLS)] * (mc * lp) + [int(TokenType.PROMPT_IMG)] * (self.pool_size_img * lp),
            dtype=torch.int8,
            device=state.x.device,
        )
        return state.insert(index, self.layer_prompts(layer, state.x.shape[0]), ptypes, kv_only=True)

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        """Groups CLS / tokens / pools and the per-row bitmask over the pools (see module docstring)."""
        st = ctx.state(self)
        bits = st.bits
        if bits is None:
            raise RuntimeError("TCPA.attention_spec without before_block for this layer.")
        if spec.q_groups is not None or spec.normalize != "softmax" or spec.topk is not None:
            raise ValueError("TCPA cannot combine with another hook that sets groups, normalisation or top-k.")
        # The groups depend only on where CLS and the pools sit: the CLS/register prefix (checked in
        # every block) and the pools inserted right after it. So they are built once per pass and
        # shape, and every block passes the same tensors: the attention's mask layout (tile lists)
        # is then built by the first block and reused by the others.
        cached = st.groups
        if cached is not None and cached[0] == tuple(state.types.shape):
            _, q_groups, k_groups = cached
        else:
            types = state.types.long()
            k_groups = torch.where(types == int(TokenType.CLS), GROUP_CLS, GROUP_TOKENS)
            ours = (types == int(TokenType.PROMPT_CLS)) | (types == int(TokenType.PROMPT_IMG))
            k_groups = torch.where(ours & state.kv_only, GROUP_PROMPTS, k_groups)
            # the key/value-only tokens are exactly the pools inserted at the prefix (before_block)
            start, end = st.prefix, st.prefix + self.num_prompt_tokens
            q_groups = torch.cat([k_groups[..., :start], k_groups[..., end:]], -1)
            st.groups = (tuple(state.types.shape), q_groups, k_groups)
        return spec.replace(
            q_groups=q_groups,
            k_groups=k_groups,
            subset_group=GROUP_PROMPTS,
            row_subset=bits,
            normalize="softmax" if self.renormalize else "all_keys",
        )

    def after_block(self, ctx: BlockContext, state: TokenState, attn: Any) -> TokenState:
        ctx.state(self).bits = None  # a block's selection never reaches the next block
        return state

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], encoder: Encoder) -> dict[str, Tensor]:
        """``{"pull": lambda * sum_l (d_cls^l + d_img^l)}`` from the last forward pass (T-TCPA only)."""
        if not self.pull_weight or not self._pull:
            return {}
        return {"pull": self.pull_weight * torch.stack(self._pull).sum()}

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, pools=({self.pool_size_cls}, {self.pool_size_img}) x {self.prompt_length}, "
            f"topk=({self.topk_cls}, {self.topk_img}), role_only={self.role_only}, base={self.base!r}, "
            f"renormalize={self.renormalize}, random_epochs={self.random_epochs}, pull_weight={self.pull_weight}"
        )

