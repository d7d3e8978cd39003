"""JSON-lines logs (`metrics.jsonl`): every record, and what a process cut off mid-line left behind.

A record is appended as one line; a power loss, a full disk or a kill can stop that write mid-line. Such a
last line is left out with a warning, and cut off the file before the next record is appended (`mend`), so
it never joins the next line; a broken line anywhere else is an error naming it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["log_records"]

logger = logging.getLogger(__name__)


def log_records(path: Path, *, mend: bool = False) -> list[dict[str, Any]]:
    """Every record of a JSON-lines log. A last line cut short (power loss, a full disk, a kill mid-write) is left
    out with a warning, and with `mend` cut off the file; any other line that is not JSON is an error naming it."""
    text = path.read_text() if path.is_file() else ""
    *lines, tail = text.split("\n")
    records = []
    for number, line in enumerate([*lines, tail], 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            if number <= len(lines):
                raise ValueError(f"{path}: line {number} is not a JSON record ({err}); delete that line") from None
            logger.warning("%s: its last line is cut short (%d characters: the process writing it stopped "
                           "mid-line); left out", path, len(tail))
            if mend:
                os.truncate(path, len(text.encode()) - len(tail.encode()))
            return records
    if mend and tail.strip():  # complete, but its newline is missing
        with path.open("a") as f:
            f.write("\n")
    return records
