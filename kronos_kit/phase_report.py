"""The phase 1 and phase 2 sections of a run's `report.md`, read from the files the notebooks left.

:func:`phase_sections` returns the markdown lines that come before the forecast evaluation:

* Phase 1 (tokenizer adaptation): the gate (every check's number, the base tokenizer's and the
  threshold; the paired test; what to try when it failed), the reconstruction error before / after in
  return units (bp of the previous close, against the median bar move), codebook usage before / after,
  and the best validation step against the base's step-0 validation.
* Phase 2 (predictor finetune): the best step and its validation metrics against the base predictor's
  step-0 validation, and the validation token metrics before / after.

Everything comes from the run folder (`reconstruction_gate.json`, `codebook_*.json`,
`metrics.jsonl`, `token_metrics.json`, `config.yaml`), so the report never reruns a model; a file that
is missing (a phase that did not run) leaves its lines out and says so; a folder without a gate file
and a training log gets no phase sections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kronos_kit.codebook import CodebookStats
from kronos_kit.config import KitConfig
from kronos_kit.gate import GateResult
from kronos_kit.runs import RunDir, load_json, read_metrics

__all__ = ["best_against_base", "phase_one_lines", "phase_sections", "phase_two_lines", "predictor_select_metric"]

_RETURN_ROWS = (("close_error_bp", "close error (bp of the previous close)"),
                ("high_error_bp", "high error (bp of the previous close)"),
                ("low_error_bp", "low error (bp of the previous close)"),
                ("median_move_bp", "median absolute bar move (bp), for scale"),
                ("close_error_to_move", "close error / median bar move"),
                ("full_mse", "full-decoder normalized MSE"))


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _num(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _change(new: float | None, old: float | None) -> str:
    if new is None or old is None or old == 0:
        return "n/a"
    return f"{(new - old) / abs(old) * 100:+.1f}%"


def best_against_base(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best evaluation by ``metric`` (the one the engine marked, else the lowest) and the phase's step-0
    `reference` value of the same metric; None without evaluations."""
    evals = [r for r in records if r.get("kind") == "eval" and r.get(metric) is not None]
    if not evals:
        return None
    marked = [r for r in evals if r.get("best")]
    best = marked[-1] if marked else min(evals, key=lambda r: r[metric])
    ref = next((r for r in records if r.get("kind") == "reference"), {})
    return {"step": best["step"], "last_step": evals[-1]["step"], "value": best[metric], "base": ref.get(metric),
            "record": best, "reference": ref}


def _best_line(phase: str, metric: str, best: dict[str, Any] | None) -> str:
    if best is None:
        return f"No {phase} validation was logged (the phase did not train in this run)."
    base = best["base"]
    if base is None:
        return (f"Best validation step {best['step']} (of {best['last_step']}): {metric} {_num(best['value'])}; "
                "no step-0 validation of the base was logged.")
    verdict = "below (better than)" if best["value"] < base else "not below"
    return (f"Best validation step {best['step']} (of {best['last_step']}): {metric} {_num(best['value'])} vs the "
            f"base's {_num(base)} at step 0 ({_change(best['value'], base)}): {verdict} the base.")


def phase_one_lines(rd: RunDir) -> list[str]:
    """Phase 1's section: gate, reconstruction in return units, codebook usage, best step vs base."""
    lines = ["## Phase 1: tokenizer adaptation", ""]
    if not rd.gate.is_file():
        return [*lines, "No reconstruction gate was written (notebook 01 did not finish).", ""]
    gate = GateResult.load(rd.gate)
    lines += [f"**Gate: {'passed' if gate.passed else 'FAILED'}.** " + (" ".join(gate.reasons) if gate.reasons
                                                                        else "Every check is within its threshold."),
              ""]
    if gate.advice:
        lines += [f"Try: {gate.advice}.", ""]
    rows = []
    for entry in gate.to_dict()["checks"]:
        op = "<=" if entry["check"].startswith("max_") else ">="
        rows.append([entry["metric"], entry["value"], entry["base"], f"{op} {_num(entry['threshold'])}",
                     "ok" if entry["passed"] else "FAIL"])
    lines += _table(["check", "adapted", "base", "threshold", "result"], rows)
    if gate.paired:
        p = gate.paired
        lines += [f"Adapted vs base: per-window mean full-decoder MSE {_num(p['adapted_mean'])} vs "
                  f"{_num(p['base_mean'])} (ratio {_num(p['ratio'])}) over {p['n_windows']} validation windows; "
                  f"{p['test']}, of 'worse than the base by more than {p['tolerance']:.0%}': "
                  f"p = {_num(p['p_value'])} ({'significant' if p['significant'] else 'not significant'} at "
                  f"{p['level']:g}).", ""]
    lines += ["Reconstruction of the validation windows in return units (full decoder, in-split bars):", ""]
    lines += _table(["", "before (base)", "after (adapted)"],
                    [[label, gate.base.get(key), gate.metrics.get(key)] for key, label in _RETURN_ROWS])
    lines += _codebook_lines(rd)
    lines += [_best_line("tokenizer", "val_recon_full", best_against_base(read_metrics(rd.metrics_log, "tokenizer"),
                                                                           "val_recon_full")), ""]
    return lines


def _codebook_lines(rd: RunDir) -> list[str]:
    if not (rd.codebook_before.is_file() and rd.codebook_after.is_file()):
        return []
    before, after = CodebookStats.load(rd.codebook_before), CodebookStats.load(rd.codebook_after)
    rows = [[f"{level} {what}", getattr(getattr(before, level), attr), getattr(getattr(after, level), attr)]
            for level in ("s1", "s2") for what, attr in (("usage", "usage"), ("perplexity", "perplexity"))]
    return ["Codebook on the validation windows (in-split bars):", "",
            *_table(["", "before (base)", "after (adapted)"], rows)]


def phase_two_lines(rd: RunDir, select_metric: str = "val_loss") -> list[str]:
    """Phase 2's section: best step by ``select_metric`` vs the base's step-0 validation, token metrics."""
    lines = ["## Phase 2: predictor finetune on the frozen tokenizer", ""]
    records = read_metrics(rd.metrics_log, "predictor")
    best = best_against_base(records, select_metric)
    lines += [f"`best` is picked by {select_metric}. " + _best_line("predictor", select_metric, best), ""]
    if best is not None:
        keys = [k for k in ("val_loss", "val_ce_s1", "val_ce_s2", "val_acc_s1", "val_acc_s2", "val_crps", "val_mae")
                if best["record"].get(k) is not None]
        rows = [[k, best["reference"].get(k), best["record"][k], _change(best["record"][k], best["reference"].get(k))]
                for k in keys]
        lines += _table(["validation metric", "base (step 0)", f"best (step {best['step']})", "change"], rows)
    if rd.token_metrics.is_file():
        tokens: Mapping[str, Mapping[str, float]] = load_json(rd.token_metrics)
        names = list(tokens)
        keys = [k for k in ("s1_accuracy", "s1_perplexity", "s2_accuracy", "s2_perplexity")
                if any(k in tokens[n] for n in names)]
        lines += ["Next-token metrics on the validation windows (notebook 02):", "",
                  *_table(["", *names], [[k, *(tokens[n].get(k) for n in names)] for k in keys])]
    return lines


def phase_sections(run_dir: str | Path) -> list[str]:
    """The markdown lines of both phase sections for `report.md` (see the module docstring)."""
    rd = RunDir(run_dir)
    if not (rd.gate.is_file() or rd.metrics_log.is_file()):
        return []  # not a training run's folder (e.g. an evaluation written elsewhere): nothing to say
    return [*phase_one_lines(rd), *phase_two_lines(rd, predictor_select_metric(rd))]


def predictor_select_metric(rd: RunDir) -> str:
    """What picked phase 2's `best`: as its validations logged it (`select_metric`), else the run's config.yaml
    (logs written before the field), else `val_loss`."""
    logged = [r["select_metric"] for r in read_metrics(rd.metrics_log, "predictor")
              if r.get("kind") == "eval" and r.get("select_metric")]
    if logged:
        return logged[-1]
    if rd.config.is_file():
        try:
            return KitConfig.from_file(rd.config).predictor.select_metric
        except (ValueError, OSError):
            pass  # an unreadable config: the report still has its phase sections
    return "val_loss"
