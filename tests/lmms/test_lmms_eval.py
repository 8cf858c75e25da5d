"""`lmms-eval --model vlm` end to end, offline: the tiny task of tests/lmms/tasks (5 questions, one
about two images; loaded through `--include_path`), a tiny random LLaVA, and the same data through
`vlm predict` / `vlm test`. Per sample, lmms-eval's answers are `vlm`'s, with and without a pruner;
its score and the visual tokens it reports are `vlm test`'s, in `efficiency_file` and in lmms-eval's own
results (`throughput`, logged by the model through lmms-eval's `log_metrics`).

Skipped without lmms-eval (`pip install -e ".[eval]"`: not in `dev`, nor in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lmms_eval")

from tests.distributed.helpers import REPO, base_env  # noqa: E402
from tests.lmms.tiny import TASK, TASKS, save_newline_processor, task_docs, write_vlm_config, write_vqa_files  # noqa: E402

PRUNER = {"class_path": "vtc_cls", "init_args": {"num_tokens": 8}}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lmms")
    write_vqa_files(root)
    save_newline_processor(root / "processor")
    return root


def vlm_reference(data: Path, name: str, pruner: dict | None) -> dict:
    """`vlm predict` answers and `vlm test` results of the tiny model on the task's files."""
    from vlm.runtime.cli import main

    root = data / name
    root.mkdir()
    for f in data.iterdir():
        if f.suffix in (".png", ".jsonl"):
            (root / f.name).symlink_to(f)
    (root / "processor").symlink_to(data / "processor")
    config = write_vlm_config(root, pruner)
    main(["predict", "--config", str(config)])
    main(["test", "--config", str(config)])
    answers = [json.loads(x) for x in (root / "run" / "predictions.jsonl").read_text().splitlines()]
    return {"config": config, "answers": {a["question_id"]: a["text"] for a in answers},
            "metrics": json.loads((root / "run" / "results.json").read_text())["metrics"]}  # fmt: skip


def by_doc(samples: list[dict]) -> dict[int, str]:
    docs = task_docs()
    out = {}
    for s in samples:
        resp = s["filtered_resps"] if "filtered_resps" in s else s["resps"]
        while isinstance(resp, list):
            resp = resp[0]
        out[docs[s["doc_id"]]["question_id"]] = resp
    return out


def check_agreement(ref: dict, answers: dict[int, str], score: float, efficiency: dict) -> None:
    assert answers == ref["answers"]  # every sample, the multi-image one included
    assert len(set(answers.values())) > 1  # the answers differ: the comparison has teeth
    assert score == pytest.approx(ref["metrics"]["test/pope_acc"] / 100)
    assert efficiency["requests"] == len(task_docs())
    assert efficiency["visual_tokens"] == pytest.approx(ref["metrics"]["test/visual_tokens"])  # logged as float32
    assert efficiency["prefill_ms"] > 0 and efficiency["kv_cache_mb"] > 0 and efficiency["llm_prefill_tflops"] > 0


def check_throughput(throughput: dict, efficiency: dict) -> None:
    """lmms-eval's `throughput` holds the task's efficiency numbers: each as `avg_<task>/<metric>`, and
    (one task) its generation time, generated tokens and tokens/s as the standard fields."""
    numbers = {k: v for k, v in efficiency.items() if k != "method"}
    prefix = f"avg_{TASK}/"
    assert {k[len(prefix):]: v for k, v in throughput.items() if k.startswith(prefix)} == pytest.approx(numbers, rel=1e-12)
    assert 0 < throughput["total_gen_tokens"] == efficiency["generated_tokens"] <= 4 * len(task_docs())  # max_new_tokens 4
    assert throughput["total_elapsed_time"] == pytest.approx(efficiency["elapsed_s"], rel=1e-12) and efficiency["elapsed_s"] > 0
    assert throughput["avg_speed"] == pytest.approx(efficiency["tokens_per_s"], rel=1e-12)
    assert throughput["avg_latency"] == pytest.approx(efficiency["elapsed_s"] / len(task_docs()), rel=1e-12)


def test_lmms_eval_command_answers_as_vlm_predict(data: Path, tmp_path: Path) -> None:
    """The `lmms-eval` command (the `vlm` model found through its entry point), no pruner."""
    ref = vlm_reference(data, "plain", None)
    out, eff = tmp_path / "out", tmp_path / "efficiency.json"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vlm", "--model_args", f"config={ref['config']},efficiency_file={eff}",
           "--tasks", TASK, "--include_path", str(TASKS), "--batch_size", "2", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = base_env({"LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (samples_file,) = out.rglob(f"*samples_{TASK}.jsonl")
    (results_file,) = out.rglob("*_results.json")
    samples = [json.loads(x) for x in samples_file.read_text().splitlines()]
    results = json.loads(results_file.read_text())
    efficiency = json.loads(eff.read_text())[TASK]
    assert efficiency["method"] == "none" and efficiency["visual_tokens"] == (4 * 16 + 2 * 16) / 5
    check_agreement(ref, by_doc(samples), results["results"][TASK]["pope_acc,none"], efficiency)
    check_throughput(results["throughput"], efficiency)  # lmms-eval's own results JSON: the file's numbers
    assert results["throughput"][f"avg_{TASK}/visual_tokens"] == pytest.approx(ref["metrics"]["test/visual_tokens"])


def test_simple_evaluate_with_a_pruner_answers_as_vlm_test(data: Path) -> None:
    """`simple_evaluate` on a `VLMLmms` instance built with `pruner=vtc_cls,num_tokens=8` over the
    unpruned config equals `vlm` with the pruner in its config, efficiency numbers included."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlm.lmms_eval_model import VLMLmms

    ref = vlm_reference(data, "pruned", PRUNER)
    model = VLMLmms(config=str(write_vlm_config(data, None)), pruner="vtc_cls", num_tokens=8, batch_size=2)
    results = simple_evaluate(model=model, tasks=[TASK], batch_size=2, log_samples=True,
                              task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))  # fmt: skip
    assert results is not None
    efficiency = model.efficiency[TASK]
    assert efficiency["method"] == "vtc_cls" and efficiency["visual_tokens"] == (4 * 8 + 2 * 8) / 5
    check_agreement(ref, by_doc(results["samples"][TASK]), results["results"][TASK]["pope_acc,none"], efficiency)
    check_throughput(results["throughput"], efficiency)


def test_throughput_keeps_tasks_apart() -> None:
    """Two tasks logged as the model logs them (one `log_metrics` each): lmms-eval's summary has each
    task's numbers under its own keys, and the standard fields summed over both."""
    from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics

    from vlm.lmms_eval_model import VLMLmms

    eff = {"pope": {"method": "vtc_cls", "requests": 4, "visual_tokens": 64.0, "prefill_ms": 10.0, "generated_tokens": 8,
                    "elapsed_s": 2.0, "tokens_per_s": 4.0},
           "gqa": {"method": "vtc_cls", "requests": 6, "visual_tokens": 32.5, "prefill_ms": 30.0, "generated_tokens": 30,
                   "elapsed_s": 3.0, "tokens_per_s": 10.0}}  # fmt: skip
    model = SimpleNamespace(efficiency=eff)
    reset_logged_metrics()
    try:
        VLMLmms._log_throughput(model, ["gqa", "pope"])  # type: ignore[arg-type]
        summary = summarize_logged_metrics()
        with pytest.warns(UserWarning, match="'pope' is logged twice"):
            VLMLmms._log_throughput(model, ["pope"])  # type: ignore[arg-type]
    finally:
        reset_logged_metrics()
    for task, numbers in eff.items():
        assert {k: summary[f"avg_{task}/{k}"] for k in numbers if k != "method"} == {k: v for k, v in numbers.items() if k != "method"}
    assert summary["total_gen_tokens"] == 38 and summary["total_elapsed_time"] == 5.0
    assert summary["avg_speed"] == 38 / 5.0 and summary["avg_latency"] == 5.0 / 10


def test_loglikelihood_is_refused_naming_the_tasks(data: Path) -> None:
    from vlm.lmms_eval_model import VLMLmms

    model = VLMLmms(config=str(write_vlm_config(data, None)), pruner="vtc_cls", num_tokens=8)
    assert model.method_name == "vtc_cls"
    reqs = [SimpleNamespace(task_name=t, args=("ctx", " A")) for t in ("seedbench", "mmbench_en", "seedbench")]
    with pytest.raises(NotImplementedError, match=r"loglikelihood is not implemented.*need it: mmbench_en, seedbench"):
        model.loglikelihood(reqs)


def test_unknown_pruner_is_refused_with_the_list(data: Path) -> None:
    from vlm.lmms_eval_model import build_eval_module

    with pytest.raises(ValueError, match=r"unknown pruner 'nope'; available: none, .*vtc_cls"):
        build_eval_module([str(write_vlm_config(data, None))], pruner="nope")


def test_two_processes_answer_each_sample_once(data: Path, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 -m lmms_eval --model vlm`, the GPU command, on a
    machine without GPUs: two CPU processes (gloo; accelerate's `--cpu` would start one). lmms-eval
    splits the documents over the ranks; every sample is answered once, as one process answers it, and
    the score and the efficiency numbers gathered from both ranks are the one-process ones."""
    ref = vlm_reference(data, "two_procs", PRUNER)
    out, eff = tmp_path / "out", tmp_path / "efficiency.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval", "--model", "vlm",
           "--model_args", f"config={ref['config']},efficiency_file={eff}", "--tasks", TASK, "--include_path", str(TASKS),
           "--batch_size", "2", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = base_env({"LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_DATASETS_OFFLINE": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    (samples_file,) = out.rglob(f"*samples_{TASK}.jsonl")
    (results_file,) = out.rglob("*_results.json")
    samples = [json.loads(x) for x in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(task_docs())))  # each sample once
    efficiency = json.loads(eff.read_text())[TASK]
    assert efficiency["method"] == "vtc_cls" and efficiency["processes"] == 2  # gathered from both ranks
    results = json.loads(results_file.read_text())
    check_agreement(ref, by_doc(samples), results["results"][TASK]["pope_acc,none"], efficiency)
