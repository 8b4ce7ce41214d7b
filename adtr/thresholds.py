"""From scores to decisions: thresholds calibrated at fit time, never on test images.

- `good_quantile` (default): the image threshold is the (1 - far) quantile of the scores of
  the held-out GOOD validation images, far = the accepted false-alarm rate (default 1%).
  With n validation images the rate is only known to about 1/n; both are recorded.
- `f1`: when labelled anomalies were given to fit, the threshold maximising F1 over the
  validation good images and those anomalies (their scores come from a model trained on
  them, so this threshold leans low; it is recorded as such).
- the pixel threshold turns a map into a defect mask: the same quantile of the validation
  images' per-image map maxima, so a good image's mask is empty at the stated rate.

The normalised score maps the validation minimum to 0, the threshold to 0.5 and twice that
distance above it to 1 (clipped): 0.5 is the decision boundary whatever the model's scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from skimage.measure import label, regionprops

from adtr.metrics import f1_max


@dataclass
class Thresholds:
    image: float  # score >= image -> anomalous
    pixel: float  # map value >= pixel -> defect pixel
    low: float  # score mapped to normalised 0 (the lowest validation score)
    method: str
    n_good: int  # validation good images behind the numbers
    false_alarm_rate: float  # share of validation good images at or above `image`

    def normalize(self, score: float | np.ndarray) -> float | np.ndarray:
        span = max(self.image - self.low, 1e-12)
        return np.clip(0.5 + (np.asarray(score, dtype=np.float64) - self.image) / (2 * span), 0.0, 1.0)

    def is_anomalous(self, score: float) -> bool:
        return bool(score >= self.image)

    def defect_mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        return anomaly_map >= self.pixel

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(**data)


def from_good_scores(scores: np.ndarray, map_maxima: np.ndarray, far: float = 0.01) -> Thresholds:
    """Thresholds from held-out good images' scores (N,) and per-image map maxima (N,)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("thresholds need at least one held-out good image")
    image = float(np.quantile(scores, 1 - far, method="higher"))
    pixel = float(np.quantile(map_maxima, 1 - far, method="higher"))
    return Thresholds(image, pixel, float(scores.min()), "good_quantile", int(scores.size),
                      float(np.mean(scores >= image)))  # fmt: skip


def f1_optimal(good: np.ndarray, anomalous: np.ndarray, map_maxima: np.ndarray, far: float = 0.01) -> Thresholds:
    """F1-optimal image threshold over good validation and labelled anomalous scores."""
    base = from_good_scores(good, map_maxima, far)
    scores = np.r_[good, anomalous]
    labels = np.r_[np.zeros(len(good)), np.ones(len(anomalous))]
    _, t = f1_max(scores, labels)
    return dataclasses.replace(base, image=t, method="f1", false_alarm_rate=float(np.mean(good >= t)))


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
