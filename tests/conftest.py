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


RECORDED = {  # a run small enough to build in seconds with the library calls the notebooks make
    "name": "recorded", "device": "cpu", "data.symbol": "A", "data.lookback": 30, "data.predict": 5, "data.stride": 2,
    "tokenizer.start_from": "embedded:base/tokenizer", "tokenizer.batch_size": 16, "tokenizer.max_steps": 2,
    "tokenizer.eval_every": 2, "tokenizer.max_val_batches": 2, "predictor.start_from": "embedded:base/predictor",
    "predictor.batch_size": 16, "predictor.max_steps": 2, "predictor.eval_every": 2, "predictor.max_val_batches": 2,
    "predictor.skill_origins": 2, "predictor.skill_paths": 2, "evaluation.pred_len": 4, "evaluation.sample_count": 4,
    "evaluation.max_origins": 5, "evaluation.val_origins": 12, "evaluation.calibration_methods": ["none", "spread"],
}


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory) -> Path:
    """A small finished run as the pipeline leaves it, made by the library calls its notebooks make: phase 1, the
    gate bound to its tokenizer, phase 2, notebook 03's start and decisions, so every stage wrote its record
    (`stages/`); config.yaml and a manifest with every stage completed. Its data, `bars.csv`, lies beside the
    run folder: take a copy with `copy_run` before changing anything."""
    import warnings

    from kronos_kit.config import KitConfig
    from kronos_kit.data import load_data
    from kronos_kit.evaluate import decide_on_validation
    from kronos_kit.gate import gate_run
    from kronos_kit.model import Kronos, KronosTokenizer
    from kronos_kit.pipeline import RUN_KIND, STAGES
    from kronos_kit.runs import RunDir, save_json
    from kronos_kit.stage_records import start_evaluation
    from kronos_kit.train import train_predictor, train_tokenizer

    root = tmp_path_factory.mktemp("recorded")
    (root / "bars.csv").write_bytes((DATA / "ashare_5min_sample.csv").read_bytes())
    rd = RunDir(root / "run")
    cfg = KitConfig().with_overrides({**RECORDED, "run_dir": str(rd.path), "data.source": str(root / "bars.csv")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = load_data(cfg)
        train_tokenizer(cfg, data=bundle, progress=False)
        gate = gate_run(cfg, data=bundle)
        assert gate.passed, gate.report()
        train_predictor(cfg, data=bundle, progress=False)
        sources = start_evaluation(cfg, bundle)
        models = {n: (Kronos.from_pretrained(s.predictor_source), KronosTokenizer.from_pretrained(s.tokenizer_source))
                  for n, s in sources.items()}
        decide_on_validation(bundle.splits, models, cfg.evaluation, lookback=cfg.data.lookback, run_dir=rd.path,
                             finetuned_sources=(sources["finetuned"].tokenizer_source,
                                                sources["finetuned"].predictor_source),
                             base_sources=(sources["base"].tokenizer_source, sources["base"].predictor_source))
    rd.config.write_text(cfg.to_yaml())
    save_json(rd.manifest, {"kind": RUN_KIND, "stages": {s: {"status": "completed"} for s in STAGES},
                            "config": cfg.to_dict()})
    return rd.path


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of `recorded_run` (and of its data, `dest/bars.csv`) at `dest/run`, its config.yaml pointing there."""
    import shutil

    from kronos_kit.config import KitConfig
    from kronos_kit.runs import RunDir

    shutil.copytree(run, dest / "run", symlinks=True)
    shutil.copy(run.parent / "bars.csv", dest / "bars.csv")
    rd = RunDir(dest / "run")
    cfg = KitConfig.from_file(rd.config).with_overrides({"run_dir": str(rd.path),
                                                         "data.source": str(dest / "bars.csv")})
    rd.config.write_text(cfg.to_yaml())
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
