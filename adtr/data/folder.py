"""Plain folder layout for a user's own data, the same as an MVTec `test/` split:

    ROOT/good/*.png                       good images (label 0)
    ROOT/<defect>/*.png                   anomalous images (label 1), any number of types
    ROOT/ground_truth/<defect>/<stem>_mask.png   optional masks (also looked up in MASKS)

When masks exist for a defect type, every image of that type must have one; a category
without any ground_truth folder gets image-level metrics only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adtr.data.images import DataError, is_image_file, list_images
from adtr.data.samples import Sample

log = logging.getLogger(__name__)

MASK_FOLDER = "ground_truth"


def good_images(folder: Path) -> list[Sample]:
    """All images of a folder of good images; an error if it has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of good images not found")
    images = list_images(folder)
    _warn_skipped(folder, images)
    if not images:
        raise DataError(f"{folder}: no image files in this folder")
    return [Sample(p, 0) for p in images]


def labelled_folder(root: Path, masks_root: Path | None = None) -> list[Sample]:
    """Samples of a folder in the test layout above: good/ plus one folder per defect."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    masks_root = Path(masks_root) if masks_root is not None else root / MASK_FOLDER
    samples: list[Sample] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != MASK_FOLDER):
        images = list_images(sub)
        _warn_skipped(sub, images)
        if sub.name == "good":
            samples += [Sample(p, 0) for p in images]
            continue
        mask_dir = masks_root / sub.name
        for p in images:
            mask = mask_dir / f"{p.stem}_mask.png"
            if mask_dir.is_dir() and not mask.is_file():
                raise DataError(f"{p}: no mask at {mask} although {mask_dir} holds masks for this defect")
            samples.append(Sample(p, 1, sub.name, mask if mask_dir.is_dir() else None))
    if not samples:
        raise DataError(f"{root}: no images in any sub-folder (expected good/ and defect folders)")
    return samples


def _warn_skipped(folder: Path, images: list[Path]) -> None:
    kept = set(images)
    for p in sorted(folder.iterdir()):
        if p.is_file() and p not in kept and not p.name.startswith("."):
            log.warning("%s: not an image file (by its extension), skipped", p)


def has_masks(samples: list[Sample]) -> bool:
    """True when every anomalous sample has a mask (pixel metrics are then possible)."""
    anomalous = [s for s in samples if s.label == 1]
    return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


def find_images(root: Path) -> list[Path]:
    """Image files below a folder, recursively and sorted; masks (ground_truth/) and hidden files are left out."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if is_image_file(p) and MASK_FOLDER not in p.relative_to(root).parts)


def image_folder(root: Path, label: int) -> list[Sample]:
    """Every image below a folder (recursively), with one image-level label and no masks."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    images = find_images(root)
    if not images:
        raise DataError(f"{root}: no image files in this folder or below it")
    return [Sample(p, label, root.name) for p in images]


def anomaly_samples(root: Path) -> list[Sample]:
    """Labelled anomalies: the test layout (defect folders, optional ground_truth/ masks;
    a good/ folder is ignored) or, if the folder holds images itself, image-level labels."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    if any(is_image_file(p) for p in root.iterdir()):
        return image_folder(root, label=1)
    samples = [s for s in labelled_folder(root) if s.label == 1]
    if not samples:
        raise DataError(f"{root}: no anomalous images (expected <defect>/ folders besides good/)")
    return samples
