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
    (`make git-filter`), git sees the notebook stripped: status clean, nothing to commit, `make lint` unaffected."""
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
