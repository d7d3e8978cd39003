"""Training curves from `metrics.jsonl`: loss parts per step, validation metrics per evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from kronos_kit.runs import read_metrics


def plot_training_curves(
    metrics: str | Path | list[dict],
    phase: str,
    *,
    train_keys: Sequence[str] | None = None,
    val_keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Two panels: training loss terms by step (left), validation metrics by step (right)."""
    records = read_metrics(metrics, phase) if not isinstance(metrics, list) else [
        r for r in metrics if r.get("phase") == phase]
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


def plot_selection_curves(metrics: str | Path | list[dict], phase: str = "predictor") -> Figure:
    """What picks phase 2's `best`: validation loss (left) and forecast skill (right: close CRPS and MAE
    on the validation origins) by step, the base model's level on the same origins dashed, and the
    evaluations that became `best` ringed."""
    records = read_metrics(metrics, phase) if not isinstance(metrics, list) else [
        r for r in metrics if r.get("phase") == phase]
    evals = [r for r in records if r["kind"] == "eval"]
    reference = next((r for r in records if r["kind"] == "reference"), {})
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, keys in ((left, ("val_loss",)), (right, ("val_crps", "val_mae"))):
        for key in keys:
            points = [(r["step"], r[key], r.get("best")) for r in evals if key in r]
            if not points:
                continue
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
            best = [(p[0], p[1]) for p in points if p[2]]
            if best:
                ax.scatter(*zip(*best), s=120, facecolors="none", edgecolors=line.get_color())
            if key in reference:
                ax.axhline(reference[key], color=line.get_color(), ls="--", lw=1, label=f"{key} (base model)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    left.set_title(f"{phase} validation loss")
    right.set_title("forecast skill on validation origins (ringed: best)")
    return fig
