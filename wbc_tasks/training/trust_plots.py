"""The trust policy's validation figures, written beside it: the reliability diagram before and
after the temperature, and the risk-coverage curve with the review threshold marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wbc_tasks.data.figures import new_figure, save_figure
from wbc_tasks.training.calibration import plot_reliability, softmax
from wbc_tasks.training.trust_policy import TrustPolicy


def _plot_risk_coverage(curve: dict[str, list[float]], threshold: float, path: Path) -> None:
    fig = new_figure(5.5, 4.0, dpi=110)
    ax = fig.subplots()
    ax.plot(curve["coverage"], curve["accuracy"])
    covered = [c for c, t in zip(curve["coverage"], curve["threshold"]) if t >= threshold]
    if covered:
        ax.axvline(max(covered), color="grey", linestyle="--", label=f"review threshold {threshold:.2f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("coverage (share not flagged)")
    ax.set_ylabel("accuracy of the unflagged")
    ax.set_ylim(0, 1.01)
    ax.set_title("risk-coverage")
    save_figure(fig, path)


def write_trust_plots(
    val_labels: np.ndarray,
    val_logits: np.ndarray,
    policy: TrustPolicy,
    risk_curve: dict[str, list[float]],
    trust_dir: Path,
) -> None:
    """``reliability_validation.png`` (before/after the temperature) and
    ``risk_coverage_validation.png`` in ``trust_dir``."""
    plot_reliability(
        val_labels,
        {"before": softmax(val_logits), "after": softmax(val_logits, policy.temperature)},
        trust_dir / "reliability_validation.png",
        title=f"validation reliability (T = {policy.temperature:.2f})",
    )
    _plot_risk_coverage(risk_curve, policy.review_threshold, trust_dir / "risk_coverage_validation.png")
