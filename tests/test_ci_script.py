"""The CI entry point fails when pytest collects nothing (pytest's exit 5 must not be lost on the way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_fails_when_no_test_is_collected():
    run_tests = ROOT / ".ci" / "run-tests"
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # what CI calls: the README's test command
    assert ".ci/run-tests" in (ROOT / "Makefile").read_text()  # ... which keeps pytest's exit 5
    env = {"PY": sys.executable, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(run_tests), "tests/test_config.py", "-q", "-p", "no:cacheprovider", "-k",
                           "no_test_is_named_like_this"], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 1 and "collected no tests" in done.stderr, done.stdout + done.stderr


def test_setup_installs_nbstripout_as_the_clones_git_filter(tmp_path):
    """JupyterLab's autosave writes outputs into the tracked notebooks; with the filter `make setup` installs
    (`make git-filter`), git sees the notebook stripped: `git diff` empty, nothing to commit, `make lint` unaffected."""
    import json
    import shutil

    from kronos_kit.notebooks import has_outputs, strip_notebook
    from kronos_kit.provenance import git_state

    repo = tmp_path / "clone"
    (repo / "notebooks").mkdir(parents=True)
    for name in ("Makefile", ".gitattributes"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".gitignore").write_text(".venv\n")
    notebook = repo / "notebooks" / "01_tokenizer_adaptation.ipynb"
    shutil.copy(ROOT / "notebooks" / notebook.name, notebook)
    (repo / ".venv").symlink_to(sys.prefix)  # this venv, with nbstripout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "Makefile", ".gitattributes", ".gitignore", "notebooks"],
                [*git, "commit", "-q", "-m", "x"]):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    done = subprocess.run(["make", "git-filter"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "git filter: nbstripout" in done.stdout, done.stdout + done.stderr
    assert (repo / ".gitattributes").read_text() == (ROOT / ".gitattributes").read_text()  # nothing to add

    # what Lab's autosave leaves: outputs, counts, widget state, papermill's metadata
    nb = json.loads(notebook.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code.update(execution_count=3, outputs=[{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}])
    code["metadata"]["papermill"] = {"duration": 1.0}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb["metadata"]["language_info"].update(version="3.11.7", mimetype="text/x-python", file_extension=".py",
                                           codemirror_mode={"name": "ipython", "version": 3})  # Lab's kernel details
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert has_outputs(notebook)
    # the filter strips it: git sees the committed notebook, and a run's manifest says "not dirty"
    assert subprocess.run(["git", "diff", "--quiet"], cwd=repo).returncode == 0
    assert git_state(repo) == {"commit": git_state(repo)["commit"], "dirty": False}
    notebook.write_text(notebook.read_text().replace("Tokenizer adaptation", "Tokenizer ADAPTATION"))
    assert git_state(repo)["dirty"] is True  # a real edit still is one
    notebook.write_text(notebook.read_text().replace("Tokenizer ADAPTATION", "Tokenizer adaptation"))
    # `make strip` writes exactly what the filter hands git
    cleaned = subprocess.run(["git", "show", ":notebooks/" + notebook.name], cwd=repo, capture_output=True,
                             text=True, check=True).stdout
    strip_notebook(notebook)
    assert notebook.read_text() == cleaned


def _nbstripout(text: str) -> str:
    """What the git filter `make setup` installs hands git for a notebook's text (its clean command)."""
    from kronos_kit.notebooks import EXTRA_KEYS

    return subprocess.run([sys.executable, "-m", "nbstripout", "--extra-keys", EXTRA_KEYS], input=text,
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_every_committed_notebook_is_what_the_git_filter_writes():
    """A fresh clone with the filter installed must read clean: a committed notebook that is not the filter's fixed
    point (say random cell ids, or `\\u00b7` escapes) shows as modified in `git status` and `git diff` before anyone
    touches it, and every run's manifest then says "dirty". `make strip` and `make lint` hold the same form."""
    from kronos_kit.notebooks import strip_notebooks, stripped_text

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 4
    for notebook in notebooks:
        text = notebook.read_text()
        assert _nbstripout(text) == text, f"{notebook.name}: run `make strip` and commit"
        assert stripped_text(text) == text, notebook.name
    assert strip_notebooks([str(ROOT / "notebooks")], check=True) == 0


def test_strip_writes_what_the_filter_writes_for_a_notebook_lab_saved(tmp_path, capsys):
    """A notebook with nbformat 4.5 cell ids as Lab or papermill write them (random), outputs and non-ASCII text:
    `make strip` renumbers the ids and writes the text as the filter does, and `make lint` refuses the unstripped
    file even when it has no outputs (its ids alone make every clone read it as modified)."""
    import json

    from kronos_kit.notebooks import strip_notebook, strip_notebooks

    nb = json.loads((ROOT / "notebooks" / "04_sweep.ipynb").read_text())
    for k, cell in enumerate(nb["cells"]):
        cell["id"] = f"a{k * 7919:07x}"
    saved = tmp_path / "saved.ipynb"
    saved.write_text(json.dumps(nb, indent=1, ensure_ascii=True) + "\n")  # ids and escapes only, no outputs
    assert strip_notebooks([str(saved)], check=True) == 1
    assert "is not stripped as the git filter writes it" in capsys.readouterr().out
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code.update(execution_count=2, outputs=[{"output_type": "stream", "name": "stdout", "text": ["· hi\n"]}])
    saved.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    filtered = _nbstripout(saved.read_text())
    assert strip_notebook(saved) and saved.read_text() == filtered
    assert strip_notebooks([str(saved)], check=True) == 0
