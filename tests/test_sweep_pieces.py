"""The sweep's pieces, each on its own: the search space file, the objective seam (validation CRPS or a
universe's RankIC, read from the run folder), taking trials atomically, recovering a killed trial, the
on-disk token cache (identical to encoding on the fly), the engine's stop hook, the TensorBoard mirror."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import DATA

from kronos_kit.config import KitConfig
from kronos_kit.runs import read_metrics, save_json
from kronos_kit.sweep import CLOSE_CRPS, RANK_IC, SearchSpace, choose_objective, universe_reason
from kronos_kit.sweep.probe import ProbePruner, replay_pruning
from kronos_kit.sweep.study import add_slots, open_storage, open_study, recover_orphans, take_trial

ROOT = Path(__file__).resolve().parent.parent
TINY = {"device": "cpu", "data.source": str(DATA / "ashare_5min_sample.csv"), "data.symbol": "A",
        "data.lookback": 30, "data.predict": 5, "tokenizer.start_from": "embedded:base/tokenizer",
        "predictor.start_from": "embedded:base/predictor", "tokenizer.enabled": False, "predictor.batch_size": 16,
        "predictor.max_steps": 6, "predictor.eval_every": 2, "predictor.skill_origins": 4,
        "predictor.skill_paths": 2, "predictor.skill_horizon": 5}


def space(**sweep) -> SearchSpace:
    return SearchSpace.from_dict({"sweep": {"trials": 4, **sweep}, "space": {
        "predictor.lr": {"low": "1e-5", "high": 2.0e-4, "log": True},
        "predictor.strategy": {"choices": ["full", "lora", "l2sp"]},
        "predictor.lora_rank": {"choices": [2, 4], "when": {"predictor.strategy": "lora"}},
        "predictor.max_steps": {"low": 2, "high": 8, "step": 2}}})


# ------------------------------------------------------------------------------------ the search space


def test_space_suggests_conditional_parameters_only_when_their_condition_holds():
    sp, base = space(), KitConfig().with_overrides({"predictor.max_steps": 4})
    assert sp.params[0].low == 1e-5 and sp.params[3].integer  # YAML's "1e-5" text is a number
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = sp.suggest(trial, base)
        seen.add(values["predictor.strategy"])
        assert ("predictor.lora_rank" in values) == (values["predictor.strategy"] == "lora")
        assert values["predictor.max_steps"] in (2, 4, 6, 8) and 1e-5 <= values["predictor.lr"] <= 2e-4
        study.tell(trial, 0.0)
    assert seen == {"full", "lora", "l2sp"}
    # trial 0: the base config's values of the parameters active under it
    assert sp.defaults(base) == {"predictor.lr": 4e-5, "predictor.strategy": "full", "predictor.max_steps": 4}


@pytest.mark.parametrize(("values", "match"), [
    ({"space": {"predictor.learning_rate": {"low": 1, "high": 2}}}, "did you mean .*'predictor.lr'"),
    ({"space": {"predictor.lr": {"low": 2e-4, "high": 1e-5}}}, "low must be below high"),
    ({"space": {"predictor.lr": {"low": 0.0, "high": 1e-4, "log": True}}}, "log range needs low > 0"),
    ({"space": {"predictor.lr": {"choices": [1e-5], "low": 1e-6}}}, "either choices or a range"),
    ({"space": {"predictor.lora_rank": {"choices": [2], "when": {"predictor.strategy": "lora"}},
                "predictor.strategy": {"choices": ["full", "lora"]}}}, "searched later in the file"),
    ({"sweep": {"trials": 0}, "space": {"predictor.lr": {"low": 1e-5, "high": 1e-4}}}, "trials must be"),
    ({"sweep": {"objective": "sharpe"}, "space": {"predictor.lr": {"low": 1e-5, "high": 1e-4}}}, "objective must"),
    ({"space": {}}, "at least one"),
])
def test_a_bad_space_file_is_refused_naming_the_entry(values, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace.from_dict(values)


def test_the_base_config_must_lie_inside_the_space_because_it_is_trial_0():
    sp = SearchSpace.from_dict({"space": {"predictor.lr": {"low": 1e-4, "high": 2e-4}}})
    with pytest.raises(ValueError, match=r"predictor.lr = 4e-05 is outside"):
        sp.check(KitConfig())
    bad = SearchSpace.from_dict({"space": {"predictor.strategy": {"choices": ["full", "adam"]}}})
    with pytest.raises(ValueError, match="'adam' is not a valid config value"):
        bad.check(KitConfig())


SHIPPED = {"default.yaml": "sweep-small.yaml", "universe.yaml": "sweep-universe.yaml"}  # space -> its base config


@pytest.mark.parametrize(("space_file", "config_file"), SHIPPED.items())
def test_the_shipped_search_spaces_load_and_hold_their_base_config(space_file, config_file):
    """Each space file in configs/sweeps (a clone once lacked it: .gitignore hid the folder) loads, and its base
    config, trial 0, lies inside it; the command in its header names that pair."""
    assert {p.name for p in (ROOT / "configs" / "sweeps").glob("*.yaml")} == set(SHIPPED)
    path = ROOT / "configs" / "sweeps" / space_file
    SearchSpace.from_file(path).check(KitConfig.from_file(ROOT / "configs" / config_file))
    assert f"--config configs/{config_file} --space configs/sweeps/{space_file}" in path.read_text()


# ------------------------------------------------------------------------------------ the objective seam


def test_the_objective_is_read_from_the_trials_own_validation_files(tmp_path):
    save_json(tmp_path / "promoted.json", {"metric": "close_crps", "evidence": {
        "finetuned": "finetuned", "metric": {"model_mean": 12.5, "other_mean": 13.0}}})
    assert CLOSE_CRPS.read(tmp_path) == 12.5 and CLOSE_CRPS.read_reference(tmp_path) == 13.0
    with pytest.raises(ValueError, match="universe.json not found"):
        RANK_IC.read(tmp_path)
    # the contract of the universe evaluation (issue 25): validation.finetuned.rank_ic, maximized
    save_json(tmp_path / "universe.json", {"validation": {"finetuned": {"rank_ic": 0.031}, "base": {"rank_ic": 0.02}},
                                           "test": {"finetuned": {"rank_ic": 0.9}, "base": {"rank_ic": -0.9}}})
    assert RANK_IC.read(tmp_path) == 0.031 and RANK_IC.direction == "maximize"
    assert RANK_IC.read_reference(tmp_path) == 0.02  # the base model on validation, never the test entry
    assert RANK_IC.better(0.04, 0.031) and CLOSE_CRPS.better(12.0, 12.5)
    # a RankIC near zero changes by a difference (a share of 0.02 means nothing); a CRPS by a share
    assert RANK_IC.change(0.031, 0.02) == pytest.approx(0.011) and RANK_IC.format_change(0.011) == "+0.011"
    assert CLOSE_CRPS.change(12.5, 13.0) == pytest.approx(0.5 / 13) and CLOSE_CRPS.format_change(0.05) == "5.0%"
    save_json(tmp_path / "universe.json", {"validation": {"finetuned": {"rank_ic": None}}})
    with pytest.raises(ValueError, match="no finite validation RankIC"):
        RANK_IC.read(tmp_path)


def _splits(frame: pd.DataFrame):
    from kronos_kit.data import load_ohlcv, split

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return split(load_ohlcv(frame), lookback=30, predict=5, ratios=(0.6, 0.2, 0.2))


def _bars(symbol: str, start: str, n: int = 300) -> pd.DataFrame:
    close = 50 * np.exp(np.cumsum(np.random.default_rng(len(symbol) + n).normal(0, 0.01, n)))
    return pd.DataFrame({"symbol": symbol, "timestamps": pd.bdate_range(start, periods=n), "open": close,
                         "high": close * 1.01, "low": close * 0.99, "close": close, "volume": 1e5})


def test_the_objective_follows_the_universe_evaluations_own_rule():
    """auto is the RankIC exactly when a run of the base config evaluates a universe (cross_section_reason):
    enough symbols sharing rebalance dates in validation and test, and evaluation.universe on."""
    from kronos_kit.evaluate.universe_evaluation import cross_section_reason

    cfg = KitConfig().with_overrides({"data.lookback": 30, "evaluation.pred_len": 5, "evaluation.rebalance_stride": 5})
    panel = _splits(pd.concat([_bars(f"S{k}", "2020-01-01") for k in range(6)]))
    one = _splits(_bars("S0", "2020-01-01"))
    few = cfg.with_overrides({"evaluation.universe_min_symbols": 7})  # 6 symbols share dates, 7 are asked for
    off = cfg.with_overrides({"evaluation.universe": False})
    assert choose_objective("auto", cfg, panel) is RANK_IC and choose_objective("auto", cfg, one) is CLOSE_CRPS
    for other in (few, off):  # a stand-in rule ("several symbols share a date") would call both a universe
        assert choose_objective("auto", other, panel) is CLOSE_CRPS
        assert universe_reason(other, panel) == cross_section_reason(panel, other.evaluation, lookback=30)
    assert choose_objective("close_crps", cfg, panel) is CLOSE_CRPS
    with pytest.raises(ValueError, match="rank_ic needs a universe, but no cross-section: .* 1 symbol"):
        choose_objective("rank_ic", cfg, one)
    with pytest.raises(ValueError, match="promotes on the validation RankIC .*sweep.objective: rank_ic"):
        choose_objective("close_crps", cfg.with_overrides({"evaluation.promote_on": "rank_ic"}), panel)


# ------------------------------------------------------------------------------------ the pruner's probe


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_pruner_stops_the_worse_probe_whatever_the_objectives_direction(direction):
    """The probe (val_crps) is lower-is-better also in a RankIC study (maximize): Optuna's MedianPruner would read
    it the study's way round there and stop the trial that forecasts best."""
    study = optuna.create_study(direction=direction, pruner=ProbePruner(n_startup_trials=2, n_warmup_steps=0))
    for probe in (10.0, 12.0):  # two finished trials: the median of the probe at step 30 is 11
        trial = study.ask()
        trial.report(probe, 30)
        study.tell(trial, 0.0)
    worse, better = study.ask(), study.ask()
    worse.report(11.5, 30)
    better.report(10.5, 30)
    assert worse.should_prune() and not better.should_prune()


def test_the_replayed_median_rule_stops_what_the_live_pruner_stopped():
    """With pruning off the report replays the rule on the finished trials; run live in the same order, the
    pruner stops the same trials at the same steps."""
    rng = np.random.default_rng(3)
    curves = [dict(zip((30, 60, 90), 10 + np.cumsum(rng.normal(0, 1, 3)))) for _ in range(10)]
    settings = SearchSpace.from_dict({"sweep": {"prune_startup_trials": 3}, "space": {
        "predictor.lr": {"low": 1e-5, "high": 1e-4}}}).settings
    live = optuna.create_study(direction="maximize", pruner=ProbePruner(3, 0))
    off = optuna.create_study(direction="maximize")
    stopped = {}
    for number, curve in enumerate(curves):
        trial, full = live.ask(), off.ask()
        for step, value in curve.items():
            full.report(value, step)
            trial.report(value, step)
            if number and trial.should_prune():  # trial 0 (the base config) is never pruned
                stopped[number] = step
                live.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            live.tell(trial, float(number))
        off.tell(full, float(number))
    done = off.get_trials()
    done[0].user_attrs["role"] = "default"
    assert stopped and replay_pruning(done, settings) == stopped


# ------------------------------------------------------------------------------------ slots, workers, recovery


def _take_all(url: str, name: str, out) -> None:
    storage = open_storage(url)
    sp = space()
    study = open_study(storage, name, sp.settings)
    taken = []
    while (trial := take_trial(study, storage, sp.settings)) is not None:
        taken.append(trial.number)
        time.sleep(0.01)
    out.put(taken)


def test_two_processes_taking_slots_never_get_the_same_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    sp = space()
    study = open_study(open_storage(url), "s", sp.settings, direction="minimize")
    add_slots(study, 30, sp.defaults(KitConfig()))
    assert add_slots(study, 30, {}) == 0  # a resume adds none; --trials 32 would add two
    queue = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_take_all, args=(url, "s", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    taken = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(taken[0] + taken[1]) == list(range(30))  # every slot once, none twice
    assert taken[0] and taken[1]  # both took some


HOLD_LOCK = """
import sys, time
from kronos_kit.run_lock import run_lock
with run_lock(sys.argv[1], "a live trial"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_killed_trial_is_enqueued_again_with_its_parameters_and_folder(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    sp = space()
    study = open_study(storage, "s", sp.settings, direction="minimize")
    add_slots(study, 3, sp.defaults(KitConfig()))
    folders = []
    for _ in range(2):  # two running trials whose folders were locked by their workers
        trial = take_trial(study, storage, sp.settings)
        trial.suggest_float("predictor.lr", 1e-5, 2e-4, log=True)
        folder = tmp_path / f"trial{trial.number}"
        folder.mkdir()
        trial.set_user_attr("run_dir", str(folder))
        trial.set_user_attr("locked", True)
        trial.report(0.5, 2)
        folders.append(folder)
    live = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folders[1])], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert live.stdout.readline().strip() == "held"
        assert recover_orphans(study, storage) == [0]  # trial 1's worker is alive: left alone
    finally:
        live.kill()
        live.wait()
    trials = study.get_trials(deepcopy=False)
    dead = trials[0]
    assert dead.state.name == "FAIL" and dead.user_attrs["interrupted"]
    retry = trials[-1]
    assert retry.state.name == "WAITING" and retry.user_attrs["retry_of"] == 0
    assert retry.params == dead.params and retry.user_attrs["run_dir"] == str(folders[0])
    assert retry.intermediate_values == {2: 0.5}
    # the retry is taken before the untouched slot, and continues in the killed trial's folder
    again = take_trial(study, storage, sp.settings)
    assert again.number == retry.number and again.params == dead.params


# ------------------------------------------------------------------------------------ token cache, engine hooks


def tiny(tmp_path: Path, **extra) -> KitConfig:
    return KitConfig().with_overrides({**TINY, "cache_dir": str(tmp_path / "cache"), **extra})


def test_cached_tokens_equal_tokens_encoded_on_the_fly(tmp_path):
    from kronos_kit.data import load_data
    from kronos_kit.model import KronosTokenizer
    from kronos_kit.token_cache import open_token_tables
    from kronos_kit.train import FrozenTokens

    cfg = tiny(tmp_path, **{"data.max_samples_per_epoch": 300})
    bundle = load_data(cfg)
    tokenizer = KronosTokenizer.from_pretrained("embedded:base/tokenizer")
    tables = open_token_tables(tmp_path / "tokens", tokenizer, {"train": bundle.train, "val": bundle.val},
                               data_key=bundle.cache.name, cfg=cfg, progress=False)
    assert len(tables["train"].index) == bundle.train.n_windows > len(bundle.train)  # every window, not one epoch
    fly, cached = FrozenTokens(tokenizer, cache=False), FrozenTokens(tokenizer, table=tables["train"])
    for epoch in range(2):  # shuffled batches of the epoch's sample, as training draws them
        bundle.train.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(bundle.train, batch_size=37, shuffle=True,
                                             generator=torch.Generator().manual_seed(epoch))
        for batch in loader:
            a, b = fly(batch, torch.device("cpu")), cached(batch, torch.device("cpu"))
            assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))
    # reopening reads the entry (no second encoding); other weights get their own entry
    again = open_token_tables(tmp_path / "tokens", tokenizer, {"val": bundle.val}, data_key=bundle.cache.name,
                              cfg=cfg, progress=False)
    assert np.array_equal(again["val"].s1, tables["val"].s1)
    with torch.no_grad():
        tokenizer.head.weight.mul_(1.01)
    open_token_tables(tmp_path / "tokens", tokenizer, {"val": bundle.val}, data_key=bundle.cache.name, cfg=cfg,
                      progress=False)
    assert len(list((tmp_path / "tokens").glob("tokens-*/meta.json"))) == 2


@pytest.mark.slow
def test_phase2_trains_the_same_weights_from_the_token_cache(tmp_path):
    from kronos_kit.model import Kronos, weights_hash
    from kronos_kit.train import train_predictor

    hashes = []
    for name, extra in (("fly", {}), ("cached", {"predictor.token_cache_dir": str(tmp_path / "tokens")})):
        result = train_predictor(tiny(tmp_path, run_dir=str(tmp_path / name), **extra), progress=False)
        hashes.append(weights_hash(Kronos.from_pretrained(result.best_dir)))
    assert hashes[0] == hashes[1]
    assert list((tmp_path / "tokens").glob("tokens-*/train_s1.npy"))


def test_on_validate_stops_a_phase_and_its_state_says_so(tmp_path):
    from kronos_kit.runs import load_training_state
    from kronos_kit.train import train_predictor

    cfg = tiny(tmp_path, run_dir=str(tmp_path / "run"))
    seen = []

    def prune_at_4(step, metrics):
        seen.append((step, metrics["val_crps"]))
        return "pruned" if step >= 4 else None

    result = train_predictor(cfg, progress=False, on_validate=prune_at_4)
    assert (result.stopped, result.steps) == ("pruned", 4) and [s for s, _ in seen] == [2, 4]
    assert load_training_state(tmp_path / "run" / "state" / "predictor.pt")["stopped"] == "pruned"
    again = train_predictor(cfg, progress=False, resume=True, on_validate=prune_at_4)  # finished: nothing more
    assert (again.stopped, again.steps) == ("pruned", 4) and len(seen) == 2


def test_tensorboard_scalars_mirror_the_metrics_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kronos_kit.train import train_predictor

    run = tmp_path / "run"
    train_predictor(tiny(tmp_path, run_dir=str(run), tensorboard=True), progress=False)
    events = EventAccumulator(str(run / "tensorboard" / "predictor"))
    events.Reload()
    log = read_metrics(run / "metrics.jsonl", "predictor")
    loss = [(r["step"], r["loss"]) for r in log if r["kind"] == "train"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("predictor_train/loss")] == loss
    crps = [(r["step"], r["val_crps"]) for r in log if r["kind"] in ("reference", "eval")]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("predictor_val/val_crps")] == crps
    assert crps[0][0] == 0  # the base model's step-0 validation starts the curve


def test_a_resumed_phase_hides_the_interrupted_attempts_later_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kronos_kit.tracking import TensorBoardLog

    first = TensorBoardLog(tmp_path)
    for step in range(6):
        first.write({"phase": "predictor", "kind": "train", "step": step, "loss": 1.0})
    first.close()
    resumed = TensorBoardLog(tmp_path)  # continues from the state saved at step 3
    for step in range(4, 8):
        resumed.write({"phase": "predictor", "kind": "train", "step": step, "loss": 2.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "predictor"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("predictor_train/loss")] == \
        [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0)]


# ------------------------------------------------------------------------------------ mistakes at the command line


@pytest.mark.parametrize(("words", "match"), [
    (["--sweep-dir", "{tmp}/s"], "--space: give the search space file"),
    (["--space", "{tmp}/nothing.yaml", "--sweep-dir", "{tmp}/s"], "search space file .* not found"),
    (["--space", "{space}", "--sweep-dir", "{tmp}/s", "-p", "predictor.lr=1e-3"], "predictor.lr = 0.001 is outside"),
    (["--space", "{space}", "--sweep-dir", "{tmp}/s", "--workers", "0"], "--workers 0"),
    (["--sweep-dir", "{tmp}", "--resume"], "is not a sweep folder"),
    (["--space", "{space}", "--sweep-dir", "{tmp}/s", "--resume"], "leave out"),
])
def test_sweep_mistakes_are_an_error_line_with_exit_2_and_create_nothing(tmp_path, capsys, words, match):
    from kronos_kit.__main__ import main

    path = tmp_path / "space.yaml"
    path.write_text("space:\n  predictor.lr: {low: 1.0e-5, high: 2.0e-4, log: true}\n")
    words = [w.format(tmp=tmp_path, space=path) for w in words]
    data = ["-p", f"data={DATA / 'ashare_5min_sample.csv'}", "-p", "data.symbol=A"]
    assert main(["sweep", *words, *(data if "--resume" not in words else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err
    assert not (tmp_path / "s").exists()


def test_notebook_04_starts_with_a_parameters_cell_of_literals_each_documented():
    import ast
    import json

    cells = [c for c in json.loads((ROOT / "notebooks" / "04_sweep.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    assignments = ast.parse("".join(cells[0]["source"])).body
    names = [a.targets[0].id for a in assignments]
    for a in assignments:
        ast.literal_eval(a.value)  # literals only: papermill injects values, nothing is derived here
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Notebook 04's parameters"):][:600]
    assert all(f"`{name}`" in section for name in names), names
    assert not any(c.get("outputs") or c.get("execution_count") for c in cells)


def test_the_selection_optimism_sentence_measures_a_rankic_gain_in_rankic_units():
    """The report's sentence for a RankIC sweep: the validation gain is a difference of RankICs (best 0.050 vs
    trial 0's 0.030: +0.020), the test gain is the paired per-date difference (+0.005), so a quarter held."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from kronos_kit.sweep.holdout import holdout_lines

    def trial(number: int, value: float):
        made = create_trial(value=value, params={"predictor.lr": 1e-4}, user_attrs={"role": "search"},
                            distributions={"predictor.lr": FloatDistribution(1e-5, 2e-4, log=True)})
        made.number = number
        return made

    def row(metric: str, model_mean: float, other_mean: float) -> dict:
        return {"model": "best", "other": "default", "metric": metric, "label": metric, "model_mean": model_mean,
                "other_mean": other_mean, "difference": model_mean - other_mean, "ci_low": -0.1, "ci_high": 0.1,
                "p_value": 0.6, "verdict": "no detectable difference", "mde": 0.08, "n": 77, "ci_level": 0.95}

    signals = ("best", "default", "base", "momentum", "reversal", "placebo")
    record = {"when": "now", "n_dates": 77, "n_symbols": 15, "best_naive": "momentum",
              "settings": {"signal": "expected_return", "horizon": 10, "stride": 5, "paths": 8, "topk": 3,
                           "n_drop": 1, "hold_bars": 5, "buy_cost_bps": 10.0, "sell_cost_bps": 15.0},
              "table": {s: {"rank_ic": 0.01, "rank_ic_t": 0.3, "rank_ic_p": 0.76, "ic": 0.0, "topk_excess": 0.02,
                            "topk_excess_gross": 0.05, "topk_ir": 0.1, "topk_breakeven_bps": -3.0,
                            "long_short": -0.1} for s in signals},
              "paired": [row("rank_ic", 0.012, 0.007), row("topk_excess", 0.04, 0.01)]}
    text = "\n".join(holdout_lines(trial(7, 0.050), trial(0, 0.030), RANK_IC, record, looks=1, trials=10))
    assert "RankIC is +0.050 against trial 0's +0.030 (+0.020); on test +0.012 against +0.007 (+0.005" in text
    assert "25% of the validation gain held on test" in text and "best of the sweep's 10 trials" in text
    assert "+4.0% a year against trial 0's +1.0%" in text
    assert "| best (trial 7) | +0.010 | 0.30 | p = 0.76 |" in text and "| none |" in text  # loses before costs
    record["paired"][0] = row("rank_ic", 0.002, 0.007)  # worse on test: nothing held, not a negative share
    assert "0% of the validation gain held on test" in "\n".join(
        holdout_lines(trial(7, 0.050), trial(0, 0.030), RANK_IC, record, looks=2, trials=10))


def test_sweep_figures_name_the_objective_on_their_axes():
    """The history and slice figures label the objective with the study's metric name (finish_sweep sets it to
    the objective's label), not Optuna's generic "Objective Value"."""
    from kronos_kit.plots import plot_sweep_history, plot_sweep_slices

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("predictor.lr", 1e-5, 2e-4, log=True) * 100, n_trials=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([RANK_IC.label])
    for fig in (plot_sweep_history(study), plot_sweep_slices(study)):
        assert "validation RankIC" in {ax.get_ylabel() for ax in fig.axes}
