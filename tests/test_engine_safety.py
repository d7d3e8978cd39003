"""The engine under attack: crafted state files, NaN gradients and metrics, kills mid-swap, changed configs
on resume, impossible configs, validation over several ranks, split-exact scoring, duplicated logs."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from test_train import smoke_config
from torch.utils.data import default_collate

from kronos_kit.data import load_data
from kronos_kit.model import Kronos, KronosTokenizer, weights_hash
from kronos_kit.runs import read_metrics, replace_dir
from kronos_kit.runtime import DistContext
from kronos_kit.train import (
    FrozenTokens,
    StepOutput,
    evaluate_tokenizer,
    make_predictor_evaluate,
    save_checkpoint,
    tokenizer_step,
    train_predictor,
    train_tokenizer,
)

SHORT = {"tokenizer.max_steps": 6, "tokenizer.eval_every": 2, "tokenizer.log_every": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(smoke_config(tmp_path_factory.mktemp("data-run")))


def interrupted(cfg, data, at: int, train=train_tokenizer):
    """Train until step `at`, then stop as a kill would (after the last save)."""
    def stop(step, parts):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=data, progress=False, on_step=stop)


# -------------------------------------------------------------------------- 1: a run folder is data


class _Payload:
    """What a crafted state file could hold: unpickling it with weights_only=False runs open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_state_is_plain_data_and_a_crafted_pickle_is_refused(tmp_path, data):
    cfg = smoke_config(tmp_path / "run", **SHORT)
    train_tokenizer(cfg, data=data, progress=False)
    state = torch.load(tmp_path / "run" / "state" / "tokenizer.pt", weights_only=True)  # plain data only
    assert state["step"] == 6 and isinstance(state["rng"]["numpy"]["key"], torch.Tensor)

    marker = tmp_path / "pwned"  # (torch warns about the pickle protocol of this file: expected)
    (tmp_path / "run" / "state" / "tokenizer.pt").write_bytes(pickle.dumps({"step": _Payload(marker)}))
    with pytest.raises(ValueError, match=r"tokenizer\.pt.*(?s:.*)run folder is data"):
        train_tokenizer(cfg, data=data, progress=False, resume=True)
    assert not marker.exists()


# -------------------------------------------------------------------------- 4: non-finite gradients


def nan_gradient_at(call: int):
    """A tokenizer step whose loss stays finite but whose gradient is NaN at the `call`-th batch."""
    calls = {"n": 0}

    def step(model, batch):
        out = tokenizer_step(model, batch)
        calls["n"] += 1
        if calls["n"] == call:
            weight = next(p for p in model.parameters() if p.requires_grad)
            poison = 0.0 * torch.sqrt(weight.sum() * 0.0)  # value 0, gradient 0 * inf = NaN
            return StepOutput(out.loss + poison, out.parts)
        return out

    return step


def test_nonfinite_gradient_stops_and_nothing_nonfinite_is_saved(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    monkeypatch.setattr(train_module, "tokenizer_step", nan_gradient_at(5))  # step 5, after the save at 4
    cfg = smoke_config(tmp_path, **SHORT)
    with pytest.raises(RuntimeError, match="non-finite gradient") as err:
        train_tokenizer(cfg, data=data, progress=False)
    assert "last good" not in str(err.value) and "step 4" in str(err.value)
    for kind in ("last", "best"):
        model = KronosTokenizer.from_pretrained(tmp_path / "tokenizer" / kind)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(tmp_path / "state" / "tokenizer.pt", weights_only=True)["step"] == 4


def test_nonfinite_gradient_skip_spends_the_step_without_an_update(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    monkeypatch.setattr(train_module, "tokenizer_step", nan_gradient_at(5))
    cfg = smoke_config(tmp_path, **SHORT, **{"tokenizer.nonfinite_grad": "skip"})
    result = train_tokenizer(cfg, data=data, progress=False)
    assert result.steps == 6 and result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in KronosTokenizer.from_pretrained(result.last_dir).parameters())
    skips = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "skip"]
    assert [(r["step"], r["grad_norm"]) for r in skips] == [(5, None)]


def test_save_checkpoint_refuses_nonfinite_weights_and_keeps_the_old_files(tmp_path):
    model = KronosTokenizer.from_preset("tiny")
    save_checkpoint(model, tmp_path / "last")
    before = (tmp_path / "last" / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match=r"refusing to write .*last.*non-finite"):
        save_checkpoint(model, tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last"]


# -------------------------------------------------------------------------- 5: a kill inside a swap


def _write(value: str):
    def write(folder):
        folder.mkdir()
        (folder / "w").write_text(value)

    return write


def _leave_swap_state(target, state: str) -> None:
    """Put `target` (holding "1") into one of the states a kill during `replace_dir` leaves behind."""
    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    half_written = lambda: (tmp.mkdir(), (tmp / "partial").write_text("x"))  # noqa: E731
    if state == "killed while writing tmp":
        half_written()
    elif state == "killed between the renames":  # target moved away, complete tmp not yet in place
        _write("2")(tmp)
        os.replace(target, old)
    elif state == "killed before deleting old":
        shutil.copytree(target, old)
    elif state == "killed while deleting old":
        shutil.copytree(target, old)
        (old / "w").unlink()
        (old / "more").mkdir()
        (old / "more" / "f").write_text("x")


SWAP_STATES = ["killed while writing tmp", "killed between the renames", "killed before deleting old",
               "killed while deleting old"]


@pytest.mark.parametrize("state", SWAP_STATES)
def test_every_interrupted_swap_state_recovers_on_the_next_save(tmp_path, state):
    target = tmp_path / "last"
    replace_dir(target, _write("1"))
    _leave_swap_state(target, state)
    replace_dir(target, _write("3"))
    assert (target / "w").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["last"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_rename_failing_mid_swap_is_recovered_by_the_next_save(tmp_path, monkeypatch, fail_at):
    import kronos_kit.atomic as runs_module  # where the run files' atomic writes live

    target = tmp_path / "last"
    replace_dir(target, _write("1"))
    calls, real = {"n": 0}, os.replace

    def dies(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt  # as if killed just before this rename
        real(src, dst)

    monkeypatch.setattr(runs_module.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, _write("2"))
    monkeypatch.setattr(runs_module.os, "replace", real)
    replace_dir(target, _write("3"))
    assert (target / "w").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["last"]


def _hashes(run_dir, phase="tokenizer", cls=KronosTokenizer):
    return [weights_hash(cls.from_pretrained(run_dir / phase / kind)) for kind in ("best", "last")]


@pytest.mark.parametrize("finished", [False, True])
def test_resume_recovers_checkpoints_left_mid_swap(tmp_path, data, finished):
    train_tokenizer(smoke_config(tmp_path / "whole", **SHORT), data=data, progress=False)
    cfg = smoke_config(tmp_path / "run", **SHORT)
    if finished:
        train_tokenizer(cfg, data=data, progress=False)
    else:
        interrupted(cfg, data, at=5)
    best, last = tmp_path / "run" / "tokenizer" / "best", tmp_path / "run" / "tokenizer" / "last"
    os.replace(best, best.with_name(".best.old"))  # killed between the renames of a `best` swap
    shutil.copytree(last, last.with_name(".last.old"))  # killed before the old `last` was deleted
    assert train_tokenizer(cfg, data=data, progress=False, resume=True).steps == 6
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == ["best", "last"]
    assert _hashes(tmp_path / "run") == _hashes(tmp_path / "whole")


# -------------------------------------------------------------------------- 6: resume checks the config


def test_resume_refuses_changed_settings_and_lists_them(tmp_path, data):
    interrupted(smoke_config(tmp_path, **SHORT), data, at=3)
    changed = smoke_config(tmp_path, **SHORT, **{"tokenizer.lr": 1e-3, "tokenizer.batch_size": 8, "data.stride": 3})
    with pytest.raises(ValueError, match=r"tokenizer\.batch_size: 16 -> 8; tokenizer\.lr: 0\.002 -> 0\.001") as err:
        train_tokenizer(changed, data=data, progress=False, resume=True)
    assert "data.stride: 2 -> 3" in str(err.value) and "resume_changed" in str(err.value)
    # fields that only decide when to log, validate or stop may change
    harmless = smoke_config(tmp_path, **{**SHORT, "tokenizer.log_every": 3, "tokenizer.patience": 5})
    assert train_tokenizer(harmless, data=data, progress=False, resume=True).steps == 6


def test_raising_max_steps_on_an_interrupted_run(tmp_path, data):
    interrupted(smoke_config(tmp_path, **SHORT), data, at=3)
    longer = {**SHORT, "tokenizer.max_steps": 10}
    with pytest.raises(ValueError, match=r"tokenizer\.max_steps: 6 -> 10"):
        train_tokenizer(smoke_config(tmp_path, **longer), data=data, progress=False, resume=True)
    allowed = smoke_config(tmp_path, **longer, **{"tokenizer.resume_changed": True})
    result = train_tokenizer(allowed, data=data, progress=False, resume=True)  # the schedule is rebuilt for 10
    assert result.steps == 10 and result.stopped == "max_steps"


def test_extending_a_finished_phase_is_refused_with_what_to_do(tmp_path, data):
    cfg = smoke_config(tmp_path, **SHORT)
    train_tokenizer(cfg, data=data, progress=False)
    assert train_tokenizer(cfg, data=data, progress=False, resume=True).steps == 6  # unchanged: nothing to do
    longer = smoke_config(tmp_path, **{**SHORT, "tokenizer.max_steps": 10, "tokenizer.resume_changed": True})
    with pytest.raises(ValueError, match=r"already finished.*max_steps: 6 -> 10.*start_from="):
        train_tokenizer(longer, data=data, progress=False, resume=True)


# -------------------------------------------------------------------------- 7: impossible configs


def test_a_config_that_cannot_make_one_step_per_epoch_is_refused(tmp_path, data):
    n = len(data.train)
    cfg = smoke_config(tmp_path, **{"tokenizer.grad_accum_steps": n // 16 + 1})
    with pytest.raises(ValueError, match=rf"{n} training windows .* = {16 * (n // 16 + 1)} windows"):
        train_tokenizer(cfg, data=data, progress=False)


# -------------------------------------------------------------------------- 8: validation over ranks


class _Rank(DistContext):
    """A fake rank: `sum` records its local sums (first pass) or returns the totals over ranks (second pass)."""

    def __init__(self, rank, world, totals=None):
        super().__init__(rank, world)
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "totals", totals)

    def sum(self, values, device):
        self.calls.append(list(values))
        return self.totals[len(self.calls) - 1] if self.totals is not None else values


def over_ranks(evaluate, model, dataset, world, batch_size=2):
    """`evaluate` run as `world` ranks would under torchrun (all-reduce replayed), with the engine's sharding."""
    from kronos_kit.train import validation_loader

    ranks = [_Rank(r, world) for r in range(world)]
    for ctx in ranks:  # first pass: each rank's local sums
        try:
            evaluate(model, validation_loader(dataset, batch_size, ctx), ctx)
        except ValueError:
            pass  # a rank without windows: its local totals are zero
    totals = [[sum(v) for v in zip(*calls)] for calls in zip(*(ctx.calls for ctx in ranks))]
    results = [evaluate(model, validation_loader(dataset, batch_size, _Rank(r, world, totals)),
                        _Rank(r, world, totals)) for r in range(world)]
    assert all(res == results[0] for res in results)
    return results[0]


@pytest.mark.parametrize("n_windows, world", [(3, 2), (3, 4), (5, 2)])
def test_validation_counts_every_window_once_over_ranks(data, n_windows, world):
    subset = torch.utils.data.Subset(data.val, range(n_windows))
    tok = KronosTokenizer.from_preset("tiny")
    single = evaluate_tokenizer(tok, torch.utils.data.DataLoader(subset, batch_size=2), DistContext())
    several = over_ranks(evaluate_tokenizer, tok, subset, world)
    for key in ("val_recon_full", "val_recon_s1", "val_loss", "s1_usage"):
        assert several[key] == pytest.approx(single[key], rel=1e-6), key


def test_validation_without_windows_is_an_error_not_zero(data):
    tok = KronosTokenizer.from_preset("tiny")
    with pytest.raises(ValueError, match="no windows"):
        evaluate_tokenizer(tok, [], DistContext())
    pred_eval = make_predictor_evaluate(FrozenTokens(tok, cache=False))
    with pytest.raises(ValueError, match="no target tokens"):
        pred_eval(Kronos.from_preset("tiny"), [], DistContext())


# -------------------------------------------------------------------------- 9: NaN validation


def test_nan_validation_metric_stops_with_a_clear_error(tmp_path, data, monkeypatch):
    import kronos_kit.train as train_module

    monkeypatch.setattr(train_module, "evaluate_tokenizer", lambda model, loader, ctx: {"val_recon_full": float("nan")})
    with pytest.raises(RuntimeError, match=r"validation at step 2 gave non-finite \['val_recon_full'\]"):
        train_tokenizer(smoke_config(tmp_path, **SHORT), data=data, progress=False)


# -------------------------------------------------------------------------- 10: only in-split targets


def test_validation_scores_only_targets_inside_the_split(data):
    first = data.val[0]  # the first val window reaches back into the training bars for its look-back
    lookback = data.val.lookback
    assert first["in_split"].tolist() == [False] * lookback + [True] * (data.val.window - lookback)
    batch = default_collate([data.val[i] for i in range(4)])
    keep = batch["in_split"]
    assert not keep.all() and keep[:, lookback:].all()

    tok = KronosTokenizer.from_preset("tiny").eval()
    with torch.no_grad():
        (z_pre, z), *_ = tok(batch["x"])
        mask = keep[..., None].expand_as(batch["x"])
        expected = ((z - batch["x"]) ** 2)[mask].mean().item()
        got = evaluate_tokenizer(tok, [batch], DistContext())["val_recon_full"]
    assert got == pytest.approx(expected, rel=1e-5)

    pred = Kronos.from_preset("tiny").eval()
    with torch.no_grad():
        s1, s2 = tok.encode(batch["x"], half=True)
        l1, _ = pred(s1[:, :-1], s2[:, :-1], batch["stamp"][:, :-1], use_teacher_forcing=True, s1_targets=s1[:, 1:])
        nll = torch.nn.functional.cross_entropy(l1.transpose(1, 2), s1[:, 1:], reduction="none")
        expected = nll[keep[:, 1:]].mean().item()
        got = make_predictor_evaluate(FrozenTokens(tok, cache=False))(pred, [batch], DistContext())["val_ce_s1"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert nll.mean().item() != pytest.approx(expected, rel=1e-5)  # the mask matters on this batch


# -------------------------------------------------------------------------- 12: one run in the log


def test_metrics_log_holds_one_record_per_step_of_the_current_run(tmp_path, data):
    cfg = smoke_config(tmp_path, **SHORT)
    interrupted(cfg, data, at=5)  # logged steps 5; saved at 4
    train_tokenizer(cfg, data=data, progress=False, resume=True)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # the file itself: the replayed step 5 is not there twice
    assert {r["attempt"] for r in lines if r["step"] <= 4} == {1}
    assert {r["attempt"] for r in lines if r["step"] > 4} == {2}
    assert len({r["run"] for r in lines}) == 1

    train_tokenizer(cfg, data=data, progress=False, overwrite=True)  # a fresh run in the same folder
    records = read_metrics(tmp_path / "metrics.jsonl", "tokenizer")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert len({r["run"] for r in records}) == 1 and records[0]["run"] != lines[0]["run"]


def test_predictor_phase_passes_its_inputs_to_the_resume_check(tmp_path, data):
    cfg = smoke_config(tmp_path, **{"tokenizer.enabled": False, "predictor.max_steps": 4, "predictor.eval_every": 2})
    train_predictor(cfg, data=data, progress=False)
    state = torch.load(tmp_path / "state" / "predictor.pt", weights_only=True)
    assert len(state["config"]["tokenizer_sha256"]) == 64 and state["config"]["data.lookback"] == 30


def test_training_curves_show_the_current_run_once_per_step():
    from kronos_kit.plots import plot_training_curves

    def rec(run, step, loss, kind="train"):
        return {"phase": "tokenizer", "kind": kind, "step": step, "loss": loss, "val_recon_full": loss, "run": run}

    records = [rec("old", 1, 9.0), rec("old", 2, 9.0), rec("old", 3, 9.0), rec("old", 3, 9.0, "eval"),
               rec("new", 1, 1.0), rec("new", 2, 5.0), rec("new", 2, 2.0), rec("new", 2, 2.0, "eval")]
    fig = plot_training_curves(records, "tokenizer", train_keys=("loss",), val_keys=("val_recon_full",))
    train_line, eval_line = fig.axes[0].lines[0], fig.axes[1].lines[0]
    assert list(train_line.get_xdata()) == [1, 2] and list(train_line.get_ydata()) == [1.0, 2.0]
    assert list(eval_line.get_xdata()) == [2]
