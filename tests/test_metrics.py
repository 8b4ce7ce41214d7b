"""Metrics against values worked out by hand on small constructed inputs."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from adtr.metrics import auroc, f1_max, image_metrics, pixel_metrics


def test_auroc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4
    assert auroc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    # one positive tied with one negative at 0.5, other pairs ordered: (1 + 1 + 0.5 + 1) / 4
    assert auroc([0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)


def test_auroc_below_half_not_flipped():
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == pytest.approx(0.0)


def test_auroc_matches_sklearn_on_random_data():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 30, 2000).astype(float)
    y = rng.random(2000) < 0.2 + s / 60
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [0, 0])


def test_f1_max_hand_computed():
    # threshold 0.7 flags {0.9, 0.8, 0.7}: tp 2, fp 1, fn 0 -> F1 = 4 / 5
    f1, t = f1_max([0.9, 0.8, 0.7, 0.3], [1, 0, 1, 0])
    assert f1 == pytest.approx(0.8)
    assert t == pytest.approx(0.7)


def test_pixel_auroc_perfect_and_hand_computed():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    perfect = mask.astype(float)
    assert pixel_metrics([perfect], [mask])["pixel_auroc"] == pytest.approx(1.0)
    # anomalous pixel scores 0.5; of 15 normal pixels one scores 0.9, the rest 0: AUROC 14/15
    m = np.zeros((4, 4))
    m[0, 0], m[3, 3] = 0.5, 0.9
    assert pixel_metrics([m], [mask])["pixel_auroc"] == pytest.approx(14 / 15)


def test_aupro_perfect_map_is_one():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[6:9, 6:9] = True
    assert pixel_metrics([mask.astype(float)], [mask])["aupro"] == pytest.approx(1.0)


def test_aupro_hand_computed_two_regions():
    # Region A (1 pixel) scores 1.0, region B (4 pixels) scores 0.0 like all 95 normal pixels.
    # Threshold 1.0: FPR 0, PRO 0.5. Threshold 0: FPR 1, PRO 1. Between them the curve is the
    # segment (0, 0.5) -> (1, 1): at FPR 0.3 PRO = 0.65, area = 0.3 * (0.5 + 0.65) / 2.
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    mask[5:7, 5:7] = True
    m = np.zeros((10, 10))
    m[0, 0] = 1.0
    expected = 0.3 * (0.5 + 0.65) / 2 / 0.3
    assert pixel_metrics([m], [mask])["aupro"] == pytest.approx(expected)


def test_aupro_regions_are_per_image_and_8_connected():
    # Two diagonal pixels form ONE region (8-connectivity); a second image adds a second region.
    m1 = np.zeros((5, 5), bool)
    m1[1, 1] = m1[2, 2] = True
    m2 = np.zeros((5, 5), bool)
    m2[0, 4] = True
    s1 = np.zeros((5, 5))
    s1[1, 1] = 1.0  # half of region 1 detected at the top threshold
    s2 = np.zeros((5, 5))
    s2[0, 4] = 1.0  # all of region 2
    # top threshold: PRO = (0.5 + 1) / 2 = 0.75 at FPR 0, then a segment to (1, 1)
    pro_at_limit = 0.75 + 0.25 * 0.3
    expected = (0.75 + pro_at_limit) / 2
    assert pixel_metrics([s1, s2], [m1, m2])["aupro"] == pytest.approx(expected)


def test_pixel_metrics_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics([np.zeros((4, 4))], [np.zeros((5, 5), bool)])


def test_image_metrics_keys():
    r = image_metrics(np.array([0.1, 0.9, 0.8]), np.array([0, 1, 1]))
    assert r["image_auroc"] == 1.0 and r["image_f1_max"] == 1.0


def _brute_force_pixel_metrics(maps, masks, limit=0.3):
    """Reference: every distinct score as a threshold, regions per image, no cleverness."""
    from skimage.measure import label

    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() for k in masks])
    regions = []
    for m, k in zip(maps, masks, strict=True):
        lab = label(k, connectivity=2)
        regions += [m[lab == r] for r in range(1, lab.max() + 1)]
    xs, ys = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        xs.append(np.mean(scores[~labels] >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    i = np.searchsorted(xs, limit, side="right")
    y_lim = np.interp(limit, xs, ys)
    aupro = np.trapezoid(np.r_[ys[:i], y_lim], np.r_[xs[:i], limit]) / limit
    return roc_auc_score(labels, scores), aupro


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_pixel_metrics_match_brute_force_with_ties_and_chunks(chunk):
    rng = np.random.default_rng(5)
    maps, masks = [], []
    for shape in [(9, 11), (12, 8), (10, 10)]:
        m = rng.integers(0, 12, shape).astype(np.float32) / 4  # many ties
        k = np.zeros(shape, bool)
        k[2:5, 3:6] = True
        k[7:, :2] = True
        m[k] += rng.random(k.sum()).astype(np.float32)
        maps.append(m)
        masks.append(k)
    got = pixel_metrics(maps, masks, chunk=chunk)
    ref_auroc, ref_aupro = _brute_force_pixel_metrics(maps, masks)
    assert got["pixel_auroc"] == pytest.approx(ref_auroc, abs=1e-9)
    assert got["aupro"] == pytest.approx(ref_aupro, abs=1e-9)


def test_pixel_metrics_negative_scores_sort_correctly():
    mask = np.array([[True, False, False]])
    assert pixel_metrics([np.array([[-1.0, -2.0, -3.0]])], [mask])["pixel_auroc"] == 1.0
    assert pixel_metrics([np.array([[-3.0, -2.0, 1.0]])], [mask])["pixel_auroc"] == 0.0
