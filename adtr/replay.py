"""Good features a run keeps so that `adtr update` can continue it without the original images.

Rehearsal ("replay") as in continual learning (Rebuffi et al., iCaRL, CVPR 2017; Rolnick et
al., "Experience Replay for Continual Learning", NeurIPS 2019): a bounded sample of the old
training data is mixed into every later training step, so the model keeps reconstructing what
it learnt. ADTR's backbone is frozen, so its features stand in for the images:

    RUN/replay.safetensors   "good": (N, C, h, w) raw backbone features of a seeded sample of
                             the training images; "val": (M, C, h, w) those of the held-out good
                             images (thresholds and the forgetting guard of an update); float16

Bound: at most MAX_IMAGES images per set and MAX_BYTES for the file. Lite0 at 256x256 has
192 x 16 x 16 values an image, 96 KiB in float16: bottle keeps 64 + 21 images, 8.4 MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adtr.errors import RunFolderError
from adtr.fileio import atomic_write
from adtr.model import ADTR

REPLAY_FILE = "replay.safetensors"
MAX_IMAGES = 64  # per set (training sample, validation images)
MAX_BYTES = 50_000_000  # the whole file; large inputs keep fewer images
DTYPE = torch.float16  # features are O(10) in magnitude: float16's 3 digits are plenty for a residual


@dataclass
class ReplayData:
    """Raw backbone features kept by a run, float16 on the CPU."""

    good: torch.Tensor  # (N, C, h, w) a seeded sample of the training images
    val: torch.Tensor  # (M, C, h, w) the held-out good images (all of them, up to the bound)

    def summary(self) -> dict[str, Any]:
        """What config.json records about the file: counts, size and bound."""
        n_bytes = sum(t.numel() * t.element_size() for t in (self.good, self.val))
        return {"file": REPLAY_FILE, "good": len(self.good), "val": len(self.val), "dtype": "float16",
                "bytes": n_bytes, "max_images": MAX_IMAGES, "max_bytes": MAX_BYTES}  # fmt: skip


def capacity(feature_shape: tuple[int, ...]) -> int:
    """Images each set may keep for features of shape (C, h, w): MAX_IMAGES, or fewer so that
    both sets together stay within MAX_BYTES."""
    per_image = math.prod(feature_shape) * torch.finfo(DTYPE).bits // 8
    return max(1, min(MAX_IMAGES, MAX_BYTES // (2 * per_image)))


def subsample(features: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most `limit` of the rows of features (N, ...), drawn with a seeded permutation, in order."""
    if len(features) <= limit:
        return features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


def make_replay(model: ADTR, train: torch.Tensor, val: torch.Tensor, seed: int) -> ReplayData:
    """What a fitted run keeps, from the standardised features (N, C, h, w) it was fitted on
    (fit.FitResult's train and val): each set subsampled to `capacity`, back to raw features
    (model.unstandardize), float16."""
    limit = capacity(tuple(train.shape[1:]))
    device = model.feature_mean.device

    def raw(f: torch.Tensor) -> torch.Tensor:
        return model.unstandardize(subsample(f, limit, seed).to(device)).cpu().to(DTYPE).contiguous()

    return ReplayData(raw(train), raw(val))


def save_replay(run_dir: Path | str, replay: ReplayData | None) -> None:
    """Write RUN/replay.safetensors atomically; without replay data, remove a stale one."""
    path = Path(run_dir) / REPLAY_FILE
    if replay is None:
        path.unlink(missing_ok=True)
        return
    tensors = {"good": replay.good.contiguous(), "val": replay.val.contiguous()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "adtr-replay"}))


def load_replay(run_dir: Path | str, feature_shape: tuple[int, ...]) -> ReplayData | None:
    """The replay features of a run folder, or None for a folder saved before they existed.

    feature_shape: (C, h, w) of the run's model. RunFolderError for an unreadable file or
    features of another shape or type."""
    path = Path(run_dir) / REPLAY_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunFolderError(f"{path}: unreadable safetensors file ({e})") from None
    for name in ("good", "val"):
        t = tensors.get(name)
        if t is None or t.dim() != 4 or tuple(t.shape[1:]) != tuple(feature_shape) or t.dtype != DTYPE:
            found = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise RunFolderError(f"{path}: tensor {name!r} is {found}; the run's model needs (N, *{feature_shape}) "
                                 "float16")  # fmt: skip
    return ReplayData(tensors["good"], tensors["val"])
