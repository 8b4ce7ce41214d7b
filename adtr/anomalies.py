"""Synthetic anomaly generators: image in, image + mask out, deterministic for a seed.

Each generator takes an RGB uint8 image (H, W, 3) and a numpy Generator and returns the
changed image and a boolean mask (H, W) that is True exactly where the image changed.

- `confetti`: FCDD's confetti noise (Liznerski et al., ICLR 2021), as used by ADTR+: a layer
  of coloured blobs (probability 1.8e-5 per pixel as blob centre, sides 8-54 px, rotated up
  to 45 degrees) plus a layer of white blobs (1.2e-5), smoothed with a Gaussian (kernel 25,
  std 5), added to the image and clamped to 0..255. At least one coloured blob is drawn.
- `cutpaste`: CutPaste (Li et al., CVPR 2021): a rectangle of the same image, optionally
  colour-jittered, pasted at another place; the choice DRAEM/CutPaste users expect.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import convolve1d, rotate

# A synthetic anomaly generator (not a torch.Generator): (image, numpy rng) -> (image, mask).
AnomalyGenerator = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _blob_layer(
    shape: tuple[int, int], p: float, sides: tuple[int, int], rng: np.random.Generator, at_least_one: bool
) -> list[tuple[np.ndarray, int, int]]:
    """Random rotated rectangles: a list of (boolean footprint, top, left)."""
    h, w = shape
    n = rng.binomial(h * w, p)
    if at_least_one:
        n = max(n, 1)
    blobs = []
    for _ in range(n):
        bh, bw = rng.integers(sides[0], sides[1] + 1, size=2)
        footprint = rotate(np.ones((bh, bw), np.float32), rng.uniform(-45, 45), order=0, reshape=True) > 0.5
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        blobs.append((footprint, cy - footprint.shape[0] // 2, cx - footprint.shape[1] // 2))
    return blobs


def _paint(layer: np.ndarray, footprint: np.ndarray, top: int, left: int, value: np.ndarray) -> None:
    h, w = layer.shape[:2]
    fh, fw = footprint.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + fh, h), min(left + fw, w)
    if y0 >= y1 or x0 >= x1:
        return
    sub = footprint[y0 - top : y1 - top, x0 - left : x1 - left]
    layer[y0:y1, x0:x1][sub] = value


def _gaussian_smooth(layer: np.ndarray, size: int = 25, std: float = 5.0) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * std**2))
    k /= k.sum()
    out = convolve1d(layer, k, axis=0, mode="constant")
    return convolve1d(out, k, axis=1, mode="constant")


def _changed(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    return np.any(original != changed, axis=2)


def confetti(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    noise = np.zeros((h, w, 3), np.float32)
    for fp, top, left in _blob_layer((h, w), 1.8e-5, (8, 54), rng, at_least_one=True):
        _paint(noise, fp, top, left, rng.uniform(-255, 255, size=3).astype(np.float32))
    for fp, top, left in _blob_layer((h, w), 1.2e-5, (8, 54), rng, at_least_one=False):
        _paint(noise, fp, top, left, np.full(3, 255, np.float32))
    noise = _gaussian_smooth(noise)
    out = np.clip(np.round(image.astype(np.float32) + noise), 0, 255).astype(np.uint8)
    return out, _changed(image, out)


def cutpaste(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.15) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 4, h - 1))
    pw = int(np.clip(np.sqrt(area / aspect), 4, w - 1))
    sy, sx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    ty, tx = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = image[sy : sy + ph, sx : sx + pw].astype(np.float32)
    patch = patch * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20, size=3)  # colour jitter
    out = image.copy()
    out[ty : ty + ph, tx : tx + pw] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    return out, _changed(image, out)


GENERATORS: dict[str, AnomalyGenerator] = {"confetti": confetti, "cutpaste": cutpaste}


def get_generator(name: str) -> AnomalyGenerator:
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic anomaly {name!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[name]
