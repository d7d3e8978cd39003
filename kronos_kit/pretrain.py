"""The embedded base checkpoints: `pretrain_base`, the command behind `make base`.

Pretrains the shipped tiny base tokenizer and predictor from scratch with the kit's own engine on the
S&P 500 sample and records their provenance beside them (`kronos_kit/assets/base/PROVENANCE.json`).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

from kronos_kit.binding import file_sha256
from kronos_kit.config import KitConfig
from kronos_kit.data import load_data
from kronos_kit.data.store import source_sha256
from kronos_kit.model.checkpoint import WEIGHTS_NAME
from kronos_kit.provenance import git_state, package_versions
from kronos_kit.runs import save_json

logger = logging.getLogger(__name__)

__all__ = ["pretrain_base"]


def pretrain_base(cfg: KitConfig, out: str | Path) -> Path:
    """Pretrain the shipped base tokenizer and predictor with the kit's own engine; record provenance."""
    from kronos_kit.train import train_predictor, train_tokenizer

    out = Path(out)
    work = out.parent / f".{out.name}-run"
    shutil.rmtree(work, ignore_errors=True)
    # phase 2 starts on the freshly pretrained tokenizer: there is no base to gate it against
    cfg = cfg.with_overrides({"run_dir": str(work), "predictor.tokenizer_from": None, "gate.override": True})
    data = load_data(cfg)
    tok = train_tokenizer(cfg, data=data)
    pred = train_predictor(cfg, data=data)
    for name, result in (("tokenizer", tok), ("predictor", pred)):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(result.best_dir, out / name)
    provenance = {
        "what": "kronos-kit embedded base checkpoints, pretrained from scratch by the kit's own engine",
        "command": "make base  (python -m kronos_kit pretrain --config configs/pretrain_base.yaml)",
        "data": {"source": cfg.data.source, "sha256": source_sha256(cfg.data.source),
                 "note": "S&P 500 daily OHLCV 1999-2018 from the arch package"},
        "seed": cfg.seed, "config": cfg.to_dict(),
        "tokenizer": {"steps": tok.steps, "best_val_recon_full": tok.best_metric,
                      "sha256": file_sha256(out / "tokenizer" / WEIGHTS_NAME)},
        "predictor": {"steps": pred.steps, "best_val_loss": pred.best_metric,
                      "sha256": file_sha256(out / "predictor" / WEIGHTS_NAME)},
        "versions": package_versions(), "git": git_state(), "created": dt.datetime.now().isoformat(timespec="seconds"),
    }
    save_json(out / "PROVENANCE.json", provenance, default=str)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("base checkpoints written to %s", out)
    return out
