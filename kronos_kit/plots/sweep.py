"""A sweep's figures: Optuna's own (`optuna.visualization.matplotlib`), as figures that show inline.

Optuna draws them with pyplot. Each function here takes the figure Optuna drew, removes it from
pyplot's registry (nothing left open, nothing shown twice by the inline backend) and makes it a
`KitFigure`, which displays itself in a notebook like every other figure of the kit. A figure Optuna
cannot draw yet (importances need two finished trials with different values) is a figure with the note.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from kronos_kit.plots.figure import KitFigure, new_figure

__all__ = ["SWEEP_FIGURES", "plot_sweep_history", "plot_sweep_importances", "plot_sweep_intermediate",
           "plot_sweep_parallel", "plot_sweep_slices"]


def _adopt(draw: Callable[[], Any], title: str) -> Figure:
    """Run one of Optuna's matplotlib functions and hand its figure over as a `KitFigure`."""
    import matplotlib.pyplot as plt  # Optuna's figures are pyplot figures; released right below

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        try:
            drawn = draw()
        except (ValueError, RuntimeError) as err:
            return _note(title, str(err))
    axes = drawn.ravel()[0] if isinstance(drawn, np.ndarray) else drawn
    fig = axes.figure if isinstance(axes, Axes) else axes
    plt.close(fig)
    fig.__class__ = KitFigure  # same object, plus the inline PNG display (KitFigure adds nothing else)
    return fig


def _note(title: str, text: str) -> Figure:
    fig = new_figure((7.0, 2.5))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _objective_name(study: Any) -> str:
    """The objective's name on the axes: the study's metric name (the sweep sets it, e.g. "validation RankIC")."""
    names = getattr(study, "metric_names", None)
    return names[0] if names else "Objective Value"


def plot_sweep_history(study: Any) -> Figure:
    """Each finished trial's objective in trial order, with the best so far."""
    from optuna.visualization.matplotlib import plot_optimization_history

    return _adopt(lambda: plot_optimization_history(study, target_name=_objective_name(study)), "optimization history")


def plot_sweep_intermediate(study: Any) -> Figure:
    """Every trial's validation forecast skill (the probe's close CRPS) at each phase-2 validation: the curves
    the pruner compared; a pruned trial's curve ends where it was stopped."""
    from optuna.visualization.matplotlib import plot_intermediate_values

    fig = _adopt(lambda: plot_intermediate_values(study), "intermediate values")
    for ax in fig.axes:
        ax.set_xlabel("phase-2 optimizer step")
        ax.set_ylabel("validation close CRPS (probe)")
    return fig


def plot_sweep_importances(study: Any) -> Figure:
    """How much each parameter explains the objective (Optuna's default evaluator, PED-ANOVA)."""
    from optuna.visualization.matplotlib import plot_param_importances

    if _finished(study) < 2:
        return _note("parameter importances", "needs at least two finished trials")
    fig = _adopt(lambda: plot_param_importances(study), "parameter importances")
    fig.subplots_adjust(left=0.32)  # room for the dotted parameter names on the y axis
    return fig


def plot_sweep_slices(study: Any) -> Figure:
    """The objective against each parameter, one panel per parameter."""
    from optuna.visualization.matplotlib import plot_slice

    fig = _adopt(lambda: plot_slice(study, target_name=_objective_name(study)), "slices")
    for ax in fig.axes:  # a narrow log axis with labelled minor ticks prints them over each other
        ax.xaxis.set_minor_formatter(NullFormatter())
    return fig


def plot_sweep_parallel(study: Any) -> Figure:
    """Every finished trial as a line through its parameter values to its objective."""
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    fig = _adopt(lambda: plot_parallel_coordinate(study), "parallel coordinates")
    fig.set_size_inches(12, 6)  # one axis per parameter: the default width crowds their ticks
    fig.subplots_adjust(bottom=0.22, right=0.88)
    return fig


# file name (under the sweep's figures/) -> figure function: report.md and notebook 04 show these
SWEEP_FIGURES: dict[str, Callable[[Any], Figure]] = {
    "sweep_history.png": plot_sweep_history,
    "sweep_intermediate.png": plot_sweep_intermediate,
    "sweep_importances.png": plot_sweep_importances,
    "sweep_slices.png": plot_sweep_slices,
    "sweep_parallel.png": plot_sweep_parallel,
}
