"""Anomaly detection metrics: plain functions, arrays in, floats out.

Higher scores mean more anomalous. Ties are handled exactly: every curve has one point per
distinct score, so an AUROC equals the Mann-Whitney statistic with ties counted as one half.
AUROCs below 0.5 are reported as they are, never flipped.

- image AUROC and image F1-max over image scores and 0/1 labels;
- pixel AUROC over all pixels of all test images, at the masks' own resolution;
- AUPRO (Bergmann et al., IJCV 2021): mean per-region overlap of each connected ground
  truth region (8-connectivity) against the false positive rate on good pixels, integrated
  up to FPR 0.3 and divided by 0.3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import label as label_regions


def _descending_curve(scores: np.ndarray, pos_weight: np.ndarray, neg_weight: np.ndarray, order=None):
    """Cumulative weights above each distinct threshold, from the highest score down.

    Returns (neg, pos, thresholds), both curves starting at 0 (threshold above every score).
    """
    if order is None:
        order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    last_of_group = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    pos = np.cumsum(pos_weight[order], dtype=np.float64)[last_of_group]
    neg = np.cumsum(neg_weight[order], dtype=np.float64)[last_of_group]
    return np.r_[0.0, neg], np.r_[0.0, pos], s[last_of_group]


def _check_binary(labels: np.ndarray, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(f"{what} needs both normal and anomalous samples")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of scores (N,) against 0/1 labels (N,)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    _check_binary(labels, "AUROC")
    fp, tp, _ = _descending_curve(scores, labels / labels.sum(), ~labels / (~labels).sum())
    return float(np.trapezoid(tp, fp))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds (score >= t is anomalous) and the threshold reaching it."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    _check_binary(labels, "F1")
    fp, tp, thresholds = _descending_curve(scores, labels.astype(float), (~labels).astype(float))
    fp, tp = fp[1:], tp[1:]
    f1 = 2 * tp / (tp + fp + labels.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def _region_weights(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel weight 1 / (|region| * n_regions) on anomalous pixels, 0 elsewhere."""
    weights, n_regions = [], 0
    for m in masks:
        regions = label_regions(np.asarray(m, dtype=bool), connectivity=2)
        sizes = np.bincount(regions.ravel())
        w = np.zeros(regions.shape, dtype=np.float64)
        inside = regions > 0
        w[inside] = 1.0 / sizes[regions[inside]]
        n_regions += len(sizes) - 1
        weights.append(w.ravel())
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region")
    return np.concatenate(weights) / n_regions


def _truncated_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under y(x) for x in [0, limit], x non-decreasing, interpolating at the limit."""
    if x[-1] <= limit:
        return float(np.trapezoid(y, x))
    i = int(np.searchsorted(x, limit, side="right"))  # x[i-1] <= limit < x[i]
    y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
    return float(np.trapezoid(np.r_[y[:i], y_lim], np.r_[x[:i], limit]))


def pixel_metrics(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3
) -> dict[str, float]:
    """Pixel AUROC and AUPRO of anomaly maps against boolean masks of the same shapes.

    Maps and masks may differ in size between images, never between a map and its mask.
    """
    for i, (a, m) in enumerate(zip(maps, masks, strict=True)):
        if a.shape != m.shape:
            raise ValueError(f"map {i} has shape {a.shape} but its mask {m.shape}")
    scores = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in maps])
    labels = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    _check_binary(labels, "pixel metrics")
    order = np.argsort(scores, kind="stable")[::-1]
    neg = ~labels / float((~labels).sum())
    fpr, tpr, _ = _descending_curve(scores, labels / float(labels.sum()), neg, order)
    pixel_auroc = float(np.trapezoid(tpr, fpr))
    fpr, pro, _ = _descending_curve(scores, _region_weights(masks), neg, order)
    aupro = _truncated_area(fpr, pro, fpr_limit) / fpr_limit
    return {"pixel_auroc": pixel_auroc, "aupro": aupro}


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    f1, threshold = f1_max(scores, labels)
    return {"image_auroc": auroc(scores, labels), "image_f1_max": f1, "image_f1_threshold": threshold}
