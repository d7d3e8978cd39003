"""Is the tokenizer fit for phase 2? The gate between the phases, relative to the base tokenizer.

:func:`reconstruction_gate` checks the adapted tokenizer's validation reconstruction
(`kronos_kit.reconstruction.ReconstructionReport`) and codebook statistics against thresholds
(`kronos_kit.config.GateConfig`, the run's ``gate.*``), and against the base tokenizer on the same
windows when its report is given:

* ``full_mse_vs_base``: the adapted tokenizer must not be worse than the base. Paired over windows:
  d_w = mse_adapted(w) - (1 + tolerance) mse_base(w), one-sided Diebold-Mariano test of mean(d) > 0
  with a Newey-West variance (overlapping windows make neighbouring d_w correlated: the lag is
  Andrews' data-dependent one, at least the Newey-West rule's) and the HLN small-sample correction.
  Fails when the ratio of the means is above ``max_full_mse_vs_base`` (= 1 + tolerance) *and* that
  test rejects at ``base_test_level``.
* ``close_error_to_move`` / ``high_low_error_to_move``: the full decoder's mean absolute close (high,
  low) error in bp of the previous close over the median absolute bar-to-bar close move of the same
  bars. A tokenizer whose error is as large as a typical move cannot carry the next bar's change,
  which is what phase 2 predicts.
* the absolute checks: full-decoder normalized MSE, full / s1-only MSE ratio, s1 / s2 codebook usage
  and the least balanced bit.

Every check is recorded with its value, threshold and the base tokenizer's value
(`reconstruction_gate.json` in a run); a failed gate names the failed checks and says in one line
what to try. ``gate.override`` (notebook parameter ``ignore_gate``) continues anyway.

A gate is bound to the tokenizer it judged (``tokenizer``: its source and the sha256 of its weights), and
reading one decides pass / fail again from its numbers (a stored ``"passed"`` is never believed).
:func:`gate_for_phase2` is phase 2's requirement: the run's own adapted tokenizer needs a gate, the gate must
have judged the weights phase 2 loads, with the run's thresholds, and passed (else ``gate.override``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kronos_kit.binding import bind, run_relative, weights_sha256
from kronos_kit.codebook import CodebookStats
from kronos_kit.config import GateConfig, KitConfig
from kronos_kit.metrics import diebold_mariano, hac_lag
from kronos_kit.reconstruction import ReconstructionReport
from kronos_kit.runs import GATE, JsonFile, RunDir, json_float, run_choice

__all__ = ["CHECKS", "GateCheck", "GateResult", "TokenizerGateError", "gate_for_phase2", "gate_metrics", "gate_run",
           "paired_vs_base", "reconstruction_gate"]


class GateCheck(NamedTuple):
    threshold: str  # GateConfig field; "max_..." is an upper bound, "min_..." a lower one
    metric: str  # key in GateResult.metrics
    label: str  # what the number is, for the failure message
    advice: str  # what to try when it fails


_LONGER = "train longer (tokenizer_steps)"
_GENTLER = "a lower tokenizer.lr or fewer steps (or tokenizer_strategy=l2sp)"
CHECKS: tuple[GateCheck, ...] = (
    GateCheck("max_full_mse_vs_base", "full_mse_vs_base", "adapted / base full-decoder MSE",
              f"{_GENTLER}, or keep the base tokenizer (train_tokenizer=False)"),
    GateCheck("max_close_error_to_move", "close_error_to_move", "close error / median bar move",
              f"{_LONGER}, or a shorter data.lookback (the window's scale, and with it the price error, grows "
              "with it)"),
    GateCheck("max_high_low_error_to_move", "high_low_error_to_move", "high/low error / median bar move",
              f"{_LONGER}, or a shorter data.lookback"),
    GateCheck("max_full_mse", "full_mse", "full-decoder normalized MSE", _LONGER),
    GateCheck("max_full_to_s1_mse_ratio", "full_to_s1_mse_ratio", "full / s1-only MSE ratio", _LONGER),
    GateCheck("min_s1_usage", "s1_usage", "s1 codebook usage", f"{_GENTLER}, or more varied data"),
    GateCheck("min_s2_usage", "s2_usage", "s2 codebook usage", f"{_GENTLER}, or more varied data"),
    GateCheck("min_bit_balance", "min_bit_balance", "least balanced bit's min(P(1), P(0))", _GENTLER),
)
_BY_THRESHOLD = {c.threshold: c for c in CHECKS}


class TokenizerGateError(RuntimeError):
    """Raised by :meth:`GateResult.raise_if_failed` when the tokenizer failed the gate."""


@dataclass
class GateResult(JsonFile):
    """Outcome of :func:`reconstruction_gate`; JSON-serialisable with :meth:`save` / :meth:`load`.

    ``metrics`` are the adapted tokenizer's numbers, ``base`` the base tokenizer's on the same windows
    (empty without a base report), ``thresholds`` the limits (None: check off), ``failed`` the names of
    the failed checks' metrics, ``paired`` the paired test behind ``full_mse_vs_base``.
    """

    passed: bool
    metrics: dict[str, float | None]
    thresholds: dict[str, float | None]
    reasons: list[str] = field(default_factory=list)
    base: dict[str, float | None] = field(default_factory=dict)
    failed: list[str] | None = None  # None (files from before): decided again from value and threshold
    paired: dict[str, Any] | None = None
    advice: str = ""
    tokenizer: dict[str, Any] | None = None  # the tokenizer judged: {"source", "sha256"} (`binding.bind`)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        def num(v: float | None) -> float | None:
            return json_float(v) if v is not None else None

        return {
            "passed": self.passed,
            "checks": [{"check": c, "metric": m, "value": num(self.metrics.get(m)), "threshold": t,
                        "base": num(self.base.get(m)), "passed": m not in self._failed()}
                       for c, m, t in self._active()],
            "metrics": {k: num(v) for k, v in self.metrics.items()},
            "base": {k: num(v) for k, v in self.base.items()},
            "thresholds": dict(self.thresholds),
            "failed": list(self._failed()),
            "paired": self.paired,
            "reasons": list(self.reasons),
            "advice": self.advice,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        """The gate as saved, decided again from its numbers and thresholds: a stored ``passed`` is never
        believed; a stored failure of a check whose value was not finite (saved as null) stands."""
        metrics, base, paired = dict(d["metrics"]), dict(d.get("base") or {}), d.get("paired")
        limits = dict(d["thresholds"])
        level = float(paired["level"]) if isinstance(paired, Mapping) and "level" in paired else \
            GateConfig.base_test_level
        reasons, failed, advice = _decide(metrics, base, paired, limits, level)
        stood = [m for m in d.get("failed") or [] if m not in failed and metrics.get(m) is None]
        reasons += [f"{m} was not finite" for m in stood]
        tokenizer = d.get("tokenizer")
        return cls(not failed and not stood, metrics, limits, reasons, base, failed + stood, paired, advice,
                   dict(tokenizer) if isinstance(tokenizer, Mapping) else None)

    def _active(self) -> list[tuple[str, str, float]]:
        """(threshold name, metric, limit) of every check that ran: a limit and a value."""
        out = []
        for key, limit in self.thresholds.items():
            metric = _BY_THRESHOLD[key].metric if key in _BY_THRESHOLD else key[4:]
            if limit is not None and self.metrics.get(metric) is not None:
                out.append((key, metric, limit))
        return out

    def _failed(self) -> list[str]:
        if self.failed is not None:
            return self.failed
        return [m for key, m, limit in self._active() if not _within(self.metrics[m], limit, key.startswith("max_"))]

    def summary(self) -> str:
        if self.passed:
            return "Tokenizer gate passed."
        text = "Tokenizer gate FAILED: " + "; ".join(self.reasons) + "."
        return f"{text} Try: {self.advice}." if self.advice else text

    def checks(self) -> list[str]:
        """One short line per active check: the number, its threshold, ok / FAIL and the base's number
        (e.g. ``close_error_to_move 0.62 <= 1 ok (base 0.68)``)."""
        failed, lines = self._failed(), []
        for key, metric, limit in self._active():
            line = (f"{metric} {self.metrics[metric]:.4g} {'<=' if key.startswith('max_') else '>='} {limit:.4g} "
                    f"{'FAIL' if metric in failed else 'ok'}")
            notes = [f"base {self.base[metric]:.4g}"] if self.base.get(metric) is not None else []
            if metric == "full_mse_vs_base" and self.paired:
                notes.append(f"paired DM one-sided p {self.paired['p_value']:.3g}")
            lines.append(line + (f" ({', '.join(notes)})" if notes else ""))
        return lines

    def report(self) -> str:
        """The summary, then every check with its number against its threshold, one per line."""
        return "\n".join([self.summary(), *(f"  {line}" for line in self.checks())])

    def raise_if_failed(self, *, override: bool = False) -> None:
        """Stop the pipeline on a failed gate, unless ``override`` (then only warn)."""
        if self.passed:
            return
        if override:
            warnings.warn(self.summary() + " Continuing because the gate was overridden.", stacklevel=2)
            return
        raise TokenizerGateError(self.summary() + " Or pass override=True (ignore_gate=True) to continue anyway.")


def _within(value: float, limit: float, upper: bool) -> bool:
    return math.isfinite(value) and (value <= limit if upper else value >= limit)


def gate_metrics(report: ReconstructionReport, stats: CodebookStats | None) -> dict[str, float | None]:
    """The numbers the gate checks (without the comparison to the base): None where they cannot be had."""
    full_mse, s1_mse = report.full_mse, report.s1_mse
    ratio = full_mse / s1_mse if s1_mse > 0 else (1.0 if full_mse == 0 else float("inf"))
    high_low = [report.error_to_move(c) for c in ("high", "low")]
    returns = report.returns or {}
    return {
        "full_mse": full_mse,
        "s1_mse": s1_mse,
        "full_to_s1_mse_ratio": ratio,
        "close_error_to_move": report.error_to_move("close"),
        "high_low_error_to_move": max(high_low) if None not in high_low else None,
        "close_error_bp": returns.get("close_error_bp"),
        "high_error_bp": returns.get("high_error_bp"),
        "low_error_bp": returns.get("low_error_bp"),
        "median_move_bp": returns.get("median_move_bp"),
        "s1_usage": stats.s1.usage if stats is not None else None,
        "s2_usage": stats.s2.usage if stats is not None else None,
        "min_bit_balance": (
            float(min(min(p, 1 - p) for p in stats.bit_balance)) if stats is not None and stats.n_tokens else None
        ),
    }


def paired_vs_base(report: ReconstructionReport, base: ReconstructionReport, *, tolerance: float,
                   level: float) -> dict[str, Any]:
    """The paired comparison behind ``full_mse_vs_base``: ratio of the per-window mean full MSEs and the
    one-sided Diebold-Mariano test of d_w = adapted_w - (1 + tolerance) base_w > 0 (see the module)."""
    a, b = report.windows, base.windows
    if a is None or b is None or len(a) != len(b) or (a.start is not None and a.start != b.start):
        raise ValueError("the adapted and base reconstruction reports must cover the same windows in the same order "
                         "(run reconstruction_report of both tokenizers on the same dataset)")
    ma, mb = a.array("full_mse"), b.array("full_mse")
    ok = np.isfinite(ma) & np.isfinite(mb)
    ma, mb = ma[ok], mb[ok]
    d = ma - (1 + tolerance) * mb
    # overlapping windows make d persistent: a data-dependent lag (below n/2, as HLN needs)
    lag = max(0, min(hac_lag(d), (len(d) - 1) // 2 - 1))
    dm = diebold_mariano(ma, (1 + tolerance) * mb, lag=lag)
    p_one = dm.p_value / 2 if dm.statistic > 0 else 1 - dm.p_value / 2  # H1: adapted worse beyond tolerance
    ratio = float(ma.mean() / mb.mean()) if len(ma) and mb.mean() > 0 else float("nan")
    return {"test": f"one-sided {dm.test}", "ratio": ratio, "tolerance": round(tolerance, 12),
            "statistic": dm.statistic,
            "p_value": float(p_one) if math.isfinite(p_one) else float("nan"), "level": level,
            "significant": bool(math.isfinite(p_one) and p_one < level), "n_windows": dm.n, "lag": dm.lag,
            "adapted_mean": float(ma.mean()) if len(ma) else None, "base_mean": float(mb.mean()) if len(mb) else None}


def reconstruction_gate(
    report: ReconstructionReport,
    stats: CodebookStats | None,
    config: GateConfig | None = None,
    *,
    base: ReconstructionReport | None = None,
    base_stats: CodebookStats | None = None,
    tokenizer: str | None = None,
    **thresholds: float | None,
) -> GateResult:
    """Decide whether the adapted tokenizer (``report``, ``stats``) is fit for phase 2.

    ``config`` (the run's ``cfg.gate``, default `GateConfig()`) gives the thresholds; keyword arguments
    named like its fields override single ones (None disables a check). With ``base`` (the base
    tokenizer's report on the same windows) the gate compares against it and records the base's value
    of every metric; ``base_stats`` adds the base's codebook numbers. Without ``stats`` the codebook
    checks are skipped (their metrics are None). ``tokenizer`` (the adapted tokenizer's source) binds the gate to
    the weights it judged: phase 2 refuses a gate for other weights (`gate_for_phase2`). Defaults and why: see
    `GateConfig` and the README.
    """
    cfg = config or GateConfig()
    unknown = set(thresholds) - {f.name for f in fields(GateConfig)}
    if unknown:
        raise TypeError(f"reconstruction_gate: unknown thresholds {sorted(unknown)}; use GateConfig's field names")
    limits = {c.threshold: thresholds.get(c.threshold, getattr(cfg, c.threshold)) for c in CHECKS}
    level = float(thresholds.get("base_test_level", cfg.base_test_level) or cfg.base_test_level)
    metrics = gate_metrics(report, stats)
    metrics["full_mse_vs_base"] = None
    base_metrics: dict[str, float | None] = {}
    paired = None
    if base is not None:
        base_metrics = gate_metrics(base, base_stats)
        tolerance = (limits["max_full_mse_vs_base"] or 1.0) - 1.0
        paired = paired_vs_base(report, base, tolerance=tolerance, level=level)
        metrics["full_mse_vs_base"], base_metrics["full_mse_vs_base"] = paired["ratio"], 1.0
    reasons, failed, advice = _decide(metrics, base_metrics, paired, limits, level)
    return GateResult(passed=not failed, metrics=metrics, thresholds=limits, reasons=reasons, base=base_metrics,
                      failed=failed, paired=paired, advice=advice,
                      tokenizer=None if tokenizer is None else bind({"tokenizer": str(tokenizer)})["tokenizer"])


def _decide(metrics: Mapping[str, float | None], base_metrics: Mapping[str, float | None],
            paired: Mapping[str, Any] | None, limits: Mapping[str, float | None],
            level: float) -> tuple[list[str], list[str], str]:
    """(reasons, failed metrics, advice) of the checks: every check with a limit and a value. The paired test's
    significance is decided again from its p-value and ``level``."""
    reasons, failed, advice = [], [], []
    for check in CHECKS:
        value, limit, upper = metrics.get(check.metric), limits.get(check.threshold), check.threshold.startswith("max_")
        if limit is None or value is None:
            continue
        if check.metric == "full_mse_vs_base":
            p_value = float((paired or {}).get("p_value", float("nan")) or float("nan"))
            significant = math.isfinite(p_value) and p_value < level
            bad = not math.isfinite(value) or (value > limit and significant)
        else:
            bad = not _within(value, limit, upper)
        if not bad:
            continue
        failed.append(check.metric)
        advice.append(check.advice)
        if not math.isfinite(value):
            reasons.append(f"{check.metric} ({check.label}) is {value} (not finite)")
        else:
            side, bound = ("above", "maximum") if upper else ("below", "minimum")
            extra = (f", significantly (paired DM one-sided p {paired['p_value']:.3g} < {level:g})"
                     if check.metric == "full_mse_vs_base" else "")
            was = f"; the base tokenizer has {base_metrics[check.metric]:.4g}" if base_metrics.get(
                check.metric) is not None and check.metric != "full_mse_vs_base" else ""
            reasons.append(f"{check.metric} ({check.label}) {value:.4g} is {side} the {bound} {limit:.4g}{extra}{was}")
    return reasons, failed, "; or ".join(dict.fromkeys(advice))


def gate_for_phase2(run_dir: str | Path, cfg: KitConfig) -> GateResult | None:
    """The reconstruction gate that lets phase 2 start on the tokenizer it loads (`runs.run_choice`, finetuned).

    The run's own adapted tokenizer needs a gate (`reconstruction_gate.json`; another tokenizer, e.g. the base
    with phase 1 off, only when the run holds one), and that gate must have judged these weights, with the run's
    thresholds (``cfg.gate``), and passed, decided again from its numbers. Otherwise `TokenizerGateError`, or
    with ``gate.override`` (``ignore_gate``) a warning. None when no gate is needed and the run has none.
    """
    run_dir = Path(run_dir)
    source = run_choice(run_dir, cfg, model="finetuned").tokenizer_source
    gate = GateResult.load(run_dir / GATE) if (run_dir / GATE).is_file() else None
    problem = _gate_problem(gate, source, run_dir, cfg.gate)
    if problem is None:
        return gate
    unclear = f"the reconstruction gate did not clear the tokenizer {run_relative(source, run_dir)}: {problem}"
    if cfg.gate.override:
        warnings.warn(f"phase 2 goes on because gate.override (ignore_gate) is set, although {unclear}", stacklevel=2)
        return gate
    raise TokenizerGateError(f"phase 2 refused: {unclear} Judge the tokenizer again (notebook 01; python -m kronos_kit "
                             f"pipeline --run-dir {run_dir} --from 01; or for a run trained with the train command "
                             f"python -m kronos_kit gate --config CONFIG --run-dir {run_dir}), or set ignore_gate=true "
                             "(gate.override) to train phase 2 anyway.")


def _gate_problem(gate: GateResult | None, source: str, run_dir: Path, config: GateConfig) -> str | None:
    """Why ``gate`` does not let phase 2 start on ``source`` (None: it does)."""
    if gate is None:
        own = run_relative(source, run_dir) != source  # the run's own tokenizer/best (phase 1 trained it)
        return f"no reconstruction gate judged it ({GATE} is missing)." if own else None
    if gate.tokenizer is None:
        return f"{GATE} does not name the tokenizer it judged (written before gates were bound to their weights)."
    judged, now = gate.tokenizer.get("sha256"), weights_sha256(source)
    if judged != now or (judged is None and gate.tokenizer.get("source") != source):
        return (f"{GATE} judged {gate.tokenizer.get('source')} with weights sha256 {str(judged)[:12]}..., but the "
                f"tokenizer has sha256 {str(now)[:12]}... now (retrained or replaced after the gate).")
    limits = {**{c.threshold: gate.thresholds.get(c.threshold) for c in CHECKS},
              **({"base_test_level": gate.paired.get("level")} if gate.paired else {})}
    changed = [f"gate.{k} {v!r} in the gate, {getattr(config, k)!r} in the config" for k, v in limits.items()
               if v != getattr(config, k)]
    if changed:
        return f"{GATE} was judged with other thresholds than the run's config ({'; '.join(changed)})."
    return None if gate.passed else gate.summary()


def gate_run(cfg: KitConfig, *, data: Any = None) -> GateResult:
    """What notebook 01 ends with, in one call (`python -m kronos_kit gate`, for a run trained from the command
    line): the run's adapted tokenizer (`runs.run_choice`) and its base (``tokenizer.start_from``) on the validation
    windows, their reconstruction reports and codebook statistics, judged with the run's thresholds, bound to the
    adapted weights and saved (`reconstruction_gate.json`, `codebook_before.json`, `codebook_after.json`) under
    the run folder's lock. ``data``: the run's `DataBundle` when already loaded."""
    from kronos_kit.codebook import codebook_stats
    from kronos_kit.data import load_data
    from kronos_kit.model import KronosTokenizer
    from kronos_kit.reconstruction import reconstruction_report
    from kronos_kit.run_lock import run_lock

    if cfg.run_dir is None:
        raise ValueError("run_dir is not set: the gate judges the tokenizer of a run folder")
    rd = RunDir(cfg.run_dir)
    with run_lock(rd.path, "judging the tokenizer"):
        data = data or load_data(cfg)
        source = run_choice(rd.path, cfg, model="finetuned").tokenizer_source
        judged = {}
        for name, tokenizer in (("base", cfg.tokenizer.start_from), ("adapted", source)):
            model = KronosTokenizer.from_pretrained(tokenizer)
            judged[name] = (reconstruction_report(model, data.val), codebook_stats(model, data.val))
        judged["base"][1].save(rd.codebook_before)
        judged["adapted"][1].save(rd.codebook_after)
        gate = reconstruction_gate(*judged["adapted"], cfg.gate, base=judged["base"][0], base_stats=judged["base"][1],
                                   tokenizer=source)
        gate.save(rd.gate)
    return gate
