"""Seeded splits: validation images out of the good training set, and the leak-free k-shot
protocol that takes k labelled anomalies per defect type out of a test set."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from adtr.data.samples import Sample


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of n good images into (train, validation) indices; none held out below 5."""
    n_val = int(round(n * fraction)) if n >= 5 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def kshot_split(
    test: Sequence[Sample], k: int, seed: int, pool_size: int | None = None
) -> tuple[list[Sample], list[Sample]]:
    """(training anomalies, remaining test samples).

    For every defect type, pool_size (default k) images are drawn with a seeded permutation;
    the first k of them train, and ALL pool_size are removed from the test set. Comparing
    k = 1, 3, 5 with pool_size = 5 therefore evaluates every k on the same remaining images.
    """
    pool_size = k if pool_size is None else pool_size
    if not 0 <= k <= pool_size:
        raise ValueError(f"k = {k} must be between 0 and pool_size = {pool_size}")
    by_defect: dict[str, list[Sample]] = defaultdict(list)
    for s in test:
        if s.label == 1:
            by_defect[s.defect].append(s)
    train, held = [], set()
    for i, defect in enumerate(sorted(by_defect)):
        items = sorted(by_defect[defect], key=lambda s: str(s.path))
        if len(items) <= pool_size:
            raise ValueError(f"defect {defect!r} has {len(items)} images: too few to hold out {pool_size}")
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + i)).tolist()
        pool = [items[j] for j in perm[:pool_size]]
        train += pool[:k]
        held |= {s.path for s in pool}
    remaining = [s for s in test if s.path not in held]
    return train, remaining


def split_per_class(labels: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: the last `fraction` of each class's images (labels (N,)) are
    held out, in their order; e.g. a labelled validation set out of CIFAR-10's training images,
    so that settings are chosen without the test set."""
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        held[idx[int(len(idx) * (1 - fraction)) :]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
