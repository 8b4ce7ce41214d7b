"""MVTec AD layout (Bergmann et al., CVPR 2019), for any of its 15 categories:

    CATEGORY/train/good/*.png
    CATEGORY/test/good/*.png, CATEGORY/test/<defect>/*.png
    CATEGORY/ground_truth/<defect>/<stem>_mask.png

A folder without `train/` is read as the plain folder layout (`adtr.data.folder`): its
`good/` images are the training set and all its sub-folders the test set.
"""

from __future__ import annotations

from pathlib import Path

from adtr.data.folder import MASK_FOLDER, good_images, labelled_folder
from adtr.data.images import DataError
from adtr.data.samples import Sample


def is_mvtec(root: Path) -> bool:
    return (Path(root) / "train").is_dir() or (Path(root) / "test").is_dir()


def train_samples(root: Path) -> list[Sample]:
    """Good training images of an MVTec category or of a plain folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if is_mvtec(root):
        if not (root / "train" / "good").is_dir():
            raise DataError(f"{root}: MVTec category without train/good")
        return good_images(root / "train" / "good")
    if (root / "good").is_dir():
        return good_images(root / "good")
    raise DataError(f"{root}: neither an MVTec category (train/good) nor a folder with good/")


def test_samples(root: Path) -> list[Sample]:
    """Test images of an MVTec category (test/), or all sub-folders of a plain folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if is_mvtec(root):
        if not (root / "test").is_dir():
            raise DataError(f"{root}: MVTec category without test/")
        return labelled_folder(root / "test", root / MASK_FOLDER)
    return labelled_folder(root)
