"""Training-step throughput of prompt learners against the plain frozen forward.

Reports images/s of one optimisation step (forward, loss, backward, SGD step) for CoOp and
VPT-deep on a CLIP of ViT-B/16 size (random weights, no download), and each as a ratio of the
frozen, prompt-free forward (``encode_image`` + cached class features, no grad)::

    python benchmarks/train_step.py                 # CPU defaults: batch 8, 3 timed steps
    python benchmarks/train_step.py --device cuda --batch 64 --steps 20 --precision bf16

Numbers depend on the machine; report them with the device name.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F

from vlm.backbones import ClipBackbone
from vlm.modules import CLIPClassifier
from vlm.prompts import create


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model config (random init)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    device = torch.device(a.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    torch.manual_seed(0)
    classnames = [f"class {i}" for i in range(a.num_classes)]
    images = torch.randn(a.batch, 3, 224, 224, device=device)
    labels = torch.randint(a.num_classes, (a.batch,), device=device)

    def make(learner_name: str | None, **kw) -> CLIPClassifier:
        bb = ClipBackbone(a.model)
        learner = create(learner_name, **kw) if learner_name else None
        return CLIPClassifier(bb, learner, classnames=classnames).to(device)

    frozen = make(None)

    @torch.no_grad()
    def frozen_forward() -> None:
        with autocast:
            frozen(images)

    results = {"frozen forward": timed(frozen_forward, a.steps, a.warmup, device)}
    for label, name, kw in (("CoOp (16 ctx) step", "coop", {"n_ctx": 16}), ("VPT-deep (10 tok) step", "vpt", {"num_tokens": 10, "deep": True})):
        model = make(name, **kw)
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3)

        def step(model: CLIPClassifier = model, opt: torch.optim.Optimizer = opt) -> None:
            with autocast:
                loss = F.cross_entropy(model(images)["logits"].float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[label] = timed(step, a.steps, a.warmup, device)
        del model, opt

    base = a.batch / results["frozen forward"]
    print(f"device: {device_name(device)}; model {a.model} random init; batch {a.batch}; {a.num_classes} classes; {a.precision}")
    print(f"{'':26s} {'images/s':>10s} {'vs frozen fwd':>14s}")
    for label, seconds in results.items():
        ips = a.batch / seconds
        print(f"{label:26s} {ips:10.2f} {ips / base:13.3f}x")


if __name__ == "__main__":
    main()
