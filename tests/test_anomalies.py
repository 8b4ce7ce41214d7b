"""Synthetic anomalies: the image differs from its source exactly where the mask says,
and the same seed gives the same result."""

import numpy as np
import pytest

from adtr.anomalies import GENERATORS, get_generator


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 100, np.uint8)
    img[::8] = 180  # some structure, so a pasted patch differs from where it lands
    return img + rng.integers(0, 10, img.shape, dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_changes_exactly_where_the_mask_says(name, image):
    for seed in range(5):
        out, mask = get_generator(name)(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert mask.any(), "a synthetic anomaly must change something"
        np.testing.assert_array_equal(np.any(out != image, axis=2), mask)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_for_a_seed(name, image):
    a = get_generator(name)(image, np.random.default_rng(7))
    b = get_generator(name)(image, np.random.default_rng(7))
    c = get_generator(name)(image, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_source_image_is_not_modified(image):
    before = image.copy()
    for name in GENERATORS:
        get_generator(name)(image, np.random.default_rng(0))
    np.testing.assert_array_equal(image, before)


def test_unknown_generator():
    with pytest.raises(ValueError, match="unknown synthetic anomaly"):
        get_generator("sparkles")
