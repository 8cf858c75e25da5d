"""Training-step throughput of prompt learners against the plain frozen forward.

Reports images/s of one optimisation step (forward, loss, backward, SGD step) for CoOp and
VPT-deep on a CLIP of ViT-B/16 size (random weights, no download), and each as a ratio of the
frozen, prompt-free forward (``encode_image`` + cached class features, no grad)::

    python benchmarks/train_step.py                       # CPU defaults: batch 8, 3 timed rounds
    python benchmarks/train_step.py --full-text           # + the same steps with the text tower at 77
    python benchmarks/train_step.py --device cuda --batch 64 --steps 20 --precision bf16

Rows:
  * CoOp re-encodes every class prompt through the text tower at each step (as CoOp does). The
    text tower runs only up to the longest prompt (``ClipBackbone(trim_text=True)``, exact);
    ``--full-text`` adds the same step at the full context length, as open_clip runs it.
  * VPT-deep backpropagates through the whole image tower; its frozen class features are
    computed once per class set (``CLIPClassifier`` caches them). The "re-encoded" row encodes
    them again at every step, as the official VPT/TCPA/DAPT code carries its text tower along
    (with ``--full-text`` also at the full context length).

All cases share one frozen backbone and are timed round-robin (one step of each case per round).
Each ratio is taken within a round (the two calls ran back to back) and the median over rounds is
reported with its range, so load from other processes that drifts between rounds cancels. Numbers
depend on the machine; report them with the device.
"""

from __future__ import annotations

import argparse
import platform
import statistics
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


class ReencodingClassifier(CLIPClassifier):
    """A classifier that encodes the frozen class features again at every forward (no cache)."""

    def class_features(self, classnames: list[str]) -> torch.Tensor:
        self._text_cache.clear()
        return super().class_features(classnames)


def time_round_robin(cases: dict[str, Callable[[], None]], steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every timed call of each case, one call of every case per round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + steps):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``num[r] / den[r]``: both calls of a round ran back to
    back, so a load change between rounds cancels in the ratio."""
    ratios = sorted(n / d for n, d in zip(num, den))
    return statistics.median(ratios), ratios[0], ratios[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16", help="open_clip model config (random init)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--full-text", action="store_true", help="also run the text tower at the full context length (before trimming)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")
    torch.manual_seed(0)
    classnames = [f"class {i}" for i in range(a.num_classes)]
    images = torch.randn(a.batch, 3, 224, 224, device=device)
    labels = torch.randint(a.num_classes, (a.batch,), device=device)
    backbone = ClipBackbone(a.model).to(device)  # frozen, shared by every case

    def make(learner_name: str | None, cls: type[CLIPClassifier] = CLIPClassifier, **kw) -> CLIPClassifier:
        learner = create(learner_name, **kw) if learner_name else None
        return cls(backbone, learner, classnames=classnames).to(device)

    def forward_case(model: CLIPClassifier) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            backbone.text.trim = True
            with autocast:
                model(images)

        return run

    def step_case(model: CLIPClassifier, trim: bool) -> Callable[[], None]:
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3)

        def run() -> None:
            backbone.text.trim = trim
            with autocast:
                loss = F.cross_entropy(model(images)["logits"].float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    coop = make("coop", n_ctx=16)
    vpt = make("vpt", num_tokens=10, deep=True)
    vpt_reencode = make("vpt", ReencodingClassifier, num_tokens=10, deep=True)
    cases = {"frozen forward": forward_case(make(None)), "CoOp (16 ctx) step": step_case(coop, True)}
    if a.full_text:
        cases["CoOp (16 ctx) step, text at 77"] = step_case(coop, False)
    cases["VPT-deep (10 tok) step"] = step_case(vpt, True)
    cases["VPT-deep, text re-encoded"] = step_case(vpt_reencode, True)
    if a.full_text:
        cases["VPT-deep, re-encoded at 77"] = step_case(vpt_reencode, False)
    tokens = coop.prompt_learner.text_inputs(classnames).tokens
    times = time_round_robin(cases, a.steps, a.warmup, device)
    backbone.text.trim = True

    frozen = times["frozen forward"]
    print(f"device: {device_name(device)}; model {a.model} random init; batch {a.batch}; {a.num_classes} classes; {a.precision}")
    print(f"CoOp prompts: {backbone.text.prefix_length(tokens)} of {tokens.shape[1]} text positions; {a.steps} rounds")
    print("images/s: median over rounds; vs frozen fwd: median [min, max] over rounds of the ratio within a round")
    print(f"{'':32s} {'images/s':>10s}   vs frozen fwd [min, max]")
    for label, t in times.items():
        med, lo, hi = paired_ratio(frozen, t)
        print(f"{label:32s} {a.batch / statistics.median(t):10.2f} {med:12.3f}x [{lo:.3f}, {hi:.3f}]")

    def speedup(label: str, slow: str, fast: str) -> None:
        med, lo, hi = paired_ratio(times[slow], times[fast])
        print(f"{label}: {med:.2f}x faster [{lo:.2f}, {hi:.2f}]")

    if a.full_text:
        speedup("CoOp step, trimmed vs text at 77", "CoOp (16 ctx) step, text at 77", "CoOp (16 ctx) step")
        speedup("VPT-deep, cached vs re-encoded at 77", "VPT-deep, re-encoded at 77", "VPT-deep (10 tok) step")
    speedup("VPT-deep, cached vs re-encoded (trimmed)", "VPT-deep, text re-encoded", "VPT-deep (10 tok) step")

if __name__ == "__main__":
    main()
