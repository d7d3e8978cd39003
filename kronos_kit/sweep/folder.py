"""The sweep folder, defined once (the README's "A sweep folder" section lists it):

```
sweeps/<name>/
  sweep.json        what the sweep is: study name, storage, objective, data hash, every call, test evaluations
  config.yaml       the base config every trial starts from (trial 0 runs it as it is)
  space.yaml        the search space and settings
  study.db          the Optuna study (SQLite), unless --storage names another
  trials/NNNN/      one ordinary run folder per trial slot (+ trial.json)
  phase1/<key>/     shared phase-1 units (a run folder each, + phase1.json)
  cache/            the memory-mapped data and the token cache (cache/tokens)
  leaderboard.csv leaderboard.md report.md test_table.csv figures/*.png
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kronos_kit.config import KitConfig
from kronos_kit.runs import load_json, save_json
from kronos_kit.sweep.objective import OBJECTIVES, Objective
from kronos_kit.sweep.space import SearchSpace

__all__ = ["SWEEP_KIND", "SweepDir", "load_sweep_study"]

SWEEP_KIND = "kronos-kit sweep"  # sweep.json's marker: --resume only continues folders of ours


class SweepDir:
    """The files of one sweep folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"SweepDir({str(self.path)!r})"

    definition_file = property(lambda self: self.path / "sweep.json")
    config = property(lambda self: self.path / "config.yaml")
    space_file = property(lambda self: self.path / "space.yaml")
    trials = property(lambda self: self.path / "trials")
    phase1 = property(lambda self: self.path / "phase1")
    cache = property(lambda self: self.path / "cache")
    tokens = property(lambda self: self.path / "cache" / "tokens")
    leaderboard_csv = property(lambda self: self.path / "leaderboard.csv")
    leaderboard_md = property(lambda self: self.path / "leaderboard.md")
    report = property(lambda self: self.path / "report.md")
    test_table = property(lambda self: self.path / "test_table.csv")

    @property
    def figures(self) -> Path:
        folder = self.path / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def exists(self) -> bool:
        if not self.definition_file.is_file():
            return False
        try:
            return load_json(self.definition_file).get("kind") == SWEEP_KIND
        except (ValueError, AttributeError):
            return False

    def definition(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(f"{self.path} is not a sweep folder (no sweep.json of ours); give the folder a "
                                    "`sweep` call created (sweeps/<name>), or start a new sweep there")
        return load_json(self.definition_file)

    def save_definition(self, data: dict[str, Any]) -> None:
        save_json(self.definition_file, {**data, "kind": SWEEP_KIND}, default=str)

    def base_config(self) -> KitConfig:
        return KitConfig.from_file(self.config)

    def space(self) -> SearchSpace:
        return SearchSpace.from_file(self.space_file)

    def objective(self) -> Objective:
        return OBJECTIVES[self.definition()["objective"]]


def load_sweep_study(sweep: SweepDir, storage: str | None = None) -> Any:
    """The sweep's Optuna study, for reading (leaderboard, figures); `storage` overrides the recorded one."""
    from kronos_kit.sweep.study import open_storage, open_study

    d = sweep.definition()
    return open_study(open_storage(storage or d["storage"]), d["study"], sweep.space().settings)
