"""Calibration at fit time: thresholds and score statistics from good images the model did not
train on, and the warning when there are too few of them for the requested false-alarm rate.

Scores come from fitted models on standardised features, so nothing is decoded again; the
rules that turn scores into thresholds are in thresholds.py. Test images are never used.
Where the scores come from (fit.py decides, `TrainConfig.calibration`):

- "held_out": the held-out good images (TrainConfig.val_fraction of them, seeded);
- "crossfit": when fewer than MIN_HELD_OUT would be held out, every good image gets a score from
  a model fitted without it (K-fold cross-fitting, K = TrainConfig.calibration_folds; for K = n,
  leave-one-out), so that a set of 20 images calibrates on 20 scores, not 2. The fold models are
  trained on (K - 1) / K of the images, so they score unseen good images a little higher than
  the final model does: the threshold errs on the side of fewer false alarms;
- "training": a single good image cannot be cross-fitted; its own score stands in, which unseen
  good images usually exceed, so no false-alarm rate can be stated (and the fit says so).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from adtr.model import ADTR
from adtr.thresholds import SOURCES, Thresholds, f1_optimal, from_good_scores

log = logging.getLogger(__name__)

MIN_HELD_OUT = 5  # fewer held-out good images than this: cross-fitted scores calibrate ("auto")


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
    good_scores: np.ndarray,
    good_maxima: np.ndarray,
    anomalous_scores: np.ndarray | None,
    false_alarm_rate: float,
    source: str = "held_out",
) -> Thresholds:
    """Thresholds from calibration good images' scores and map maxima (N,), from `source`.

    With labelled real anomalies' scores (M,): the F1-optimal image threshold; else the
    conformal rank of the good scores (thresholds.py). Logs a warning, with the count, when N
    is too small for false_alarm_rate (fewer than 1 / rate - 1 scores) or when the scores are
    the training images' own.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown calibration source {source!r}; expected one of {sorted(SOURCES)}")
    if anomalous_scores is not None and len(anomalous_scores):
        thresholds = f1_optimal(good_scores, anomalous_scores, good_maxima, false_alarm_rate, source)
    else:
        thresholds = from_good_scores(good_scores, good_maxima, false_alarm_rate, source)
    n = thresholds.n_good
    if source == "training":
        log.warning(
            "%d good image%s and none held out: the threshold rests on the training images' own scores, which "
            "unseen good images usually exceed, so no false-alarm rate can be stated and many good parts may be "
            "flagged (a fit with 2 or more good images cross-fits instead; an update of a run with no held-out "
            "images cannot: give it new good images to hold out); a false-alarm rate of %g needs about %d",
            n, "" if n == 1 else "s", false_alarm_rate, needed_images(false_alarm_rate),
        )  # fmt: skip
    elif thresholds.method == "f1" and thresholds.implied_false_alarm_rate > false_alarm_rate:
        # the F1-optimal threshold may lie below good scores: say how many it flags, not "above the highest"
        flagged = round(thresholds.false_alarm_rate * n)
        log.warning(
            "the F1-optimal threshold (labelled anomalies given) flags %d of %d calibration good image%s (%s): "
            "it implies a false-alarm rate of up to %d/%d = %.3g, not the requested %g",
            flagged, n, "" if n == 1 else "s", SOURCES[source], flagged + 1, n + 1,
            thresholds.implied_false_alarm_rate, false_alarm_rate,
        )  # fmt: skip
    elif thresholds.implied_false_alarm_rate is not None and thresholds.implied_false_alarm_rate > false_alarm_rate:
        log.warning(
            "only %d calibration score%s (%s): a threshold above the highest implies a false-alarm rate of up to "
            "1/%d = %.3g, not the requested %g, which needs %d good images the model did not train on",
            n, "" if n == 1 else "s", SOURCES[source], n + 1, thresholds.implied_false_alarm_rate,
            false_alarm_rate, needed_images(false_alarm_rate),
        )  # fmt: skip
    return thresholds


def needed_images(false_alarm_rate: float) -> int:
    """Calibration scores needed for a conformal threshold to bound the rate by false_alarm_rate."""
    return max(1, math.ceil(1 / false_alarm_rate - 1 - 1e-9))


def score_stats(scores: np.ndarray) -> dict[str, Any]:
    """Statistics of the calibration good images' scores (N,): n, mean, std, min, max, q50..q99.

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
