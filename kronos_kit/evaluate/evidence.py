"""How far to trust a run's forecasts: what its test evaluation (`metrics.json`) said about the model it hands on.

`test_evidence(run_dir, model)` reads the run's plain `metrics.json` (written by notebook 03 with the decisions
that chose `model`) and returns the numbers a forecast should travel with: the model's close CRPS on the test
split against the best naive probabilistic baseline, its 80% interval coverage, its close MAE against
persistence (each with the run's paired test where it made one), for the handed-over forecast how it did against
the model alone, and the run's verdict on finetuning. `forecast --run` prints them and writes them beside the CSV.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from kronos_kit.evaluate.baselines import PROBABILISTIC_BASELINES
from kronos_kit.evaluate.scores import HANDED_OVER
from kronos_kit.runs import RunDir, load_json

__all__ = ["TestEvidence", "test_evidence"]


@dataclasses.dataclass
class TestEvidence:
    """The test split's word on one model of a run (`available` False, with `why`, when there is none)."""

    model: str
    available: bool
    why: str = ""
    n_origins: int | None = None
    close_crps: float | None = None
    best_naive: str | None = None  # the naive probabilistic baseline with the lowest close CRPS on test
    best_naive_crps: float | None = None
    crps_vs_best_naive_pct: float | None = None  # negative: the model's CRPS is lower (better)
    crps_verdict: str | None = None  # the paired test's verdict when the run tested this model against it
    coverage_80: float | None = None  # share of realized closes inside the 80% interval (nominal 0.80)
    mae_vs_persistence_pct: float | None = None
    mae_verdict: str | None = None  # the paired test against persistence on close MAE, when the run made one
    alone: str | None = None  # for the handed-over forecast: the model in it (what `--model-only` writes)
    crps_vs_alone_pct: float | None = None  # negative: the handed-over forecast's close CRPS is the lower
    alone_verdict: str | None = None  # the paired test of the handed-over forecast against the model alone
    verdict: str | None = None  # the run's bottom line (finetuned vs base and the naive forecasts)

    __test__ = False  # not a pytest class, despite its name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The evidence in a few sentences, for a terminal or a README."""
        if not self.available:
            return [f"how far to trust it: unknown ({self.why})"]
        lines = [f"how far to trust it, from the run's test split ({self.n_origins} origins, model {self.model}):",
                 f"  close CRPS {self.close_crps:.4g} vs the best naive forecast ({self.best_naive}) "
                 f"{self.best_naive_crps:.4g}: {_pct(self.crps_vs_best_naive_pct)}{_tested(self.crps_verdict)}"]
        if self.crps_vs_alone_pct is not None:
            lines.append(f"  close CRPS vs {self.alone} alone (what --model-only writes): "
                         f"{_pct(self.crps_vs_alone_pct)}{_tested(self.alone_verdict)}")
        if self.coverage_80 is not None:
            lines.append(f"  its 80% interval covered {self.coverage_80:.2f} of the realized closes (nominal 0.80)")
        if self.mae_vs_persistence_pct is not None:
            lines.append(f"  close MAE vs persistence (no change): {_pct(self.mae_vs_persistence_pct)}"
                         f"{_tested(self.mae_verdict)}")
        if self.verdict:
            lines.append(f"  the run's verdict: {self.verdict}")
        return lines


def _tested(verdict: str | None) -> str:
    return f", {verdict} in the run's paired test" if verdict else ", untested"


def _pct(change: float | None) -> str:
    if change is None:
        return "n/a"
    return f"{abs(change):.1f}% {'lower' if change < 0 else 'higher'}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def test_evidence(run_dir: str | Path, model: str) -> TestEvidence:
    """What the run's `metrics.json` says about `model` on the test split: "finetuned", "base", or "handed_over"
    (the handed-over forecast, tested in `handover_comparisons`)."""
    rd = RunDir(run_dir)
    if not rd.metrics_json.is_file():
        return TestEvidence(model, False, f"{rd.path} has no metrics.json: notebook 03 did not evaluate it")
    metrics = load_json(rd.metrics_json)
    table = metrics.get("table") or {}
    row = table.get(model)
    if not isinstance(row, dict) or _number(row.get("close_crps")) is None:
        return TestEvidence(model, False, f"{rd.metrics_json} holds no test scores of {model!r}")
    naive = {name: _number(table[name].get("close_crps")) for name in PROBABILISTIC_BASELINES
             if isinstance(table.get(name), dict) and _number(table[name].get("close_crps")) is not None}
    best = min(naive, key=naive.get) if naive else None
    crps = _number(row["close_crps"])
    tests = [r for r in (*(metrics.get("paired_comparisons") or []), *(metrics.get("handover_comparisons") or []))
             if isinstance(r, dict) and r.get("model") == model]

    def verdict(other: str | None, metric: str) -> str | None:
        return next((r.get("verdict") for r in tests if r.get("other") == other and r.get("metric") == metric), None)

    persistence = _number((table.get("persistence") or {}).get("close_mae"))
    mae = _number(row.get("close_mae"))
    handed = (metrics.get("config") or {}).get("handed_over") or {}
    alone = handed.get("model") if model == HANDED_OVER else None
    alone_crps = _number((table.get(alone) or {}).get("close_crps")) if alone else None
    return TestEvidence(
        model, True, n_origins=metrics.get("n_origins"), close_crps=crps, best_naive=best,
        best_naive_crps=naive.get(best), crps_vs_best_naive_pct=(crps / naive[best] - 1) * 100 if best else None,
        crps_verdict=verdict(best, "close_crps"), coverage_80=_number(row.get("coverage_80")),
        mae_vs_persistence_pct=(mae / persistence - 1) * 100 if mae is not None and persistence else None,
        mae_verdict=verdict("persistence", "close_ae"), alone=alone if alone_crps else None,
        crps_vs_alone_pct=(crps / alone_crps - 1) * 100 if alone_crps else None,
        alone_verdict=verdict(alone, "close_crps") if alone_crps else None, verdict=metrics.get("bottom_line"))
