"""Training curves: loss parts per step, validation metrics per evaluation, optional reference levels.

A loss term on another scale (the BSQ entropy term of phase 1 is negative and small) gets a panel of
its own, so it neither squashes the reconstruction errors nor drags their axis below zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kronos_kit.plots.figure import legend_outside, new_figure
from kronos_kit.runs import current_records, read_metrics

__all__ = ["SEPARATE_AXIS_KEYS", "PHASE_CURVES", "plot_loss_curves", "plot_training_curves"]

# loss parts drawn on a panel of their own: the BSQ term (negative) and its logged parts are on other
# scales than the MSEs; only `bsq` is drawn by default, the parts when asked for in train_keys / keys
SEPARATE_AXIS_KEYS: tuple[str, ...] = ("bsq", "bsq_commitment", "bsq_per_sample_entropy", "bsq_codebook_entropy")

# phase -> (training keys, validation keys, y label of the training panel, y label of the validation panel)
PHASE_CURVES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, str]] = {
    "tokenizer": (("loss", "recon_s1", "recon_full", "bsq"), ("val_recon_full", "val_recon_s1"),
                  "loss, MSE (normalized)", "MSE (normalized)"),
    "predictor": (("loss", "ce_s1", "ce_s2"), ("val_loss", "val_ce_s1", "val_ce_s2"),
                  "cross-entropy (nats)", "cross-entropy (nats)"),
}
_REFERENCE_STYLES = ("--", ":", "-.")

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # name -> (steps, values)


def _draw_panel(ax: Axes, series: Series, *, title: str, ylabel: str, xlabel: str = "optimizer step",
                marker: str | None = None, reference: Mapping[str, float] | None = None,
                start: Mapping[str, float] | None = None) -> None:
    """One panel: a line per non-empty series, a dashed horizontal line per reference level, legend outside.

    ``start`` maps a series to the starting model's value (its step-0 validation): a hollow diamond at
    step 0 and a dashed line in the series' colour, so a curve that never goes below it shows at a glance.
    """
    start = {k: float(v) for k, v in (start or {}).items() if k in series and v is not None}
    for key, (xs, ys) in series.items():
        if not len(xs) and key not in start:
            continue
        line, = ax.plot(xs, ys, marker=marker, markersize=4, lw=1.2, label=key)
        if key in start:
            color, level = line.get_color(), start[key]
            ax.axhline(level, color=color, ls="--", lw=0.9, alpha=0.8, label=f"{key}, base (step 0) = {level:.4g}")
            ax.plot([0], [level], ls="none", marker="D", markersize=7, mfc="white", mec=color, mew=1.5, zorder=3)
    has_data = bool(ax.lines)
    for k, (name, level) in enumerate((reference or {}).items()):
        ax.axhline(float(level), color="0.25", lw=1.0, ls=_REFERENCE_STYLES[k % len(_REFERENCE_STYLES)],
                   label=f"{name} = {float(level):.4g}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # readable on the narrow panel too
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not has_data:
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
    legend_outside(ax)


def plot_loss_curves(
    series: Series,
    *,
    separate: Sequence[str] | None = None,
    reference: Mapping[str, float] | None = None,
    title: str = "training loss",
    ylabel: str = "loss",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Loss curves from memory (``{name: (steps, values)}``), e.g. while a phase trains.

    Names in ``separate`` (default :data:`SEPARATE_AXIS_KEYS`) go to a narrower panel on the right, with
    their own y axis. ``reference`` draws a dashed horizontal line per ``{label: level}`` (e.g.
    ``{"base model val_loss": 2.31}``) on the panel of the series of that name, else on the main panel.
    """
    separate = SEPARATE_AXIS_KEYS if separate is None else tuple(separate)
    main = {k: v for k, v in series.items() if k not in separate}
    side = {k: v for k, v in series.items() if k in separate}
    reference = dict(reference or {})
    side_ref = {k: v for k, v in reference.items() if k in side}
    main_ref = {k: v for k, v in reference.items() if k not in side}
    if side:
        fig = new_figure(figsize or (10.0, 3.2))
        ax, ax_side = fig.subplots(1, 2, width_ratios=(2, 1))
        _draw_panel(ax_side, side, title=", ".join(side) + " term", ylabel=", ".join(side), reference=side_ref)
    else:
        fig = new_figure(figsize or (7.5, 3.2))
        ax = fig.add_subplot()
    _draw_panel(ax, main, title=title, ylabel=ylabel, reference=main_ref)
    return fig


def _records(metrics: str | Path | list[dict], phase: str) -> list[dict]:
    # the current run only, one record per step (see `runs.current_records`), from a file or a list
    return current_records(metrics, phase) if isinstance(metrics, list) else read_metrics(metrics, phase)


def _series(records: list[dict], keys: Sequence[str]) -> dict[str, tuple[list, list]]:
    out = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        out[key] = ([p[0] for p in points], [p[1] for p in points])
    return out


def plot_training_curves(
    metrics: str | Path | list[dict],
    phase: str,
    *,
    train_keys: Sequence[str] | None = None,
    val_keys: Sequence[str] | None = None,
    separate: Sequence[str] | None = None,
    reference: Mapping[str, float] | None = None,
    title: str | None = None,
    base: bool = True,
) -> Figure:
    """Training loss terms by step (left), validation metrics by evaluation step (right).

    ``metrics`` is a run's ``metrics.jsonl`` or its records. Keys default per phase
    (:data:`PHASE_CURVES`); training keys in ``separate`` (default :data:`SEPARATE_AXIS_KEYS`: the
    negative BSQ term) get a middle panel of their own. With ``base`` the validation panel shows the
    starting checkpoint's step-0 validation (the phase's ``reference`` record) as a diamond at step 0
    and a dashed line per metric. ``reference`` draws more ``{label: level}`` as dashed grey lines.
    Legends sit outside the axes, so they never cover a curve.
    """
    records = _records(metrics, phase)
    default_train, default_val, train_label, val_label = PHASE_CURVES.get(phase, (("loss",), ("val_loss",),
                                                                                  "loss", "loss"))
    separate = SEPARATE_AXIS_KEYS if separate is None else tuple(separate)
    train = _series([r for r in records if r.get("kind") == "train"], train_keys or default_train)
    evals = _series([r for r in records if r.get("kind") == "eval"], val_keys or default_val)
    start = next((r for r in records if r.get("kind") == "reference"), {}) if base else {}
    main = {k: v for k, v in train.items() if k not in separate}
    side = {k: v for k, v in train.items() if k in separate}

    fig = new_figure((13.0, 3.6) if side else (11.0, 3.6))
    if side:
        left, middle, right = fig.subplots(1, 3, sharex=True, width_ratios=(2, 1.2, 2))
        _draw_panel(middle, side, title=f"{phase} training: " + ", ".join(side), ylabel=", ".join(side) + " loss")
    else:
        left, right = fig.subplots(1, 2, sharex=True)
    _draw_panel(left, main, title=f"{phase} training", ylabel=train_label)
    note = "\n(diamond, dashed: the base at step 0)" if start else ""
    _draw_panel(right, evals, title=f"{phase} validation{note}", ylabel=val_label, marker="o", reference=reference,
                start={k: start.get(k) for k in evals})
    if title:
        fig.suptitle(title)
    return fig


def plot_selection_curves(metrics: str | Path | list[dict], phase: str = "predictor") -> Figure:
    """What picks phase 2's `best`: validation loss (left) and forecast skill (right: close CRPS and MAE
    on the validation origins) by step, the base model's level on the same origins dashed, and the one
    evaluation kept as `best` ringed on the curve of the metric that picked it (the log's `select_metric`),
    with a dotted line at its step on both panels."""
    records = _records(metrics, phase)
    evals = [r for r in records if r["kind"] == "eval"]
    reference = next((r for r in records if r["kind"] == "reference"), {})
    kept = [r for r in evals if r.get("best")]
    best = kept[-1] if kept else None  # each improvement was `best` in its time; the last one is the checkpoint
    select = (best or {}).get("select_metric") or "val_loss"
    fig = new_figure((11, 3.6))
    left, right = fig.subplots(1, 2)
    for ax, keys in ((left, ("val_loss",)), (right, ("val_crps", "val_mae"))):
        if best is not None:
            ax.axvline(best["step"], color="0.5", ls=":", lw=1)
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if key in r]
            if not points:
                continue
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
            if best is not None and key == select and key in best:
                ax.scatter([best["step"]], [best[key]], s=160, facecolors="none", edgecolors=line.get_color(),
                           linewidths=1.8, label=f"best: step {best['step']}, by {select}", zorder=4)
            if reference.get(key) is not None:
                ax.axhline(reference[key], color=line.get_color(), ls="--", lw=1, label=f"{key} (base model)")
                ax.plot([0], [reference[key]], ls="none", marker="D", markersize=7, mfc="white",
                        mec=line.get_color(), mew=1.5, zorder=3)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    left.set_title(f"{phase} validation loss")
    right.set_title("forecast skill on validation origins (ringed: the kept best)")
    return fig
