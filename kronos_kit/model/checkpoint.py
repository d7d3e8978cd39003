"""Checkpoint IO in the reference Hugging Face layout (`config.json` + `model.safetensors`), and presets.

A checkpoint source is one of:
- a local folder holding `config.json` and `model.safetensors` (e.g. a run's `tokenizer/best`);
- a preset name (`tiny`, `tokenizer-base`, `tokenizer-2k`, `mini`, `small`, `base`, optionally
  prefixed `preset:`), initialised from scratch with a seed;
- `embedded:base/tokenizer` or `embedded:base/predictor`: the small base checkpoints shipped inside
  the package (pretrained by the kit on the S&P 500 sample; `make base` regenerates them);
- a hub id `owner/name`, fetched through `huggingface_hub` (its cache, `revision`, and offline mode
  via `HF_HUB_OFFLINE=1` / `local_files_only=True` are respected).

A source that looks local never goes to the network: a `Path`, a string starting with `.`, `/` or
`~`, one under `runs/`, one with more than one `/`, or one whose first part is an existing folder.
If that folder is missing, `CheckpointNotFoundError` says "folder not found" and lists the closest
folders; a hub id that cannot be fetched (offline, unreachable, not cached, unknown) raises it too,
saying how to use a local folder instead.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kronos_kit.binding import embedded_folder
from kronos_kit.runs import atomic_write, load_json, save_json
from kronos_kit.runtime import state_dict_hash as state_dict_hash  # re-exported: the checkpoint hashes
from kronos_kit.runtime import weights_hash as weights_hash

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_TOKENIZER_BASE = dict(
    d_in=6, d_model=256, n_heads=4, ff_dim=512, n_enc_layers=4, n_dec_layers=4, ffn_dropout_p=0.0,
    attn_dropout_p=0.0, resid_dropout_p=0.0, s1_bits=10, s2_bits=10, beta=0.05, gamma0=1.0, gamma=1.1,
    zeta=0.05, group_size=4,
)
_PREDICTOR_DROPOUT = dict(ffn_dropout_p=0.2, attn_dropout_p=0.0, resid_dropout_p=0.2, token_dropout_p=0.0)

# Published shapes (the config.json of the released checkpoints) plus `tiny`, which trains in
# seconds on a CPU. Dropouts of the published predictors are typical values: a real checkpoint's
# own config.json always wins when you load it.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "KronosTokenizer": {
        "tokenizer-base": _TOKENIZER_BASE,
        "tokenizer-2k": {**_TOKENIZER_BASE, "group_size": 5},
        "tiny": {**_TOKENIZER_BASE, "d_model": 64, "ff_dim": 128, "n_enc_layers": 3, "n_dec_layers": 3,
                 "s1_bits": 6, "s2_bits": 6},
    },
    "Kronos": {
        "mini": dict(s1_bits=10, s2_bits=10, n_layers=4, d_model=256, n_heads=4, ff_dim=512,
                     learn_te=True, **_PREDICTOR_DROPOUT),
        "small": dict(s1_bits=10, s2_bits=10, n_layers=8, d_model=512, n_heads=8, ff_dim=1024,
                      learn_te=True, **_PREDICTOR_DROPOUT),
        "base": dict(s1_bits=10, s2_bits=10, n_layers=12, d_model=832, n_heads=16, ff_dim=2048,
                     learn_te=True, **_PREDICTOR_DROPOUT),
        "tiny": dict(s1_bits=6, s2_bits=6, n_layers=2, d_model=64, n_heads=4, ff_dim=128, learn_te=True,
                     ffn_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, token_dropout_p=0.0),
    },
}

M = TypeVar("M", bound="CheckpointMixin")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repository ids
_FOLDER_HINT = f"pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}, e.g. runs/<run>/predictor/best"


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint source that names no loadable weights: a missing folder or a hub id that could
    not be fetched. The message names the source and says what to do."""


class CheckpointMixin:
    """`from_pretrained` / `save_pretrained` for modules whose `config` dict holds their init kwargs."""

    config: dict[str, Any]

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(PRESETS.get(cls.__name__, {}))

    @classmethod
    def from_config(cls: type[M], config: dict[str, Any], *, source: str = "config") -> M:
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown, missing = set(config) - params, params - set(config)
        if unknown or missing:
            raise ValueError(
                f"{source}: config does not fit {cls.__name__}: "
                + (f"unknown keys {sorted(unknown)}; " if unknown else "")
                + (f"missing keys {sorted(missing)}; " if missing else "")
                + f"expected exactly {sorted(params)}"
            )
        return cls(**config)

    @classmethod
    def from_preset(cls: type[M], name: str, *, seed: int = 0) -> M:
        name = name.removeprefix("preset:")
        if name not in PRESETS.get(cls.__name__, {}):
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; presets: {cls.presets()}")
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            model = cls.from_config(dict(PRESETS[cls.__name__][name]), source=f"preset {name}")
        return model

    @classmethod
    def from_pretrained(
        cls: type[M],
        source: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        seed: int = 0,
    ) -> M:
        """Load from a local folder, a preset name or a hub id; the model comes back in eval() mode."""
        folder = _resolve_folder(cls, source, revision=revision, cache_dir=cache_dir,
                                 local_files_only=local_files_only)
        if folder is None:
            model = cls.from_preset(str(source), seed=seed)
            logger.info("%s: initialised preset %r from scratch (seed %d)", cls.__name__, str(source), seed)
        else:
            model = cls.from_config(_read_config(folder / CONFIG_NAME), source=str(folder / CONFIG_NAME))
            load_weights(model, folder / WEIGHTS_NAME)
            logger.info("%s: loaded %s in eval() mode", cls.__name__, folder)
        if device is not None:
            model.to(device)
        return model.eval()

    def save_pretrained(
        self, directory: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write config.json and model.safetensors (each atomically) loadable by kit and reference.

        `state_dict` replaces the module's own tensors, e.g. LoRA-merged weights in the reference
        layout (`adapters.save_merged`); it must hold exactly the keys this config builds.
        """
        source = self.state_dict() if state_dict is None else state_dict
        self._check_layout(source)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in source.items()}
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        save_json(directory / CONFIG_NAME, self.config, sort_keys=True)
        return directory

    def _check_layout(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse to write tensors that `from_pretrained` would not load (e.g. unmerged LoRA adapters)."""
        with torch.device("meta"):  # the config's own layout, without allocating or drawing random numbers
            expected = {k: v.shape for k, v in type(self).from_config(dict(self.config)).state_dict().items()}
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        shapes = [k for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k]]
        if extra or missing or shapes:
            raise ValueError(
                f"{type(self).__name__}.save_pretrained: the state does not fit its config.json "
                f"(unexpected {extra[:4]}, missing {missing[:4]}, misshapen {shapes[:4]}); "
                "a model with LoRA adapters is saved with kronos_kit.model.save_merged"
            )


def source_width(source: str, model: str = "Kronos") -> int | None:
    """d_model of a checkpoint source without loading its weights: a folder's or an embedded checkpoint's
    config.json, a preset of `model` ("Kronos" or "KronosTokenizer"), or a hub id already in the local hub cache
    (never fetched); None when it cannot be told."""
    name = str(source)
    try:
        if name.startswith("embedded:"):
            return int(load_json(embedded_folder(name) / CONFIG_NAME)["d_model"])
        path = Path(name).expanduser()
        if (path / CONFIG_NAME).is_file():
            return int(load_json(path / CONFIG_NAME)["d_model"])
        preset = PRESETS.get(model, {}).get(name.removeprefix("preset:"))
        if preset is not None:
            return int(preset["d_model"])
        if _HUB_ID.fullmatch(name) and not _looks_local(name):
            import huggingface_hub

            return int(load_json(huggingface_hub.hf_hub_download(name, CONFIG_NAME, local_files_only=True))["d_model"])
    except Exception:  # an unreadable or uncached config: the width is unknown, the caller falls back
        return None
    return None


def config_width(cfg: Any) -> int | None:
    """The widest model a `KitConfig` starts from (its tokenizer and predictor `start_from`), None if unknown."""
    widths = [source_width(cfg.tokenizer.start_from, "KronosTokenizer"), source_width(cfg.predictor.start_from)]
    if cfg.predictor.tokenizer_from:
        widths.append(source_width(cfg.predictor.tokenizer_from, "KronosTokenizer"))
    known = [w for w in widths if w is not None]
    return max(known) if len(known) == len(widths) else None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    return load_json(path)


def _resolve_folder(cls, source, *, revision, cache_dir, local_files_only) -> Path | None:
    """Local folder for `source`, or None when it names a preset."""
    name = str(source)
    if name.startswith("embedded:"):
        path = embedded_folder(name)  # inside the kit's assets: `embedded:../..` is refused
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(f"embedded checkpoint {name!r} not found at {path}; "
                                          "run `make base` to build it")
        return path
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; pass the checkpoint folder that holds {CONFIG_NAME}")
        return path
    if name.removeprefix("preset:") in PRESETS.get(cls.__name__, {}):
        return None
    if isinstance(source, os.PathLike) or _looks_local(name):
        raise CheckpointNotFoundError(_folder_not_found(name, path))
    if name.startswith("preset:") or not _HUB_ID.fullmatch(name):
        close = difflib.get_close_matches(name.removeprefix("preset:"), cls.presets(), n=1)
        raise ValueError(
            f"checkpoint source {name!r} is neither an existing folder, a {cls.__name__} preset "
            f"{cls.presets()}, nor a hub id of the form owner/name"
            + (f"; did you mean {close[0]!r}?" if close else "")
        )
    return _download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)


def _looks_local(name: str) -> bool:
    """True for names that can only be meant as a path on this machine (never a hub id)."""
    first = Path(name).parts[0] if Path(name).parts else ""
    return (
        name.startswith((".", "~", "runs/", "runs" + os.sep))
        or Path(name).is_absolute()
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or ("/" in name and Path(first).is_dir())
    )


def _folder_not_found(name: str, path: Path) -> str:
    """'folder not found' naming the path, with the closest folders of its deepest existing parent."""
    absolute = path.absolute()
    parent = absolute.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    wanted = absolute.relative_to(parent).parts[0]
    try:  # one listing of one folder: cheap
        folders = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        folders = []
    close = difflib.get_close_matches(wanted, folders, n=5, cutoff=0.6)
    if close:
        nearby = f"; closest folders in {parent}: {close}"
    elif folders:
        nearby = f"; {parent} holds {folders[:10]}{' ...' if len(folders) > 10 else ''}"
    else:
        nearby = f"; {parent} holds no folders"
    return f"checkpoint folder not found: {name!r} (looked for {absolute}; no {wanted!r} in {parent}){nearby}. " \
        f"Check the path, or {_FOLDER_HINT}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _download(name: str, *, revision, cache_dir, local_files_only) -> Path:
    """Fetch a hub id through huggingface_hub (cache, revision and offline mode respected)."""
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(
                name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            )
        )
    except Exception as err:  # every failed fetch gets the same advice; the cause stays chained
        reason = (str(err).strip().splitlines() or [""])[0]
        if _hub_offline():
            why = "HF_HUB_OFFLINE is set and this id is not in the local hub cache"
        elif local_files_only:
            why = "local_files_only=True and this id is not in the local hub cache"
        else:
            why = "the hub may be unreachable, or the id or revision may not exist"
        raise CheckpointNotFoundError(
            f"weights of hub id {name!r}{f' (revision {revision!r})' if revision else ''} could not be fetched: "
            f"{why} ({type(err).__name__}: {reason}). To use a local folder instead, {_FOLDER_HINT} (no "
            f"{name!r} exists under {Path.cwd()}); to use the hub, load it once with network access, after "
            "which it loads from the cache offline."
        ) from err


def load_weights(model: nn.Module, path: Path) -> None:
    """Strictly load a safetensors file, naming every missing, unexpected or misshapen tensor."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # truncated, replaced or not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the checkpoint is damaged: "
                         "rerun the phase that wrote it, or use another checkpoint") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match {type(model).__name__} built from its config.json: "
            + (f"missing tensors {missing}; " if missing else "")
            + (f"unexpected tensors {unexpected}; " if unexpected else "")
            + (f"shape mismatches [{'; '.join(shapes)}]" if shapes else "")
        )
    model.load_state_dict(state, strict=True)


def check_pair(tokenizer: nn.Module, predictor: nn.Module) -> None:
    """Refuse a tokenizer and predictor whose token vocabularies differ."""
    tok = (tokenizer.s1_bits, tokenizer.s2_bits)
    pred = (predictor.s1_bits, predictor.s2_bits)
    if tok != pred:
        raise ValueError(
            f"tokenizer has (s1_bits, s2_bits) = {tok} but predictor expects {pred}: "
            "pair a predictor with the tokenizer it was trained on"
        )
