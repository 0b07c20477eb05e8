"""Drop names in MLflow keys (issue 28's hostile names): a 240-character drop name once failed the
nightly summary (MLflow caps metric keys at 250 characters), and two drops whose names differ only
in characters a key cannot hold would have shared their drift metrics."""

from __future__ import annotations

from wbc_tasks.serving.summary import MAX_DROP_LABEL, drop_label


def test_ordinary_drop_names_keep_their_labels():
    assert drop_label("2026-11-24") == "2026-11-24"
    assert drop_label("") == "loose"


def test_long_or_unsafe_names_get_short_distinct_labels():
    long_name = "w" * 226 + "<svg onload=1>"
    assert len("drift." + drop_label(long_name) + ".class_mix_divergence") <= 250
    assert len(drop_label(long_name)) <= MAX_DROP_LABEL + 9
    pairs = [("a#b", "a?b"), ("x" * 300, "x" * 301), ("\u202eexe", "_exe")]
    for one, other in pairs:
        assert drop_label(one) != drop_label(other)
    assert drop_label("a#b") == drop_label("a#b")  # stable from night to night
