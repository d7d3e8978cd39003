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
