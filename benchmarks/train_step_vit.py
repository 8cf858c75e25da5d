"""Train-step time of TCPA and KTPP against VPT-deep on a ViT-B/16-sized timm ViT (random weights).

Usage::

    python benchmarks/train_step_vit.py                  # GPU: batch 64, bf16 autocast
    python benchmarks/train_step_vit.py --cpu --batch 2  # CPU smoke run (slow: reference attention)

Each method runs the full step a prompt learner trains with: frozen backbone forward with the
learner's hooks, linear head, cross-entropy (+ the learner's own losses), backward into the
learned tensors only, AdamW step. Settings are the papers' defaults: VPT-deep 10 tokens; TCPA
(VFPT base) pools 18 + 18, top-k 10, matched selection (post warm-up); KTPP three stages
(k = 75 / 50 / 25 % of keys), mean-token context, pyramid prompts from 5 class embeddings of
width 512. Attention goes through ``vlm.kernels.attention``, so on CUDA TCPA and KTPP use the
fused kernel where it supports the call, and VPT the plain path. Reported: median ms per step
and images per second, with peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from vlm.backbones import ViTBackbone
from vlm.prompts import PromptLearner
from vlm.prompts.ktpp import KTPP
from vlm.prompts.tcpa import TCPA
from vlm.prompts.vpt import VPT


def learners() -> dict[str, Callable[[], PromptLearner]]:
    return {
        "vpt_deep": lambda: VPT(num_tokens=10, deep=True, dropout=0.1),
        "tcpa": lambda: TCPA(random_epochs=0),
        "ktpp": lambda: KTPP(text_dim=512),
    }


def time_method(name: str, backbone: ViTBackbone, batch: int, steps: int, warmup: int, amp: bool) -> dict[str, float]:
    """Median step time (ms) of one learner on ``backbone``."""
    device = next(backbone.parameters()).device
    learner = learners()[name]()
    learner.build(backbone)
    learner.train()
    if isinstance(learner, KTPP):
        learner.set_class_text(F.normalize(torch.randn(5, 512, device=device), dim=-1))
    head = torch.nn.Linear(backbone.num_features, 100).to(device)
    params = [p for p in learner.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(backbone.encode_image(images, [learner]))
            loss = F.cross_entropy(logits.float(), labels)
            loss = loss + sum(learner.losses({"logits": logits}, {"label": labels}, backbone).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    out = {"ms": ms, "img_s": batch / ms * 1e3}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (fp32)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(learners()))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_base_patch16_224", pretrained=False).to(device)
    amp = device.type == "cuda"
    print(f"device={device} batch={a.batch} amp_bf16={amp} model=vit_base_patch16_224 (197 tokens, D=768, 12 heads)")
    base = None
    for name in a.methods:
        r = time_method(name, backbone, a.batch, a.steps, a.warmup, amp)
        base = base or r["ms"]
        mem = f"  peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        print(f"{name:>9}: {r['ms']:8.1f} ms/step  {r['img_s']:8.1f} img/s  x{r['ms'] / base:.2f} vs {a.methods[0]}{mem}")


if __name__ == "__main__":
    main()
