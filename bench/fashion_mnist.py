"""Write Fashion-MNIST images as a PNG folder, for use as external irrelevant anomalies.

Debian's `dataset-fashion-mnist` package installs the original idx files under
/usr/share/datasets/fashion-mnist (a real, lossless set unrelated to CIFAR-10):

    sudo apt-get install dataset-fashion-mnist
    python bench/fashion_mnist.py --out runs/fashion-mnist --count 5000
    python bench/cifar10.py --external runs/fashion-mnist ...
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from adtr.fileio import atomic_write_bytes

DEFAULT_IDX = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def read_idx_images(path: Path) -> np.ndarray:
    """uint8 images (N, rows, cols) of an idx3 file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 16:
        raise ValueError(f"{path}: too short for an idx3 header")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: not an idx3 image file (magic {magic}, expected 2051)")
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"{path}: {len(data) - 16} pixel bytes, the header says {n}x{rows}x{cols}")
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx", type=Path, default=DEFAULT_IDX)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=5000, help="first N images")
    args = p.parse_args()
    images = read_idx_images(args.idx)[: args.count]
    for i, image in enumerate(images):
        atomic_write_bytes(args.out / f"{i:05d}.png", _png_bytes(image))
    print(f"wrote {len(images)} images from {args.idx} to {args.out}")


def _png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


if __name__ == "__main__":
    main()
