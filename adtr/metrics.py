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


def _descending_curve(scores: np.ndarray, pos_weight: np.ndarray, neg_weight: np.ndarray):
    """Cumulative weights above each distinct threshold, from the highest score down.

    Returns (neg, pos, thresholds), both curves starting at 0 (threshold above every score).
    """
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


def _sortable_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 whose unsigned order is the float order (sign-magnitude flipped)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def pixel_metrics(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3, chunk: int = 1 << 22
) -> dict[str, float]:
    """Pixel AUROC and AUPRO of anomaly maps against boolean masks of the same shapes.

    Exact (every distinct score is a threshold) and lean enough for full-resolution MVTec:
    each pixel costs one uint64 sort key (float32 score bits above the pixel index), a
    label byte and a region id, and the curves are integrated while the sorted keys are
    walked in chunks, never stored. `maps` may be a lazy sequence: each item is read once.
    """
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    sizes = [int(np.asarray(m).size) for m in masks]
    total = sum(sizes)
    keys = np.empty(total, dtype=np.uint64)
    labels = np.empty(total, dtype=bool)
    regions = np.empty(total, dtype=np.int32)
    region_sizes = [0]
    pos = 0
    for i, (mask, n) in enumerate(zip(masks, sizes, strict=True)):
        a = np.asarray(maps[i], dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if a.shape != mask.shape:
            raise ValueError(f"map {i} has shape {a.shape} but its mask {mask.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"map {i} has NaN or infinite values")
        keys[pos : pos + n] = (_sortable_bits(a.ravel()).astype(np.uint64) << np.uint64(32)) | np.arange(
            pos, pos + n, dtype=np.uint64
        )
        labels[pos : pos + n] = mask.ravel()
        r = label_regions(mask, connectivity=2).ravel()
        offset = len(region_sizes) - 1
        regions[pos : pos + n] = np.where(r > 0, r + offset, 0)
        region_sizes += np.bincount(r)[1:].tolist()
        pos += n
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == total:
        raise ValueError("pixel metrics need both normal and anomalous pixels")
    n_neg, n_regions = total - n_pos, len(region_sizes) - 1
    region_weight = np.zeros(len(region_sizes))
    region_weight[1:] = 1.0 / (np.asarray(region_sizes[1:], dtype=np.float64) * n_regions)

    keys.sort()
    low32 = np.uint64(0xFFFFFFFF)
    fp = tp = pro = 0.0  # cumulative counts / weights above the current threshold
    auroc_area = aupro_area = 0.0
    end = total
    while end > 0:
        start = max(0, end - chunk)
        if start > 0:  # move back to the first key of its score: tied scores stay in one chunk
            group_key = (keys[start] >> np.uint64(32)) << np.uint64(32)
            start = int(np.searchsorted(keys, group_key, side="left"))
        block = keys[start:end][::-1]  # descending
        idx = (block & low32).astype(np.int64)
        score = block >> np.uint64(32)
        lab = labels[idx]
        cum_tp = tp + np.cumsum(lab, dtype=np.float64)
        cum_fp = fp + np.cumsum(~lab, dtype=np.float64)
        cum_pro = pro + np.cumsum(region_weight[regions[idx]])
        last = np.r_[np.flatnonzero(score[1:] != score[:-1]), len(score) - 1]
        x = np.r_[fp, cum_fp[last]] / n_neg
        y_roc = np.r_[tp, cum_tp[last]] / n_pos
        y_pro = np.r_[pro, cum_pro[last]]
        auroc_area += float(np.trapezoid(y_roc, x))
        if x[0] < fpr_limit:
            aupro_area += _truncated_area(x, y_pro, fpr_limit)
        fp, tp, pro = cum_fp[-1], cum_tp[-1], cum_pro[-1]
        end = start
    return {"pixel_auroc": auroc_area, "aupro": aupro_area / fpr_limit}


def _truncated_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under y(x) for x in [x[0], limit], x non-decreasing, interpolating at the limit."""
    if x[-1] <= limit:
        return float(np.trapezoid(y, x))
    i = int(np.searchsorted(x, limit, side="right"))  # x[i-1] <= limit < x[i]
    y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
    return float(np.trapezoid(np.r_[y[:i], y_lim], np.r_[x[:i], limit]))


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    f1, threshold = f1_max(scores, labels)
    return {"image_auroc": auroc(scores, labels), "image_f1_max": f1, "image_f1_threshold": threshold}
