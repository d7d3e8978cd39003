"""The README's Python snippet runs as written against a run folder (built here from the kit's base pair)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- tests/test_readme.py runs this block against a run folder it builds -->"
RUN_IN_README = "runs/default-nasdaq-20260101-120000"


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "the README's tested snippet lost its marker"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.DOTALL)
    return block.group(1)


def test_readme_snippet_runs_against_a_run_folder(tiny_run):
    code = readme_snippet()
    assert code.count(RUN_IN_README) == 1, "the snippet names one run folder, which the test replaces"
    namespace: dict = {}
    exec(compile(code.replace(RUN_IN_README, str(tiny_run)), "README.md", "exec"), namespace)
    assert namespace["paths"].paths.shape == (1, 32, 24, 6)  # as the snippet's comment says
    mean_df = namespace["mean_df"]
    assert mean_df.shape == (24, 6) and mean_df.index[0] > namespace["bars"]["timestamps"].iloc[-1]
