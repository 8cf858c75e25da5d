"""scripts/compare_pruners.py (vlm.compare) on a tiny random LLaVA: 2 methods x 2 budgets + the
unpruned baseline through `vlm test`, each run's results.json, and report.md's numbers read back
against them; a budget the backbone cannot give is a skipped row; unknown names are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlm import compare as cmp

METHODS, BUDGETS = ["vtc_cls", "random"], [8, 4]


@pytest.fixture(scope="module")
def sweep(tiny_llava_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    runs = cmp.compare([str(tiny_llava_files["model"]), str(tiny_llava_files["data"])], METHODS, BUDGETS, out,
                       log=lambda *_: None)
    return out, runs


def _table(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_every_run_writes_its_own_results(sweep) -> None:
    out, runs = sweep
    assert [r.name for r in runs] == ["none", "vtc_cls_8", "vtc_cls_4", "random_8", "random_4"]
    for r in runs:
        res = json.loads((out / r.name / "results.json").read_text())
        assert res["method"] == r.method and res["dataset"] == "pope"
        assert res["metrics"]["test/visual_tokens"] == (16 if r.budget is None else r.budget)


def test_report_rows_are_the_results(sweep) -> None:
    out, runs = sweep
    header, *rows = _table((out / "report.md").read_text())
    assert header[:2] == ["method", "budget"] and header[-3:] == ["visual tokens", "prefill ms", "speed-up"]
    metrics = [h.removesuffix(" (rel. %)") for h in header[2:-3]]
    assert metrics[0] == "pope_acc" and "pope_f1" in metrics
    assert [(r[0], r[1]) for r in rows] == [("none", "—")] + [(m, str(b)) for m in METHODS for b in BUDGETS]
    base = json.loads((out / "none" / "results.json").read_text())["metrics"]
    base_ms = float(rows[0][-2])
    for row in rows:
        folder = "none" if row[0] == "none" else f"{row[0]}_{row[1]}"
        m = json.loads((out / folder / "results.json").read_text())["metrics"]
        for name, cell in zip(metrics, row[2:-3]):
            value, rel = re.fullmatch(r"([\d.]+) \(([\d.]+)%\)", cell).groups()
            assert float(value) == round(m[f"test/{name}"], 2)
            expect = 100.0 * round(m[f"test/{name}"], 2) / round(base[f"test/{name}"], 2)
            assert float(rel) == pytest.approx(round(expect, 1))
        assert float(row[-3]) == m["test/visual_tokens"]
        ms = float(row[-2])
        assert ms == round(m["test/prefill_ms"], 2)
        assert float(row[-1].removesuffix("x")) == pytest.approx(round(base_ms / ms, 2))  # from the printed ms
    assert rows[0][-1] == "1.00x"


def test_report_png_is_a_png(sweep) -> None:
    from PIL import Image

    out, _ = sweep
    data = (out / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "report.png") as im:
        im.verify()
    assert json.loads((out / "report.json").read_text())["metrics"][0] == "test/pope_acc"


def test_a_budget_that_does_not_fit_is_a_skipped_row(tiny_llava_files, tmp_path: Path) -> None:
    run = cmp.Run("random", 99, tmp_path / "random_99")
    cmp.execute(run, [str(tiny_llava_files["model"]), str(tiny_llava_files["data"])], [])
    assert run.results is None and "num_tokens=99" in run.skipped and "16" in run.skipped
    base = cmp.Run("none", None, tmp_path / "none", results={"metrics": {"test/pope_acc": 50.0, "test/prefill_ms": 3.0,
                                                                        "test/visual_tokens": 16.0}})
    (header, *rows) = _table(cmp.markdown([base, run]))
    assert rows[1][:2] == ["random", "99"] and rows[1][2].startswith("skipped: ") and "num_tokens=99" in rows[1][2]


def test_unknown_method_lists_the_available_ones(capsys) -> None:
    import vlm.pruning

    with pytest.raises(ValueError, match="unknown pruner name.*'nope'.*available: .*vtc_cls"):
        cmp.plan(["vtc_cls", "nope"], [8], Path("unused"))
    with pytest.raises(SystemExit):
        cmp.main(["--config", "x.yaml", "--methods", "nope", "--budgets", "8", "--out", "o"])
    err = capsys.readouterr().err
    assert "nope" in err and all(n in err for n in vlm.pruning.available())
