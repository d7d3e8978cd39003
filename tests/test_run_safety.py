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
from test_train import smoke_config

from kronos_kit import run_lock as locks
from kronos_kit import runs
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
        if not runs._alive(child) or Path(f"/proc/{child}/status").read_text().count("zombie"):
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
