"""Configs: every shipped YAML loads; overrides and notebook parameters map onto typed fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kronos_kit.config import (
    NOTEBOOK_PARAMETERS,
    RUN_PARAMETERS,
    KitConfig,
    config_diff,
    describe_config,
    notebook_config,
    parse_overrides,
    project_root,
    resolve_path,
    thread_count,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "kronos-small.yaml", "pretrain_base.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert path.read_text().startswith("#"), "each config begins with a comment saying how to run it"
    cfg = KitConfig.from_file(path)
    assert cfg.name == path.stem
    assert KitConfig.from_dict(cfg.to_dict()) == cfg


def test_published_hyperparameters_are_the_defaults():
    cfg = KitConfig()
    assert (cfg.tokenizer.lr, cfg.tokenizer.grad_clip) == (2e-4, 2.0)
    assert (cfg.predictor.lr, cfg.predictor.grad_clip) == (4e-5, 3.0)
    assert (cfg.tokenizer.beta1, cfg.tokenizer.beta2, cfg.tokenizer.weight_decay) == (0.9, 0.95, 0.1)
    assert (cfg.tokenizer.pct_start, cfg.tokenizer.div_factor) == (0.03, 10.0)


def test_overrides_are_typed_and_unknown_keys_named():
    cfg = KitConfig().with_overrides(parse_overrides(["tokenizer.max_steps=20", "seed=3", "data.source=x.csv"]))
    assert (cfg.tokenizer.max_steps, cfg.seed, cfg.data.source) == (20, 3, "x.csv")
    with pytest.raises(ValueError, match="unknown parameter 'tokenizer.max_step'; did you mean 'tokenizer.max_steps'"):
        KitConfig().with_overrides({"tokenizer.max_step": 2})
    with pytest.raises(ValueError, match="Kronos|must be int"):
        KitConfig().with_overrides({"seed": "three"})
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["tokenizer.max_steps"])


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# x\ntokenizer:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*learning_rate"):
        KitConfig.from_file(bad)


def test_notebook_parameters_map_onto_config(tmp_path):
    cfg = notebook_config(ROOT / "configs" / "default.yaml", tmp_path, data="sample:sp500", tokenizer_steps=7,
                          train_predictor=False, seed=None)
    assert (cfg.data.source, cfg.tokenizer.max_steps, cfg.predictor.enabled) == ("sample:sp500", 7, False)
    assert cfg.seed == 0 and cfg.run_dir == str(tmp_path)
    with pytest.raises(ValueError, match="unknown notebook parameters"):
        notebook_config(ROOT / "configs" / "default.yaml", tmp_path, lr=1)


def test_notebooks_share_one_parameters_cell_with_every_parameter():
    from kronos_kit.pipeline import STAGES

    for path in sorted(ROOT / "notebooks" / name for name in STAGES.values()):  # the pipeline's stages
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert "parameters" in cells[0]["metadata"].get("tags", []), path.name
        names = {line.split("=")[0].strip() for line in "".join(cells[0]["source"]).splitlines() if "=" in line}
        assert names == {*RUN_PARAMETERS, *NOTEBOOK_PARAMETERS}, path.name
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells), f"{path.name} has outputs"


def test_an_override_can_set_a_field_to_null(tmp_path):
    # pipeline.pretrain_base clears predictor.tokenizer_from with {"predictor.tokenizer_from": None}
    path = tmp_path / "explicit.yaml"
    path.write_text("# test\npredictor:\n  tokenizer_from: some/tokenizer\n  max_steps: 5\n")
    cfg = KitConfig.from_file(path)
    assert cfg.predictor.tokenizer_from == "some/tokenizer"
    cleared = cfg.with_overrides({"predictor.tokenizer_from": None})
    assert cleared.predictor.tokenizer_from is None
    assert cfg.with_overrides(parse_overrides(["predictor.max_steps=null"])).predictor.max_steps is None

    # a notebook parameter left at None keeps the config's value; the same None as a dotted key clears it
    path_cfg = notebook_config(path, tmp_path, tokenizer_from=None)
    assert path_cfg.predictor.tokenizer_from == "some/tokenizer"


def test_numbers_in_every_notation(tmp_path):
    # the README's examples, verbatim: YAML 1.1 reads 1e-5 (no dot) as a string
    assert KitConfig().with_overrides(parse_overrides(["predictor.lr=1e-5"])).predictor.lr == 1e-5
    path = tmp_path / "lr.yaml"
    path.write_text("# test\npredictor:\n  lr: 4e-5\ntokenizer:\n  max_steps: 1e3\n  lr: 2\n")
    cfg = KitConfig.from_file(path)
    assert (cfg.predictor.lr, cfg.tokenizer.max_steps, cfg.tokenizer.lr) == (4e-5, 1000, 2.0)
    assert isinstance(cfg.tokenizer.max_steps, int) and isinstance(cfg.tokenizer.lr, float)
    with pytest.raises(ValueError, match="max_steps must be int, got 2.5"):
        KitConfig().with_overrides(parse_overrides(["tokenizer.max_steps=2.5e0"]))
    with pytest.raises(ValueError, match="lr must be float"):
        KitConfig().with_overrides({"predictor.lr": "fast"})


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", ""])
def test_run_names_with_path_parts_are_refused(name):
    with pytest.raises(ValueError, match=r"name=.*run name"):
        KitConfig().with_overrides({"name": name})


def test_notebook_cells_do_not_shadow_parameters():
    import ast

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        bound = set()
        for cell in cells[1:]:  # after the parameters cell
            for node in ast.walk(ast.parse("".join(cell["source"]))):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    bound.add(node.id)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        assert not bound & {*RUN_PARAMETERS, *NOTEBOOK_PARAMETERS}, path.name


def test_a_dotted_key_reaches_into_a_mapping_field():
    cfg = KitConfig().with_overrides(parse_overrides(["data.columns.Date=timestamps", "data.columns.Px=close"]))
    assert cfg.data.columns == {"Date": "timestamps", "Px": "close"}
    assert cfg.with_overrides({"data.columns.Px": None}).data.columns == {"Date": "timestamps"}
    assert KitConfig.from_dict(cfg.to_dict()) == cfg  # and it survives config.yaml
    with pytest.raises(ValueError, match="DataConfig.columns must be a mapping"):
        KitConfig().with_overrides({"data.columns": ["Date"]})


def test_relative_paths_resolve_the_same_from_notebooks_dir(tmp_path, monkeypatch):
    root = project_root()
    assert (root / "configs" / "default.yaml").is_file()
    monkeypatch.chdir(root / "notebooks")  # where JupyterLab starts a notebook's kernel
    assert resolve_path("configs/default.yaml") == root / "configs" / "default.yaml"
    cfg = notebook_config("configs/default.yaml", "runs/notebook", data="tests/data/ashare_5min_sample.csv")
    assert cfg.run_dir == str(root / "runs" / "notebook")
    assert cfg.data.source == str(root / "tests" / "data" / "ashare_5min_sample.csv")
    assert cfg.tokenizer.start_from == "embedded:base/tokenizer"  # not a path: unchanged
    # the working directory wins where the path exists there
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("# local\nseed: 5\n")
    assert resolve_path("configs/default.yaml") == Path("configs/default.yaml")
    assert notebook_config("configs/default.yaml", None).seed == 5
    assert resolve_path("missing.csv") == Path("missing.csv")  # named as given in the error that follows
    assert resolve_path("runs/new", new=True) == root / "runs" / "new"


def test_threads_come_from_config_then_environment(monkeypatch):
    monkeypatch.delenv("KRONOS_THREADS", raising=False)
    assert thread_count(KitConfig()) is None
    monkeypatch.setenv("KRONOS_THREADS", "3")
    assert thread_count(KitConfig()) == 3
    assert thread_count(KitConfig().with_overrides(parse_overrides(["threads=1"]))) == 1
    monkeypatch.setenv("KRONOS_THREADS", "many")
    with pytest.raises(ValueError, match="KRONOS_THREADS"):
        thread_count(KitConfig())
    with pytest.raises(ValueError, match="threads must be >= 1"):
        KitConfig().with_overrides({"threads": 0})


def test_describe_config_lists_only_what_differs():
    cfg = KitConfig.from_file(ROOT / "configs" / "default.yaml").with_overrides({"run_dir": "/r", "seed": 4})
    diff = config_diff(cfg)
    assert diff["seed"] == (0, 4) and diff["tokenizer.max_steps"] == (None, 150) and "run_dir" not in diff
    text = describe_config(cfg)
    assert text.splitlines()[0] == "run 'default' -> /r"
    assert len(text.splitlines()) == 3 + len(diff) < 25  # instead of the 70-line YAML
    assert "data.lookback" not in text  # same as the default
