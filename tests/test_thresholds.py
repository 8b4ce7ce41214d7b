"""Thresholds calibrated on good images; normalised scores; defect boxes."""

import numpy as np
import pytest

from adtr.thresholds import ABOVE, Thresholds, bounding_boxes, f1_optimal, from_good_scores


def test_good_quantile_threshold_and_rate():
    scores = np.arange(1.0, 101.0)  # 100 good images scoring 1..100
    t = from_good_scores(scores, scores + 1, far=0.05)
    # k = ceil(101 * 0.95) = 96 scores pass: the threshold lies just above the 96th
    assert t.image == pytest.approx(96.0 * (1 + ABOVE)) and t.is_anomalous(97.0) and not t.is_anomalous(96.0)
    assert t.false_alarm_rate == pytest.approx(0.04) and t.implied_false_alarm_rate == pytest.approx(5 / 101)
    assert t.pixel == pytest.approx(97.0 * (1 + ABOVE)) and t.low == 1.0 and t.n_good == 100


def test_normalised_score_is_half_at_threshold():
    t = Thresholds(image=10.0, pixel=12.0, low=2.0, method="good_quantile", n_good=5, false_alarm_rate=0.0)
    assert t.normalize(10.0) == pytest.approx(0.5)
    assert t.normalize(2.0) == pytest.approx(0.0)
    assert t.normalize(18.0) == pytest.approx(1.0)
    assert t.normalize(100.0) == 1.0 and t.normalize(-5.0) == 0.0
    assert t.is_anomalous(10.0) and not t.is_anomalous(9.99)
    assert Thresholds.from_dict(t.to_dict()) == t


def test_f1_optimal_separates_when_possible():
    t = f1_optimal(np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert t.method == "f1" and t.image == 5.0 and t.false_alarm_rate == 0.0


def test_bounding_boxes_of_two_regions():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 2:5] = True
    mask[6:9, 8:9] = True
    boxes = sorted(bounding_boxes(mask), key=lambda b: b["y"])
    assert boxes == [
        {"x": 2, "y": 1, "width": 3, "height": 2, "area": 6},
        {"x": 8, "y": 6, "width": 1, "height": 3, "area": 3},
    ]
