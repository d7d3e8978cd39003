"""Notebook hygiene: committed notebooks carry no outputs and no execution counts, in the git filter's form."""

from __future__ import annotations

import json
from pathlib import Path


def _notebook_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.ipynb")) if p.is_dir() else [p])
    return files


# what stripping removes besides outputs and execution counts: nbstripout's default keys (the git filter `make
# setup` installs, so `make strip` and a commit strip alike) plus papermill's and the kernel details JupyterLab
# adds to language_info on save, set as the filter's extrakeys (`make git-filter`: EXTRA_KEYS, keep them equal)
NOTEBOOK_KEYS = ("signature", "widgets", "papermill")
CELL_KEYS = ("collapsed", "ExecuteTime", "execution", "heading_collapsed", "hidden", "scrolled", "papermill")
LANGUAGE_INFO_KEYS = ("codemirror_mode", "file_extension", "mimetype", "nbconvert_exporter", "pygments_lexer",
                      "version")
EXTRA_KEYS = " ".join(["metadata.papermill", "cell.metadata.papermill",
                       *(f"metadata.language_info.{k}" for k in LANGUAGE_INFO_KEYS)])


def stripped_text(text: str) -> str:
    """A notebook's JSON text as `make strip` and the git filter leave it: no outputs, execution counts or run
    metadata, cell ids numbered by position and keys sorted, as nbstripout writes them (its default, without
    `--keep-id`): so a stripped notebook is exactly what the filter hands git, and a fresh clone's `git diff` is
    empty."""
    nb = json.loads(text)
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        if "id" in cell:  # nbformat >= 4.5 cells carry one; Lab and papermill write random ids
            cell["id"] = str(i)
        for key in CELL_KEYS:
            cell.get("metadata", {}).pop(key, None)
    for key in NOTEBOOK_KEYS:
        nb.get("metadata", {}).pop(key, None)
    for key in LANGUAGE_INFO_KEYS:
        nb.get("metadata", {}).get("language_info", {}).pop(key, None)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def strip_notebook(path: Path) -> bool:
    """Strip a notebook in place (:func:`stripped_text`); return True if the file changed."""
    text = path.read_text()
    new = stripped_text(text)
    if new != text:
        path.write_text(new)
        return True
    return False


def has_outputs(path: Path) -> bool:
    nb = json.loads(path.read_text())
    return any(
        c.get("outputs") or c.get("execution_count")
        for c in nb.get("cells", [])
        if c.get("cell_type") == "code"
    )


def strip_notebooks(paths: list[str], *, check: bool = False) -> int:
    """Strip (or with `check`, only report) every notebook under `paths`; exit code 1 if dirty in check mode.

    Dirty: stripping would change the file, outputs or not (a notebook whose cell ids or key order differ from
    what the git filter writes reads as modified in every clone, and every run's manifest as "dirty")."""
    dirty = []
    for f in _notebook_files(paths):
        if check:
            text = f.read_text()
            if stripped_text(text) != text:
                dirty.append(f)
        elif strip_notebook(f):
            print(f"stripped {f}")
    for f in dirty:
        what = "has outputs" if has_outputs(f) else "is not stripped as the git filter writes it (cell ids, metadata)"
        print(f"{f} {what}: run `make strip` before committing")
    return 1 if dirty else 0
