"""Shared test fixtures: the reference checkpoints and golden arrays live in tests/fixtures/."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

FIXTURES = Path(__file__).parent / "fixtures" / "kronos_reference"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "golden.npz"))


@pytest.fixture(scope="session")
def reference_dirs() -> dict[str, Path]:
    return {"tokenizer": FIXTURES / "tokenizer", "predictor": FIXTURES / "predictor"}


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A minimal run folder as the pipeline leaves it: manifest, config.yaml and best checkpoints
    (the kit's embedded base pair, which belong together), without running any notebook."""
    import shutil

    from kronos_kit.config import KitConfig
    from kronos_kit.pipeline import RUN_KIND
    from kronos_kit.runs import RunDir, save_json

    rd = RunDir(tmp_path / "default-ashare-20260101-120000")
    base = Path(__file__).resolve().parent.parent / "kronos_kit" / "assets" / "base"
    for phase in ("tokenizer", "predictor"):
        shutil.copytree(base / phase, rd.checkpoint(phase))
    cfg = KitConfig.from_dict({"name": "default", "run_dir": str(rd.path), "device": "cpu",
                               "data": {"source": str(DATA / "ashare_5min_sample.csv")},
                               "tokenizer": {"start_from": "embedded:base/tokenizer"},
                               "predictor": {"start_from": "embedded:base/predictor"}})
    rd.config.write_text(cfg.to_yaml())
    save_json(rd.manifest, {"kind": RUN_KIND, "stages": {}, "config": cfg.to_dict()})
    return rd.path


def _untracked_files(root: Path) -> set[str] | None:
    """Files git neither tracks nor ignores under ``root`` (None outside a git checkout)."""
    import subprocess

    done = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True)
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def tests_write_nothing_into_the_repo():
    """Tests write into tmp paths only: a cache or run folder left in the checkout would be committed."""
    root = Path(__file__).resolve().parent.parent
    before = _untracked_files(root)
    yield
    after = _untracked_files(root)
    if before is not None and after is not None and after - before:
        pytest.fail(f"tests left files in the checkout: {sorted(after - before)[:10]}", pytrace=False)
