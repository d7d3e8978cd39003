"""The code's shape: one metric table that drives every output, an import graph without cycles, sizes."""

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos_kit.evaluate import table as metric_table
from kronos_kit.evaluate import walk_forward, write_report
from kronos_kit.metrics import CLOSE

PACKAGE = Path(__file__).resolve().parents[1] / "kronos_kit"


# ------------------------------------------------------------------------------------ the metric table


def drifting_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    vol = rng.integers(100, 1000, n).astype(float)
    return pd.DataFrame({"symbol": "X", "timestamps": pd.date_range("2024-01-02 09:30", periods=n, freq="5min"),
                         "open": close, "high": close * 1.001, "low": close * 0.999, "close": close,
                         "volume": vol, "amount": vol * close})


def noisy(histories, hist_stamps, future_stamps, pred_len, sample_count):
    rng = np.random.default_rng(len(histories))
    last = np.stack([h.to_numpy()[-1] for h in histories])
    return last[:, None, None, :] * np.exp(0.01 * rng.standard_normal((len(histories), sample_count, pred_len, 6)))


def close_bias(result, name, entry) -> float:
    """Mean signed error of the point close: a metric the kit does not have."""
    if name not in result.samples:
        return float("nan")
    return float(np.mean(result.point(name)[..., CLOSE] - result.realized[..., CLOSE]))


def test_a_row_added_to_the_metric_table_reaches_table_csv_summary_and_report(tmp_path, monkeypatch):
    row = metric_table.Metric("close_bias", "close bias", "lower", close_bias, ": no point forecast")
    monkeypatch.setattr(metric_table, "METRICS", (*metric_table.METRICS, row))
    frame = drifting_frame()
    result = walk_forward(frame, {"finetuned": noisy, "base": noisy}, lookback=32, pred_len=4, stride=10,
                          sample_count=3, baselines=("persistence", "garch"), progress=False)
    # the summary table
    assert "close_bias" in result.table.columns
    assert result.table.loc["finetuned", "close_bias"] == pytest.approx(close_bias(result, "finetuned", {}))
    assert np.isnan(result.table.loc["garch", "close_bias"])
    paths = write_report(result, tmp_path, n_boot=50)
    # metrics_table.csv and metrics.json
    csv = pd.read_csv(paths["table"], index_col="model")
    assert csv.loc["finetuned", "close_bias"] == pytest.approx(result.table.loc["finetuned", "close_bias"])
    # report.md: in the headline table and one sentence per comparison (GARCH is volatility only)
    report = paths["report"].read_text()
    header = report.splitlines()[report.splitlines().index("### Headline metrics") + 2]
    assert "| close_bias |" in header
    sentences = [line for line in report.splitlines() if line.startswith("- Finetuned close bias ")]
    assert [s.split(" vs ")[1].split(" ")[0] for s in sentences] == ["base", "persistence"]


def test_the_table_without_the_row_has_no_such_column(tmp_path):
    result = walk_forward(drifting_frame(), {"finetuned": noisy}, lookback=32, pred_len=4, stride=10,
                          sample_count=3, baselines=(), progress=False)
    assert "close_bias" not in result.table.columns
    assert list(result.table.columns) == list(metric_table.TABLE_COLUMNS)


# ------------------------------------------------------------------------------------ the import graph


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every kronos_kit module `path` imports, at module level or inside a function (TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    here = module_name(path)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("kronos_kit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.startswith("kronos_kit"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    # a module's own parent packages always run first: that edge is how packages work, not a cycle
    return {m for m in out if m in modules and m != here and not here.startswith(m + ".")}


def unit(module: str) -> str:
    """The unit the cycle rule applies to: a subpackage of kronos_kit (model, data, evaluate, plots) or a module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def graph(collapse) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        src = collapse(module_name(path))
        edges.setdefault(src, set()).update(collapse(m) for m in imports_of(path))
    for src in edges:
        edges[src].discard(src)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_between_packages_and_modules():
    by_unit = graph(unit)
    assert cycles(by_unit) == [], "import cycle between kronos_kit's packages/modules"
    assert cycles(graph(lambda m: m)) == [], "import cycle between kronos_kit's modules"
    assert "kronos_kit.data" not in by_unit["kronos_kit.model"], "model/ must not import data/"
    assert not {"kronos_kit.train", "kronos_kit.evaluate", "kronos_kit.pipeline"} & by_unit["kronos_kit.runs"]


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------------------------ sizes


def test_no_file_over_700_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 700:
            long_files.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert long_files == [] and long_functions == []


# ------------------------------------------------------------------------------------ one declaration each


def test_train_state_round_trips_by_field_name():
    import dataclasses

    from kronos_kit.runs import STATE_PARTS, TrainState, restore_counters, state_counters, state_keys

    state = TrainState(step=7, epoch=1, batch_in_epoch=3, best=0.5, evals_since_best=2, history=[{"step": 4}],
                       stopped=None, skipped_steps=1, run_id="abc", attempt=2)
    saved = {**dict.fromkeys(STATE_PARTS), **state_counters(state)}
    assert restore_counters(saved) == state
    assert state_keys() == STATE_PARTS + tuple(f.name for f in dataclasses.fields(TrainState))


def test_the_training_steps_use_the_models_losses():
    source = (PACKAGE / "train.py").read_text() + (PACKAGE / "engine.py").read_text()
    assert "compute_loss" not in source and ".head" not in source


def test_evaluate_models_takes_a_config_section_or_loose_settings_never_both():
    from kronos_kit.config import EvalConfig
    from kronos_kit.evaluate import evaluate_models
    from kronos_kit.runs import SamplingCalibration

    frame = drifting_frame()
    with pytest.raises(ValueError, match="either evaluation .* or temperature, not both"):
        evaluate_models(frame, {"m": None}, EvalConfig(), lookback=32, temperature=0.5)
    calibration = SamplingCalibration(temperature=0.85, top_p=1.0)
    with pytest.raises(ValueError, match="either calibration .* not both"):
        evaluate_models(frame, {"m": None}, EvalConfig(), lookback=32, calibration=calibration, top_p=0.5)


def test_run_choice_answers_for_promoted_finetuned_and_base(tmp_path):
    from kronos_kit.config import KitConfig
    from kronos_kit.runs import Promotion, SamplingCalibration, run_choice

    cfg = KitConfig()
    base = run_choice(tmp_path, cfg, model="base")
    assert (base.tokenizer_source, base.predictor_source) == (cfg.tokenizer.start_from, cfg.predictor.start_from)
    assert base.sampling == {"temperature": cfg.evaluation.temperature, "top_p": cfg.evaluation.top_p}
    with pytest.raises(FileNotFoundError, match="run phase 1 first"):
        run_choice(tmp_path, cfg, model="finetuned")
    (tmp_path / "tokenizer" / "best").mkdir(parents=True)
    (tmp_path / "predictor" / "best").mkdir(parents=True)
    own = run_choice(tmp_path, cfg, model="finetuned")
    assert own.tokenizer_source == str(tmp_path / "tokenizer" / "best")
    assert own.predictor_source == str(tmp_path / "predictor" / "best")
    with pytest.raises(FileNotFoundError, match="promoted.json not found"):
        run_choice(tmp_path, cfg)
    from kronos_kit.binding import bind

    bound = bind({"tokenizer": own.tokenizer_source, "predictor": own.predictor_source})
    Promotion(promoted="finetuned", tokenizer="tokenizer/best", predictor="predictor/best",
              checkpoints=bound).save(tmp_path)
    SamplingCalibration(temperature=0.85, top_p=1.0, checkpoints=bound).save(tmp_path)
    chosen = run_choice(tmp_path, cfg)
    assert (chosen.promoted, chosen.predictor_source) == ("finetuned", own.predictor_source)
    assert (chosen.sampling, chosen.calibrated) == ({"temperature": 0.85, "top_p": 1.0}, True)
    assert run_choice(tmp_path, cfg, calibrated=False).sampling == base.sampling
