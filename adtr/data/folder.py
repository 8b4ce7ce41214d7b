"""Plain folder layout for a user's own data, the same as an MVTec `test/` split:

    ROOT/good/*.png                       good images (label 0)
    ROOT/<defect>/*.png                   anomalous images (label 1), any number of types
    ROOT/ground_truth/<defect>/<stem>_mask.png   optional masks (also looked up in MASKS)

When masks exist for a defect type, every image of that type must have one (a missing one
is named, with a hint when a file of a near-miss name is there: "found 000.png; expected
000_mask.png"); a category without any ground_truth folder gets image-level metrics only.
A folder that holds only mask files (`*_mask.*`), or one named `mask/` or `masks/` (as
other tools name them, flat or with one folder per defect), is never read as a defect type:
it is skipped with a warning saying that masks are read from ground_truth/ only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from adtr.data.images import DataError, is_image_file, list_images
from adtr.data.samples import Sample

log = logging.getLogger(__name__)

MASK_FOLDER = "ground_truth"
OTHER_MASK_FOLDERS = ("mask", "masks")  # mask folder names of other tools: never a defect type
MASK_SUFFIX = "_mask"


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
    """Samples of a folder in the test layout above: good/ plus one folder per defect.

    Raises DataError when a defect type with masks lacks one for an image (naming the image,
    the expected mask and any near-miss file), or when no sub-folder holds images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    masks_root = Path(masks_root) if masks_root is not None else root / MASK_FOLDER
    samples: list[Sample] = []
    ignored: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != MASK_FOLDER):
        images = list_images(sub)
        if sub.name.lower() in OTHER_MASK_FOLDERS or (images and all(is_mask_name(p) for p in images)):
            ignored.append(sub)
            continue
        _warn_skipped(sub, images)
        if sub.name == "good":
            samples += [Sample(p, 0) for p in images]
            continue
        mask_dir = masks_root / sub.name
        for p in images:
            mask = find_mask(p, mask_dir)
            samples.append(Sample(p, 1, sub.name, mask))
    if not samples:
        raise DataError(f"{root}: no images in any sub-folder (expected good/ and defect folders)")
    if ignored:
        _warn_mask_folders(ignored, masks_root, any(s.mask_path is not None for s in samples))
    return samples


def is_mask_name(path: Path) -> bool:
    """True for a mask file name, `<stem>_mask.<ext>` (any case)."""
    return path.stem.lower().endswith(MASK_SUFFIX)


def find_mask(image: Path, mask_dir: Path) -> Path | None:
    """The mask of `image` in `mask_dir` (`<stem>_mask.png`, or another image extension), or None
    when mask_dir does not exist. DataError when mask_dir exists but holds no mask for it."""
    if not mask_dir.is_dir():
        return None
    expected = mask_dir / f"{image.stem}{MASK_SUFFIX}.png"
    if expected.is_file():
        return expected
    others = sorted(p for p in mask_dir.glob(f"{image.stem}{MASK_SUFFIX}.*") if is_image_file(p))
    if others:
        return others[0]
    near = sorted(p.name for p in mask_dir.iterdir() if p.is_file() and p.stem.lower().startswith(image.stem.lower()))
    hint = f"; found {', '.join(near[:3])}; expected {expected.name}" if near else ""
    raise DataError(f"{image}: no mask at {expected}{hint} (although {mask_dir} holds masks for this defect)")


def _warn_mask_folders(folders: list[Path], masks_root: Path, found_masks: bool) -> None:
    """Say that mask-only folders were not read as defect types, and what that means for pixel metrics."""
    names = ", ".join(str(f) for f in folders)
    if found_masks:
        log.warning("%s: holds masks, not test images: skipped (masks are read from %s)", names, masks_root)
    else:
        log.warning(
            "%s: holds masks, not test images: skipped; no masks were found in %s/<defect>/<name>_mask.png, "
            "so pixel metrics are skipped (move the masks there to get them)",
            names,
            masks_root,
        )


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
