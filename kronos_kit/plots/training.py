"""Training curves from `metrics.jsonl`: loss parts per step, validation metrics per evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from kronos_kit.runs import current_records, read_metrics


def plot_training_curves(
    metrics: str | Path | list[dict],
    phase: str,
    *,
    train_keys: Sequence[str] | None = None,
    val_keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Two panels: training loss terms by step (left), validation metrics by step (right)."""
    # the current run only, one record per step (see `runs.current_records`), from a file or a list
    records = read_metrics(metrics, phase) if not isinstance(metrics, list) else current_records(metrics, phase)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    defaults = {"tokenizer": (("loss", "recon_s1", "recon_full", "bsq"), ("val_recon_full", "val_recon_s1")),
                "predictor": (("loss", "ce_s1", "ce_s2"), ("val_loss", "val_ce_s1", "val_ce_s2"))}
    train_keys = train_keys or defaults.get(phase, (("loss",), ("val_loss",)))[0]
    val_keys = val_keys or defaults.get(phase, (("loss",), ("val_loss",)))[1]
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for key in train_keys:
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            left.plot(*zip(*points), label=key)
    for key in val_keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            right.plot(*zip(*points), marker="o", label=key)
    for ax, name in ((left, "training"), (right, "validation")):
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{phase} {name}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return fig
