"""Kronos model code: tokenizer, predictor, checkpoint IO (reference-compatible)."""

from kronos_kit.model.checkpoint import PRESETS, CheckpointMixin, CheckpointNotFoundError, check_pair, weights_hash
from kronos_kit.model.predictor import Kronos, NextTokenScores, PredictorCache
from kronos_kit.model.tokenizer import BinarySphericalQuantizer, KronosTokenizer, LossBreakdown

__all__ = [
    "PRESETS",
    "BinarySphericalQuantizer",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "Kronos",
    "KronosTokenizer",
    "LossBreakdown",
    "NextTokenScores",
    "PredictorCache",
    "check_pair",
    "weights_hash",
]
