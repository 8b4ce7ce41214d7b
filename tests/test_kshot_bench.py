"""bench/kshot.py: references scored once and restricted to a draw's remaining images."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from kshot import _pool_size, _reference_metrics, summary  # noqa: E402

from adtr.data.samples import Sample  # noqa: E402
from adtr.metrics import image_metrics  # noqa: E402


def _samples(defects: dict[str, int], good: int) -> list[Sample]:
    out = [Sample(Path(f"good_{i}.png"), 0, "good") for i in range(good)]
    for d, n in defects.items():
        out += [Sample(Path(f"{d}_{i}.png"), 1, d) for i in range(n)]
    return out


def test_pool_size_keeps_one_test_image_per_defect_type():
    test = _samples({"scratch": 6, "dent": 11}, good=4)
    assert _pool_size(test, [1, 3, 5, 10]) == (5, [1, 3, 5])  # scratch keeps one image at k = 5
    with pytest.raises(SystemExit, match="smallest defect type has 6"):
        _pool_size(test, [6, 10])


def test_reference_metrics_equal_metrics_of_the_subset():
    test = _samples({"scratch": 8}, good=8)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(test)) + np.array([s.label for s in test])
    ref = SimpleNamespace(scores=scores, maps=[], original_sizes=[(4, 4)] * len(test))
    keep = [test[i] for i in (15, 0, 3, 9, 12, 5)]  # out of order: the restriction must follow paths
    got = _reference_metrics(ref, test, keep)
    index = [15, 0, 3, 9, 12, 5]
    expected = image_metrics(scores[index], np.array([test[i].label for i in index]))["image_auroc"]
    assert got["image_auroc"] == pytest.approx(expected)
    assert got["image_auroc"] != pytest.approx(image_metrics(scores, np.array([s.label for s in test]))["image_auroc"])
    assert got["pixel_auroc"] is None and got["aupro"] is None  # no masks: image metrics only


def test_summary_gives_mean_and_spread_over_draws():
    rows = [
        {
            "set": "s",
            "mode": "masks",
            "k": 5,
            "draw": d,
            "fit_seconds": t,
            "image_auroc": v,
            "pixel_auroc": None,
            "aupro": None,
        }
        for d, (v, t) in enumerate([(0.8, 10.0), (0.9, 30.0), (1.0, 20.0)])
    ] + [
        {
            "set": "s",
            "mode": "normal",
            "k": None,
            "draw": 0,
            "fit_seconds": 5.0,
            "image_auroc": 0.7,
            "pixel_auroc": 0.9,
            "aupro": 0.6,
        }
    ]
    table = summary(rows)
    assert table[0] == ["s", "masks", 5, 3, "0.9000 ± 0.1000", "-", "-", "20"]  # sample std, median time
    assert table[1] == ["s", "normal", "-", 1, "0.7000", "0.9000", "0.6000", "5"]
