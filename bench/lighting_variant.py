"""A "new lighting" copy of an image folder, for updates with new good images (issue 15):

    python bench/lighting_variant.py SRC DST

Every image under SRC (an MVTec-layout category: train/, test/) is written under DST darker, with
less contrast and warmer (0.55 x + 20, red x 1.15, blue x 0.85, 0..255), in its own format (JPEG
at quality 95); ground_truth/ masks and files that are not images (a licence) are copied as they
are, so DST is a category of its own with the same defects.
Used for results/update_bank_rows.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def relit(image: Image.Image) -> Image.Image:
    """The image (any mode) darker, flatter and warmer, RGB."""
    a = np.asarray(image.convert("RGB")).astype(np.float32) * 0.55 + 20
    a[..., 0] *= 1.15
    a[..., 2] *= 0.85
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args()
    if args.dst.exists():
        raise SystemExit(f"{args.dst}: exists; give a new folder")
    for path in sorted(args.src.rglob("*")):
        if not path.is_file():
            continue
        out = args.dst / path.relative_to(args.src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in path.parts:
            shutil.copy(path, out)
            continue
        try:
            with Image.open(path) as image:
                relit(image).save(out, quality=95)
        except UnidentifiedImageError:  # not an image
            shutil.copy(path, out)


if __name__ == "__main__":
    main()
