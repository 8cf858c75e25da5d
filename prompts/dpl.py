"""DPL: Decoupled Prompt Learning (Xu, Zhu, Zhang, Shen, Liao, Chen, Wu, Wang, arXiv 2308.10061).

RECONSTRUCTION. Only the abstract of DPL is public (no full text, no code). What the abstract states, and how it is implemented here:

1. "Attention between prompts and instances (image patches / text tokens) is reformulated as four
   separate sub-processes." With s_j = q.k_j / sqrt(d), instance keys I and prompt keys P, and
   Z_I = sum_{j in I} e^{s_j}, Z_P = sum_{m in P} e^{s_m}, ordinary attention factors exactly as

       Attn(q) = beta(q) A_I(q) + (1 - beta(q)) A_P(q),     beta = Z_I / (Z_I + Z_P),
       A_I = sum_{j in I} softmax_I(s)_j v_j,  A_P = sum_{m in P} softmax_P(s)_m v_m,

   and applying it to instance and prompt queries gives the sub-processes I->I, I->P, P->I, P->P.
   Here that is one :class:`~vlm.kernels.AttnSpec` per block: key groups {0: instance, 1: prompt},
   query groups {0: instance, 1: prompt, 2: instance rows that see no prompt key (e.g. CLIP's SOS
   under the causal mask)}, an ``allow [3, 2]`` matrix that switches each sub-process on or off
   (flags ``i2i, i2p, p2i, p2p``), and ``normalize="segmented"`` (one normaliser per key group,
   recombined by ``segment_gate``). The fused kernel serves it; ``gate="exact"`` (segment_gate
   None, gate_g = Z_g / sum Z) reproduces ordinary attention, which the tests check end to end.
2. "Certain sub-processes can be strengthened by approximation techniques." [INF] The
   approximation is the gate: ``gate="learned"`` (default) replaces the data-dependent beta(q) by
   ``sigmoid(a[layer, head, query group])``, a learned scalar per layer, head and query group
   initialised to ``gate_init`` (0.9: the instance path keeps a fixed, large share, so prompts
   cannot swamp the frozen I->I computation); ``gate="constant"`` fixes it at ``gate_init``.
   Rows whose query group may read only one key group get gate 1 for it (no rescaling).
3. "Language-conditioned textual prompting based on decoupled attention." [INF] In a causal text
   tower (CLIP) the context tokens sit before the class name and never see it. With
   ``text_mode="language_conditioned"`` (default) the prompt rows (CTX) read every valid text token
   up to EOT, class name included (P->I across the causal boundary, P->P among all prompts), while
   instance rows keep exactly CLIP's causal attention. Expressed without a dense mask: ``causal``
   off, ``k_lengths`` = EOT + 1, and a ``row_subset`` bitmask over the instance key group that is
   causal for instance rows and full for prompt rows. ``text_mode="causal"`` keeps the ordinary
   causal mask (bidirectional HF text towers are never causal, so the mode changes nothing there).
   Note: a prompt row's output only matters where it flows on, i.e. into blocks >= ``depth_text``
   (below that depth the next layer's prompts replace it), so the conditioning acts in the blocks
   after the prompt depth (all blocks with ``depth_text=1``).
4. Prompts: multi-modal deep prompts as in IVLP (the abstract: visual, textual and multi-modal
   prompting; no auxiliary loss). [INF] Defaults follow the IVLP recipe of PromptSRC (4 + 4 tokens,
   depth 9, "a photo of a"; SGD lr 0.0025, batch 4, 20 epochs), since DPL's are unknown.

Which sub-processes are strengthened and how, where the gate is applied and whether the text
prompts sit before the class name are not public: each is a flag above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vlm.context import BlockContext, Tower
from vlm.kernels import AttnSpec
from vlm.prompts._deep import is_prompt
from vlm.prompts.ivlp import IVLP
from vlm.prompts.registry import register
from vlm.protocols import tower_runner
from vlm.tokens import TokenState, TokenType, check, kept_first

GATES = ("exact", "constant", "learned")
TEXT_MODES = ("language_conditioned", "causal")
#: Query groups: instance rows, prompt rows, instance rows that see no prompt key.
Q_INSTANCE, Q_PROMPT, Q_NO_PROMPT = 0, 1, 2


def pack_bits(allowed: Tensor) -> Tensor:
    """``[B, Nq, K]`` bool -> int64 ``[B, Nq]`` (K <= 64) or ``[B, Nq, ceil(K/64)]``: bit m of word
    m // 64 set when key m is allowed (AttnSpec.row_subset layout)."""
    b, nq, k = allowed.shape
    words = max(1, math.ceil(k / 64))
    padded = torch.zeros(b, nq, words * 64, dtype=torch.bool, device=allowed.device)
    padded[..., :k] = allowed
    padded = padded.view(b, nq, words, 64).long()
    out = torch.zeros(b, nq, words, dtype=torch.long, device=allowed.device)
    for bit in range(64):
        out |= padded[..., bit] << bit
    return out[..., 0] if words == 1 else out


@register("dpl")
class DPL(IVLP):
    """Decoupled attention between prompts and instances on top of deep V+L prompts.

    Args:
        prompts: IVLP's prompt arguments (``n_ctx_text``, ``n_ctx_vision``, ``depth_text``,
            ``depth_vision``, ``ctx_init``, ``init_std``); the recipe's values are in
            ``configs/experiments/dpl/recipe.yaml``.
        gate: ``"learned"`` | ``"constant"`` | ``"exact"`` (see module doc, item 2).
        gate_init: instance share of the gate (initial value when learned; the value when constant).
        i2i, i2p, p2i, p2p: switch each sub-process on (True) or off.
        text_mode: ``"language_conditioned"`` | ``"causal"`` (item 3).
        decouple: towers whose attention is decoupled (others run ordinary attention).
    """

    def __init__(
        self,
        gate: str = "learned",
        gate_init: float = 0.9,
        i2i: bool = True,
        i2p: bool = True,
        p2i: bool = True,
        p2p: bool = True,
        text_mode: str = "language_conditioned",
        decouple: tuple[str, ...] = ("vision", "text"),
        **prompts: Any,
    ) -> None:
        super().__init__(**prompts)
        if gate not in GATES:
            raise ValueError(f"DPL gate must be one of {GATES}; got {gate!r}.")
        if text_mode not in TEXT_MODES:
            raise ValueError(f"DPL text_mode must be one of {TEXT_MODES}; got {text_mode!r}.")
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"DPL gate_init must lie in (0, 1); got {gate_init}.")
        if not (i2i or i2p) or not (p2i or p2p):
            raise ValueError("DPL: instance and prompt queries must each attend to at least one key group.")
        self.gate, self.gate_init, self.text_mode = gate, gate_init, text_mode
        self.decouple = tuple(decouple)
        rows = ((bool(i2i), bool(i2p)), (bool(p2i), bool(p2p)), (bool(i2i), False))
        self._allow_rows = rows  # the same on the host: the gate table reads it without a device sync
        self.register_buffer("allow", torch.tensor(rows, dtype=torch.bool), persistent=False)
        self.gate_logits = nn.ParameterDict()

    def build(self, backbone: Any) -> None:
        """IVLP prompts, plus one gate logit per layer, head and query group when ``gate="learned"``."""
        super().build(backbone)
        self.gate_logits = nn.ParameterDict()
        if self.gate != "learned":
            return
        ref = self.ctx
        logit = math.log(self.gate_init / (1.0 - self.gate_init))
        for tower in self.decouple:
            if tower not in self.towers:
                continue
            runner = tower_runner(backbone, Tower(tower), "DPL")
            shape = (int(runner.num_layers), int(runner.heads), 2)
            self.gate_logits[tower] = nn.Parameter(torch.full(shape, logit, dtype=ref.dtype, device=ref.device))

    # --- the spec ------------------------------------------------------------------------------
    def _gate_table(self, tower: str, layer: int, heads: int, ref: Tensor) -> Optional[Tensor]:
        """``[H, 3, 2]`` gate per head, query group and key group; ``None`` for the exact gate."""
        if self.gate == "exact":
            return None
        if self.gate == "learned":
            g = torch.sigmoid(self.gate_logits[tower][layer]).to(ref.dtype)  # [H, 2]
        else:
            g = torch.full((heads, 2), self.gate_init, dtype=ref.dtype, device=ref.device)
        allow = self._allow_rows
        rows = []
        for qg in (Q_INSTANCE, Q_PROMPT, Q_NO_PROMPT):
            both = all(allow[qg])
            gi = g[:, min(qg, 1)] if both else torch.full_like(g[:, 0], float(allow[qg][0]))
            rows.append(torch.stack([gi, 1.0 - gi if both else torch.full_like(gi, float(allow[qg][1]))], dim=-1))
        return torch.stack(rows, dim=1)

    @dataclass
    class PassState:
        """Facts fixed for a pass (prompt slots are replaced, never added or removed): whether the
        tower has prompt tokens, and the text tower's count of instance keys."""

        has_prompts: Optional[bool] = None
        instance_keys: Optional[int] = None

    def attention_spec(self, ctx: BlockContext, state: TokenState, spec: AttnSpec) -> AttnSpec:
        """Decoupled attention for this block (module doc, items 1-3)."""
        tower, layer = ctx.tower.value, ctx.layer
        if tower not in self.decouple:
            return spec
        if spec.q_groups is not None or spec.normalize != "softmax":
            raise ValueError(f"DPL: another hook already set a structured attention spec for {tower} layer {layer}.")
        types = state.batch_types
        prompt_k = is_prompt(types)  # [B, Nk]
        st = ctx.state(self)
        if st.has_prompts is None:  # prompt slots are replaced, never added or removed, within a pass
            st.has_prompts = bool(prompt_k.any())  # sync: once per pass
        if not st.has_prompts:
            return spec
        b, nk = prompt_k.shape
        pos = torch.arange(nk, device=types.device)
        q_groups = torch.where(prompt_k, Q_PROMPT, Q_INSTANCE)
        if spec.causal:
            first_prompt = torch.where(prompt_k, pos, nk).amin(1, keepdim=True)  # [B, 1]
            q_groups = torch.where(~prompt_k & (pos < first_prompt), Q_NO_PROMPT, q_groups)
        if state.kv_only is not None:  # sync: key/value-only tokens have no query row (a shape)
            q_groups = q_groups[:, ~state.kv_only]
        k_groups = prompt_k.long()
        gate = self._gate_table(tower, layer, ctx.block.heads, state.x)
        if gate is not None:
            gate = gate[:, q_groups].permute(1, 0, 2, 3)  # [B, H, Nq, 2]
        spec = spec.replace(q_groups=q_groups, k_groups=k_groups, allow=self.allow, normalize="segmented", segment_gate=gate)
        if spec.causal and tower == "text" and self.text_mode == "language_conditioned":
            spec = self._language_conditioned(spec, types, prompt_k, st)
        return spec

    def _language_conditioned(self, spec: AttnSpec, types: Tensor, prompt_k: Tensor, st: "DPL.PassState") -> AttnSpec:
        """Causal for instance rows, and prompt rows reading every token up to EOT (item 3)."""
        b, n = types.shape
        if spec.q_groups.shape[1] != n:
            raise ValueError("DPL language-conditioned text prompting does not support key/value-only text tokens.")
        pos = torch.arange(n, device=types.device)
        is_eot = types == int(TokenType.EOT)
        check(is_eot.any(1), "DPL language-conditioned text prompting needs an EOT token in every text sequence.")
        lengths = is_eot.int().argmax(1) + 1
        if spec.k_lengths is not None:
            lengths = torch.minimum(lengths, spec.k_lengths.to(lengths.device))
        if st.instance_keys is None:  # the text tower keeps its tokens: the count is fixed for the pass
            st.instance_keys = int((~prompt_k[0]).sum())  # sync: once per pass
        inst_order = kept_first(~prompt_k, st.instance_keys)  # instance keys in order
        inst_pos = torch.gather(pos.expand(b, n), 1, inst_order)  # [B, K_inst]
        causal = inst_pos[:, None, :] <= pos[None, :, None]  # [B, Nq, K_inst]
        rows_are_prompts = prompt_k[:, :, None]
        allowed = causal | rows_are_prompts
        return spec.replace(causal=False, k_lengths=lengths, subset_group=0, row_subset=pack_bits(allowed))

    def extra_repr(self) -> str:
        a = self.allow
        subs = ",".join(n for n, on in zip(("i2i", "i2p", "p2i", "p2p"), (a[0, 0], a[0, 1], a[1, 0], a[1, 1])) if bool(on))
        return f"{super().extra_repr()}, gate={self.gate!r}, gate_init={self.gate_init}, sub_processes={subs}, text_mode={self.text_mode!r}"
