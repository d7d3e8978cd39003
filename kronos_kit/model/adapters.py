"""Finetune strategies on the model side: parameter groups (freeze), LoRA adapters, L2-SP.

- Parameter groups split every parameter of a Kronos predictor or tokenizer into named, disjoint
  groups (`embedding`, `layers.3`, `head`, ...); `set_trainable` trains only the selected ones.
- LoRA (Hu et al., https://arxiv.org/abs/2106.09685): a frozen linear W plus a trainable low-rank
  update, y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T, with B = 0 at the start so the
  adapted model begins as the base model. `LoRALinear` keeps W and b under their own names
  (`q_proj.weight`, as torchtune's `LoRALinear`), so merging W' = W + (alpha / rank) B A gives back
  the plain checkpoint layout that the reference code and every kit function load.
- L2-SP (Li et al., https://arxiv.org/abs/1802.01483): a penalty strength * sum ||w - w0||^2 that
  pulls the trained parameters toward their starting values, against forgetting.

Call order for a training run: load the base -> `apply_lora` and/or `set_trainable` -> `L2SP` ->
optimizer over the parameters that require grad -> DDP wrap. Everything that changes
`requires_grad` must happen before the DDP wrap and the optimizer; the read-only functions accept
a DDP-wrapped model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kronos_kit.config import LORA_ATTENTION_TARGETS, LORA_FFN_TARGETS, LORA_TARGET_NAMES, check_lora_targets
from kronos_kit.model.checkpoint import state_dict_hash
from kronos_kit.model.layers import RMSNorm, TransformerBlock
from kronos_kit.model.predictor import FixedEmbedding, Kronos
from kronos_kit.model.tokenizer import KronosTokenizer
from kronos_kit.runs import atomic_write, check_finite, save_json
from kronos_kit.runtime import unwrap

ATTENTION_TARGETS = LORA_ATTENTION_TARGETS  # SelfAttention linears of a block
FFN_TARGETS = LORA_FFN_TARGETS  # SwiGLU linears of a block
LORA_TARGETS = LORA_TARGET_NAMES  # the default: every linear of every transformer block
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "kronos-kit-lora/1"

# top-level attribute -> group; `layers` is split per transformer block (`layers.0`, ...)
_GROUPS_BY_MODEL: dict[type, dict[str, str]] = {
    Kronos: {"embedding": "embedding", "time_emb": "time_embedding", "transformer": "layers", "norm": "norm",
             "dep_layer": "dependency", "head": "head"},
    KronosTokenizer: {"embed": "embed", "encoder": "encoder", "quant_embed": "quantizer",
                      "post_quant_embed_pre": "quantizer", "post_quant_embed": "quantizer", "decoder": "decoder",
                      "head": "head"},
}
_SELECTORS_HELP = ("'last:N' (the last N transformer layers, predictor only), 'all', 'all_norms' (every RMSNorm "
                   "weight, whatever its group) and 'lora' (every adapter matrix)")


def _refuse_ddp(model: nn.Module, what: str) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"{what} changes which parameters train: call it on the bare model before wrapping it "
                        "in DistributedDataParallel (DDP fixes its parameter set when it is built)")


# ---------------------------------------------------------------------------------------------
# parameter groups (the `freeze` strategy)


def _group_rules(model: nn.Module) -> dict[str, str]:
    for cls, rules in _GROUPS_BY_MODEL.items():
        if isinstance(model, cls):
            return rules
    raise TypeError(f"parameter groups are defined for Kronos and KronosTokenizer, not {type(model).__name__}")


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> parameter names, in model order; every parameter is in exactly one group.

    Kronos: `embedding` (s1/s2 embeddings + fusion), `time_embedding`, `layers.0` .. `layers.{n-1}`
    (each transformer block, its own two norms included), `norm` (the final norm before the heads),
    `dependency` (the s2 cross-attention layer and its norm), `head` (both projections).
    KronosTokenizer: `embed`, `encoder`, `quantizer` (quant_embed and both post-quant projections;
    the BSQ itself has no parameters), `decoder`, `head`.
    LoRA matrices belong to the group of the linear they adapt.
    """
    model = unwrap(model)
    rules = _group_rules(model)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        top, _, rest = name.partition(".")
        if top not in rules:
            raise ValueError(f"parameter {name!r} of {type(model).__name__} has no group; add {top!r} to "
                             "adapters._GROUPS_BY_MODEL")
        group = rules[top]
        if group == "layers":
            group = f"layers.{rest.partition('.')[0]}"
        groups.setdefault(group, []).append(name)
    return groups


def _fixed_parameters(model: nn.Module) -> set[str]:
    """Parameters the architecture never trains (the sinusoidal time tables when learn_te=False)."""
    return {f"{prefix}.{name}" for prefix, module in model.named_modules() if isinstance(module, FixedEmbedding)
            for name, _ in module.named_parameters()}


def select_trainable(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """Names of the parameters that `groups` selects, in model order.

    A selector is a group name of `parameter_groups`, or `last:N` (the groups `layers.{n-N}` ..
    `layers.{n-1}`), `all`, `all_norms` (every RMSNorm weight) or `lora` (every adapter matrix).
    Fixed sinusoidal time tables are never selected.
    """
    model = unwrap(model)
    if isinstance(groups, str) or not groups:
        raise ValueError(f"groups must be a non-empty list of selectors, got {groups!r}; e.g. ['head', 'last:2']")
    by_group = parameter_groups(model)
    layers = [g for g in by_group if g.startswith("layers.")]
    chosen: set[str] = set()
    for selector in groups:
        if selector in by_group:
            chosen.update(by_group[selector])
        elif selector == "all":
            chosen.update(name for names in by_group.values() for name in names)
        elif selector == "all_norms":
            chosen.update(f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, RMSNorm))
        elif selector == "lora":
            chosen.update(name for name, _ in model.named_parameters() if _is_lora_key(name))
        elif selector.startswith("last:"):
            count = selector.removeprefix("last:")
            if not layers:
                raise ValueError(f"selector {selector!r} picks predictor transformer layers; a "
                                 f"{type(model).__name__} has the groups {list(by_group)}")
            if not count.isdigit() or not 1 <= int(count) <= len(layers):
                raise ValueError(f"selector {selector!r}: N must be a whole number from 1 to the "
                                 f"{len(layers)} transformer layers of this {type(model).__name__}")
            for group in layers[len(layers) - int(count):]:
                chosen.update(by_group[group])
        else:
            raise ValueError(f"unknown parameter group {selector!r} for {type(model).__name__}; groups: "
                             f"{list(by_group)}; selectors also accept {_SELECTORS_HELP}")
    fixed = _fixed_parameters(model)
    return [name for name, _ in model.named_parameters() if name in chosen and name not in fixed]


def set_trainable(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """requires_grad True exactly on the parameters `groups` selects (see `select_trainable`); returns them."""
    _refuse_ddp(model, "set_trainable")
    names = set(select_trainable(model, groups))
    if not names:
        raise ValueError(f"selectors {list(groups)} select no trainable parameter of {type(model).__name__}; "
                         f"choose among {list(parameter_groups(model))}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return [name for name, _ in model.named_parameters() if name in names]


def trainable_table(model: nn.Module) -> pd.DataFrame:
    """One row per group and a `total` row: parameters, trainable parameters, share.

    `share` is the group's trainable parameters as a fraction of all the model's parameters, so
    the rows add up to the `total` row's share: the fraction of the model that trains.
    """
    model = unwrap(model)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    rows = []
    for group, names in parameter_groups(model).items():
        count = sum(params[n].numel() for n in names)
        trainable = sum(params[n].numel() for n in names if params[n].requires_grad)
        rows.append({"group": group, "parameters": count, "trainable parameters": trainable})
    rows.append({"group": "total", "parameters": total,
                 "trainable parameters": sum(r["trainable parameters"] for r in rows)})
    table = pd.DataFrame(rows)
    table["share"] = table["trainable parameters"] / max(total, 1)
    return table


# ---------------------------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: x W^T + b + scale * dropout(x) A^T B^T.

    `weight` and `bias` are the wrapped layer's own Parameters (shared, not copied), so the state
    dict keeps the base keys and adds `lora_a` (rank, in) and `lora_b` (out, rank).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,  # inner dimension of the update B A
        alpha: float,  # the update is scaled by alpha / rank
        dropout: float = 0.0,  # dropout on the input of the LoRA path only
        generator: torch.Generator | None = None,  # draws A's init; None = the global RNG
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight = base.weight.requires_grad_(False)  # (out, in)
        self.bias = None if base.bias is None else base.bias.requires_grad_(False)  # (out,)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # B = 0: starts as the base
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5), generator=generator)  # as nn.Linear, litgpt
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A, detached, in the base weight's dtype."""
        return self.weight + self.scale * (self.lora_b @ self.lora_a)

    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (its weight keeps W's requires_grad)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout.p}")


def _is_lora_key(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> LoRALinear, in model order (empty when no adapter is applied)."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _target_parent(block: TransformerBlock, target: str) -> nn.Module:
    return block.self_attn if target in ATTENTION_TARGETS else block.ffn


def apply_lora(
    model: nn.Module,
    *,
    rank: int,  # inner dimension of each update; 4-16 is typical
    alpha: float,  # scale = alpha / rank; alpha = rank gives scale 1
    dropout: float = 0.0,  # dropout on the LoRA path's input
    targets: Sequence[str] = LORA_TARGETS,  # which linears of every transformer block get an adapter
    generator: torch.Generator | None = None,  # draws the A inits; None = the global RNG (seeded by the engine)
) -> int:
    """Wrap the target linears of every transformer block in `LoRALinear`, in place.

    Everything else is frozen: only the adapter matrices train (add groups afterwards with
    `set_trainable(model, ["lora", "head", ...])`). The dependency layer and the heads are not
    transformer blocks and get no adapter. Returns the number of adapter parameters.
    """
    _refuse_ddp(model, "apply_lora")
    _group_rules(model)  # a clear error for models without groups
    if lora_modules(model):
        raise ValueError("model already carries LoRA adapters; merge_lora(model) first or load the base again")
    check_lora_targets(targets)
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    widths = [min(lin.in_features, lin.out_features) for block in blocks
              for lin in (getattr(_target_parent(block, t), t) for t in LORA_TARGETS if t in targets)]
    if widths and rank > min(widths):  # rank r of a w-wide linear: r >= w is no low-rank update at all
        raise ValueError(f"LoRA rank {rank} is not below the narrowest adapted linear ({min(widths)} wide): "
                         f"choose lora_rank < {min(widths)} (4 to 16 is typical)")
    for param in model.parameters():
        param.requires_grad_(False)
    for block in blocks:
        for target in (t for t in LORA_TARGETS if t in targets):  # a fixed order: reproducible inits
            parent = _target_parent(block, target)
            setattr(parent, target, LoRALinear(getattr(parent, target), rank=rank, alpha=alpha, dropout=dropout,
                                               generator=generator))
    return sum(p.numel() for name, p in model.named_parameters() if _is_lora_key(name))


def lora_config(model: nn.Module) -> dict[str, Any] | None:
    """rank, alpha, dropout and targets of the applied adapters, read from the modules; None without LoRA."""
    modules = list(lora_modules(model).items())
    if not modules:
        return None
    first = modules[0][1]
    present = {name.rsplit(".", 1)[-1] for name, _ in modules}
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout.p,
            "targets": [t for t in LORA_TARGETS if t in present]}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter matrices alone (fresh detached copies), under their full parameter names."""
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items() if _is_lora_key(k)}


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor except the adapters: the base weights, under the base checkpoint's names."""
    return {k: v for k, v in unwrap(model).state_dict().items() if not _is_lora_key(k)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base checkpoint layout (same keys, shapes, order) with W' = W + scale * B @ A.

    Fresh detached tensors: the training model is not changed. A model without LoRA gives a
    detached copy of its own state dict.
    """
    model = unwrap(model)
    merged = {f"{name}.weight": m.merged_weight() for name, m in lora_modules(model).items()}
    return {k: merged[k] if k in merged else v.detach().clone() for k, v in _base_state_dict(model).items()}


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by the plain nn.Linear of its merged weight, in place; returns how many."""
    _refuse_ddp(model, "merge_lora")
    modules = lora_modules(model)
    for name, module in modules.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.merge())
    return len(modules)


def save_merged(model: nn.Module, folder: str | os.PathLike, *, adapter: bool = True) -> Path:
    """Write config.json + model.safetensors with merged weights via the model's `save_pretrained`.

    The folder loads with `Kronos.from_pretrained` / `KronosTokenizer.from_pretrained` (and the
    reference code) unchanged. With `adapter` and LoRA applied, `adapter.safetensors` and
    `adapter_config.json` are written beside them. Without LoRA this is `save_pretrained`.
    """
    model, folder = unwrap(model), Path(folder)
    state = merged_state_dict(model)
    check_finite(state, folder)
    model.save_pretrained(folder, state_dict=state)
    if adapter and lora_modules(model):
        save_adapter(model, folder)
    return folder


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `adapter.safetensors` (the A/B matrices) and `adapter_config.json`.

    The config is read from the modules (rank, alpha, dropout, targets), so it cannot disagree
    with the weights, and records `base_sha256`: the `weights_hash` of the non-adapter weights the
    adapter must be added to. `extra` (JSON values, e.g. the base checkpoint's source) is stored too.
    """
    model, folder = unwrap(model), Path(folder)
    config = lora_config(model)
    if config is None:
        raise ValueError("model has no LoRA adapters to save; apply_lora(model, ...) first")
    state = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    check_finite(state, folder)
    config = {"format": ADAPTER_FORMAT, "model": type(model).__name__, **config,
              "adapter_parameters": sum(v.numel() for v in state.values()),
              "base_sha256": state_dict_hash(_base_state_dict(model)), "extra": dict(extra or {})}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    save_json(folder / ADAPTER_CONFIG_NAME, config, sort_keys=True)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {ADAPTER_CONFIG_NAME} and "
                                f"{ADAPTER_WEIGHTS_NAME} (written by save_adapter / save_merged)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: format {config.get('format')!r} is not {ADAPTER_FORMAT!r}")
    return config


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Add the adapter saved in `folder` to `model`, which must hold the base it was trained on.

    Applies LoRA with the saved settings first when the model has none (the global RNG is not
    touched), then loads A/B strictly: every name and shape must match.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    settings = {k: config[k] for k in ("rank", "alpha", "dropout", "targets")}
    if type(model).__name__ != config["model"]:
        raise ValueError(f"{folder}: adapter is for a {config['model']}, not a {type(model).__name__}")
    base_hash = state_dict_hash(_base_state_dict(model))
    if base_hash != config["base_sha256"]:
        raise ValueError(
            f"{folder}: the adapter was trained on base weights with sha256 {config['base_sha256'][:12]}..., "
            f"this model's are {base_hash[:12]}...: load that base checkpoint first (when other parameters "
            "were trained beside the adapter, load the merged model.safetensors instead)"
        )
    if lora_config(model) is None:
        device = next(model.parameters()).device
        apply_lora(model, **settings, generator=torch.Generator(device))
    elif lora_config(model) != settings:
        raise ValueError(f"{folder}: adapter settings {settings} differ from the model's {lora_config(model)}")
    state, own = load_file(str(folder / ADAPTER_WEIGHTS_NAME)), lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{folder / ADAPTER_WEIGHTS_NAME} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


# ---------------------------------------------------------------------------------------------
# L2-SP


class L2SP:
    """strength * sum ||w - w0||^2 over the parameters that require grad when it is built.

    Build it from the freshly loaded starting weights, after `set_trainable` / `apply_lora` and
    before loading a resume state, so w0 is the run's start (store `anchor_hash` in the training
    state and compare it on resume). The strength is applied here: add `penalty(model)` to the loss
    as it is. The gradient is 2 * strength * (w - w0).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        strength: float,  # weight of the penalty in the loss; 0 switches it off
    ):
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"L2-SP strength must be a finite number >= 0, got {strength!r}")
        self.strength = strength
        self.anchor = {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}
        if not self.anchor:
            raise ValueError("L2SP: no parameter requires grad; build it after set_trainable / apply_lora")

    @property
    def anchor_hash(self) -> str:
        return state_dict_hash(self.anchor)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The weighted penalty, a scalar fp32 tensor with gradients toward the anchored parameters."""
        params = dict(unwrap(model).named_parameters())
        missing = sorted(set(self.anchor) - set(params))
        if missing:
            raise ValueError(f"L2SP: the model lost anchored parameters {missing[:3]}...; build L2SP after "
                             "apply_lora / set_trainable, on the model you train")
        total = torch.zeros((), device=next(iter(params.values())).device)
        for name, w0 in self.anchor.items():
            w = params[name]
            if w0.device != w.device:  # the model moved after the snapshot: move the anchor once
                self.anchor[name] = w0 = w0.to(w.device)
            total = total + (w.float() - w0.float()).pow(2).sum()
        return self.strength * total
