"""Evaluation: predictions on labelled test images + their labels and masks -> metrics.

Image AUROC / F1-max need good and anomalous images, pixel AUROC / AUPRO masks with both
kinds of pixels (metrics.py computes them); a metric that cannot be computed is named in
result["skipped_metrics"] with the reason, and logged. NaN or infinite maps stop the
evaluation (FloatingPointError): metrics over them would mean nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from adtr.data.folder import has_masks
from adtr.data.images import read_mask
from adtr.data.samples import Sample
from adtr.data.transforms import resize_map
from adtr.engine import Predictions
from adtr.metrics import image_metrics, pixel_metrics
from adtr.thresholds import Thresholds

log = logging.getLogger(__name__)

METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "false_alarm_rate_at_threshold": "good flagged at threshold",
    "detection_rate_at_threshold": "anomalous flagged at threshold",
}


def evaluate(
    samples: Sequence[Sample], preds: Predictions, thresholds: Thresholds, wall_seconds: float | None = None
) -> dict[str, Any]:
    """Metrics of predictions (engine.predict_samples, maps (h, w) at the model size) on the
    labelled samples they were made from, and the decisions of the run's thresholds.

    Masks are read at each image's original size and maps upsampled to it one at a time.
    wall_seconds: the time the predictions took with decoding (images_per_second_with_decoding).
    Raises FloatingPointError naming the first image with a NaN or infinite score or map;
    DataError for an unreadable mask.
    """
    labels = np.array([s.label for s in samples])
    n_bad = int(labels.sum())
    result: dict[str, Any] = {"n_images": len(samples), "n_anomalous": n_bad, "skipped_metrics": {}}
    if 0 < n_bad < len(labels):
        result.update(image_metrics(preds.scores, labels))
    else:
        n_good = len(labels) - n_bad
        why = f"it needs both good and anomalous images; the test data has {n_good} good and {n_bad} anomalous"
        _skip_metrics(result, ["image_auroc", "image_f1_max"], why)
    check_finite(samples, preds.scores, preds.maps)
    if has_masks(samples):
        masks = [
            read_mask(s.mask_path, size) if s.mask_path else np.zeros(size, dtype=bool)
            for s, size in zip(samples, preds.original_sizes, strict=True)
        ]
        _note_empty_masks(result, samples, masks)
        if not any(m.any() for m in masks) or all(m.all() for m in masks):
            _skip_pixel_metrics(result, "the masks hold no anomalous pixels, or no normal ones")
        else:
            # Maps are upsampled to each image's original size one at a time, as the metric reads them.
            result.update(pixel_metrics(ResizedMaps(preds.maps, preds.original_sizes), masks))
    elif any(s.mask_path is not None for s in samples):
        _skip_pixel_metrics(result, "only some anomalous images have masks")
    elif n_bad == 0:
        _skip_pixel_metrics(result, "there are no anomalous images, so no defect pixels to find")
    else:
        _skip_pixel_metrics(result, "no masks found (expected ground_truth/<defect>/<name>_mask.png)")
    flagged = np.array([thresholds.is_anomalous(v) for v in preds.scores])
    result["threshold"] = thresholds.image
    if (labels == 0).any():
        result["false_alarm_rate_at_threshold"] = float(flagged[labels == 0].mean())
    else:
        _skip_metrics(result, ["false_alarm_rate_at_threshold"], "there are no good images")
    if (labels == 1).any():
        result["detection_rate_at_threshold"] = float(flagged[labels == 1].mean())
    else:
        _skip_metrics(result, ["detection_rate_at_threshold"], "there are no anomalous images")
    result["images_per_second"] = len(samples) / max(preds.model_seconds, 1e-9)
    if wall_seconds is not None:
        result["images_per_second_with_decoding"] = len(samples) / max(wall_seconds, 1e-9)
    return result


def score_rows(
    samples: Sequence[Sample], scores: np.ndarray, input_warnings: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """One {path, label, defect, score} per sample, for the metrics JSON; "input_warnings" added
    for the samples listed in input_warnings (path -> departures from the training images)."""
    rows = []
    for s, v in zip(samples, scores, strict=True):
        row = {"path": str(s.path), "label": s.label, "defect": s.defect, "score": float(v)}
        if input_warnings and str(s.path) in input_warnings:
            row["input_warnings"] = input_warnings[str(s.path)]
        rows.append(row)
    return rows


def check_finite(samples: Sequence[Sample], scores: np.ndarray, maps: Sequence[np.ndarray]) -> None:
    """Raise FloatingPointError naming the first image whose score or map is NaN or infinite.

    Metrics over such values mean nothing; the model, not the data, is at fault (a bug or a
    diverged fit), so this is not a user error.
    """
    for s, score, m in zip(samples, scores, maps, strict=True):
        if not np.isfinite(score) or not np.isfinite(m).all():
            raise FloatingPointError(
                f"{s.path}: the model's anomaly score or map is NaN or infinite; no metric can be computed"
            )


def _skip_metrics(result: dict[str, Any], metrics: Sequence[str], reason: str) -> None:
    """Record why each metric is missing in result["skipped_metrics"], and log one line per metric."""
    for key in metrics:
        result["skipped_metrics"][key] = reason
        log.warning("%s not computed: %s", METRIC_NAMES[key], reason)


def _skip_pixel_metrics(result: dict[str, Any], reason: str) -> None:
    """Say in the result and the log why pixel AUROC and AUPRO are missing."""
    result["pixel_metrics_skipped"] = reason
    _skip_metrics(result, ["pixel_auroc", "aupro"], reason)


def _note_empty_masks(result: dict[str, Any], samples: Sequence[Sample], masks: Sequence[np.ndarray]) -> None:
    """Warn about each anomalous image whose mask is all black: its pixels count as normal."""
    empty = [str(s.path) for s, m in zip(samples, masks, strict=True) if s.label == 1 and not m.any()]
    if not empty:
        return
    for path in empty:
        log.warning("%s: anomalous image with an empty (all black) mask: its pixels count as normal", path)
    result["empty_masks"] = empty
    result["pixel_metrics_note"] = (
        f"{len(empty)} of {int(sum(s.label for s in samples))} anomalous images have empty masks; "
        "their pixels count as normal in pixel AUROC and AUPRO"
    )


class ResizedMaps(Sequence):
    """maps[i] upsampled to sizes[i] on access: full-resolution maps never all in memory."""

    def __init__(self, maps: list[np.ndarray], sizes: list[tuple[int, int]]):
        self.maps, self.sizes = maps, sizes

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> np.ndarray:
        return resize_map(self.maps[i], self.sizes[i])
