"""Helpers shared by the report tools: input errors, file reading, table output."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd


class ReportError(ValueError):
    """An input file is missing, unreadable or not in the expected format."""


def read_text(path: str | Path, expected: str) -> str:
    """The UTF-8 text of ``path``; ReportError naming the file and ``expected`` otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text (expected {expected})") from e
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror or e}); expected {expected}") from e


def _cell(value: object, floatfmt: str) -> str:
    """One table cell: '' for missing values, ``floatfmt`` for floats, str() otherwise."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else format(value, floatfmt)
    return str(value)


def to_markdown(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """GitHub-flavoured markdown table of ``df`` (index dropped); numbers right-aligned."""
    header = [str(c) for c in df.columns]
    rows = [
        [_cell(v, floatfmt).replace("|", "\\|") for v in row]
        for row in df.astype(object).itertuples(index=False)
    ]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    widths = [max([len(h), 3, *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])


def report_error(error: ReportError) -> int:
    """Print ``error: ...`` to stderr; the exit status of a tool that got bad input (1)."""
    print(f"error: {error}", file=sys.stderr)
    return 1
