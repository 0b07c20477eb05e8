"""Does an order that spans what a new lab sees teach more per review (issue 30, item 5)? Measured
before any training: which of the lab's classes the first N reviews would cover, per order, on a
fold prepared by bench_learning_curve.py (its champion's night on the review pool; the pool's own
classes only, never the held-out fold).

    .venv/bin/python bench/bench_review_orders.py /work/lc-f1 [/work/lc-f2 ...]

Orders: ``queue`` (the review page's: suspected blasts first, then least confident) and ``random``
(seeded), as the learning curve reviews them; and candidate spanning orders, each starting from
the least confident cell:
- ``kcentre-hellinger``: farthest-first (greedy k-centre, the "core-set" selection of Sener and
  Savarese, ICLR 2018) over the champion's class probabilities, Hellinger distance;
- ``kcentre-rank``: the same over each class's log-probability ranked within the pool (spreads the
  near-uniform outputs outlier exposure gives a foreign stain);
- ``by-predicted-class``: one cell per predicted class in turn, least confident first in each;
- ``queue+random``: the queue and the random order interleaved;
- ``kcentre-features``: farthest-first over the champion's pooled top features (the layer the
  unfamiliar score measures), in the metric of its fitted shared precision (Mahalanobis), which
  the nightly run computes but does not store (added later: the probabilities did not separate
  a foreign lab's cells);
- ``kcentre-features-cosine``: the same features, cosine distance (L2-normalised rows).

The rule, named before the first table: the order with the highest smallest-class count among the
first 50 reviews, then among the first 100, is the one worth an adaptation run.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POOL = "review-pool"
MEASURED = ("eosinophils", "lymphocytes", "monocytes", "neutrophils")


def kcentre(points: np.ndarray, first: int) -> list[int]:
    """``first``, then each time the row farthest from every row chosen so far."""
    chosen, nearest = [first], np.linalg.norm(points - points[first], axis=1)
    while len(chosen) < len(points):
        nearest[chosen] = -1.0
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[pick], axis=1))
    return chosen


def interleaved(*orders: list[str]) -> list[str]:
    """Each order's next item not yet taken, the orders in turn, until all are used up: every
    item once, in the first place any order reaches it."""
    out: list[str] = []
    taken: set[str] = set()
    sources = [iter(o) for o in orders]
    while sources:
        for source in list(sources):
            item = next((i for i in source if i not in taken), None)
            if item is None:
                sources.remove(source)
            else:
                out.append(item)
                taken.add(item)
    return out


def champion_features(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The champion's (version 1) pooled top features of the pool's images: as they are, and
    whitened by its fitted shared precision (Euclidean distance is then its Mahalanobis one)."""
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.data.images import load_image
    from wbc_tasks.registry.versions import load_keras_model, resolve_model
    from wbc_tasks.serving.model import load_policy
    from wbc_tasks.training.outputs import outputs_model, predict_all

    settings = get_settings()
    ref = resolve_model(settings, "1")
    _, stats = load_policy(settings, ref)
    images = np.stack(
        [load_image(settings.classify_dir / p, ref.image_size, max_pixels=settings.max_image_pixels) for p in paths]
    )
    top = predict_all(outputs_model(load_keras_model(settings, ref)), images, 32)["top"]
    return top, top @ np.linalg.cholesky(stats.precision_top)


def feature_order(home: Path) -> list[str]:
    """The pool in ``kcentre-features`` order."""
    return candidate_orders(home)[0]["kcentre-features"]


def candidate_orders(home: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    os.environ["WBC_HOME"] = str(home / "wbc")
    from wbc_tasks.core.settings import get_settings
    from wbc_tasks.serving.review_queue import drop_cells

    prepared = json.loads((home / "prepared.json").read_text())
    cells = [c for c in drop_cells(get_settings(), POOL, model_version="1") if c["prediction"]]
    classes = sorted(cells[0]["prediction"]["probabilities"])
    probs = np.array([[c["prediction"]["probabilities"][k] for k in classes] for c in cells])
    paths = [c["path"] for c in cells]
    confidence = np.array([c["prediction"]["confidence"] for c in cells])
    least = int(np.lexsort((paths, confidence))[0])
    logs = np.log(np.clip(probs, 1e-12, 1.0))
    ranks = logs.argsort(0).argsort(0) / len(logs)
    groups: dict[str, list[str]] = {}
    for i in np.lexsort((paths, confidence)):
        groups.setdefault(cells[i]["prediction"]["predicted_class"], []).append(paths[i])
    orders = {
        "queue": prepared["orders"]["queue"],
        "random": prepared["orders"]["random"],
        "kcentre-hellinger": [paths[i] for i in kcentre(np.sqrt(probs), least)],
        "kcentre-rank": [paths[i] for i in kcentre(ranks, least)],
        "by-predicted-class": interleaved(*sorted(groups.values(), key=len, reverse=True)),
        "queue+random": interleaved(prepared["orders"]["queue"], prepared["orders"]["random"]),
    }
    top, whitened = champion_features(paths)
    unit = top / np.maximum(np.linalg.norm(top, axis=1, keepdims=True), 1e-12)
    orders["kcentre-features"] = [paths[i] for i in kcentre(whitened, least)]
    orders["kcentre-features-cosine"] = [paths[i] for i in kcentre(unit, least)]
    return orders, prepared["truth"]


def main(homes: list[Path]) -> None:
    for home in homes:
        orders, truth = candidate_orders(home)
        pool = Counter(truth[p] for p in orders["queue"])
        print(f"\n{home}: pool {dict(pool)}")
        print("| order | first 25: eos / lym / mono / neu | first 50 | first 100 | smallest class at 50 / 100 |")
        print("|---|---|---|---|---|")
        for name, order in orders.items():
            cells = []
            for n in (25, 50, 100):
                counts = Counter(truth[p] for p in order[:n])
                cells.append(" / ".join(str(counts[k]) for k in MEASURED))
            smallest = [min(Counter(truth[p] for p in order[:n])[k] for k in MEASURED) for n in (50, 100)]
            print(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {smallest[0]} / {smallest[1]} |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
