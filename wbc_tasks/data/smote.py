"""SMOTE (imbalanced-learn) on full-resolution images, memory-bounded: the neighbours, base samples
and gaps of SMOTE on small stand-ins, the interpolation done chunk by chunk at full resolution.

Every class is brought up to the largest class's count. The notebook this replaces flattened
every image into one float64 matrix and called ``SMOTE().fit_resample`` once: at 256 px that is
1.5 MB per image before SMOTE copies it, so memory grew with the dataset (see
``docs/benchmarks.md``). Here imbalanced-learn's ``SMOTE`` still draws every synthetic sample,
one class at a time, but on a small stand-in for each image:

- each image of the class is reduced to ``settings.smote_neighbour_size`` px (float32, flat);
  an identity block is appended as extra columns (sparse: a dense one would grow with the
  square of the class), plus one dummy row of another label (imbalanced-learn needs two
  classes);
- the neighbour search sees the reduced columns only (:class:`ReducedColumnsNeighbours`), so
  SMOTE's neighbours, base samples and gaps are exactly those of SMOTE on the reduced images;
- SMOTE interpolates the identity block like any feature, so a synthetic row holds ``1 - gap``
  in its base image's column and ``gap`` in its neighbour's: that names the two parents and
  the gap exactly (checked against the reduced columns, so a change in imbalanced-learn's
  sampling fails loudly rather than silently);
- the full-resolution image is then interpolated from the memory-mapped store, in chunks:
  ``x = x_a + gap * (x_b - x_a)`` in float32, rounded and clipped to uint8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from imblearn.over_sampling import SMOTE
from PIL import Image
from scipy import sparse
from sklearn.neighbors import NearestNeighbors

from wbc_tasks.data.store import release_pages

log = logging.getLogger(__name__)


class ReducedColumnsNeighbours(NearestNeighbors):
    """``NearestNeighbors`` that measures distance on the first ``n_features`` columns only.

    Given to ``SMOTE(k_neighbors=...)`` so the identity block that tags each row (to decode
    SMOTE's output) plays no part in choosing neighbours.
    """

    def __init__(self, *, n_neighbors: int = 6, n_features: int = 1) -> None:
        super().__init__(n_neighbors=n_neighbors)
        self.n_features = n_features

    def _leading(self, X):
        X = X[:, : self.n_features]
        return X.toarray() if sparse.issparse(X) else X

    def fit(self, X, y=None):
        return super().fit(self._leading(X))

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        return super().kneighbors(None if X is None else self._leading(X), n_neighbors, return_distance)


@dataclass(frozen=True)
class SmotePairs:
    """Decoded SMOTE samples, as row indices into the class's rows and the gap."""

    a: np.ndarray
    b: np.ndarray
    gap: np.ndarray


def reduced_copy(images: np.ndarray, rows: np.ndarray, size: int, chunk_size: int) -> np.ndarray:
    """``rows`` of a store shrunk to ``size`` px (box filter), float32 0..1, one row per image."""
    side = images.shape[1]
    out_side = min(size, side)
    features = np.empty((len(rows), out_side * out_side * 3), dtype=np.float32)
    step = max(1, chunk_size)
    for start in range(0, len(rows), step):
        block = np.asarray(images[rows[start : start + step]])
        for i, image in enumerate(block):
            if out_side != side:
                image = np.asarray(Image.fromarray(image).resize((out_side, out_side), Image.Resampling.BOX))
            features[start + i] = image.reshape(-1) / np.float32(255.0)
        release_pages(images)
    return features


def smote_pairs(features: np.ndarray, n_new: int, *, k: int, seed: int) -> SmotePairs:
    """Let imbalanced-learn's SMOTE draw ``n_new`` samples of one class; decode their parents.

    ``features``: the class's reduced images, one row each. Returns for every sample the two
    parents (row indices into ``features``; ``a`` the nearer, weight ``1 - gap``) and the gap.
    """
    n, f = features.shape
    tags = sparse.identity(n, dtype=np.float32, format="csr")
    X = sparse.vstack(
        [
            sparse.hstack([sparse.csr_matrix(features), tags], format="csr"),
            sparse.csr_matrix((1, f + n), dtype=np.float32),  # the dummy "other class" row
        ],
        format="csr",
    )
    y = np.r_[np.zeros(n, dtype=np.int64), 1]
    smote = SMOTE(
        sampling_strategy={0: n + n_new},
        k_neighbors=ReducedColumnsNeighbours(n_neighbors=k + 1, n_features=f),
        random_state=seed,
    )
    X_res, y_res = smote.fit_resample(X, y)
    new = sparse.csr_matrix(X_res[n + 1 :])
    if new.shape[0] != n_new or not np.all(y_res[n + 1 :] == 0):
        raise RuntimeError(f"SMOTE returned {new.shape[0]} samples, expected {n_new} of one class")
    weights = new[:, f:].tocsr()
    weights.eliminate_zeros()
    per_row = np.diff(weights.indptr)
    if np.any((per_row < 1) | (per_row > 2)):
        raise RuntimeError("cannot decode SMOTE's samples: a sample is not between two images")
    a = np.empty(n_new, dtype=np.int64)
    b = np.empty(n_new, dtype=np.int64)
    gap = np.zeros(n_new, dtype=np.float64)
    for r in range(n_new):
        lo, hi = weights.indptr[r], weights.indptr[r + 1]
        cols, vals = weights.indices[lo:hi], weights.data[lo:hi].astype(np.float64)
        if len(cols) == 1:  # gap == 0 (or a duplicate): the sample is its base image
            a[r] = b[r] = cols[0]
            continue
        order = np.argsort(-vals, kind="stable")
        a[r], b[r] = cols[order[0]], cols[order[1]]
        gap[r] = vals[order[1]] / vals.sum()
    # The reduced columns SMOTE interpolated must agree with the decoded parents and gap.
    expected = features[a] + gap[:, None].astype(np.float32) * (features[b] - features[a])
    drawn = new[:, :f].toarray()
    if np.abs(drawn - expected).max(initial=0.0) > 1e-4:
        raise RuntimeError("cannot decode SMOTE's samples: reduced features do not match")
    return SmotePairs(a=a, b=b, gap=gap)


def write_interpolations(
    source: np.ndarray,
    target: np.ndarray,
    first_row: int,
    a_rows: np.ndarray,
    b_rows: np.ndarray,
    gap: np.ndarray,
    chunk_size: int,
) -> None:
    """``target[first_row + i] = source[a_i] + gap_i * (source[b_i] - source[a_i])``, chunk by chunk."""
    step = max(1, chunk_size)
    for start in range(0, len(a_rows), step):
        stop = min(start + step, len(a_rows))
        mixed = np.asarray(source[a_rows[start:stop]], dtype=np.float32)
        other = np.asarray(source[b_rows[start:stop]], dtype=np.float32)
        other -= mixed
        other *= gap[start:stop, None, None, None].astype(np.float32)
        mixed += other
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, 255, out=mixed)
        target[first_row + start : first_row + stop] = mixed.astype(np.uint8)
        release_pages(source, target)
