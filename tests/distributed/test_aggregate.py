"""scripts/reproduce/aggregate.py: mean ± 95 % CI per dataset, HM of the averaged base and new."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.distributed.helpers import REPO


def _aggregate_module():
    spec = importlib.util.spec_from_file_location("vlm_aggregate", REPO / "scripts" / "reproduce" / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_papers_convention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agg = _aggregate_module()
    runs = {("pets", 1): (90.0, 70.0), ("pets", 2): (92.0, 72.0), ("pets", 3): (94.0, 74.0), ("sat", 1): (60.0, 40.0)}
    for (ds, seed), (base, new) in runs.items():
        d = tmp_path / ds / f"seed{seed}"
        d.mkdir(parents=True)
        metrics = {"test/acc_base": base, "test/acc_new": new, "test/hm": 0.0}
        (d / "results.json").write_text(json.dumps({"metrics": metrics, "seed": seed, "method": "coop", "dataset": ds}))
    table = agg.aggregate(agg.load([tmp_path]))["coop"]
    mean, ci, n = table["datasets"]["pets"]["base"]
    assert (mean, n) == (92.0, 3) and ci == pytest.approx(1.96 * 2.0 / 3**0.5, rel=1e-9)  # Dassl: 1.96 std / sqrt(n)
    assert table["datasets"]["sat"]["base"] == (60.0, 0.0, 1)
    assert table["average"]["base"] == 76.0 and table["average"]["new"] == 56.0
    assert table["average"]["hm"] == pytest.approx(2 * 76 * 56 / 132)  # HM of the averages
    assert table["average"]["hm"] != pytest.approx((table["datasets"]["pets"]["hm"][0] + table["datasets"]["sat"]["hm"][0]) / 2)
    agg.main([str(tmp_path)])
    assert "92.00 ± 2.26 (n=3)" in capsys.readouterr().out
