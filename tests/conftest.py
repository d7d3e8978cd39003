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
