"""Markdown pieces shared by every report (perf, compare, tune, profile)."""

from __future__ import annotations

import math


def num(value, fmt: str = "{:.2f}", none: str = "–") -> str:
    """A number formatted for a table cell; `none` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def table(header: list[str], rows: list[list], right: int = 0) -> list[str]:
    """A markdown table as lines; `|` inside cells is escaped; the last `right` columns right-aligned."""
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    rule = ["---"] * (len(header) - right) + ["---:"] * right
    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(rule) + "|",
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]
