"""DDP on CPU (gloo): 2 processes train the same prompts and report the same metrics as 1 process.

Both runs use one YAML and the same global batch (1 x 6 vs 2 x 3). Training sees identical
samples per step (DistributedSampler's permutation, split across ranks) and deterministic
transforms, and DDP averages the per-rank mean gradients, so the prompts agree up to float
reduction order. Evaluation uses an unpadded per-rank sampler: with an odd test set each sample
is still evaluated exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.distributed.helpers import base_env, run_cli, toy_data, write_config

PROMPT_ATOL = 1e-5  # reached: max |delta ctx| = 2.1e-7 (|ctx| <= 0.17), torch 2.14 CPU, gloo fp32 all-reduce


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = toy_data(tmp / "toy")
    results = {}
    for world, per_rank_batch in ((1, 6), (2, 3)):
        d = tmp / f"w{world}"
        d.mkdir()
        cfg = write_config(d, data, batch_size=per_rank_batch)
        args = ["--config", str(cfg), "--trainer.devices", str(world), "--trainer.callbacks+=vlm.runtime.callbacks.BaseNewReport"]
        results[world] = run_cli(d / "out.json", args, base_env(), timeout=180)
    return results


def test_two_processes_train_the_same_prompts(runs: dict[int, dict]) -> None:
    one, two = runs[1], runs[2]
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["global_step"] == two["global_step"] == 2  # 6 base-class shots / global batch 6, 2 epochs
    assert list(one["learned"]) == list(two["learned"]) == ["prompt_learner.ctx"]
    a, b = one["learned"]["prompt_learner.ctx"], two["learned"]["prompt_learner.ctx"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= PROMPT_ATOL
    assert max(abs(x) for x in a) > 0


def test_two_processes_report_the_same_metrics(runs: dict[int, dict]) -> None:
    one, two = runs[1]["metrics"], runs[2]["metrics"]
    assert set(one) == set(two) == {"test/acc_base", "test/acc_new", "test/hm"}
    assert two == pytest.approx(one, abs=1e-6)


def test_base_new_report_counts_every_rank_once(runs: dict[int, dict]) -> None:
    """BaseNewReport evaluates on the sharded test loaders and sums the counts over ranks: two
    processes give the one-process table, and its tuned row is what `trainer.test` measured."""
    one, two = runs[1]["base_new_report"], runs[2]["base_new_report"]
    assert list(one) == list(two) == ["zero-shot CLIP", "tuned (coop)"]
    for row in one:
        assert two[row] == pytest.approx(one[row], abs=1e-6)
    tuned, metrics = two["tuned (coop)"], runs[2]["metrics"]
    assert [tuned["base"], tuned["new"], tuned["hm"]] == pytest.approx(
        [metrics["test/acc_base"], metrics["test/acc_new"], metrics["test/hm"]], abs=1e-4
    )


def test_evaluation_counts_every_sample_once(runs: dict[int, dict]) -> None:
    expected = {"0": 7, "1": 6}  # base test set (odd) and new test set
    for world in (1, 2):
        per_rank = runs[world]["indices_per_rank"]
        assert len(per_rank) == world
        for loader, n in expected.items():
            counted = Counter(i for rank in per_rank for i in rank.get(loader, []))
            assert sorted(counted) == list(range(n)) and set(counted.values()) == {1}


def test_two_processes_resume_mid_epoch_bitwise(tmp_path: Path) -> None:
    """2 ranks x batch 1 over 6 shots (3 steps an epoch, 2 epochs) with random crop + flip: stopped
    after step 4 (inside epoch 2) and resumed from last.ckpt, they end on the uninterrupted prompts."""
    data = toy_data(tmp_path / "toy")
    cfg = write_config(tmp_path, data, batch_size=1)
    every_step = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
                  "--trainer.callbacks.save_last=true", "--trainer.deterministic=true",
                  "--data.init_args.transforms.train=[random_resized_crop, random_flip, normalize]"]  # fmt: skip

    def fit(name: str, extra: list[str]) -> dict:
        run = tmp_path / name
        args = ["--config", str(cfg), "--trainer.devices", "2", "--trainer.default_root_dir", str(run),
                *every_step, "--trainer.callbacks.dirpath", str(run / "ckpt")]  # fmt: skip
        return run_cli(run.with_suffix(".json"), args, base_env(), timeout=180, extra=["--no-test", *extra])

    whole = fit("whole", [])
    stopped = fit("stopped", ["--stop-at-step", "4"])
    assert stopped["global_step"] == 4 and whole["global_step"] == 6
    resumed = fit("resumed", ["--ckpt_path", str(tmp_path / "stopped" / "ckpt" / "last.ckpt")])
    assert resumed["start_step"] == 4 and resumed["global_step"] == 6
    assert resumed["learned"] == whole["learned"]
