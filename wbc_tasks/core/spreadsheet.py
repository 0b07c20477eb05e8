"""CSV cells a spreadsheet cannot run as formulas (CSV injection).

File, drop and model names and review notes come from outside: a file named
``=HYPERLINK(...).jpg`` would be a live formula when a lab opens an export in a spreadsheet. OWASP's
rule: a text cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a
leading apostrophe, which spreadsheets show as text and do not display. Applied to every CSV the
product writes for people (predictions, reports); JSON and Parquet keep the exact text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """``value``, with an apostrophe before a text that a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def spreadsheet_safe_frame(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose text cells are :func:`spreadsheet_safe`."""
    from pandas.api.types import is_bool_dtype, is_datetime64_any_dtype, is_numeric_dtype

    safe = table.copy()
    for column in safe.columns:
        kind = safe[column].dtype
        if not (is_numeric_dtype(kind) or is_bool_dtype(kind) or is_datetime64_any_dtype(kind)):
            safe[column] = safe[column].map(spreadsheet_safe)
    return safe
