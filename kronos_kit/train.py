"""The two Kronos finetuning phases, on the one training engine (`kronos_kit.engine`, re-exported here).

Phase 1 (`train_tokenizer`) adapts the tokenizer: loss = (mse(z_pre, x) + mse(z, x) + bsq_loss) / 2.
Phase 2 (`train_predictor`) finetunes the predictor on tokens of the frozen phase-1 tokenizer:
loss = (ce_s1 + ce_s2) / 2 on next-token targets. Never jointly. Both run `run_phase`, which reads
top to bottom: `setup_optimizer` (AdamW + OneCycle), `restore_state` (exact resume), then
`train_epoch` (gradient accumulation and clipping) with `validate` (best checkpoint, early stopping)
and `save_state` (`last` checkpoint + training state) at every evaluation. Non-finite losses,
gradients and validation metrics stop training (gradients may be skipped instead), and nothing
non-finite is ever saved. Resume checks that the saved config matches the current one. Files go where
`kronos_kit.runs.RunDir` says; seeding, devices and DDP come from `kronos_kit.runtime`.
The phases differ only in their `Phase`: the model trained, a step function, an evaluation
function and the checkpoints they start from.

Finetune strategies (`PhaseConfig.strategy`, per phase) are set up by `apply_strategy` on the bare
model before the engine builds the optimizer and the DDP wrapper: `full` trains every weight,
`freeze` only the parameter groups in `trainable`, `lora` only low-rank adapters (checkpoints hold
the merged weights in the reference layout, the adapter files beside them), `l2sp` every weight
with a penalty toward the starting weights added to the loss (logged as `l2sp`). Phase 2 also
scores forecast skill on the validation split at each validation (`forecast.ForecastSkill`: close
CRPS and MAE) and selects `best` by `predictor.select_metric`. The engine validates the starting
checkpoint of both phases once before the first step (`engine.write_reference`: a `reference` record
at step 0), the level the curves and the reports compare against.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kronos_kit.binding import StageRecord, check_stages, run_relative
from kronos_kit.codebook import CodebookCounter
from kronos_kit.config import KitConfig, PhaseConfig
from kronos_kit.data import DataBundle, in_split_mask, load_data
from kronos_kit.data.store import source_key
from kronos_kit.engine import (
    HARMLESS_ON_RESUME,
    EpochSampler,
    FrozenTokenizerChanged,
    NonFiniteError,
    NonFiniteGradientError,
    NonFiniteLossError,
    NonFiniteMetricError,
    NonFiniteWeightsError,
    OnStep,
    OnValidate,
    Phase,
    PhaseExistsError,
    PhaseResult,
    ResumeMismatchError,
    StepOutput,
    TrainState,
    check_batch,
    planned_steps,
    restore_state,
    run_phase,
    save_checkpoint,
    save_state,
    setup_optimizer,
    train_epoch,
    validate,
    validation_loader,
)
from kronos_kit.forecast import ForecastSkill
from kronos_kit.gate import gate_for_phase2
from kronos_kit.model import (
    L2SP,
    Kronos,
    KronosTokenizer,
    apply_lora,
    check_pair,
    set_trainable,
    weights_hash,
)
from kronos_kit.run_lock import run_lock
from kronos_kit.runs import RunDir, run_choice
from kronos_kit.runtime import DistContext, freeze, module_device, resolve_device, unwrap
from kronos_kit.stage_records import record_stage_finish, record_stage_start
from kronos_kit.token_cache import TokenTable, open_token_tables

__all__ = [
    "HARMLESS_ON_RESUME", "EpochSampler", "FrozenTokenizerChanged", "FrozenTokens", "NonFiniteError",
    "NonFiniteGradientError", "NonFiniteLossError", "NonFiniteMetricError", "NonFiniteWeightsError", "Phase",
    "PhaseExistsError", "PhaseResult", "ResumeMismatchError", "StepOutput", "Strategy", "TrainState", "apply_strategy",
    "check_phases", "evaluate_tokenizer", "make_predictor_evaluate", "make_predictor_step", "planned_steps",
    "restore_state", "run_phase", "save_checkpoint", "save_state", "setup_optimizer", "tokenizer_source_for_phase2",
    "tokenizer_step", "train_epoch", "train_predictor", "train_tokenizer", "validate", "validation_loader",
]

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# finetune strategies



@dataclass
class Strategy:
    """A phase's finetune strategy applied to its model: which parameters train, and the L2-SP anchor."""

    name: str  # full, freeze, lora or l2sp
    trainable: list[str]  # names of the parameters that train, in model order
    l2sp: L2SP | None = None  # the penalty toward the starting weights (strategy l2sp)

    def wrap_step(self, step: Callable[[nn.Module, dict], StepOutput]) -> Callable[[nn.Module, dict], StepOutput]:
        """`step` with the L2-SP penalty added to its loss and logged (`task_loss`, `l2sp`); else `step`."""
        if self.l2sp is None:
            return step
        l2sp = self.l2sp

        def penalized(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
            out = step(model, batch)
            penalty = l2sp.penalty(model)
            parts = {**out.parts, "task_loss": out.loss.detach(), "l2sp": penalty.detach()}
            return StepOutput(out.loss + penalty, parts)

        return penalized


def apply_strategy(model: nn.Module, cfg: PhaseConfig, *, phase: str, seed: int) -> Strategy:
    """Set up `cfg.strategy` on the freshly loaded bare `model`, before the optimizer and the DDP wrap.

    freeze: `set_trainable(cfg.trainable_groups)`; lora: `apply_lora` with the configured rank, alpha,
    dropout and targets (A drawn from a generator seeded by `seed`, so a resumed run rebuilds the same
    modules before its state is loaded); l2sp: every weight trains and `L2SP` anchors them at their
    starting values (the base checkpoint, also on resume); full: the model as loaded.
    """
    if cfg.strategy == "freeze":
        try:
            set_trainable(model, cfg.trainable_groups)
        except ValueError as err:
            raise ValueError(f"{phase}.trainable: {err}") from err
    elif cfg.strategy == "lora":
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                   generator=torch.Generator().manual_seed(seed))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    l2sp = L2SP(model, strength=cfg.l2sp_strength) if cfg.strategy == "l2sp" else None
    counts = [sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())]
    logger.info("%s: strategy %s, %d of %d parameters train", phase, cfg.strategy, *counts)
    return Strategy(cfg.strategy, trainable, l2sp)



# ---------------------------------------------------------------------------------------------
# phase 1: tokenizer


def tokenizer_step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
    """(mse(z_pre, x) + mse(z, x) + bsq_loss) / 2, as the reference trains the tokenizer.

    The log gets each reconstruction term, the BSQ loss and its unweighted parts (`LossBreakdown`).
    """
    x = batch["x"].to(module_device(model))
    out = unwrap(model).loss(x, *model(x, return_loss_breakdown=True))
    bsq = out.breakdown
    return StepOutput(out.loss, {"recon_s1": out.recon_s1.detach(), "recon_full": out.recon_full.detach(),
                                 "bsq": out.bsq.detach(), "bsq_commitment": bsq.commitment.detach(),
                                 "bsq_per_sample_entropy": bsq.per_sample_entropy.detach(),
                                 "bsq_codebook_entropy": bsq.codebook_entropy.detach()})


def _require(count: float, what: str) -> float:
    if count <= 0:
        raise ValueError(f"validation saw no {what} over all ranks; the validation split or max_val_batches is "
                         "too small: enlarge data.val_ratio, or raise max_val_batches")
    return count


def evaluate_tokenizer(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
    """Full-decoder and s1-only reconstruction MSE, the BSQ term, loss and s1/s2 usage, all over the
    windows' in-split bars (a validation window's context bars belong to the training split)."""
    device = module_device(model)
    counter = CodebookCounter(model.s1_bits, model.s2_bits, joint=False)
    sums = [0.0] * 5  # full squared error, s1 squared error, bsq loss * bars, in-split bars, in-split values
    for batch in loader:
        x = batch["x"].to(device)
        bars = in_split_mask(batch, x)  # (B, L)
        (z_pre, z), bsq_loss, quantized, _ = model(x, loss_mask=bars)
        s1, s2 = model.quantizer.codes_to_indices(quantized)
        counter.update(s1[bars].cpu(), s2[bars].cpu())
        keep = bars[..., None].expand_as(x)  # (B, L, 6)
        n_bars = bars.sum().item()
        sums = [a + b for a, b in zip(sums, (((z.float() - x) ** 2)[keep].sum().item(),
                                             ((z_pre.float() - x) ** 2)[keep].sum().item(),
                                             bsq_loss.item() * n_bars if n_bars else 0.0, n_bars, keep.sum().item()))]
    sums = ctx.sum(sums, device)
    s1_counts, s2_counts, _ = counter.counts()
    if ctx.world_size > 1:
        merged = ctx.sum([*s1_counts.tolist(), *s2_counts.tolist()], device)
        s1_counts, s2_counts = np.array(merged[: len(s1_counts)]), np.array(merged[len(s1_counts):])
    bars, values = _require(sums[3], "windows (in-split bars)"), sums[4]
    full, pre, bsq = sums[0] / values, sums[1] / values, sums[2] / bars
    return {"val_recon_full": full, "val_recon_s1": pre, "val_bsq": bsq, "val_loss": (full + pre + bsq) / 2,
            "s1_usage": float((s1_counts > 0).mean()), "s2_usage": float((s2_counts > 0).mean())}


# ---------------------------------------------------------------------------------------------
# phase 2: predictor on the frozen tokenizer


class FrozenTokens:
    """Tokens of windows from a frozen tokenizer (eval mode, no grad), optionally cached per window.

    The cache key is the window's (symbol, start), so each window is encoded once across epochs. A `table`
    (`token_cache.TokenTable`: every window encoded once on disk, shared between runs) answers instead.
    """

    def __init__(self, tokenizer: KronosTokenizer, *, cache: bool = True, table: TokenTable | None = None):
        self.tokenizer = tokenizer
        freeze(tokenizer)
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.table = table
        self.encode_seconds = 0.0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["x"]
        if self.table is not None:
            s1, s2 = self.table.lookup(batch["symbol"], batch["start"])
            return s1.to(device), s2.to(device)
        if self.cache is None:
            return self._encode(x.to(device))
        keys = list(zip(batch["symbol"], [int(s) for s in batch["start"]]))
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            s1, s2 = self._encode(x[missing].to(device))
            for j, i in enumerate(missing):
                self.cache[keys[i]] = (s1[j].cpu(), s2[j].cpu())
        s1 = torch.stack([self.cache[k][0] for k in keys]).to(device)
        s2 = torch.stack([self.cache[k][1] for k in keys]).to(device)
        return s1, s2

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        if self.tokenizer.training:
            raise FrozenTokenizerChanged("the frozen tokenizer was switched to train mode during phase 2")
        s1, s2 = self.tokenizer.encode(x, half=True)
        self.encode_seconds += time.perf_counter() - start
        return s1, s2


def make_predictor_step(tokens: FrozenTokens, *, teacher_forcing: bool) -> Callable[[nn.Module, dict], StepOutput]:
    def step(model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        device = module_device(model)
        s1, s2 = tokens(batch, device)
        stamp = batch["stamp"].to(device)
        # inputs: tokens[:-1] with their time features; targets: tokens[1:]
        s1_logits, s2_logits = model(s1[:, :-1], s2[:, :-1], stamp[:, :-1], use_teacher_forcing=teacher_forcing,
                                     s1_targets=s1[:, 1:])
        out = unwrap(model).loss(s1_logits, s2_logits, s1[:, 1:], s2[:, 1:])
        return StepOutput(out.loss, {"ce_s1": out.ce_s1.detach(), "ce_s2": out.ce_s2.detach()})

    return step


def make_predictor_evaluate(
    tokens: FrozenTokens, skill: ForecastSkill | None = None
) -> Callable[[nn.Module, Any, DistContext], dict[str, float]]:
    """Token-level validation (loss, cross-entropies, accuracies) plus, with `skill`, forecast skill
    (`val_crps`, `val_mae`) of the current weights with the frozen tokenizer on fixed validation origins
    (every rank scores the same origins with the same seed, so ranks agree without a reduction)."""

    def evaluate(model: nn.Module, loader, ctx: DistContext) -> dict[str, float]:
        device = module_device(model)
        sums = [0.0] * 5
        for batch in loader:
            s1, s2 = tokens(batch, device)
            scores = model.score_next_tokens(s1, s2, batch["stamp"].to(device), batch.get("in_split"))
            sums = [a + b for a, b in zip(sums, scores)]
        sums = ctx.sum(sums, device)  # only targets inside the validation split count
        n = _require(sums[4], "target tokens")
        ce1, ce2 = sums[0] / n, sums[1] / n
        out = {"val_loss": (ce1 + ce2) / 2, "val_ce_s1": ce1, "val_ce_s2": ce2, "val_acc_s1": sums[2] / n,
               "val_acc_s2": sums[3] / n}
        if skill is not None:
            out.update(skill(unwrap(model), tokens.tokenizer))
        return out

    return evaluate


# ---------------------------------------------------------------------------------------------
# entry points


def check_phases(cfg: KitConfig, train_windows: int) -> None:
    """Refuse (ValueError naming the field) before a run what training would refuse later: a batch the training
    windows cannot fill (`engine.check_batch`), `freeze` groups or a LoRA rank the start checkpoint does not have."""
    for name, model_class in (("tokenizer", KronosTokenizer), ("predictor", Kronos)):
        phase = getattr(cfg, name)
        if phase.enabled:
            check_batch(name, phase, train_windows)
            if phase.strategy in ("freeze", "lora"):
                _check_strategy(name, model_class, phase)


def _check_strategy(name: str, model_class: type, phase: PhaseConfig) -> None:
    """Group names and layer widths are the model's: load the start checkpoint and set the strategy up on it."""
    field = "start_from"
    try:
        model = model_class.from_pretrained(phase.start_from)
        field = "trainable" if phase.strategy == "freeze" else "lora_rank"
        if phase.strategy == "freeze":
            set_trainable(model, phase.trainable_groups)
        else:
            apply_lora(model, rank=phase.lora_rank, alpha=phase.lora_alpha, dropout=phase.lora_dropout,
                       targets=phase.lora_targets, generator=torch.Generator())
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{name}.{field}: {err}") from None


def tokenizer_source_for_phase2(cfg: KitConfig, run_dir: Path) -> str:
    """The tokenizer phase 2 uses (`runs.run_choice(..., model="finetuned")`): explicit, else this run's
    phase-1 best, else the base tokenizer."""
    return run_choice(run_dir, cfg, model="finetuned").tokenizer_source


def _run_dir(cfg: KitConfig) -> Path:
    if cfg.run_dir is None:
        raise ValueError("run_dir is not set: pass run_dir in the config or as a parameter")
    return Path(cfg.run_dir)


def train_tokenizer(cfg: KitConfig, *, resume: bool = False, overwrite: bool = False, data: DataBundle | None = None,
                    progress: bool = True, on_step: OnStep | None = None,
                    on_validate: OnValidate | None = None) -> PhaseResult:
    """Phase 1: adapt the tokenizer to the configured data (`resume`, `overwrite`, `on_validate`: see
    `engine.run_phase`).

    The run folder is locked before anything is read or written (a refused second writer changes nothing), and
    the stage records what it trained on and wrote (`stages/01.json`, `binding.StageRecord`)."""
    run_dir = _run_dir(cfg)
    with run_lock(run_dir, "training the tokenizer"):
        data = data or load_data(cfg)
        tokenizer = KronosTokenizer.from_pretrained(cfg.tokenizer.start_from, seed=cfg.seed)
        tokenizer.quantizer.entropy_mode = cfg.tokenizer.entropy_mode
        strategy = apply_strategy(tokenizer, cfg.tokenizer, phase="tokenizer", seed=cfg.seed)
        phase = Phase("tokenizer", tokenizer, strategy.wrap_step(tokenizer_step), evaluate_tokenizer,
                      "val_recon_full", data.train, data.val, inputs=_data_inputs(cfg, data))
        return _run_recorded(phase, cfg, data, {"tokenizer.start_from": cfg.tokenizer.start_from}, stage="01",
                             by="train_tokenizer", resume=resume, overwrite=overwrite, progress=progress,
                             on_step=on_step, on_validate=on_validate)


def train_predictor(cfg: KitConfig, *, resume: bool = False, overwrite: bool = False, data: DataBundle | None = None,
                    progress: bool = True, on_step: OnStep | None = None,
                    on_validate: OnValidate | None = None) -> PhaseResult:
    """Phase 2: finetune the predictor on tokens of the frozen phase-1 tokenizer (`resume`, `overwrite`,
    `on_validate`: see `engine.run_phase`); with `predictor.token_cache_dir` the tokens come from the on-disk
    token cache (`token_cache`), built there once.

    Under the run folder's lock, before anything is trained: the run's own phase-1 tokenizer must be what stage
    01 wrote, from this data and config (`binding.check_stages`), and the gate must let it through
    (`gate.gate_for_phase2`); the stage records what it trained on and wrote (`stages/02.json`)."""
    run_dir = _run_dir(cfg)
    with run_lock(run_dir, "training the predictor"):
        device = resolve_device(cfg.device)
        data = data or load_data(cfg)
        source = tokenizer_source_for_phase2(cfg, run_dir)
        if run_relative(source, run_dir) != source:  # this run's phase-1 tokenizer
            check_stages(run_dir, cfg, reader="phase 2", stages=("01",), data_sha256=data.source_sha256,
                         external=False)
        gate_for_phase2(run_dir, cfg)
        tokenizer = KronosTokenizer.from_pretrained(source, device=device)
        predictor = Kronos.from_pretrained(cfg.predictor.start_from, seed=cfg.seed)
        check_pair(tokenizer, predictor)
        phase = _predictor_phase(cfg, data, tokenizer, predictor, progress=progress)
        gate = RunDir(run_dir).gate
        inputs = {"tokenizer": source, "predictor.start_from": cfg.predictor.start_from,
                  "gate": str(gate) if gate.is_file() else None}
        result = _run_recorded(phase, cfg, data, inputs, stage="02", by="train_predictor", resume=resume,
                               overwrite=overwrite, progress=progress, on_step=on_step, on_validate=on_validate)
    phase.before_save()
    logger.info("predictor: tokenizer weights unchanged (sha256 %s...)", phase.inputs["tokenizer_sha256"][:12])
    return result


def _data_inputs(cfg: KitConfig, data: DataBundle) -> dict[str, Any]:
    """What fixes a phase's result besides its own config (resume checks it): the data config and bytes."""
    return {"data": {**dataclasses.asdict(cfg.data), "sha256": data.source_sha256}}


def _predictor_phase(cfg: KitConfig, data: DataBundle, tokenizer: KronosTokenizer, predictor: Kronos, *,
                     progress: bool = True) -> Phase:
    """Phase 2's `Phase`: its strategy, the frozen tokenizer's tokens, the skill probe, the frozen-weights check."""
    frozen_hash = weights_hash(tokenizer)
    skill = _skill_probe(cfg, data)
    strategy = apply_strategy(predictor, cfg.predictor, phase="predictor", seed=cfg.seed)
    tables = _token_tables(cfg, tokenizer, data, progress)
    train_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache, table=tables.get("train"))
    val_tokens = FrozenTokens(tokenizer, cache=cfg.predictor.token_cache, table=tables.get("val"))

    def check_frozen() -> None:
        if weights_hash(tokenizer) != frozen_hash:
            raise FrozenTokenizerChanged(
                "the tokenizer's weights changed during phase 2 (hash differs from the one taken before "
                "training); phase 2 must never update the tokenizer"
            )

    step = strategy.wrap_step(make_predictor_step(train_tokens, teacher_forcing=cfg.predictor.teacher_forcing))
    return Phase("predictor", predictor, step, make_predictor_evaluate(val_tokens, skill), cfg.predictor.select_metric,
                 data.train, data.val, before_save=check_frozen,
                 inputs={**_data_inputs(cfg, data), "tokenizer_sha256": frozen_hash},
                 reference=None if skill is None else _reference_skill(cfg, skill))


def _run_recorded(phase: Phase, cfg: KitConfig, data: DataBundle, inputs: dict[str, str | None], *, stage: str,
                  by: str, **run: Any) -> PhaseResult:
    """`run_phase`, with the stage's record: its inputs once the phase passed its checks (rank 0), its outputs
    (the `best` and `last` checkpoints) when it ends."""
    run_dir = _run_dir(cfg)
    started: list[StageRecord] = []
    phase.on_start = lambda: started.append(record_stage_start(run_dir, stage, cfg, data_sha256=data.source_sha256,
                                                               inputs=inputs, by=by))
    result = run_phase(phase, getattr(cfg, phase.name), run_dir=run_dir, seed=cfg.seed,
                       device=resolve_device(cfg.device), precision=cfg.precision, tensorboard=cfg.tensorboard, **run)
    if started:
        record_stage_finish(run_dir, started[0], {f"{phase.name}/{kind}": str(getattr(result, f"{kind}_dir"))
                                                  for kind in ("best", "last")})
    return result


def _token_tables(cfg: KitConfig, tokenizer: KronosTokenizer, data: DataBundle,
                  progress: bool) -> dict[str, TokenTable]:
    """The on-disk token tables of the training and validation windows ({} without `predictor.token_cache_dir`)."""
    if not cfg.predictor.token_cache_dir:
        return {}
    d = cfg.data
    data_key = data.cache.name if data.cache is not None else source_key(d.source, symbol=d.symbol, fill=d.fill,
                                                                          columns=d.columns, use_adj_close=d.adj_close)
    return open_token_tables(cfg.predictor.token_cache_dir, tokenizer, {"train": data.train, "val": data.val},
                             data_key=data_key, cfg=cfg, progress=progress)


def _skill_probe(cfg: KitConfig, data: DataBundle) -> ForecastSkill | None:
    """Phase 2's forecast-skill probe on the validation split (None when `predictor.skill_origins` is 0)."""
    p = cfg.predictor
    if not p.skill_origins:
        return None
    return ForecastSkill(data.splits.val, lookback=cfg.data.lookback, pred_len=p.skill_horizon, stride=p.skill_stride,
                         max_origins=p.skill_origins, sample_count=p.skill_paths, seed=cfg.seed)


def _reference_skill(cfg: KitConfig, skill: ForecastSkill) -> Callable[[], dict[str, Any]]:
    """What the `reference` record says about the probe; its scores (the level a finetune must beat) are
    the starting predictor's step-0 validation, which includes the probe."""

    def reference() -> dict[str, Any]:
        return {"model": "base", "source": cfg.predictor.start_from, "origins": skill.n_origins,
                "paths": skill.sample_count, "horizon": skill.pred_len}

    return reference
