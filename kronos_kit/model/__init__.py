"""Kronos model code: tokenizer, predictor, checkpoint IO (reference-compatible)."""

from kronos_kit.model.checkpoint import PRESETS, CheckpointMixin, CheckpointNotFoundError, check_pair, weights_hash
from kronos_kit.model.predictor import TIME_FEATURES, Kronos, PredictorCache
from kronos_kit.model.tokenizer import BinarySphericalQuantizer, KronosTokenizer

__all__ = [
    "PRESETS",
    "TIME_FEATURES",
    "BinarySphericalQuantizer",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "Kronos",
    "KronosTokenizer",
    "PredictorCache",
    "check_pair",
    "weights_hash",
]
