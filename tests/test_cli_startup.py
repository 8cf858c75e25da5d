"""Issue 24 item 7: the `vlm` entry point imports nothing heavy, `vlm --help` answers without
Lightning, `vlm <subcommand> --help` is kept after the first time, and `vlm fit --help` lists vlm's
options (model, data, our own) before Lightning's trainer options. Times: benchmarks/cli_startup.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.runtime import help_cache
from vlm.runtime.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers", "triton", "open_clip", "timm", "jsonargparse")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(__import__('json').dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_entry_point_imports_no_heavy_library() -> None:
    """`vlm = vlm.runtime.cli:main`: importing it must not import transformers or triton (nor torch,
    Lightning, open_clip or timm, which the old module imported at its top through Lightning)."""
    assert _imported_after("import vlm.runtime.cli") == []


def test_vlm_help_imports_no_heavy_library() -> None:
    code = "from vlm.runtime.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert _imported_after(code) == []


def test_export_help_text_is_the_exporters() -> None:
    """`vlm --help` shows export's line without importing the exporter (it imports Lightning)."""
    from vlm.runtime.export import EXPORT_HELP

    assert SUBCOMMANDS["export"] == EXPORT_HELP


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VLM_HELP_CACHE", raising=False)
    return tmp_path / "cache" / "vlm" / "help"


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    return capsys.readouterr().out


def test_fit_help_lists_vlm_options_before_the_trainers(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["fit", "--help"], capsys)
    first_trainer = text.index("--trainer.accelerator ACCELERATOR\n")
    for ours in ("--model CONFIG", "--data CONFIG", "--allow_untrained"):
        assert text.index(ours) < first_trainer, ours
    assert "vlm.modules.CLIPClassifier" in text and "vlm.datamodules.FewShotDataModule" in text, "known subclasses listed"


def test_subcommand_help_is_served_from_the_cache_after_the_first_time(
    cache: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _help(["test", "--help"], capsys)
    assert len(list(cache.glob("*.txt"))) == 1 and "--ckpt_path" in first

    import vlm.runtime.lightning_cli as lightning_cli

    def no_cli(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached help must not build a LightningCLI")

    monkeypatch.setattr(lightning_cli, "VLMCLI", no_cli)
    assert _help(["test", "--help"], capsys) == first
    monkeypatch.setenv("VLM_HELP_CACHE", "0")
    with pytest.raises(AssertionError, match="must not build"):
        main(["test", "--help"])


def test_cache_key_follows_arguments_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(help_cache, "_source_roots", lambda: [src])
    key = help_cache.key(["fit", "--help"])
    assert help_cache.key(["test", "--help"]) != key
    os.utime(src / "a.py", ns=(1, 2))
    assert help_cache.key(["fit", "--help"]) != key, "an edited source file makes a new entry"
    assert not help_cache.cacheable(["fit", "--config", "x.yaml", "--help"]) and help_cache.cacheable(["fit", "-h"])


@pytest.mark.parametrize("package", ["vlm.modules", "vlm.backbones"])
def test_lazy_packages_export_what_they_load(package: str) -> None:
    """The lazy package ``__init__``s: ``__all__`` is exactly the lazily loaded names, each from its module."""
    import importlib

    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(module._LAZY)
    assert all(path.startswith(f"{package}.") for path in module._LAZY.values())
