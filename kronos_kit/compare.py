"""Several runs side by side: one table of what differed between them and what came out.

`compare_runs(["runs/a", "runs/b"])` reads only the plain files of each run directory (config.yaml,
reconstruction_gate.json, codebook_before/after.json, metrics.json, promoted.json) and returns one
row per run: the config fields whose values differ between the runs, the gate, codebook usage before
and after phase 1, the bottom line, and headline test metrics of the finetuned and base models.
`write_comparison` saves it as Markdown and CSV; `python -m kronos_kit compare RUN RUN ...` does both.
A file a run lacks (a failed or unfinished stage) leaves its cells empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kronos_kit.binding import check_stages
from kronos_kit.config import KitConfig, flatten, read_yaml
from kronos_kit.gate import GateResult
from kronos_kit.runs import Promotion, RunDir, load_json

__all__ = ["COMPARED_METRICS", "compare_runs", "comparison_markdown", "write_comparison"]

# headline test metrics per model (columns of metrics.json's table); lower is better except IC
COMPARED_METRICS: tuple[str, ...] = ("close_crps", "close_mae", "coverage_80", "ic")
COMPARED_MODELS: tuple[str, ...] = ("finetuned", "base")
IGNORED_FIELDS: tuple[str, ...] = ("run_dir",)  # differs by construction


def _read(path: Path, pick: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """`pick(data)` of a JSON file of the run; {} when the run lacks it. A file that is not as the kit
    writes it (broken JSON, missing keys, wrong types) is a ValueError naming it."""
    if not path.is_file():
        return {}
    data = load_json(path)
    try:
        return pick(data)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not as the kit writes it ({type(err).__name__}: {err}); rerun the stage that "
                         "writes it, or leave this run out of the comparison") from None


def _config(rd: RunDir) -> dict[str, Any]:
    """The run's config.yaml, flat; refused when it no longer says what the run's stages ran with
    (`binding.check_stages`): the table would show settings its numbers did not come from."""
    if not rd.config.is_file():
        raise FileNotFoundError(f"{rd.path}: no config.yaml; give the folder of a pipeline run (runs/<name>)")
    values = read_yaml(rd.config)
    check_stages(rd.path, KitConfig.from_dict(values, source=str(rd.config)), reader="compare", external=False)
    return flatten(values)


def _gate(gate: dict[str, Any]) -> dict[str, Any]:
    passed = GateResult.from_dict(gate).passed  # decided from its numbers, never from a stored "passed"
    row = {"gate": "passed" if passed else "FAILED", "gate full_mse": gate["metrics"].get("full_mse")}
    for metric in ("full_mse_vs_base", "close_error_to_move"):  # absent in gate files of older runs
        if gate["metrics"].get(metric) is not None:
            row[f"gate {metric}"] = gate["metrics"][metric]
    return row


def _usage(when: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda stats: {f"s1 usage {when}": stats["s1"]["usage"], f"s2 usage {when}": stats["s2"]["usage"]}


def _metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    table, row = metrics.get("table", {}), {}
    for model in COMPARED_MODELS:
        for metric in COMPARED_METRICS:
            if model in table and metric in table[model]:
                row[f"{model} {metric}"] = table[model][metric]
    return {**row, "bottom line": metrics.get("bottom_line")}


def _outcome(rd: RunDir) -> dict[str, Any]:
    return {**_read(rd.gate, _gate), **_read(rd.codebook_before, _usage("before")),
            **_read(rd.codebook_after, _usage("after")), **_read(rd.metrics_json, _metrics),
            **({"promoted": Promotion.load(rd.path).promoted} if rd.promoted.is_file() else {})}


def compare_runs(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run (index: the run folder's name): differing config fields, then the outcomes."""
    if len(run_dirs) < 1:
        raise ValueError("compare_runs needs at least one run directory")
    rds = [RunDir(p) for p in run_dirs]
    for rd in rds:
        if not rd.path.is_dir():
            raise FileNotFoundError(f"{rd.path}: run folder not found")
    configs = [_config(rd) for rd in rds]
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in IGNORED_FIELDS))
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    rows = [{**{k: c.get(k) for k in differing}, **_outcome(rd)} for c, rd in zip(configs, rds)]
    names = [rd.path.name for rd in rds]
    if len(set(names)) < len(names):  # same folder names under different parents
        names = [str(rd.path) for rd in rds]
    frame = pd.DataFrame(rows, index=pd.Index(names, name="run"))
    frame.attrs["config_fields"] = differing
    return frame


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table with one column per run (fields and metrics read down)."""
    lines = ["| | " + " | ".join(_cell(n) for n in table.index) + " |", "|---|" + "---|" * len(table.index)]
    lines += ["| " + " | ".join([_cell(col), *(_cell(v) for v in table[col])]) + " |" for col in table.columns]
    return "\n".join(lines)


def write_comparison(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write `comparison.md` and `comparison.csv` into `out_dir`; return their paths."""
    from kronos_kit.runs import atomic_write_text

    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv"}
    fields = table.attrs.get("config_fields", [])
    intro = (f"# Run comparison\n\nConfig fields that differ: {', '.join(fields) or 'none'}.\n\n")
    atomic_write_text(paths["markdown"], intro + comparison_markdown(table) + "\n")
    atomic_write_text(paths["csv"], table.to_csv())
    return paths
