"""Figures: the one way we make and save one, and the data stages' plots (class counts per
stage, sample grids of generated images).

Drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), never through
``pyplot``: no global backend state, no display needed, safe in worker processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wbc_tasks.core.vocabulary import CLASS_NAMES


def new_figure(width: float, height: float, dpi: int = 100):  # -> matplotlib.figure.Figure
    """A figure on its own Agg canvas (inches; constrained layout), for every plot we draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.savefig(tmp)
    tmp.replace(path)
    return path


def save_class_counts_plot(counts_by_stage: dict[str, dict[str, int]], path: Path) -> Path:
    """Grouped bars: images per class (x) for each stage (one bar colour per stage).

    Stages are drawn in the dict's order; classes with no image in any stage are left out.
    """
    stages = list(counts_by_stage)
    present = [c for c in CLASS_NAMES if any(counts_by_stage[s].get(c, 0) for s in stages)]
    extra = sorted({c for s in stages for c in counts_by_stage[s]} - set(CLASS_NAMES))
    classes = present + extra
    figure = new_figure(max(6.0, 0.9 * len(classes) + 2.0), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(stages))
    x = np.arange(len(classes))
    for i, stage in enumerate(stages):
        values = [counts_by_stage[stage].get(c, 0) for c in classes]
        bars = axes.bar(x + (i - (len(stages) - 1) / 2) * width, values, width, label=stage)
        axes.bar_label(bars, fontsize=7, padding=1)
    axes.set_xticks(x, classes, rotation=30, ha="right")
    axes.set_ylabel("images")
    axes.set_title("Training images per class, by stage")
    top = max((v for s in stages for v in counts_by_stage[s].values()), default=1)
    axes.set_ylim(0, top * 1.2 + 1)
    axes.legend(ncol=len(stages), loc="upper center", frameon=False)
    return save_figure(figure, path)


def save_sample_grid(store_path: Path, path: Path, *, origin: str, per_class: int, seed: int) -> Path:
    """A grid of up to ``per_class`` random images of one ``origin`` per class (a row each).

    ``origin`` is a value of the store's ``records.csv`` ``origin`` column ("augmented",
    "synthetic", "original"). With none of that origin the figure says so, so the file always
    exists and nobody mistakes a missing figure for a failed step.
    """
    from wbc_tasks.data.store import open_store

    store = open_store(store_path)
    origins = store.records["origin"].to_numpy() if "origin" in store.records else np.array([])
    rng = np.random.default_rng(seed)
    rows_by_class: list[tuple[str, np.ndarray]] = []
    for cls, name in enumerate(CLASS_NAMES):
        rows = np.flatnonzero((store.labels == cls) & (origins == origin)) if len(origins) else np.array([], int)
        if len(rows):
            chosen = np.sort(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
            rows_by_class.append((name, chosen))
    if not rows_by_class:
        figure = new_figure(6.0, 1.5)
        figure.text(0.5, 0.5, f"no {origin} images in {store_path.name}", ha="center", va="center")
        return save_figure(figure, path)
    # One mosaic and one imshow: a subplot per tile takes seconds at a few dozen tiles.
    columns = max(len(rows) for _, rows in rows_by_class)
    side = store.image_size
    cell = side + 2
    top = max(2, side // 8)  # room above each tile for its caption
    row_height = top + side + 2
    mosaic = np.full((len(rows_by_class) * row_height, columns * cell, 3), 255, dtype=np.uint8)
    gap = store.records["gap"].astype(str).to_numpy() if "gap" in store.records else None
    figure = new_figure(1.2 * columns + 1.6, 1.2 * len(rows_by_class) + 0.6)
    axes = figure.add_subplot()
    for r, (_, rows) in enumerate(rows_by_class):
        for c, row in enumerate(rows):
            y = r * row_height + top
            mosaic[y : y + side, c * cell : c * cell + side] = store.images[row]
            if gap is not None and gap[row] not in ("", "nan"):
                axes.text(c * cell, y - 1, f"gap {float(gap[row]):.2f}", fontsize=6, va="bottom")
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_yticks([r * row_height + top + side / 2 for r in range(len(rows_by_class))], [n for n, _ in rows_by_class])
    axes.set_xticks([])
    axes.set_title(f"{origin} samples ({store_path.name})", fontsize=9)
    return save_figure(figure, path)
