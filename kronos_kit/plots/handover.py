"""What a run hands over, in one figure: the ensemble's weights and the interval coverage before / after."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from kronos_kit import metrics as M
from kronos_kit.plots.figure import new_figure

if TYPE_CHECKING:
    from kronos_kit.evaluate.scores import EvaluationResult

LEVELS = (0.5, 0.8, 0.95)


def _coverage(entry: Mapping[str, Any]) -> list[float]:
    return [float(entry.get(f"coverage_{round(lvl * 100)}", np.nan)) for lvl in LEVELS]


def plot_handover(fit: Mapping[str, Any], result: EvaluationResult | None = None) -> Figure:
    """Left: the weights of the handed-over forecast's members (``fit``: calibration.json's ``handover``, i.e.
    :meth:`kronos_kit.calibration.HandoverFit.to_dict`). Right: coverage of the 50/80/95% close intervals
    against nominal, for the calibrated model alone and the handed-over forecast, held out on validation and,
    with ``result`` (a test evaluation holding ``handed_over``), on the test split.

    Look at: how much weight the model kept, and whether the handed-over bars reach the nominal marks.
    """
    fig = new_figure((11, 4))
    ax_w, ax_c = fig.subplots(1, 2, width_ratios=(1, 1.6))
    ensemble = fit.get("handover", {}).get("ensemble", {"members": ["model"], "weights": [1.0]})
    weights = ensemble["weights"]
    model = result.config["handed_over"]["model"] if result is not None and "handed_over" in result.config else None
    names = [f"model ({model})" if n == "model" and model else n for n in ensemble["members"]]
    colors = ["tab:blue" if n.startswith("model") else "tab:gray" for n in names]
    ax_w.barh(names[::-1], weights[::-1], color=colors[::-1])
    for y, w in enumerate(weights[::-1]):
        ax_w.text(min(w + 0.02, 0.9), y, f"{w:.0%}", va="center")
    ax_w.set_xlim(0, 1)
    ax_w.set_xlabel("weight")
    ax_w.set_title(f"handed over: {ensemble.get('method', 'model').replace('_', ' ')}")
    rows = {"model alone (validation, held out)": fit.get("before", {}),
            "handed over (validation, held out)": fit.get("after", {})}
    if result is not None and "handed_over" in result.samples:
        model = result.config["handed_over"]["model"]
        for label, name in ((f"{model} (test)", model), ("handed over (test)", "handed_over")):
            cov = M.interval_coverage(result.samples[name][..., M.CLOSE], result.realized[..., M.CLOSE], LEVELS)
            rows[label] = {f"coverage_{round(lvl * 100)}": float(c.mean()) for lvl, c in cov.items()}
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(LEVELS))
    for i, (label, entry) in enumerate(rows.items()):
        ax_c.bar(x + (i - (len(rows) - 1) / 2) * width, _coverage(entry), width, label=label)
    for i, lvl in enumerate(LEVELS):
        ax_c.hlines(lvl, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1)
    ax_c.set_xticks(x, [f"{lvl:.0%} interval" for lvl in LEVELS])
    ax_c.set_ylim(0, 1.05)
    ax_c.set_ylabel("coverage of the realized close (dashed: nominal)")
    ax_c.set_title("close interval coverage")
    ax_c.legend(fontsize="small", loc="upper left")
    return fig


__all__ = ["plot_handover"]
