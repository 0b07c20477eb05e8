"""CSV injection (issue 28): a text cell a spreadsheet would run as a formula gets OWASP's leading
apostrophe; numbers and every other text stay as they are."""

from __future__ import annotations

import pandas as pd
import pytest

from wbc_tasks.core.spreadsheet import spreadsheet_safe, spreadsheet_safe_frame


@pytest.mark.parametrize(
    "text",
    ['=HYPERLINK("http://evil.example","x")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tTAB", "\rCR"],
)
def test_formula_starts_get_an_apostrophe(text):
    assert spreadsheet_safe(text) == "'" + text


@pytest.mark.parametrize("value", ["2026-11-24/a.jpg", "neutrophils", "", "a=b", "x-1", -0.5, 3, None, ["=x"]])
def test_other_values_are_unchanged(value):
    assert spreadsheet_safe(value) == value


def test_a_frame_keeps_numbers_and_changes_only_formula_text():
    table = pd.DataFrame({"path": ["=1+1.jpg", "ok.jpg"], "confidence": [-1.0, 0.5], "n": [1, 2]})
    safe = spreadsheet_safe_frame(table)
    assert safe["path"].tolist() == ["'=1+1.jpg", "ok.jpg"]
    assert safe["confidence"].tolist() == [-1.0, 0.5] and safe["n"].tolist() == [1, 2]
    assert table["path"].tolist() == ["=1+1.jpg", "ok.jpg"]  # the caller's table is untouched
