"""How the report writes numbers and p-values (shared by the report, the verdicts and the decisions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def fmt(x: Any) -> str:
    """A number as the report prints it: 4 significant digits, integers whole, missing as "n/a" (text as it is)."""
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.4g}"


def fmt_p(p: float) -> str:
    """A p-value as the report prints it ("p < 0.001", "p = 0.02", "p n/a")."""
    if not np.isfinite(p):
        return "p n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.2f}" if p >= 0.1 else f"p = {p:.3g}" if p >= 0.01 else f"p = {p:.1g}"


def fmt_pct(x: float) -> str:
    """A share as a percentage with one decimal ("6.3%"), missing as "n/a"."""
    return f"{x:.1%}" if x is not None and np.isfinite(x) else "n/a"


def markdown_table(table: pd.DataFrame) -> str:
    """A frame as a Markdown table: the index first (its name as the header), every cell through :func:`fmt`."""
    cols = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name)] + [fmt(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


__all__ = ["fmt", "fmt_p", "fmt_pct", "markdown_table"]
