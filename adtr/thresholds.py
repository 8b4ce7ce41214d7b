"""From scores to decisions: thresholds calibrated at fit time, never on test images.

The one decision rule, wherever a decision is made (PyTorch and ONNX backends, the service,
`adtr test`, the report): an image is anomalous when `anomaly_score >= thresholds.image`, a
pixel is a defect pixel when `anomaly_map >= thresholds.pixel`. A calibrated threshold lies
just above the calibration score it is taken at (by ABOVE, relative), never on it, so the image
that sets it is not flagged when it is scored again, even through another backend or batch
size (scores agree to about 1e-6 relative; TF32 convolutions on GPUs to about 1e-3).

- `good_quantile` (default): the calibration scores are those of GOOD images the model did not
  train on (held out, or cross-fitted: calibration.py); with n of them and an accepted
  false-alarm rate far, the threshold passes the k = ceil((n + 1)(1 - far)) lowest, which
  bounds the rate on new good images by (n + 1 - k) / (n + 1) (split conformal prediction;
  Vovk et al., "Algorithmic Learning in a Random World", 2005; Angelopoulos & Bates, "A Gentle
  Introduction to Conformal Prediction", 2021, section 1). With fewer than 1 / far - 1 scores,
  k = n (the highest score) and the bound is 1 / (n + 1), above the requested rate: that
  implied rate is what is stored (`implied_false_alarm_rate`) and warned about.
- `f1`: when labelled anomalies were given to fit, the threshold maximising F1 over the
  calibration good images and those anomalies (their scores come from a model trained on
  them, so this threshold leans low; it is recorded as such).
- the pixel threshold turns a map into a defect mask: the same rank of the calibration images'
  per-image map maxima, so a good image's mask is empty at the stated rate.

The normalised score maps the calibration minimum to 0, the threshold to 0.5 and twice that
distance above it to 1 (clipped): 0.5 is the decision boundary whatever the model's scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from skimage.measure import label, regionprops

from adtr.metrics import f1_max

ABOVE = 1e-3  # a threshold sits this far (relative) above the calibration score it is taken at

# Where the calibration scores come from (Thresholds.source)
SOURCES = {
    "held_out": "held-out good images",
    "crossfit": "cross-fitted good images (each scored by a model fitted without it)",
    "training": "training images (their own scores)",
}


@dataclass
class Thresholds:
    image: float  # score >= image -> anomalous
    pixel: float  # map value >= pixel -> defect pixel
    low: float  # score mapped to normalised 0 (the lowest calibration score)
    method: str
    n_good: int  # calibration good images behind the numbers
    false_alarm_rate: float  # share of calibration good images at or above `image`
    # Bound on the share of NEW good images at or above `image` (conformal, see above); None
    # where no bound can be stated (training images' own scores) or for runs saved before it.
    implied_false_alarm_rate: float | None = None
    requested_false_alarm_rate: float | None = None
    source: str | None = None  # where the calibration scores come from (SOURCES); None: saved before it was recorded

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        span = max(self.image - self.low, 1e-12)
        return np.clip(0.5 + (np.asarray(score, dtype=np.float64) - self.image) / (2 * span), 0.0, 1.0)

    def is_anomalous(self, score: float) -> bool:
        return bool(score >= self.image)

    def defect_mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        return anomaly_map >= self.pixel

    def describe(self) -> str:
        """One line for people: the threshold, what it rests on and the false-alarm rate it implies."""
        if self.implied_false_alarm_rate is not None:
            rate = f"it implies a false-alarm rate of at most {self.implied_false_alarm_rate:.3g}"
        elif self.source == "training":
            rate = "no false-alarm rate can be stated"
        else:  # a run saved before implied rates were recorded
            rate = f"{self.false_alarm_rate:.3g} of them at or above it"
        asked = f" (requested {self.requested_false_alarm_rate:g})" if self.requested_false_alarm_rate else ""
        where = SOURCES.get(self.source or "", "calibration good images")
        return f"threshold {self.image:.4g} ({self.method}) from {self.n_good} {where}; {rate}{asked}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(**data)


def just_above(value: float) -> float:
    """The threshold for a calibration score: value + ABOVE * max(|value|, 1e-12)."""
    return float(value + ABOVE * max(abs(value), 1e-12))


def conformal_rank(n: int, far: float) -> int:
    """k, 1-based: a threshold above the k-th lowest of n scores bounds the false-alarm rate by
    (n + 1 - k) / (n + 1) <= far; k = n (the highest) when n is too small for far."""
    return min(n, math.ceil((n + 1) * (1 - far) - 1e-9))


def from_good_scores(
    scores: np.ndarray, map_maxima: np.ndarray, far: float = 0.01, source: str = "held_out"
) -> Thresholds:
    """Thresholds from calibration good images' scores (N,) and per-image map maxima (N,).

    far: the accepted false-alarm rate. The image threshold lies just above the k-th lowest
    score, k = conformal_rank(N, far); the pixel threshold likewise on the maxima. The implied
    rate (N + 1 - k) / (N + 1) is stored, except for source "training" (a model's own training
    images score low: nothing can be said). Raises ValueError without scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    maxima = np.asarray(map_maxima, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("thresholds need at least one calibration good image")
    k = conformal_rank(scores.size, far)
    image = just_above(np.sort(scores)[k - 1])
    pixel = just_above(np.sort(maxima)[k - 1])
    implied = (scores.size + 1 - k) / (scores.size + 1) if source != "training" else None
    return Thresholds(image, pixel, float(scores.min()), "good_quantile", int(scores.size),
                      float(np.mean(scores >= image)), implied, far, source)  # fmt: skip


def f1_optimal(
    good: np.ndarray, anomalous: np.ndarray, map_maxima: np.ndarray, far: float = 0.01, source: str = "held_out"
) -> Thresholds:
    """F1-optimal image threshold over calibration good and labelled anomalous scores.

    The threshold is the lowest flagged score (f1_max), so it may sit on an anomalous score;
    its implied false-alarm rate counts the good scores at or above it, as conformal ranks do.
    """
    base = from_good_scores(good, map_maxima, far, source)
    scores = np.r_[good, anomalous]
    labels = np.r_[np.zeros(len(good)), np.ones(len(anomalous))]
    _, t = f1_max(scores, labels)
    above = int(np.sum(np.asarray(good) >= t))
    implied = (above + 1) / (len(good) + 1) if source != "training" else None
    return dataclasses.replace(base, image=t, method="f1", false_alarm_rate=above / len(good),
                               implied_false_alarm_rate=implied)  # fmt: skip


def bounding_boxes(mask: np.ndarray, min_area: int = 1) -> list[dict]:
    """Connected defect regions of a boolean mask: [{x, y, width, height, area}] in pixels."""
    boxes = []
    for region in regionprops(label(mask, connectivity=2)):
        if region.area < min_area:
            continue
        y0, x0, y1, x1 = region.bbox
        boxes.append({"x": int(x0), "y": int(y0), "width": int(x1 - x0), "height": int(y1 - y0),
                      "area": int(region.area)})  # fmt: skip
    return boxes
