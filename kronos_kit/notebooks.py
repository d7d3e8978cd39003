"""Notebook hygiene: committed notebooks carry no outputs and no execution counts."""

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


def strip_notebook(path: Path) -> bool:
    """Remove outputs, execution counts and run metadata in place; return True if the file changed."""
    text = path.read_text()
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in CELL_KEYS:
            cell.get("metadata", {}).pop(key, None)
    for key in NOTEBOOK_KEYS:
        nb.get("metadata", {}).pop(key, None)
    for key in LANGUAGE_INFO_KEYS:
        nb.get("metadata", {}).get("language_info", {}).pop(key, None)
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
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
    """Strip (or with `check`, only report) every notebook under `paths`; exit code 1 if dirty in check mode."""
    dirty = []
    for f in _notebook_files(paths):
        if check:
            if has_outputs(f):
                dirty.append(f)
        elif strip_notebook(f):
            print(f"stripped {f}")
    for f in dirty:
        print(f"{f} has outputs: run `make strip` before committing")
    return 1 if dirty else 0
