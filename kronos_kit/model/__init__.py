"""Kronos model code: tokenizer, predictor, checkpoint IO (reference-compatible), finetune adapters."""

from kronos_kit.model.adapters import (
    L2SP,
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_config,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    parameter_groups,
    save_adapter,
    save_merged,
    select_trainable,
    set_trainable,
    trainable_table,
)
from kronos_kit.model.checkpoint import (
    PRESETS,
    CheckpointMixin,
    CheckpointNotFoundError,
    check_pair,
    state_dict_hash,
    weights_hash,
)
from kronos_kit.model.predictor import Kronos, NextTokenScores, PredictorCache
from kronos_kit.model.tokenizer import BinarySphericalQuantizer, KronosTokenizer, LossBreakdown

__all__ = [
    "L2SP",
    "LORA_TARGETS",
    "PRESETS",
    "BinarySphericalQuantizer",
    "CheckpointMixin",
    "CheckpointNotFoundError",
    "Kronos",
    "KronosTokenizer",
    "LoRALinear",
    "LossBreakdown",
    "NextTokenScores",
    "PredictorCache",
    "apply_lora",
    "check_pair",
    "load_adapter",
    "lora_config",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "parameter_groups",
    "save_adapter",
    "save_merged",
    "select_trainable",
    "set_trainable",
    "state_dict_hash",
    "trainable_table",
    "weights_hash",
]
