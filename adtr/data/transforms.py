"""Turning decoded images into model inputs: resize to the model size, as float 0..255."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def input_size_for(
    sizes: list[tuple[int, int]], pixels: int = 256 * 256, multiple: int = 32
) -> tuple[int, int]:
    """Model input (height, width) for images of the given (height, width) sizes.

    Keeps the median aspect ratio (long parts are not squashed) at about `pixels` pixels,
    both sides multiples of `multiple`: square images -> 256x256; 1130x460 -> 160x384.
    """
    if not sizes:
        raise ValueError("no image sizes to choose an input size from")
    ratio = float(np.median([w / h for h, w in sizes]))  # width / height
    long_ratio = max(ratio, 1 / ratio)  # the short side first, so that portrait = landscape turned
    short = max(multiple, round((pixels / long_ratio) ** 0.5 / multiple) * multiple)
    long = max(multiple, round(short * long_ratio / multiple) * multiple)
    return (int(short), int(long)) if ratio >= 1 else (int(long), int(short))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float tensor (3, h, w) with values 0..255, size = (h, w).

    PIL's bilinear filter widens with the scale factor, so downscaling is anti-aliased.
    """
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)


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
