"""The published checkpoints' route, without the network: a Hugging Face cache under tmp_path (`HF_HOME`,
`HF_HUB_OFFLINE=1`) holds NeoQuasar/Kronos-small and NeoQuasar/Kronos-Tokenizer-base in the hub's own layout
(`models--owner--name/snapshots/<rev>/` and `refs/main`): config.json with the published shapes, random
weights. Then what a user runs: `from_pretrained("NeoQuasar/Kronos-small")`, and `configs/kronos-small.yaml`
through phase 1, phase 2 and the evaluation (steps and sizes reduced), and a forecast from that run.

Everything runs in subprocesses: huggingface_hub reads HF_HOME when it is imported, and the notebooks' kernels
inherit the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kronos_kit.data import load_sample
from kronos_kit.model import Kronos, KronosTokenizer

ROOT = Path(__file__).resolve().parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub's refs hold
PUBLISHED = {  # the published config.json of each id: the reference's constructor arguments
    "NeoQuasar/Kronos-Tokenizer-base": (KronosTokenizer, "tokenizer-base", {"d_model": 256, "n_heads": 4,
                                        "ff_dim": 512, "n_enc_layers": 4, "n_dec_layers": 4, "s1_bits": 10,
                                        "s2_bits": 10, "group_size": 4}),
    "NeoQuasar/Kronos-small": (Kronos, "small", {"d_model": 512, "n_layers": 8, "n_heads": 8, "ff_dim": 1024,
                                                 "s1_bits": 10, "s2_bits": 10}),
}
# phase 1 and 2 a few steps each on small windows, a handful of origins and paths: the route, not the result
REDUCED = ["tokenizer_steps=2", "predictor_steps=2", "threads=1", "ignore_gate=true", "eval_origins=3",
           "data.lookback=24", "data.predict=4", "tokenizer.batch_size=4", "predictor.batch_size=4",
           "tokenizer.eval_every=2", "predictor.eval_every=2", "tokenizer.max_val_batches=1",
           "predictor.max_val_batches=1", "predictor.skill_origins=2", "predictor.skill_paths=2",
           "predictor.skill_horizon=3", "evaluation.pred_len=3", "evaluation.sample_count=2",
           "evaluation.val_origins=10", "evaluation.stride=20", "evaluation.max_context=64"]

pytestmark = pytest.mark.slow


def hub_cache(home: Path) -> None:
    """Write both ids into `home`/hub as huggingface_hub lays a download out."""
    for repo, (cls, preset, shape) in PUBLISHED.items():
        model = cls.from_preset(preset, seed=1)
        assert {k: model.config[k] for k in shape} == shape  # the published shape
        folder = home / "hub" / f"models--{repo.replace('/', '--')}"
        model.save_pretrained(folder / "snapshots" / REVISION)
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(REVISION)


def run(args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: int = 900) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_published_checkpoints_route_from_the_hub_cache_through_both_phases_and_a_forecast(tmp_path):
    home = tmp_path / "hf"
    hub_cache(home)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "KRONOS_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    loaded = run(["-c", "from kronos_kit.model import Kronos, KronosTokenizer\n"
                        "m = Kronos.from_pretrained('NeoQuasar/Kronos-small')\n"
                        "t = KronosTokenizer.from_pretrained('NeoQuasar/Kronos-Tokenizer-base')\n"
                        "print(m.config['d_model'], m.config['n_layers'], t.config['d_model'], t.s1_bits)"], env)
    assert loaded.split() == ["512", "8", "256", "10"]

    bars = tmp_path / "nasdaq_tail.csv"  # 600 daily bars: enough windows and origins for every stage, quickly
    load_sample("nasdaq").tail(600).drop(columns="symbol").to_csv(bars, index=False)
    run_dir = tmp_path / "run"
    words = [w for p in [*REDUCED, f"data={bars}"] for w in ("-p", p)]
    out = run(["-m", "kronos_kit", "pipeline", "--config", "configs/kronos-small.yaml", "--run-dir", str(run_dir),
               *words], env)
    assert "[pipeline] summary" in out and "tokenizer" in out and "predictor" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in ("01", "02", "03")] == ["completed"] * 3
    config = json.loads((run_dir / "predictor" / "best" / "config.json").read_text())
    assert {k: config[k] for k in PUBLISHED["NeoQuasar/Kronos-small"][2]} == PUBLISHED["NeoQuasar/Kronos-small"][2]
    assert (run_dir / "report.md").read_text().startswith("# Report: run\n\n**Bottom line.** ")

    csv = tmp_path / "next.csv"
    out = run(["-m", "kronos_kit", "forecast", "--run", str(run_dir), "--data", str(bars), "--horizon", "3",
               "--out", str(csv), "--samples", "2", "--threads", "1"], env)
    assert csv.is_file() and "how far to trust it" in out
