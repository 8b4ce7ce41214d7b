"""Turning decoded images into model inputs: resize to the model size, as float 0..255.

Images are stretched to the model's (h, w) by default. With letterbox, an image keeps its
aspect ratio: it is scaled to fit inside (h, w), centred, and the rest is filled by repeating
its edge pixels (letterbox_box says where it lies); the map of that region alone
(crop_to_box) is the image's map, so the padding is never scored.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def input_size_for(
    sizes: list[tuple[int, int]], short_side: int = 256, max_pixels: int = 120 * 1024, multiple: int = 32
) -> tuple[int, int]:
    """Model input (height, width) for images of the given (height, width) sizes.

    Keeps the median aspect ratio (long parts are not squashed), the short side `short_side`
    (rounded to a multiple of `multiple`) unless that makes more than `max_pixels` pixels; then
    the largest multiple of `multiple` whose input stays within them (at least `multiple`, so
    ratios above about 120:1 pass the cap). Both sides are multiples of `multiple`: square images
    -> 256x256; 1130x460 -> 224x544; 2:1 -> 224x448. The cap, 1.875x the pixels of 256x256, bounds
    the fit time, which grows with the pixels (bsdata at 1.86x: 444-595 s of issue 13's 600);
    before it, a fixed 256x256 pixel count gave bsdata 160x384, which lost its small pits
    (docs/design.md, "The input of long parts"). Raises ValueError for no sizes.
    """
    if not sizes:
        raise ValueError("no image sizes to choose an input size from")
    ratio = float(np.median([w / h for h, w in sizes]))  # width / height
    long_ratio = max(ratio, 1 / ratio)  # the short side first, so that portrait = landscape turned

    def long_for(short: int) -> int:
        return max(multiple, round(short * long_ratio / multiple) * multiple)

    short = max(multiple, round(short_side / multiple) * multiple)
    while short > multiple and short * long_for(short) > max_pixels:
        short -= multiple
    return (short, long_for(short)) if ratio >= 1 else (long_for(short), short)


def resize_image(image: np.ndarray, size: tuple[int, int], letterbox: bool = False) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float tensor (3, h, w) with values 0..255, size = (h, w).

    PIL's bilinear filter widens with the scale factor, so downscaling is anti-aliased. With
    letterbox, the image keeps its aspect ratio inside (h, w) and the rest is padding (pad_to_box).
    """
    if letterbox:
        box = letterbox_box(image.shape[:2], size)
        return pad_to_box(resize_image(image, box[2:]), size, box)
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)


def letterbox_box(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of original (H, W) inside a model input of size
    (h, w) when its aspect ratio is kept: scaled by min(h / H, w / W), centred."""
    (big_h, big_w), (h, w) = original, size
    scale = min(h / big_h, w / big_w)
    height, width = min(h, max(1, round(big_h * scale))), min(w, max(1, round(big_w * scale)))
    return (h - height) // 2, (w - width) // 2, height, width


def pad_to_box(content: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """Place content (3, height, width) at box inside (3, h, w), size = (h, w), repeating its edge
    pixels outwards: an edge continued looks more like the part's surroundings than a flat colour."""
    top, left, height, width = box
    pads = (left, size[1] - width - left, top, size[0] - height - top)
    return torch.nn.functional.pad(content[None], pads, mode="replicate")[0]


def crop_to_box(anomaly_map: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The part (height, width) of a model-size map (h, w) that covers the image: box from letterbox_box."""
    top, left, height, width = box
    return anomaly_map[top : top + height, left : left + width]


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float map (h, w) -> (H, W) by bilinear interpolation, for metrics at the original size."""
    if anomaly_map.shape == tuple(size):
        return anomaly_map
    t = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    t = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


def resize_batch(images: np.ndarray, size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, h, w, 3) in memory -> float (N, 3, H, W), values 0..255, size = (H, W).

    Bilinear in float on `device` (torch, align_corners=False): for small images upscaled to the
    model size (CIFAR-10's 32x32), where resize_image's uint8 result would round every value.
    For upscaling the two agree up to that rounding.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(device)
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
