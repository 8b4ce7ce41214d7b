"""Reading and validating image and mask files.

Every failure raises `DataError` naming the file and the problem, so that a bad file in a
folder of thousands is found in one read of the message. Images come back as RGB uint8
arrays (H, W, 3) whatever their mode (grayscale, palette, RGBA, 16-bit), masks as boolean
arrays (H, W).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adtr.errors import DataError

__all__ = ["DataError", "image_size", "is_image_file", "list_images", "read_image", "read_mask"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 100_000_000  # larger images are refused as likely decompression bombs


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode a file, or `data` (then `path` only names it in messages)."""
    if data is None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
    elif len(data) == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data) if data is not None else path)
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{path}: {im.width}x{im.height} pixels exceeds the limit of {MAX_PIXELS}")
            im.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image too large (decompression bomb limit)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file, or an unknown image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: truncated or corrupt image ({e})") from None
    return im


def image_size(path: Path | str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not an image file, or an unknown image format ({e})") from None


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 array, scaling 16/32-bit data to 0..255 rather than clipping it."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    return np.asarray(im)


def read_image(path: Path | str, data: bytes | None = None) -> np.ndarray:
    """Decode an image file (or its bytes, `data`, named by `path`) to RGB uint8 (H, W, 3)."""
    im = _open(Path(path), data)
    if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # Transparent pixels are composited on black, as a camera would see nothing there.
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
    a = _to_uint8(im)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"{path}: unsupported image layout {a.shape} (mode {im.mode})")
    return np.ascontiguousarray(a)


def read_mask(path: Path | str, expected_size: tuple[int, int] | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode a mask file (or its bytes) to bool (H, W): any non-zero pixel is anomalous.

    expected_size is the (height, width) of the image the mask belongs to.
    """
    im = _open(Path(path), data)
    a = _to_uint8(im)
    if a.ndim == 3:
        a = a.max(axis=2)
    if expected_size is not None and a.shape != tuple(expected_size):
        raise DataError(
            f"{path}: mask is {a.shape[1]}x{a.shape[0]} but its image is "
            f"{expected_size[1]}x{expected_size[0]} (width x height)"
        )
    return a > 0


def list_images(folder: Path) -> list[Path]:
    """Image files in a folder, sorted; other files are skipped."""
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))
