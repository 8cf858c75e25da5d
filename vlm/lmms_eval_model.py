"""``lmms-eval --model vlm``: any vlm backbone (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL), with or
without a visual-token pruner, as an lmms-eval model (``pip install -e ".[eval]"``).

    lmms-eval --model vlm --model_args config=configs/llava/llava15_7b.yaml,pruner=<name>,num_tokens=64 \\
        --tasks pope,textvqa_val --batch_size 8 --output_path runs/lmms

``config`` is a ``vlm test`` YAML (its ``model:`` section is read with vlm's own parser: short
pruner names, ``class_path``/``init_args``; other sections are ignored); several compose left to
right when separated by ``;``. ``pruner`` (a name of ``vlm.pruning.available()`` or ``none``) and
``num_tokens`` override the config's pruner, ``overrides`` takes more ``--model.…`` flags separated
by spaces, ``max_new_tokens`` caps every task's own length. The backbone writes each prompt with its
own chat template (LLaVA: Vicuna v1; Qwen: the processor's), one image placeholder per image of the
request, and answers greedily through :meth:`~vlm.backbones.llava.LlavaBackbone.answer` in batches of
``--batch_size`` requests (in the task's order; answers equal ``vlm test``'s on the same questions,
``tests/lmms/``). Sampling arguments of a task (temperature, beams) are ignored with a warning;
``until`` strings cut the answer after decoding. ``loglikelihood`` is refused, naming the tasks that
need it.

Efficiency, per task (``efficiency`` attribute; printed at the end, and written to
``efficiency_file`` when given; under several processes gathered on every rank first, ``processes`` says how many): mean visual
tokens entering the LLM per request (after an LLM-stage cut: after it), mean prefill ms per batch
(vision + projector + LLM prefill), decode ms per generated token, the mean KV cache at the end of
decoding per request (bytes: layers × 2 × KV heads × head dim × dtype bytes × cached tokens, the
layers before an LLM-stage cut holding the full prompt), and an estimate of the LLM prefill FLOPs
per request (2 × non-embedding parameters × tokens + 2 × layers × hidden × tokens², per side of a
cut; the vision tower is not counted), with the generated tokens (up to and including EOS), the
elapsed generation time (prefill + decode) and tokens per second.

The same numbers go into lmms-eval's own results: rank 0 logs them, after the gather, through
lmms-eval's ``log_metrics`` once per task (``<task>/<metric>`` keys, each task's final numbers, so each
average is the task's number), and the results JSON holds them under ``throughput`` as
``avg_<task>/<metric>`` (``avg_pope/visual_tokens``), with the standard ``total_elapsed_time``,
``total_gen_tokens`` and ``avg_speed`` summed over the tasks and ``avg_latency`` (seconds per request);
lmms-eval prints them as its Throughput Summary.

Several GPUs: ``accelerate launch --num_processes N -m lmms_eval --model vlm …`` (or ``torchrun``);
each process loads the model on ``cuda:LOCAL_RANK`` and lmms-eval splits the documents and gathers
the scores.
"""

from __future__ import annotations

import json
import os
import shlex
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from lmms_eval.api.model import lmms

__all__ = ["VLMLmms", "manifest", "build_eval_module"]

MODEL_ID = "vlm"


def filelock_compat() -> None:
    """lmms-eval 0.7.3's evaluator patches ``filelock._api.FileLockMeta`` (filelock 3.x); filelock 4
    (pinned here, constraints.txt) moved it to ``filelock._core._singleton`` with the same ``__call__``
    signature. Alias the old module name to the new one so the evaluator's patch applies; a no-op on
    filelock 3. Called before the evaluator runs (at import and when the model is built)."""
    import importlib
    import sys
    import types

    try:
        importlib.import_module("filelock._api")
        return
    except ImportError:
        pass
    try:
        import filelock
        from filelock._core import _singleton
    except ImportError:  # neither layout: leave the evaluator's own error
        return
    shim = types.ModuleType("filelock._api")
    shim.FileLockMeta = _singleton.FileLockMeta  # type: ignore[attr-defined]
    shim.BaseFileLock = filelock.BaseFileLock  # type: ignore[attr-defined]
    shim._UNSET_FILE_MODE = getattr(_singleton, "UNSET_FILE_MODE", -1)  # type: ignore[attr-defined]
    sys.modules["filelock._api"] = shim


filelock_compat()


def manifest() -> Any:
    """The entry point of the ``lmms_eval.models`` group (pyproject.toml)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="vlm.lmms_eval_model.VLMLmms")


def build_eval_module(
    configs: Sequence[str], pruner: Optional[str] = None, num_tokens: Optional[int] = None, overrides: Sequence[str] = ()
) -> Any:
    """The ``LlavaEval`` (or any module with ``backbone``, ``hooks``, ``max_new_tokens`` and
    ``prompt_template``) of the composed ``vlm`` configs, its pruner replaced by ``pruner`` at
    ``num_tokens`` when given (the budget is checked against the backbone, as in ``vlm test``). A
    config's integer ``seed_everything`` seeds the process first, as ``vlm test`` does (random weights
    built from a ``config`` are then ``vlm test``'s)."""
    from vlm.kept_picture import build_model

    seed = config_seed(configs)
    if seed is not None:  # as `vlm test` does before it builds the model: the same random weights
        import lightning as L

        L.seed_everything(seed, verbose=False)
    extra: list[str] = []
    if pruner is not None:
        if pruner != "none":
            import vlm.pruning

            if pruner not in vlm.pruning.available():
                raise ValueError(f"unknown pruner {pruner!r}; available: none, {', '.join(vlm.pruning.available())}.")
        extra += ["--model.init_args.pruner", "null"] if pruner == "none" else ["--model.init_args.pruner.class_path", pruner]
    if num_tokens is not None:
        if pruner == "none":
            raise ValueError("num_tokens is a pruner's budget: it needs a pruner, not pruner=none.")
        extra += ["--model.init_args.pruner.init_args.num_tokens", str(int(num_tokens))]
    return build_model(list(configs), extra + list(overrides)).eval()


def config_seed(configs: Sequence[str]) -> Optional[int]:
    """The last integer ``seed_everything`` among the configs (``true``/``false``/absent: None)."""
    import yaml

    seed = None
    for path in configs:
        value = (yaml.safe_load(Path(path).read_text()) or {}).get("seed_everything")
        if isinstance(value, int) and not isinstance(value, bool):
            seed = value
    return seed


class _TaskStats:
    """Per-task sums; ``summary()`` the means."""

    def __init__(self) -> None:
        self.requests = 0
        self.visual_tokens = 0
        self.kv_bytes = 0.0
        self.prefill_flops = 0.0
        self.prefill_s: list[float] = []
        self.decode_s = 0.0
        self.decode_tokens = 0
        self.generated_tokens = 0

    def state(self) -> dict[str, Any]:
        return dict(vars(self))

    def merge(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, getattr(self, key) + value)

    def summary(self) -> dict[str, float]:
        n = max(self.requests, 1)
        elapsed = sum(self.prefill_s) + self.decode_s
        return {
            "requests": self.requests,
            "visual_tokens": self.visual_tokens / n,
            "prefill_ms": 1000.0 * sum(self.prefill_s) / max(len(self.prefill_s), 1),
            "decode_ms_per_token": 1000.0 * self.decode_s / max(self.decode_tokens, 1),
            "kv_cache_mb": self.kv_bytes / n / 2**20,
            "llm_prefill_tflops": self.prefill_flops / n / 1e12,
            "generated_tokens": self.generated_tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": self.generated_tokens / elapsed if elapsed > 0 else 0.0,
        }


class VLMLmms(lmms):
    """Args (``--model_args k=v,…``; lmms-eval adds ``batch_size`` and ``device``):
    config: a ``vlm test`` YAML, or several separated by ``;``.
    pruner, num_tokens: override the config's pruner (``none``: no pruner) and its budget.
    overrides: more ``--model.…`` flags for vlm's parser, separated by spaces.
    max_new_tokens: a cap on every task's ``max_new_tokens`` (default: the task's, else the config's).
    device: ``cuda``/``cpu``/``cuda:1``; default ``cuda:LOCAL_RANK`` when CUDA is there, else ``cpu``.
    efficiency_file: where rank 0 writes the per-task efficiency JSON (the same numbers are logged
    into lmms-eval's results, ``throughput``).
    """

    is_simple = True

    def __init__(
        self,
        config: str,
        pruner: Optional[str] = None,
        num_tokens: Optional[int] = None,
        overrides: str = "",
        max_new_tokens: Optional[int] = None,
        batch_size: int | str = 1,
        device: Optional[str] = None,
        efficiency_file: Optional[str] = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        import torch

        filelock_compat()
        unused = {k: v for k, v in unused.items() if v is not None}
        if unused:
            warnings.warn(f"lmms-eval --model vlm ignores {', '.join(sorted(unused))}.", stacklevel=2)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device in (None, "", "cuda") and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self._device = torch.device(device if device not in (None, "") else "cpu")
        if self._device.type == "cuda" and self._device.index is not None:
            torch.cuda.set_device(self._device)  # NCCL's object collectives use the current device
        configs = [c for c in str(config).split(";") if c]
        self.module = build_eval_module(configs, pruner, num_tokens, shlex.split(overrides or "")).to(self._device)
        self.batch_size = 1 if str(batch_size) == "auto" else int(batch_size)
        self.max_new_tokens_cap = None if max_new_tokens is None else int(max_new_tokens)
        self.efficiency_file = efficiency_file
        self.method_name = getattr(self.module, "method_name", "none")
        self.stats: dict[str, _TaskStats] = defaultdict(_TaskStats)
        self.efficiency: dict[str, dict[str, float]] = {}
        self._shape = _llm_shape(self.module.backbone.model)
        self._warned: set[str] = set()

    @property
    def device(self) -> Any:
        return self._device

    # --- lmms-eval's request types -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        tasks = sorted({str(getattr(r, "task_name", None) or r.args[-2]) for r in requests})
        raise NotImplementedError(
            f"lmms-eval --model vlm answers generate_until tasks only (greedy answers through the backbone's runner); "
            f"loglikelihood is not implemented, and these tasks need it: {', '.join(tasks)}."
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        tasks = sorted({str(getattr(r, "task_name", None)) for r in requests})
        raise NotImplementedError(f"lmms-eval --model vlm has no multi-round generation; needed by: {', '.join(tasks)}.")

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Answers in the requests' order, batched ``batch_size`` at a time among consecutive requests
        of one task and one ``max_new_tokens``."""
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.args[4], self._max_new_tokens(req.args[1]))].append(i)
        for (task, max_new), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, text in zip(chunk, self._answer([requests[i] for i in chunk], task, max_new)):
                    out[i] = text
        self._summarise({task for task, _ in groups})
        return [o if o is not None else "" for o in out]

    # --- internals -----------------------------------------------------------------------------
    def _max_new_tokens(self, gen_kwargs: dict[str, Any]) -> int:
        n = int(gen_kwargs.get("max_new_tokens") or self.module.max_new_tokens)
        return min(n, self.max_new_tokens_cap) if self.max_new_tokens_cap else n

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _visuals(self, req: Any) -> list[Any]:
        from PIL import Image

        _, _, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        flat: list[Any] = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        if not all(isinstance(v, Image.Image) for v in flat):
            kinds = sorted({type(v).__name__ for v in flat if not isinstance(v, Image.Image)})
            raise NotImplementedError(f"lmms-eval --model vlm takes images only; task {task!r} gives {', '.join(kinds)}.")
        return [v.convert("RGB") for v in flat]

    def _answer(self, reqs: list[Any], task: str, max_new_tokens: int) -> list[str]:
        import torch

        contexts = [r.args[0] for r in reqs]
        kwargs = reqs[0].args[1]
        if float(kwargs.get("temperature") or 0) > 0 or kwargs.get("do_sample") or int(kwargs.get("num_beams") or 1) > 1:
            self._warn_once(f"sampling:{task}", f"lmms-eval --model vlm decodes greedily: task {task!r}'s sampling/beam "
                                                "arguments are ignored.")  # fmt: skip
        images = [self._visuals(r) for r in reqs]
        m = self.module
        with torch.inference_mode():
            texts, gen = m.backbone.answer(contexts, images, m.hooks, max_new_tokens, m.prompt_template)
        texts = [_until(t, r.args[1].get("until")) for t, r in zip(texts, reqs)]
        real = [not (getattr(r, "metadata", None) or {}).get("__padding_only__") for r in reqs]
        if any(real):  # rank padding (lmms-eval repeats a request) is not counted
            self._record(task, gen, real)
        return texts

    def _record(self, task: str, gen: Any, real: list[bool]) -> None:
        s = self.stats[task]
        inputs, cut = gen.inputs, gen.inputs.cut
        visual = (inputs.visual_counts if cut is None else cut.visual_counts).tolist()
        full = inputs.attention_mask.sum(-1).tolist()
        after = cut.attention_mask.sum(-1).tolist() if cut is not None else full
        new = _generated_counts(gen.tokens, self.module.backbone)
        layers_before = (cut.layer + 1) if cut is not None else self._shape["layers"]
        for b, keep in enumerate(real):
            if not keep:
                continue
            s.requests += 1
            s.visual_tokens += int(visual[b])
            s.kv_bytes += self._kv_bytes(full[b], after[b], new[b], layers_before)
            s.prefill_flops += self._flops(full[b], after[b], layers_before)
            s.generated_tokens += int(new[b])
        s.prefill_s.append(gen.prefill_s)
        s.decode_s += gen.decode_s
        s.decode_tokens += max(gen.tokens.shape[1] - 1, 0)

    def _kv_bytes(self, full: int, after: int, new: int, layers_before: int) -> float:
        sh = self._shape
        per_token_layer = 2 * sh["kv_heads"] * sh["head_dim"] * sh["bytes"]
        return per_token_layer * (layers_before * (full + new) + (sh["layers"] - layers_before) * (after + new))

    def _flops(self, full: int, after: int, layers_before: int) -> float:
        sh = self._shape
        if sh["params"] is None:
            return 0.0
        per_layer = sh["params"] / sh["layers"]

        def side(n: int, layers: int) -> float:
            return layers * (2.0 * per_layer * n + 2.0 * sh["hidden"] * n * n)

        return side(full, layers_before) + side(after, sh["layers"] - layers_before)

    def _summarise(self, tasks: set[str]) -> None:
        """Gather every rank's per-task sums and the tasks of this call (a collective: every rank calls
        it once per ``generate_until``), then set, print and write ``efficiency``, and log the tasks of
        this call into lmms-eval's throughput metrics (rank 0)."""
        import torch.distributed as dist

        mine = {"stats": {task: s.state() for task, s in self.stats.items()}, "tasks": sorted(tasks)}
        states = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(states, mine)
        merged: dict[str, _TaskStats] = defaultdict(_TaskStats)
        for state in states:
            for task, st in state["stats"].items():
                merged[task].merge(st)
        self.efficiency = {task: {"method": self.method_name, "processes": len(states), **merged[task].summary()}
                           for task in sorted(merged)}
        called = sorted({t for state in states for t in state["tasks"]} & set(self.efficiency))
        if self.rank == 0 and self.efficiency:
            print(efficiency_table(self.efficiency))
            if self.efficiency_file:
                path = Path(self.efficiency_file)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.efficiency, indent=2))
            self._log_throughput(called)

    def _log_throughput(self, tasks: Sequence[str]) -> None:
        """One ``log_metrics`` per task: its generation time, generated tokens and tokens/s in the
        standard fields (lmms-eval sums them over the tasks), its requests (``avg_latency``), and every
        number of ``efficiency[task]`` as ``<task>/<metric>`` (one value each: lmms-eval's
        ``avg_<task>/<metric>`` is the task's number)."""
        from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, log_metrics

        logged = {key.rsplit("/", 1)[0] for entry in get_logged_metrics_history() for key in entry if "/" in key}
        for task in tasks:
            e = self.efficiency[task]
            if task in logged:  # lmms-eval 0.7.3 sends a run's requests in one call: not seen there
                warnings.warn(f"task {task!r} is logged twice in one lmms-eval run: lmms-eval's throughput averages and "
                              f"totals count both logs; efficiency_file has its final numbers.", stacklevel=2)  # fmt: skip
            numbers = {f"{task}/{k}": v for k, v in e.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            log_metrics(total_elapsed_time=e["elapsed_s"], total_gen_tokens=e["generated_tokens"], avg_speed=e["tokens_per_s"],
                        additional_metrics={"total_requests": e["requests"], **numbers})  # fmt: skip


def efficiency_table(eff: dict[str, dict[str, Any]]) -> str:
    cols = ["method", "requests", "visual_tokens", "prefill_ms", "decode_ms_per_token", "kv_cache_mb", "llm_prefill_tflops"]
    rows = ["| task | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for task, e in eff.items():
        cells = [f"{e[c]:.4g}" if isinstance(e[c], float) else str(e[c]) for c in cols]
        rows.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _until(text: str, until: Any) -> str:
    for stop in [until] if isinstance(until, str) else list(until or []):
        if stop:
            text = text.split(stop)[0]
    return text


def _generated_counts(tokens: Any, backbone: Any) -> list[int]:
    """Tokens each sample generated: up to and including its EOS (padding after it is not cached)."""
    eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    counts = []
    for row in tokens.tolist():
        n = len(row)
        for j, t in enumerate(row):
            if t in eos_ids:
                n = j + 1
                break
        counts.append(n)
    return counts


def _llm_shape(model: Any) -> dict[str, Any]:
    """Layers, KV heads, head dim, hidden size, dtype bytes and non-embedding parameters of the LLM."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    lm = getattr(getattr(model, "model", model), "language_model", None)
    params = None
    if lm is not None:
        params = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    return {
        "layers": cfg.num_hidden_layers,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or hidden // heads,
        "hidden": hidden,
        "bytes": next(model.parameters()).element_size(),
        "params": params,
    }
