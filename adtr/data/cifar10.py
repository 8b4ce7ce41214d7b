"""CIFAR-10 (Krizhevsky, 2009) in the forms users have it, as uint8 arrays (N, 32, 32, 3).

- the official `cifar-10-python.tar.gz`, still packed or extracted (`cifar-10-batches-py/`
  with `data_batch_1..5` and `test_batch`, or those files directly in ROOT);
- image folders `ROOT/train/<class>/*` and `ROOT/test/<class>/*`.

The official batches are Python pickles. They are read with a restricted unpickler that
admits only the numpy array reconstruction the format needs: a crafted file that asks for
anything else (os.system, builtins.eval, ...) is refused with DataError, never executed.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from adtr.data.images import DataError, list_images, read_image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
TARBALL = "cifar-10-python.tar.gz"
BATCH_FOLDER = "cifar-10-batches-py"

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 carry array bytes this way
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images uint8 (N, 32, 32, 3) and labels int64 (N,)."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{name}: not a CIFAR-10 batch, refused ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name}: not a CIFAR-10 batch (no data/labels)")
    flat = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if flat.dtype != np.uint8 or flat.ndim != 2 or flat.shape[1] != 3072 or len(labels) != len(flat):
        raise DataError(f"{name}: unexpected array shape {flat.shape} / {flat.dtype}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{name}: labels outside 0..9")
    return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _batch_bytes(root: Path, names: list[str]) -> list[tuple[str, bytes]]:
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(root) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"{root}: the archive has no {missing}")
            return [(f"{root}:{n}", tar.extractfile(members[n]).read()) for n in names]
    for folder in (root, root / BATCH_FOLDER):
        if all((folder / n).is_file() for n in names):
            return [(str(folder / n), (folder / n).read_bytes()) for n in names]
    if (root / TARBALL).is_file():
        return _batch_bytes(root / TARBALL, names)
    raise DataError(f"{root}: no CIFAR-10 batches ({', '.join(names)}) found")


def _from_folders(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths, labels = [], []
    for i, name in enumerate(CLASSES):
        folder = root / split / name
        if not folder.is_dir():
            raise DataError(f"{folder}: class folder not found")
        files = list_images(folder)
        paths += files
        labels += [i] * len(files)
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(read_image, paths))
    for p, im in zip(paths, images, strict=True):
        if im.shape != (32, 32, 3):
            raise DataError(f"{p}: {im.shape[1]}x{im.shape[0]} image, CIFAR-10 images are 32x32")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_cifar10(root: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 32, 32, 3) and labels (N,) of split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: not found")
    if root.is_dir() and (root / split).is_dir():
        return _from_folders(root, split)
    parts = [
        read_batch(data, name) for name, data in _batch_bytes(root, TRAIN_BATCHES if split == "train" else TEST_BATCHES)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
