"""Calibration at fit time: thresholds and score statistics from held-out images' features.

Scores come from the fitted model on standardised features, so nothing is decoded again;
the rules that turn scores into thresholds are in thresholds.py. Test images are never used.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from adtr.model import ADTR
from adtr.thresholds import Thresholds, f1_optimal, from_good_scores

log = logging.getLogger(__name__)


@torch.no_grad()
def feature_scores(
    model: ADTR, features: torch.Tensor, device: torch.device, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) and anomaly-map maxima (N,), float64, of standardised features (N, C, h, w)."""
    scores, maxima = [], []
    for i in range(0, len(features), batch_size):
        out = model.score(features[i : i + batch_size].to(device))
        scores.append(out.anomaly_score.cpu())
        maxima.append(out.anomaly_map.flatten(1).amax(1).cpu())
    if not scores:
        return np.array([]), np.array([])
    return torch.cat(scores).double().numpy(), torch.cat(maxima).double().numpy()


def calibrate(
    model: ADTR,
    val: torch.Tensor,
    train: torch.Tensor,
    real_anomalies: torch.Tensor | None,
    false_alarm_rate: float,
    device: torch.device,
) -> Thresholds:
    """Thresholds from the held-out good images' features val (N, C, h, w).

    With labelled real anomalies' features (M, C, h, w): the F1-optimal image threshold;
    else the (1 - false_alarm_rate) quantile of the good scores (thresholds.py). Without
    held-out images (fewer than 5 good ones) the training images stand in, with a warning.
    """
    scores, maxima = feature_scores(model, val if len(val) else train, device)
    if not len(val):
        log.warning("fewer than 5 good images: thresholds come from the training images and run low")
    if real_anomalies is not None and len(real_anomalies):
        anomalous, _ = feature_scores(model, real_anomalies, device)
        return f1_optimal(scores, anomalous, maxima, false_alarm_rate)
    return from_good_scores(scores, maxima, false_alarm_rate)


def score_stats(scores: np.ndarray) -> dict[str, Any]:
    """Statistics of the held-out good images' scores (N,): n, mean, std, min, max, q50..q99.

    They set the heatmaps' colour range (render.display_range); {"n": 0} without scores.
    """
    if scores.size == 0:
        return {"n": 0}
    q = np.quantile(scores, [0.5, 0.9, 0.95, 0.99])
    return {
        "n": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
        "q50": float(q[0]),
        "q90": float(q[1]),
        "q95": float(q[2]),
        "q99": float(q[3]),
    }
