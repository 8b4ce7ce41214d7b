"""Good features a run keeps so that `adtr update` can continue it without the original images.

Rehearsal ("replay") as in continual learning (Rebuffi et al., iCaRL, CVPR 2017; Rolnick et
al., "Experience Replay for Continual Learning", NeurIPS 2019): a bounded sample of the old
training data is mixed into every later training step, so the model keeps reconstructing what
it learnt. ADTR's backbone is frozen, so its features stand in for the images:

    RUN/replay.safetensors   "good": (N, C, h, w) raw backbone features of a seeded sample of
                             the training images; "val": (M, C, h, w) those of the held-out good
                             images (thresholds and the forgetting guard of an update); float16;
                             in runs with a defect head also "defects": (K, C, h, w) the labelled
                             defects it was fitted on, "defect_labels": (K, h, w) their token
                             labels, "defect_masked": (K,) uint8 (1: the labels come from a mask),
                             so that an update fits the head on the old defects and the new ones;
                             in runs that paste defects for the head, "backgrounds": (B, H, W, 3)
                             uint8, up to defect_paste.BACKGROUNDS good training images at the
                             input size, for an update to paste the old and new defects onto
                             (defect_paste.py), as the fit would; and "defect_images" (K, H, W, 3),
                             "defect_image_masks" (K, H, W) uint8: the kept defects' pixels and
                             masks at the input size, pasted again by an update

Bound: at most MAX_IMAGES images per set and MAX_BYTES for the file. Lite0 at 256x256 has
192 x 32 x 32 values an image on the default stride-8 grid (token_patch 2), 384 KiB in
float16: bottle keeps 63 + 21 images, 33 MB (192 x 16 x 16, 96 KiB and 8.4 MB with token_patch 1).
The backgrounds add at most 16 x H x W x 3 bytes beyond MAX_BYTES (3.1 MB at 256x256, 5.8 MB at
bsdata's 224x544), the kept defects' pixels K x H x W x 4 (16.8 MB for 64 at 256x256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adtr.engine import AnomalyPool
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
    defects: AnomalyPool | None = None  # the defect head's labelled defects, raw features (float16)
    backgrounds: torch.Tensor | None = None  # (B, H, W, 3) uint8 good images to paste defects onto
    # uint8 images (K, H, W, 3) and masks (K, H, W) of `defects`, in runs that paste them
    defect_pixels: tuple[torch.Tensor, torch.Tensor] | None = None

    def background_images(self) -> torch.Tensor | None:
        """The backgrounds, or None where there are none (runs saved before them)."""
        return self.backgrounds if self.backgrounds is not None and len(self.backgrounds) else None

    def summary(self) -> dict[str, Any]:
        """What config.json records about the file: counts, sizes (bytes: the features and defects,
        within max_bytes; background_bytes: the uint8 backgrounds and defect pixels, on top) and bound."""
        d = self.defects
        tensors = [self.good, self.val]
        if d is not None:
            tensors += [d.features, d.token_labels.to(DTYPE), d.pixel_level]
        n_bytes = sum(t.numel() * t.element_size() for t in tensors)  # the features, bounded by MAX_BYTES
        background_bytes = self.backgrounds.numel() if self.backgrounds is not None else 0  # uint8, on top
        if self.defect_pixels is not None:
            background_bytes += sum(t.numel() for t in self.defect_pixels)
        return {"file": REPLAY_FILE, "good": len(self.good), "val": len(self.val),
                "defects": len(self.defects) if self.defects is not None else 0,
                "backgrounds": len(self.backgrounds) if self.backgrounds is not None else 0, "dtype": "float16",
                "bytes": n_bytes, "background_bytes": background_bytes, "max_images": MAX_IMAGES,
                "max_bytes": MAX_BYTES}  # fmt: skip

    def defect_pool(self, model: ADTR) -> AnomalyPool | None:
        """The kept defects with standardised float32 features (for fit.fit_on_features), or None."""
        if self.defects is None:
            return None
        d = self.defects
        device = model.feature_mean.device
        features = model.standardize(d.features.float().to(device)).cpu()
        return AnomalyPool(features, d.token_labels.float(), d.pixel_level, d.kinds)


def capacity(feature_shape: tuple[int, ...], sets: int = 2) -> int:
    """Images each set may keep for features of shape (C, h, w): MAX_IMAGES, or fewer so that
    the sets together (good, val, and the head's defects where kept: 3) stay within MAX_BYTES
    (a defect's token labels add h * w values)."""
    c, h, w = feature_shape
    per_image = (c + (sets > 2)) * h * w * torch.finfo(DTYPE).bits // 8
    return max(1, min(MAX_IMAGES, MAX_BYTES // (sets * per_image)))


def subsample(features: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most `limit` of the rows of features (N, ...), drawn with a seeded permutation, in order."""
    if len(features) <= limit:
        return features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


def make_replay(
    model: ADTR, train: torch.Tensor, val: torch.Tensor, seed: int, defects: AnomalyPool | None = None,
    backgrounds: torch.Tensor | None = None,
    defect_pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ReplayData:
    """What a fitted run keeps, from the standardised features (N, C, h, w) it was fitted on
    (fit.FitResult's train and val): each set subsampled to `capacity`, back to raw features
    (model.unstandardize), float16; the defect head's defects (fit.FitResult.head_defects,
    standardised), the latest MAX_IMAGES of them; and the good images defects are pasted onto
    (fit.FitResult.backgrounds: uint8 (B, H, W, 3)), as they are, with the kept defects' pixels
    (fit.FitResult.head_pixels, aligned with defects)."""
    has_defects = defects is not None and len(defects) > 0
    limit = capacity(tuple(train.shape[1:]), 3 if has_defects else 2)
    device = model.feature_mean.device

    def raw(f: torch.Tensor) -> torch.Tensor:
        return model.unstandardize(f.to(device)).cpu().to(DTYPE).contiguous()

    kept, kept_pixels = None, None
    if has_defects:
        last = slice(max(0, len(defects) - limit), len(defects))
        kept = AnomalyPool(raw(defects.features[last]), defects.token_labels[last].to(DTYPE).contiguous(),
                           defects.pixel_level[last], defects.kinds[last])  # fmt: skip
        if defect_pixels is not None:
            kept_pixels = (defect_pixels[0][last].contiguous(), defect_pixels[1][last].contiguous())
    return ReplayData(raw(subsample(train, limit, seed)), raw(subsample(val, limit, seed)), kept, backgrounds,
                      kept_pixels)  # fmt: skip


def save_replay(run_dir: Path | str, replay: ReplayData | None) -> None:
    """Write RUN/replay.safetensors atomically; without replay data, remove a stale one."""
    path = Path(run_dir) / REPLAY_FILE
    if replay is None:
        path.unlink(missing_ok=True)
        return
    tensors = {"good": replay.good.contiguous(), "val": replay.val.contiguous()}
    if replay.defects is not None:
        d = replay.defects
        tensors.update(defects=d.features.contiguous(), defect_labels=d.token_labels.to(DTYPE).contiguous(),
                       defect_masked=d.pixel_level.to(torch.uint8).contiguous())  # fmt: skip
    if replay.backgrounds is not None:
        tensors["backgrounds"] = replay.backgrounds.contiguous()
    if replay.defect_pixels is not None:
        tensors.update(defect_images=replay.defect_pixels[0].contiguous(),
                       defect_image_masks=replay.defect_pixels[1].contiguous())  # fmt: skip
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "adtr-replay"}))


def load_replay(
    run_dir: Path | str, feature_shape: tuple[int, ...], image_size: tuple[int, int] | None = None
) -> ReplayData | None:
    """The replay features of a run folder, or None for a folder saved before they existed.

    feature_shape: (C, h, w) of the run's model; image_size: its input (H, W), which the
    backgrounds must have (unchecked when None). RunFolderError for an unreadable file or
    tensors of another shape or type."""
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
    names = ("defects", "defect_labels", "defect_masked")
    defects = None
    if any(n in tensors for n in names):  # a run with a defect head
        defects = _defects(path, *(tensors.get(n) for n in names), feature_shape)
    backgrounds = tensors.get("backgrounds")
    if backgrounds is not None and not (
        backgrounds.dim() == 4 and backgrounds.shape[3] == 3 and backgrounds.dtype == torch.uint8
        and (image_size is None or tuple(backgrounds.shape[1:3]) == tuple(image_size))
    ):  # fmt: skip
        size = "H, W" if image_size is None else f"{image_size[0]}, {image_size[1]}"
        raise RunFolderError(f"{path}: tensor 'backgrounds' is {tuple(backgrounds.shape)} {backgrounds.dtype}; "
                             f"expected uint8 (B, {size}, 3)")  # fmt: skip
    pixels = None
    images, masks = tensors.get("defect_images"), tensors.get("defect_image_masks")
    if images is not None or masks is not None:
        k = len(defects) if defects is not None else 0
        size = tuple(image_size) if image_size is not None else (tuple(images.shape[1:3]) if images is not None
                                                                 and images.dim() == 4 else None)  # fmt: skip
        ok = (images is not None and masks is not None and size is not None and images.dtype == torch.uint8
              and masks.dtype == torch.uint8 and tuple(images.shape) == (k, *size, 3)
              and tuple(masks.shape) == (k, *size) and (k == 0 or int(masks.max()) <= 1))  # fmt: skip
        if not ok:
            shape = lambda t: None if t is None else f"{tuple(t.shape)} {t.dtype}"  # noqa: E731
            raise RunFolderError(f"{path}: invalid defect pixels: defect_images {shape(images)}, defect_image_masks "
                                 f"{shape(masks)}; expected uint8 (K, H, W, 3) and uint8 (K, H, W) of 0 / 1 for the "
                                 f"{k} kept defects")  # fmt: skip
        pixels = (images, masks)
    return ReplayData(tensors["good"], tensors["val"], defects, backgrounds, pixels)


def _defects(
    path: Path, f: torch.Tensor | None, labels: torch.Tensor | None, masked: torch.Tensor | None,
    feature_shape: tuple[int, ...],
) -> AnomalyPool:  # fmt: skip
    """The kept defects of a replay file, checked; RunFolderError naming what is wrong."""
    k = len(f) if f is not None and f.dim() else -1
    ok = (f is not None and f.dim() == 4 and tuple(f.shape[1:]) == tuple(feature_shape) and f.dtype == DTYPE
          and labels is not None and tuple(labels.shape) == (k, *feature_shape[1:]) and labels.dtype == DTYPE
          and masked is not None and tuple(masked.shape) == (k,) and masked.dtype == torch.uint8)  # fmt: skip
    if ok and k > 0:
        ok = bool(torch.isfinite(f).all() and torch.isfinite(labels).all() and labels.min() >= 0
                  and labels.max() <= 1 and masked.max() <= 1)  # fmt: skip
    if not ok:
        shape = lambda t: None if t is None else f"{tuple(t.shape)} {t.dtype}"  # noqa: E731
        raise RunFolderError(
            f"{path}: invalid defect tensors: defects {shape(f)}, defect_labels {shape(labels)}, defect_masked "
            f"{shape(masked)}; expected finite float16 (K, *{feature_shape}), float16 (K, h, w) in [0, 1] and "
            "uint8 (K,) of 0 / 1"
        )
    return AnomalyPool(f, labels.float(), masked.bool(), ("real",) * k)
