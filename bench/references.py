"""Reference methods on adtr's backbone, data and metrics: PatchCore and PaDiM.

Written from their papers, to compare side by side with ADTR on identical splits,
preprocessing and metrics (bench/suite.py). Both use a frozen EfficientNet-Lite0 at the
same input size as adtr; maps are upsampled bilinearly to the input size and smoothed with
a Gaussian of sigma 4 input pixels (adtr.model.upsample_map); the image score is the
maximum of the map.

- PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022):
  stride-8 and stride-16 features (the stride-16 map upsampled to the stride-8 grid), 3x3
  local averaging, a greedy k-center coreset (10% of the patches, 1% above 500,000; chosen on
  a 128-dim random projection, section 3.2), anomaly score = distance to the nearest patch.
- PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021): stride
  4, 8, 16 features on the stride-4 grid, 100 randomly chosen channels, one Gaussian per
  position (covariance + 0.01 I), anomaly score = Mahalanobis distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adtr.backbones import build_backbone
from adtr.data.samples import Sample
from adtr.engine import iter_image_batches
from adtr.memory_bank import greedy_coreset, nearest_distance
from adtr.model import align_features, gaussian_kernel1d, upsample_map


@dataclass
class ReferenceOutput:
    scores: np.ndarray  # (N,) image scores, higher = more anomalous
    maps: list[np.ndarray]  # N maps (H, W) at the input size
    original_sizes: list[tuple[int, int]]
    fit_seconds: float
    images_per_second: float  # test images scored per second (backbone included, decoding excluded)


@torch.no_grad()
def _features(
    samples: Sequence[Sample], size: tuple[int, int], strides: tuple[int, ...], backbone: str = "lite0"
) -> tuple[torch.Tensor, list[tuple[int, int]], float]:
    """Features of all samples aligned to the smallest stride's grid: (N, C, h, w), sizes, seconds."""
    import time

    net = build_backbone(backbone, size, strides)
    grid = (size[0] // min(strides), size[1] // min(strides))
    out, sizes, seconds = [], [], 0.0
    for batch in iter_image_batches(samples, size, 8):
        t0 = time.perf_counter()
        out.append(align_features(net(batch.images), grid))
        seconds += time.perf_counter() - t0
        sizes += batch.original_sizes
    return torch.cat(out), sizes, seconds


def _maps_and_scores(grid_maps: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    maps = upsample_map(grid_maps.float(), size, gaussian_kernel1d(4.0))[:, 0]
    return maps.flatten(1).amax(1).double().numpy(), list(maps.numpy())


def _nearest_distance(query: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row (Q, C) to its nearest bank row (M, C): (Q,), in
    chunks of rows (adtr.memory_bank.nearest_distance on each, as a one-image grid)."""
    return torch.cat([nearest_distance(q.t().reshape(1, q.shape[1], -1, 1), bank).flatten()
                      for q in query.split(chunk)])  # fmt: skip


def patchcore(train: Sequence[Sample], test: Sequence[Sample], size: tuple[int, int], seed: int = 0) -> ReferenceOutput:
    import time

    t0 = time.perf_counter()
    local = lambda f: F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)  # 3x3 neighbourhood
    f_train, _, _ = _features(train, size, (8, 16))
    patches = local(f_train).permute(0, 2, 3, 1).reshape(-1, f_train.shape[1])  # (N*h*w, C)
    share = 0.1 if len(patches) <= 500_000 else 0.01
    bank = patches[greedy_coreset(patches, max(1, int(share * len(patches))), seed)]
    fit_seconds = time.perf_counter() - t0
    f_test, sizes, backbone_s = _features(test, size, (8, 16))
    t1 = time.perf_counter()
    n, c, h, w = f_test.shape
    dist = _nearest_distance(local(f_test).permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(n, h, w)
    scores, maps = _maps_and_scores(dist, size)
    seconds = backbone_s + time.perf_counter() - t1
    return ReferenceOutput(scores, maps, sizes, fit_seconds, len(test) / seconds)


def padim(
    train: Sequence[Sample], test: Sequence[Sample], size: tuple[int, int], seed: int = 0, dims: int = 100
) -> ReferenceOutput:
    import time

    t0 = time.perf_counter()
    f_train, _, _ = _features(train, size, (4, 8, 16))
    n, c, h, w = f_train.shape
    keep = torch.randperm(c, generator=torch.Generator().manual_seed(seed))[:dims].sort().values
    x = f_train[:, keep].permute(2, 3, 0, 1).reshape(h * w, n, -1).double()  # (positions, N, d)
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    cov = centred.transpose(1, 2) @ centred / max(1, n - 1) + 0.01 * torch.eye(len(keep), dtype=torch.float64)
    precision = torch.linalg.inv(cov).float()  # (positions, d, d)
    mean = mean.float()
    fit_seconds = time.perf_counter() - t0
    f_test, sizes, backbone_s = _features(test, size, (4, 8, 16))
    t1 = time.perf_counter()
    y = f_test[:, keep].permute(2, 3, 0, 1).reshape(h * w, len(test), -1) - mean  # (positions, M, d)
    dist = ((y @ precision) * y).sum(-1).clamp_min(0).sqrt()  # (positions, M)
    scores, maps = _maps_and_scores(dist.T.reshape(len(test), h, w), size)
    seconds = backbone_s + time.perf_counter() - t1
    return ReferenceOutput(scores, maps, sizes, fit_seconds, len(test) / seconds)


REFERENCES = {"patchcore": patchcore, "padim": padim}
