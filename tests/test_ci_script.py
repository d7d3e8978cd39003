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
