"""A "new lighting" copy of an image folder, for updates with new good images (issue 15):

    python bench/lighting_variant.py SRC DST [--strength S]

Every image under SRC (an MVTec-layout category: train/, test/) is written under DST darker, with
less contrast and warmer (at strength 1, the default: 0.55 x + 20, red x 1.15, blue x 0.85,
0..255; at strength S each change is S times as large: S = 0.5 is 0.775 x + 10, red x 1.075, blue
x 0.925), in its own format (JPEG at quality 95); ground_truth/ masks and files that are not
images (a licence) are copied as they are, so DST is a category of its own with the same defects.
Used for results/update_bank_rows.md and results/update_retrain.md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def relit(image: Image.Image, strength: float = 1.0) -> Image.Image:
    """The image (any mode) darker, flatter and warmer, RGB; strength 0 leaves it as it is."""
    a = np.asarray(image.convert("RGB")).astype(np.float32) * (1 - 0.45 * strength) + 20 * strength
    a[..., 0] *= 1 + 0.15 * strength
    a[..., 2] *= 1 - 0.15 * strength
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--strength", type=float, default=1.0, help="how far from the original (default 1; 0: none)")
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
                relit(image, args.strength).save(out, quality=95)
        except UnidentifiedImageError:  # not an image
            shutil.copy(path, out)


if __name__ == "__main__":
    main()
