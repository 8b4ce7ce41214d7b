"""Heatmaps: colours at known values, the blend, and PNG bytes that decode to the overlay."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from adtr.render import colorize, heatmap_png, overlay


def test_colorize_maps_the_range_onto_the_colour_map():
    lut = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    m = np.array([[-5.0, 2.0, 4.5], [7.0, 12.0, 2.0 + 10 * 100 / 255]])  # below, vmin, mid, vmax, above, index 100
    rgb = colorize(m, 2.0, 12.0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == lut[0]).all() and (rgb[0, 1] == lut[0]).all()  # clipped below
    assert (rgb[1, 1] == lut[255]).all()  # vmax
    assert (rgb[0, 2] == lut[64]).all()  # 2.5 / 10 x 255 = 63.75 -> 64
    assert (rgb[1, 2] == lut[100]).all()
    assert (colorize(np.full((2, 2), 3.0), 3.0, 3.0) == lut[0]).all()  # an empty range does not divide by 0


def test_overlay_blends_and_png_decodes_to_it():
    image = np.full((4, 5, 3), 200, np.uint8)
    m = np.zeros((4, 5))
    black = colorize(m, 0.0, 1.0)[0, 0].astype(np.float64)
    out = overlay(image, m, 0.0, 1.0, alpha=0.25)
    assert (out == np.rint(0.75 * 200 + 0.25 * black).astype(np.uint8)).all()
    decoded = np.asarray(Image.open(io.BytesIO(heatmap_png(image, m, (0.0, 1.0)))))
    assert (decoded == overlay(image, m, 0.0, 1.0)).all()  # lossless, whatever the zlib level
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, np.zeros((5, 4)), 0.0, 1.0)
