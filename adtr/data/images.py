"""Reading and validating image and mask files, and turning any image array into RGB uint8.

Every failure raises `DataError` naming the file and the problem, so that a bad file in a
folder of thousands is found in one read of the message. Images come back as RGB uint8
arrays (H, W, 3) whatever their mode (grayscale, palette, RGBA, 16-bit, float), masks as
boolean arrays (H, W). Files and in-memory arrays (cameras, OpenCV, uploads) go through the
same conversion, `to_rgb_uint8`, so equal content gives equal pixels whichever way it came.

Pixel limit: an image larger than `pixel_limit()` pixels (default `MAX_PIXELS`, 100 MP; the
environment variable ADTR_MAX_PIXELS or an explicit `max_pixels` overrides it) is refused
from its header, before any pixel is decoded, with its size and the limit in the message.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adtr.errors import DataError

__all__ = [
    "DataError",
    "ImageTooLarge",
    "decode_for_model",
    "image_size",
    "is_image_file",
    "list_images",
    "pixel_limit",
    "read_image",
    "read_mask",
    "to_rgb_uint8",
]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 100_000_000  # default limit; larger images are refused as likely decompression bombs
PIXEL_LIMIT_ENV = "ADTR_MAX_PIXELS"

ACCEPTED_ARRAYS = (
    "accepted: (H, W) grey, (H, W, 1), (H, W, 3) RGB, (H, W, 4) RGBA, or channel-first (1|3|4, H, W); "
    "dtype uint8 (0..255), uint16 (0..65535), or float16/32/64 with value_range=1.0 or 255.0"
)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def pixel_limit(max_pixels: int | None = None) -> int:
    """The largest accepted width x height: `max_pixels` if given, else $ADTR_MAX_PIXELS, else MAX_PIXELS.

    Raises DataError when ADTR_MAX_PIXELS is not a positive integer (e.g. "50_000_000" or "5e7").
    """
    if max_pixels is not None:
        return int(max_pixels)
    text = os.environ.get(PIXEL_LIMIT_ENV)
    if not text:
        return MAX_PIXELS
    try:
        value = int(float(text.replace("_", "")))
    except ValueError:
        value = 0
    if value <= 0:
        raise DataError(f"{PIXEL_LIMIT_ENV}={text!r}: expected a positive number of pixels, e.g. 50000000")
    return value


class ImageTooLarge(DataError):
    """An image above the pixel limit (the service answers 413 rather than 415)."""


def _too_large(path: Path, width: int, height: int, limit: int) -> DataError:
    return ImageTooLarge(
        f"{path}: image of {width}x{height} = {width * height} pixels ({width * height / 1e6:.1f} MP) exceeds "
        f"the limit of {limit} pixels ({limit / 1e6:.1f} MP; set {PIXEL_LIMIT_ENV} or --max-pixels to change it)"
    )


def _open(path: Path, data: bytes | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode a file, or `data` (then `path` only names it in messages).

    Every failure of the decoder on a corrupt file is a DataError naming the file (Pillow raises
    TypeError, IndexError and others on some; tests/test_fuzz.py); MemoryError propagates. The
    pixel limit is checked from the header, before decoding. Pillow's own decompression-bomb
    check (warning at 89 MP, error at twice that) would fire first with a message naming neither
    size nor limit: its warning is ignored and its limit raised to ours.
    """
    limit = pixel_limit(max_pixels)
    if data is None:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
    elif len(data) == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow's hard stop (2x this) then never fires before our limit
    source = io.BytesIO(data) if data is not None else path  # outside the try: bad `data` is a caller's bug
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
            if im.width * im.height > limit:
                raise _too_large(path, im.width, im.height, limit)
            im.load()
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{path}: image too large for the decoder ({e}); adtr's limit is {limit / 1e6:.1f} megapixels"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file, or an unknown image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: truncated or corrupt image ({e})") from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise other types on some corrupt files
        raise DataError(f"{path}: corrupt image: the decoder failed ({type(e).__name__}: {e})") from None
    return im


def image_size(path: Path | str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding the pixels.

    Raises DataError naming the file: missing, not an image, or a corrupt header (whatever
    Pillow raises on it; MemoryError propagates)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.height, im.width
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not an image file, or an unknown image format ({e})") from None
    except MemoryError:
        raise
    except Exception as e:  # as in _open: a corrupt header may raise any type
        raise DataError(f"{path}: corrupt image header ({type(e).__name__}: {e})") from None


def to_rgb_uint8(
    image: np.ndarray,
    name: str = "<image>",
    value_range: float | None = None,
    channel_order: str = "rgb",
) -> np.ndarray:
    """Any accepted image array -> RGB uint8 (H, W, 3); the one conversion for files and arrays.

    image: (H, W) grey, (H, W, 1), (H, W, 3), (H, W, 4) with alpha, or channel-first
        (1|3|4, H, W) (read as channel-first only when the last axis cannot be channels).
        Alpha is composited on black, as a camera would see nothing there.
    value_range: the value of white. uint8 -> 255 and uint16 -> 65535 by default; float
        arrays must state it (1.0 or 255.0), since 0..1 and 0..255 data cannot be told apart.
    channel_order: "rgb" (PIL, imageio) or "bgr" (OpenCV: BGR / BGRA).
    name: names the image in messages.
    Raises ValueError (a DataError) naming the accepted shapes and dtypes for anything else.
    """
    a = np.asarray(image)
    if channel_order not in ("rgb", "bgr"):
        raise DataError(f"{name}: channel_order {channel_order!r}; expected 'rgb' or 'bgr'")
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, 2)  # channel-first (C, H, W) -> (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{name}: unsupported image array of shape {tuple(np.shape(image))}; {ACCEPTED_ARRAYS}")
    if a.dtype == np.uint8 and value_range in (None, 255, 255.0):
        top = None  # already 0..255
    elif a.dtype == np.uint8 or a.dtype == np.uint16 or a.dtype.kind == "f":
        top = value_range if value_range is not None else (65535.0 if a.dtype == np.uint16 else None)
        if top is None:
            raise DataError(
                f"{name}: {a.dtype} array without value_range: say whether white is 1.0 or 255.0 "
                f"(e.g. value_range=1.0); {ACCEPTED_ARRAYS}"
            )
        if not float(top) > 0:
            raise DataError(f"{name}: value_range must be positive, got {value_range!r}")
    else:
        raise DataError(f"{name}: unsupported dtype {a.dtype}; {ACCEPTED_ARRAYS}")
    if top is not None:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise DataError(f"{name}: the image holds NaN or infinite values")
        a = np.clip(np.round(f / float(top) * 255.0), 0, 255).astype(np.uint8)
    if channel_order == "bgr" and a.shape[2] >= 3:
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    if a.shape[2] == 4:
        alpha = a[:, :, 3:].astype(np.uint16)
        # round(c * alpha / 255) in integers: what compositing on an opaque black background gives
        a = ((a[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _pil_to_rgb(im: Image.Image, path: Path | str) -> np.ndarray:
    """A decoded PIL image in any mode -> RGB uint8 (H, W, 3), through to_rgb_uint8."""
    if im.mode in ("RGB", "L"):
        return to_rgb_uint8(np.asarray(im), str(path))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return to_rgb_uint8(np.asarray(im.convert("RGBA")), str(path))
    if im.mode.startswith("I;16"):
        return to_rgb_uint8(np.asarray(im).astype(np.uint16), str(path))
    if im.mode == "I":  # 32-bit integer files: 16-bit data when above 255, else 8-bit
        a = np.asarray(im, dtype=np.float64)
        return to_rgb_uint8(a, str(path), value_range=65535.0 if a.max() > 255 else 255.0)
    if im.mode == "F":  # float files carry no range: 0..1 when they fit in it, else 0..255
        a = np.asarray(im, dtype=np.float64)
        return to_rgb_uint8(a, str(path), value_range=1.0 if a.max() <= 1.0 else 255.0)
    if im.mode == "1":
        return to_rgb_uint8(np.asarray(im.convert("L")), str(path))
    return to_rgb_uint8(np.asarray(im.convert("RGB")), str(path))  # P, CMYK, YCbCr, LAB, HSV


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 array, scaling 16/32-bit data to 0..255 rather than clipping it (masks)."""
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


def read_image(path: Path | str, data: bytes | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file (or its bytes, `data`, named by `path`) to RGB uint8 (H, W, 3).

    Raises DataError naming the file: missing, empty, not an image, corrupt, or larger than
    pixel_limit(max_pixels) (checked from the header, before decoding).
    """
    im = _open(Path(path), data, max_pixels)
    return _pil_to_rgb(im, path)


def decode_for_model(
    path: Path | str,
    size: tuple[int, int],
    data: bytes | None = None,
    max_pixels: int | None = None,
    letterbox: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode a file and resize it to the model's (h, w) at once: (tensor (3, h, w) 0..255, (H, W)).

    The full-size image lives only inside this call (one decoded copy, plus one converted
    copy for modes other than RGB / grey), so a batch of huge files never holds them all.
    Equals resize_image(read_image(path), size, letterbox). Errors as read_image.
    """
    from adtr.data.transforms import letterbox_box, pad_to_box, resize_image

    im = _open(Path(path), data, max_pixels)
    original = (im.height, im.width)
    box = letterbox_box(original, size) if letterbox else (0, 0, *size)
    if im.mode in ("RGB", "L") and original != tuple(box[2:]):
        im = im.convert("RGB").resize((box[3], box[2]), Image.BILINEAR)  # the PIL image, no array copy
        tensor = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1)
        return (pad_to_box(tensor, size, box) if letterbox else tensor), original
    image = _pil_to_rgb(im, path)
    del im
    return resize_image(image, size, letterbox), original


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
