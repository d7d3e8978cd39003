"""A run folder you can trust: one writer at a time (the lock), no silent retrain of a finished phase,
notebook parameters that never override the pipeline's config, honest thread-count resumes, durable
writes, and a notebook that reads well in JupyterLab (issue 20)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DATA
from test_train import smoke_config

from kronos_kit import atomic, runs
from kronos_kit import run_lock as locks
from kronos_kit.__main__ import main
from kronos_kit.data import load_data
from kronos_kit.run_lock import RunLockedError, run_lock
from kronos_kit.runs import DiskFullError, RunDir, atomic_write, atomic_write_text
from kronos_kit.train import PhaseExistsError, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"tokenizer.max_steps": 4, "tokenizer.eval_every": 2, "tokenizer.log_every": 1}
HOLD = ("import sys, time\nfrom kronos_kit.run_lock import run_lock\nwith run_lock(sys.argv[1], 'a test holder'):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(smoke_config(tmp_path_factory.mktemp("data")))  # its cache goes there, not into the checkout


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path/run's lock; yields (run folder, process)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "KRONOS_RUN_LOCK": ""})
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ---------------------------------------------------------------------------------------------
# item 5: the lock, and a finished phase is not retrained silently


def test_a_second_writer_is_refused_with_the_holders_pid(holder):
    run, proc = holder
    with pytest.raises(RunLockedError, match=rf"process {proc.pid} holds its lock \(a test holder"):
        with run_lock(run, "second"):
            pass


def test_a_killed_holders_lock_is_stale_and_taken_over(holder, caplog):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / locks.LOCK_FILE).read_text())["pid"] == proc.pid  # the dead holder's record stays
    with caplog.at_level(logging.WARNING, logger="kronos_kit.run_lock"), run_lock(run, "after the kill"):
        assert json.loads((run / locks.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"stale lock of process {proc.pid}" in caplog.text
    assert (run / locks.LOCK_FILE).read_text() == ""  # released on exit: names no holder
    with run_lock(run, "again"):  # and free for the next writer
        pass


def test_train_command_is_refused_while_another_process_writes_the_folder(holder, capsys):
    run, proc = holder
    code = main(["train", "tokenizer", "--run-dir", str(run), *(f"{k}={v}" for k, v in SHORT.items()),
                 *(f"{k}={v}" for k, v in smoke_overrides().items())])
    err = capsys.readouterr().err
    assert code == 2 and f"process {proc.pid} holds its lock" in err and "Traceback" not in err
    assert not (run / "tokenizer").exists() and not (run / "state").exists()


def smoke_overrides() -> dict[str, object]:
    from test_train import SMOKE

    return {k: v for k, v in SMOKE.items() if not k.startswith("predictor.")}


def test_a_finished_phase_is_not_retrained_without_overwrite(tmp_path, data):
    cfg = smoke_config(tmp_path, **SHORT)
    first = train_tokenizer(cfg, data=data, progress=False)
    weights = (RunDir(tmp_path).checkpoint("tokenizer") / "model.safetensors").read_bytes()
    state = RunDir(tmp_path).state("tokenizer").read_bytes()
    with pytest.raises(PhaseExistsError, match="already holds the tokenizer phase"):
        train_tokenizer(cfg, data=data, progress=False)
    assert (RunDir(tmp_path).checkpoint("tokenizer") / "model.safetensors").read_bytes() == weights
    assert RunDir(tmp_path).state("tokenizer").read_bytes() == state
    again = train_tokenizer(cfg, data=data, progress=False, resume=True)  # resume returns the finished result
    assert again.steps == first.steps
    redo = train_tokenizer(cfg, data=data, progress=False, overwrite=True)  # an explicit retrain
    assert redo.steps == first.steps and (tmp_path / locks.LOCK_FILE).read_text() == ""


def test_the_pipeline_holds_the_lock_for_its_kernels(tmp_path, monkeypatch):
    """Kernels started under the pipeline inherit its lock ($KRONOS_RUN_LOCK) instead of being refused."""
    run = tmp_path / "run"
    with run_lock(run, "pipeline"):
        assert os.environ[locks.LOCK_ENV] == str(run.resolve())
        child = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(run)],
                               capture_output=True, text=True)
        assert child.returncode == 0 and "held" in child.stdout
    assert locks.LOCK_ENV not in os.environ


# ---------------------------------------------------------------------------------------------
# item 2: the notebook's saved parameters never override the pipeline's config


def test_parameters_saved_in_a_notebook_do_not_override_the_pipeline(tmp_path):
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from kronos_kit.config import NOTEBOOK_PARAMETERS
    from kronos_kit.pipeline import NOTEBOOK_DIR, STAGES, stage_parameters

    for notebook in STAGES.values():
        nb = load_notebook_node(str(NOTEBOOK_DIR / notebook))  # as papermill.execute_notebook reads it
        cell = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
        cell.source = cell.source.replace("tokenizer_steps = None", "tokenizer_steps = 7")  # edited and saved in Lab
        cell.source = cell.source.replace("seed = None", "seed = 3")
        assert "tokenizer_steps = 7" in cell.source
        nb = parameterize_notebook(nb, stage_parameters(tmp_path, False))
        namespace: dict[str, object] = {}
        for c in nb.cells:
            tags = c.get("metadata", {}).get("tags", [])
            if "parameters" in tags or "injected-parameters" in tags:
                exec(c.source, namespace)
        assert namespace["tokenizer_steps"] is None and namespace["seed"] is None, notebook  # config.yaml decides
        assert {k: namespace[k] for k in NOTEBOOK_PARAMETERS} == dict.fromkeys(NOTEBOOK_PARAMETERS)
        assert namespace["config"] == str(RunDir(tmp_path).config)
        # no overwrite is injected: the kernel learns from the pipeline's environment that it may retrain, and the
        # executed copy keeps `overwrite = False`, so Run All there cannot retrain the run (stages.open_stage)
        assert namespace["overwrite"] is False


# ---------------------------------------------------------------------------------------------
# item 8: threads change results by rounding; a resume with another count says so


def test_resume_with_another_thread_count_warns(tmp_path, data, caplog):
    cfg = smoke_config(tmp_path, **SHORT)

    def stop(step, parts):
        if step == 3:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg, data=data, progress=False, on_step=stop)
    try:
        torch.set_num_threads(threads + 1)
        with caplog.at_level(logging.WARNING, logger="kronos_kit.train"):
            train_tokenizer(cfg, data=data, progress=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert f"resuming with {threads + 1} CPU threads, saved with {threads}" in caplog.text
    assert "not" in caplog.text or "differ" in caplog.text


# ---------------------------------------------------------------------------------------------
# items 10 and 12: durable writes, a full disk is a message, train failures are error lines


def test_atomic_writes_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write_text(tmp_path / "a.json", "{}")
    assert any(".a.json.tmp-" in p for p in synced) and str(tmp_path) in synced


def test_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))

    def torch_save_on_a_full_disk(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    (tmp_path / "state.pt").write_bytes(b"previous")
    with pytest.raises(DiskFullError, match="no space left on the device while writing .*state.pt"):
        atomic_write(tmp_path / "state.pt", torch_save_on_a_full_disk)
    assert (tmp_path / "state.pt").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_training_failure_is_an_error_line_from_the_train_command(tmp_path, monkeypatch, capsys):
    from kronos_kit import train

    def diverge(cfg, **kwargs):
        raise train.NonFiniteGradientError("tokenizer: non-finite gradient norm nan at step 3")

    monkeypatch.setattr(train, "train_tokenizer", diverge)
    code = main(["train", "tokenizer", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: tokenizer: non-finite gradient") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# item 14: JupyterLab


def test_notebooks_use_the_kernel_setup_registers():
    from kronos_kit.pipeline import KERNEL_NAME, NOTEBOOK_DIR, STAGES

    for notebook in STAGES.values():
        spec = json.loads((NOTEBOOK_DIR / notebook).read_text())["metadata"]["kernelspec"]
        assert spec["name"] == KERNEL_NAME == "kronos-kit", notebook


def test_make_lab_allows_root_only_as_root():
    out = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert ("--allow-root" in out) == (os.getuid() == 0)


def test_info_lines_are_plain_output_in_a_kernel_and_warnings_stay_errors(monkeypatch, capsys):
    log = logging.getLogger("kronos_kit.model.checkpoint")
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or type(sys)("ipykernel"))
    log.info("loaded a checkpoint")
    log.warning("something to look at")
    out, err = capsys.readouterr()
    assert "INFO kronos_kit.model.checkpoint: loaded a checkpoint" in out and "loaded" not in err
    assert "WARNING kronos_kit.model.checkpoint: something to look at" in err
    monkeypatch.delitem(sys.modules, "ipykernel")
    log.info("outside a kernel")
    assert "outside a kernel" in capsys.readouterr().err


def test_kit_notices_print_without_a_python_source_line():
    from kronos_kit.data.schema import DataNotice

    text = warnings.formatwarning("3 rows forward-filled", DataNotice, "/x/notebook.py", 12, "bundle = load_data(cfg)")
    assert text == "DataNotice: 3 rows forward-filled\n"
    assert "load_data" in warnings.formatwarning("other", UserWarning, "/x/a.py", 1, "load_data()")


def test_a_phase_result_shows_as_one_line(tmp_path):
    from kronos_kit.train import PhaseResult

    result = PhaseResult("tokenizer", 150, 0.04425, tmp_path / "best", tmp_path / "last", "max_steps",
                         history=[{"step": s, "val": 1.0} for s in range(50)])
    assert repr(result) == f"tokenizer: 150 steps (max_steps), best 0.04425 -> {tmp_path / 'best'}"
    # which metric picked `best`, and at which step (Lab showed "best 74.1434" with no word of val_crps)
    result = PhaseResult("predictor", 300, 74.1434, tmp_path / "best", tmp_path / "last", "max_steps",
                         history=[{"step": s, "val_crps": 75.0 - (s == 200), "best": s in (100, 200)}
                                  for s in (100, 200, 300)], select_metric="val_crps")
    assert repr(result) == f"predictor: 300 steps (max_steps), best val_crps 74.1434 at step 200 -> {tmp_path / 'best'}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_torchrun_worker_ends_when_its_launcher_is_killed(tmp_path):
    """Item 12: a SIGKILLed torchrun cannot stop its workers; each worker asks the kernel to end it then."""
    import time

    pid_file = tmp_path / "worker.pid"
    worker = ("import os, sys, time\nfrom kronos_kit.runtime import _end_with_parent\n_end_with_parent()\n"
              "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    launcher = ("import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]])\n"
                "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher, worker, str(pid_file)])
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        if not atomic._alive(child) or Path(f"/proc/{child}/status").read_text().count("zombie"):
            break
        time.sleep(0.05)
    status = Path(f"/proc/{child}/status").read_text() if Path(f"/proc/{child}").exists() else "gone"
    assert status == "gone" or "zombie" in status


def test_progress_bars_are_text_in_a_kernel_so_a_saved_notebook_keeps_their_last_state(monkeypatch, capsys):
    """Item 13: a widget bar in a notebook opened without a kernel shows its first frame for ever."""
    from tqdm.notebook import tqdm as widget_bar

    from kronos_kit.runtime import tqdm

    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or type(sys)("ipykernel"))
    bar = tqdm(total=3, desc="phase tokenizer")
    for _ in range(3):
        bar.update(1)
    bar.close()
    out = capsys.readouterr().out
    assert not isinstance(bar, widget_bar) and "phase tokenizer: 100%" in out and "3/3" in out


# ---------------------------------------------------------------------------------------------
# issue 28: a cache and a lock that cannot be fooled, and the crashes that were promised messages


def _csv(path: Path, scale: float = 1.0, rows: int | None = None, symbol: str | None = None) -> Path:
    """The A-share sample (prices times `scale`, its last `rows` rows, with a symbol column when given)."""
    import pandas as pd

    from kronos_kit.data.schema import PRICE_COLUMNS

    frame = pd.read_csv(DATA / "ashare_5min_sample.csv")
    frame = frame.tail(rows) if rows else frame
    frame[list(PRICE_COLUMNS)] *= scale
    if symbol is not None:
        frame.insert(0, "symbol", symbol)
    frame.to_csv(path, index=False)
    return path


def _swap(entry: Path, other: Path) -> None:
    high, low = (entry / "high.npy").read_bytes(), (entry / "low.npy").read_bytes()
    (entry / "high.npy").write_bytes(low)
    (entry / "low.npy").write_bytes(high)


def _meta(entry: Path, change) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(change(meta)))


def _array(entry: Path, name: str, change) -> None:
    import numpy as np

    values = np.load(entry / f"{name}.npy")
    (entry / f"{name}.npy").unlink()
    np.save(entry / f"{name}.npy", change(values))


def _linked_to_damaged(entry: Path, other: Path) -> None:
    (other / "close.npy").write_bytes(b"")
    _relink(entry, other)


def _relink(entry: Path, other: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    entry.symlink_to(other, target_is_directory=True)


def _copied_in(entry: Path, other: Path) -> None:
    import shutil

    shutil.rmtree(entry)
    shutil.copytree(other, entry)


CACHE_DAMAGE = {  # item 5: another dataset's entry; item 10: damaged entries
    "another dataset's entry copied in (same rows)": _copied_in,
    "a link to another dataset's entry": _relink,
    "high.npy and low.npy swapped": _swap,
    "close saved as int8": lambda e, o: _array(e, "close", lambda v: v.astype("int8")),
    "close a 2-D array": lambda e, o: _array(e, "close", lambda v: v.reshape(-1, 1)),
    "close.npy empty (cut short by a move)": lambda e, o: (e / "close.npy").write_bytes(b""),
    "meta.json null": lambda e, o: (e / "meta.json").write_text("null"),
    "meta.json a list": lambda e, o: (e / "meta.json").write_text("[1, 2]"),
    "meta.json missing keys": lambda e, o: _meta(e, lambda m: {k: v for k, v in m.items() if k != "rows"}),
    "meta.json an unknown time zone": lambda e, o: _meta(e, lambda m: {**m, "tz": "Mars/Olympus_Mons"}),
    "a link to a damaged entry": _linked_to_damaged,
}


@pytest.mark.parametrize("case", list(CACHE_DAMAGE))
def test_a_cache_entry_that_is_not_this_datas_own_is_rebuilt(case, tmp_path):
    import numpy as np

    from kronos_kit.data.schema import FEATURE_COLUMNS
    from kronos_kit.data.store import cached_arrays

    ours, theirs, cache = _csv(tmp_path / "ours.csv"), _csv(tmp_path / "theirs.csv", scale=2.0), tmp_path / "cache"
    truth = cached_arrays(str(ours), None)
    entry, other = cached_arrays(str(ours), cache).folder, cached_arrays(str(theirs), cache).folder
    CACHE_DAMAGE[case](entry, other)
    kept = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.warns(RuntimeWarning, match="damaged or not this data's .*rebuilding it"):
        again = cached_arrays(str(ours), cache)
    assert again.folder == entry and entry.is_dir() and not entry.is_symlink()
    for column in FEATURE_COLUMNS:
        assert np.array_equal(again.features[column], truth.features[column]), column
    assert {p.name: p.read_bytes() for p in other.iterdir()} == kept  # the other entry was not touched
    assert not list(cache.glob(".data-*"))
    cached_arrays(str(ours), cache)  # and it is good now: no warning (pytest.warns above caught the only one)


def test_a_full_or_read_only_cache_folder_leaves_nothing_behind_and_loads_into_memory(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from kronos_kit.data.store import cached_arrays

    source, cache = _csv(tmp_path / "bars.csv"), tmp_path / "cache"
    real_save = np.save

    def full_disk(path, values, **kwargs):
        if Path(path).name == "close.npy":
            Path(path).write_bytes(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, values, **kwargs)

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.warns(RuntimeWarning, match="cannot be written \\(No space left on device\\).*into memory"):
        arrays = cached_arrays(str(source), cache)
    assert arrays.folder is None and arrays.rows == 2500
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no .data-*.tmp left
    monkeypatch.setattr(np, "save", real_save)
    built = cached_arrays(str(source), cache).folder
    real_open = Path.open

    def read_only(self, mode="r", *args, **kwargs):
        if self.suffix == ".lock" and "a" in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    assert cached_arrays(str(source), cache).folder == built  # a good entry is still read
    with pytest.warns(RuntimeWarning, match="cannot be written \\(Read-only file system\\)"):
        assert cached_arrays(str(_csv(tmp_path / "other.csv", scale=3.0)), cache).folder is None


def test_a_killed_builders_temporary_entry_is_removed_by_the_next_build(tmp_path):
    from kronos_kit.data.store import cached_arrays, source_key

    source, cache = _csv(tmp_path / "bars.csv"), tmp_path / "cache"
    key = source_key(str(source), symbol=None, fill=None, columns=None)
    leftover = cache / f".data-{key[:32]}.99999999.tmp"  # a pid no process has
    leftover.mkdir(parents=True)
    (leftover / "close.npy").write_bytes(b"half")
    cached_arrays(str(source), cache)
    assert not leftover.exists()


def test_prices_at_any_scale_normalize_alike_and_forecast_valid_candles(tmp_path):
    """Item 6: prices around 1e-5 (BTC-quoted pairs) keep their own spread; times 1e6 too."""
    import numpy as np

    from kronos_kit.config import KitConfig
    from kronos_kit.data import load_data, load_ohlcv
    from kronos_kit.forecast import KronosPredictor, forecast_frame
    from kronos_kit.model import Kronos, KronosTokenizer

    def windows(scale: float) -> np.ndarray:
        cfg = KitConfig().with_overrides({"data.source": str(_csv(tmp_path / f"x{scale:g}.csv", scale)),
                                          "data.lookback": 30, "data.predict": 5})
        return load_data(cfg).val.window_array()[..., :4]

    # below a level of 1 the guard scales with the prices: x 1e-6 and x 1e-3 give the same windows
    np.testing.assert_allclose(windows(1e-6), windows(1e-3), rtol=0, atol=1e-6)
    # and any scale the same up to the reference's own 1e-5 guard of a series at level 1 and above (a few 1e-2
    # here, where 5-minute closes move about 0.1% within a window); a fixed 1e-5 collapsed x 1e-6 to ~0.01 of them
    np.testing.assert_allclose(windows(1e-6), windows(1e6), rtol=0, atol=5e-2)
    predictor = KronosPredictor(Kronos.from_pretrained("embedded:base/predictor"),
                                KronosTokenizer.from_pretrained("embedded:base/tokenizer"))
    tables = {s: forecast_frame(predictor, load_ohlcv(_csv(tmp_path / f"f{s:g}.csv", s, rows=200)), horizon=8,
                                sample_count=16, lookback=60) for s in (1e-6, 1e6)}
    for scale, table in tables.items():
        prices = table[[c for c in table.columns if c.startswith(("open", "high", "low", "close"))]]
        assert (prices.to_numpy() > 0).all() and (table["high_median"] >= table["low_median"]).all(), scale
    np.testing.assert_allclose(tables[1e-6]["close_median"] * 1e12, tables[1e6]["close_median"], rtol=1e-3)


LOCK_FILES = {  # item 7 and item 15
    "a link to a file outside the run": lambda lock, victim: lock.symlink_to(victim),
    "a hard link to a file outside the run": lambda lock, victim: os.link(victim, lock),
    "a folder": lambda lock, victim: lock.mkdir(),
    "a named pipe": lambda lock, victim: os.mkfifo(lock),
}


QUICK_TRAIN = ["data.symbol=A", "data.lookback=30", "data.predict=5", "tokenizer.max_steps=1",
               "tokenizer.batch_size=8", "tokenizer.max_val_batches=1"]


@pytest.mark.parametrize("case", list(LOCK_FILES))
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_never_written_through(case, tiny_run, tmp_path, capsys):
    from test_bad_inputs import _expect_error

    victim = tmp_path / "victim"
    victim.write_text("precious")
    LOCK_FILES[case](tiny_run / locks.LOCK_FILE, victim)
    manifest = RunDir(tiny_run).manifest.read_bytes()
    for argv in (["train", "tokenizer", "--config", str(RunDir(tiny_run).config), "--run-dir", str(tiny_run),
                  "--resume", *QUICK_TRAIN],
                 ["pipeline", "--run-dir", str(tiny_run), "--resume"]):
        err = _expect_error(capsys, argv)
        assert "not the lock file the kit writes" in err and "Errno" not in err, err
    assert victim.read_text() == "precious" and RunDir(tiny_run).manifest.read_bytes() == manifest
    assert not (tiny_run / "state").exists()


def _holding(run: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "KRONOS_RUN_LOCK": "", **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_refused_second_writer_reads_and_writes_nothing(recorded_run, tmp_path, capsys):
    """Item 8: the lock comes before the data: a refused writer built no cache entry and deleted none."""
    from conftest import copy_run
    from test_bad_inputs import _edit_data, _expect_error

    run = copy_run(recorded_run, tmp_path)
    _edit_data(run)  # a load now would build a new entry and prune the holder's
    cache = {p.name for p in (run / "cache").iterdir()}
    proc = _holding(run)
    try:
        for argv in (["pipeline", "--run-dir", str(run), "--resume"],
                     ["train", "tokenizer", "--config", str(RunDir(run).config), "--run-dir", str(run), "--resume"],
                     ["train", "predictor", "--config", str(RunDir(run).config), "--run-dir", str(run), "--resume"]):
            assert f"process {proc.pid} holds its lock" in _expect_error(capsys, argv)
            assert {p.name for p in (run / "cache").iterdir()} == cache
    finally:
        proc.kill()
        proc.wait()


def test_a_moved_run_builds_its_cache_in_its_own_folder(recorded_run, tmp_path):
    import shutil

    from conftest import copy_run

    from kronos_kit.pipeline import _check_inputs, _plan

    run = copy_run(recorded_run, tmp_path / "before")
    moved = tmp_path / "after"
    shutil.move(run, moved)  # config.yaml still names the old folder
    shutil.rmtree(moved / "cache")
    plan = _plan(None, moved, {}, resume=True, from_stage=None, overwrite=False)
    _check_inputs(plan)
    assert (moved / "cache").is_dir() and not run.exists()


@pytest.mark.parametrize("rank", ["2", "abc"])
def test_a_bare_rank_does_not_bypass_the_lock(rank, tiny_run, capsys, monkeypatch):
    """Item 9: only a torchrun worker is a rank; RANK=2 or RANK=abc alone is an ordinary writer."""
    from test_bad_inputs import _expect_error

    written = (RunDir(tiny_run).manifest.read_bytes(), RunDir(tiny_run).config.read_bytes())
    proc = _holding(tiny_run)
    monkeypatch.setenv("RANK", rank)
    try:
        for argv in (["train", "tokenizer", "--config", str(RunDir(tiny_run).config), "--run-dir", str(tiny_run),
                      *QUICK_TRAIN], ["pipeline", "--run-dir", str(tiny_run), "--resume"]):
            assert f"process {proc.pid} holds its lock" in _expect_error(capsys, argv)
    finally:
        proc.kill()
        proc.wait()
    assert (RunDir(tiny_run).manifest.read_bytes(), RunDir(tiny_run).config.read_bytes()) == written
    assert not (tiny_run / "state").exists() and not (tiny_run / "cache").exists()


TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "1", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "job-a"}


def test_only_a_torchrun_worker_under_its_own_rank_0_goes_on_without_the_lock(tmp_path, monkeypatch):
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert locks.torchrun_rank() == 1
    monkeypatch.setenv("RANK", "abc")
    assert locks.torchrun_rank() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert locks.torchrun_rank() is None  # a bare RANK (and friends) is no rank
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    run = tmp_path / "run"
    rank0 = {**TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}
    proc = _holding(run, rank0)  # rank 0 of job-a (another node: GROUP_RANK 1 here) holds the lock
    try:
        with run_lock(run, "rank 1 of job-a"):  # goes on under rank 0's lock
            pass
        monkeypatch.setenv("MASTER_PORT", "29999")  # a worker of another job waits for its own rank 0, then stops
        monkeypatch.setattr(locks, "RANK_WAIT_S", 0.5)
        with pytest.raises(RunLockedError, match="waited .* for rank 0 of its job"), run_lock(run, "other job"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_torn_last_line_of_the_metrics_log_is_cut_off_with_a_notice(tmp_path, data, caplog):
    """Item 11: a power loss mid-line in metrics.jsonl; resume drops the partial line and goes on."""
    cfg = smoke_config(tmp_path, **SHORT)

    def stop(step, parts):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg, data=data, progress=False, on_step=stop)
    with RunDir(tmp_path).metrics_log.open("a") as f:
        f.write('{"phase": "tokenizer", "kind": "tra')
    assert len(runs.read_metrics(RunDir(tmp_path).metrics_log)) > 0  # readers leave it out too
    with caplog.at_level(logging.WARNING, logger="kronos_kit.jsonl"):
        result = train_tokenizer(cfg, data=data, progress=False, resume=True)
    assert result.steps == 4 and "last line is cut short" in caplog.text
    lines = RunDir(tmp_path).metrics_log.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and lines[-1].startswith("{")


def test_a_ticker_named_NA_is_a_symbol(tmp_path, capsys):
    """Item 12: NA, NULL, None are tickers; only an empty cell is a missing symbol."""
    import pandas as pd

    from kronos_kit.data import load_ohlcv

    parts = [pd.read_csv(_csv(tmp_path / f"{s}.csv", rows=300, symbol=s), keep_default_na=False)
             for s in ("NA", "NULL")]
    pd.concat(parts).to_csv(tmp_path / "universe.csv", index=False)
    assert sorted(load_ohlcv(tmp_path / "universe.csv")["symbol"].unique()) == ["NA", "NULL"]
    out = tmp_path / "out.csv"
    assert main(["forecast", "--tokenizer", "embedded:base/tokenizer", "--predictor", "embedded:base/predictor",
                 "--data", str(tmp_path / "universe.csv"), "--symbol", "NA", "--horizon", "2", "--samples", "2",
                 "--out", str(out)]) == 0
    assert list(pd.read_csv(out, keep_default_na=False)["symbol"].unique()) == ["NA"]


def test_the_advice_for_a_too_short_symbol_can_be_followed(tmp_path, capsys):
    """Item 13: `-p data.short=drop` exists and leaves the short symbol out, with a notice (as the panel default
    `auto` does); `data.short=error` refuses and its advice can be followed."""
    import pandas as pd
    from test_bad_inputs import _expect_error

    from kronos_kit.pipeline import _check_inputs, _plan

    long, short = _csv(tmp_path / "L.csv", symbol="L"), _csv(tmp_path / "S.csv", rows=40, symbol="S")
    pd.concat([pd.read_csv(long), pd.read_csv(short)]).to_csv(tmp_path / "u.csv", index=False)
    params = {"data": str(tmp_path / "u.csv"), "data.lookback": 30, "data.predict": 5, "tokenizer_steps": 1,
              "predictor_steps": 1, "predictor.skill_origins": 2, "tokenizer.batch_size": 8,
              "predictor.batch_size": 8}
    strict = {**params, "data.short": "error"}
    err = _expect_error(capsys, ["pipeline", "--run-dir", str(tmp_path / "run"),
                                 *(w for k, v in strict.items() for w in ("-p", f"{k}={v}"))])
    assert "too short for one window" in err and "-p data.short=drop" in err and not (tmp_path / "run").exists()
    for short in ("drop", "auto"):  # auto: a panel leaves the short symbol out, as drop does
        with pytest.warns(UserWarning, match="left out 1 symbol"):
            _check_inputs(_plan(None, tmp_path / "run", {**params, "data.short": short}, resume=False,
                                from_stage=None, overwrite=False))
    assert not (tmp_path / "run").exists()


FORECAST_BOUNDS = {  # item 14: (what to forecast, its options, what the error names)
    "50 million paths": (None, ["--samples", "50000000"], "--samples 50000000"),
    "a billion bars ahead": (None, ["--horizon", "1000000000"], "--horizon 1000000000"),
    "a Parquet time in 2300": ("parquet2300", [], "lies outside 1677-09-22 .. 2262-04-11"),
    "a horizon past 2262": ("daily2262", ["--horizon", "400"], "horizon 400"),
}


def _bounds_data(kind: str | None, tmp_path: Path) -> str:
    import pandas as pd

    if kind is None:
        return str(DATA / "ashare_5min_sample.csv")
    frame = pd.read_csv(DATA / "ashare_5min_sample.csv").tail(100).reset_index(drop=True)
    if kind == "parquet2300":
        frame["timestamps"] = pd.to_datetime(frame["timestamps"]).astype("datetime64[us]")
        frame.loc[99, "timestamps"] = pd.Timestamp("2300-01-02").as_unit("us")
        frame.to_parquet(tmp_path / "bars.parquet")
        return str(tmp_path / "bars.parquet")
    frame["timestamps"] = pd.bdate_range(end="2262-03-31", periods=len(frame))
    frame.to_csv(tmp_path / "daily.csv", index=False)
    return str(tmp_path / "daily.csv")


@pytest.mark.parametrize("case", list(FORECAST_BOUNDS))
def test_a_forecast_out_of_bounds_is_refused_naming_what_is_at_fault(case, tmp_path, capsys):
    from test_bad_inputs import _expect_error

    kind, options, named = FORECAST_BOUNDS[case]
    args = {"--horizon": "2", "--samples": "2"}
    args.update(dict(zip(options[::2], options[1::2])))
    err = _expect_error(capsys, ["forecast", "--tokenizer", "embedded:base/tokenizer", "--predictor",
                                 "embedded:base/predictor", "--data", _bounds_data(kind, tmp_path),
                                 *(w for kv in args.items() for w in kv), "--out", str(tmp_path / "out.csv")])
    assert named in err, err
    assert not (tmp_path / "out.csv").exists()


def test_forecast_run_says_which_symbols_had_less_history_than_the_runs_lookback(recorded_run, tmp_path, capsys):
    """Item 15: a file of 10 bars is forecast from 10, and the command says so."""
    out = tmp_path / "out.csv"
    assert main(["forecast", "--run", str(recorded_run), "--data", str(_csv(tmp_path / "ten.csv", rows=10)),
                 "--horizon", "2", "--samples", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "history: the last 30 bars of each symbol (the run's data.lookback); 1 symbol(s) have fewer" in printed
    assert "(ten 10)" in printed


def test_a_full_disk_while_saving_a_checkpoint_is_the_promised_message(tmp_path, monkeypatch):
    """Item 15: safetensors reports a full disk as a SafetensorError; the kit says what happened and keeps the
    previous checkpoint."""
    from safetensors import SafetensorError

    from kronos_kit.engine import save_checkpoint
    from kronos_kit.model import KronosTokenizer
    from kronos_kit.model import checkpoint as ckpt

    model = KronosTokenizer.from_pretrained("embedded:base/tokenizer")
    save_checkpoint(model, tmp_path / "best")
    before = (tmp_path / "best" / "model.safetensors").read_bytes()

    def full(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              '"No space left on device" })')

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(DiskFullError, match="no space left on the device while writing"):
        save_checkpoint(model, tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == before
