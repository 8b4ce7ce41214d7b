"""One-class protocol on in-memory images (CIFAR-10, SPEC section 3).

For each normal class: fit ADTR on that class's training images, score every test image,
AUROC with anomaly = any other class. Backbone features do not depend on the class, so they
are computed once per image and setting (`array_features`) and each class only trains the
reconstructor and standardises with its own training statistics.

Test-time views (`scoring_views`): a test image's score can be averaged over its mirror image
and small shifts. A 32x32 image gives the 4x4 deepest grid few tokens, so one pixel's
misplacement moves the score; averaging views steadies it (measured in docs/design.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adtr.config import ModelConfig, RunConfig, ScoreConfig, TrainConfig
from adtr.data.samples import Sample
from adtr.engine import extract_features, iter_image_batches
from adtr.fit import fit_on_features
from adtr.metrics import auroc
from adtr.model import ADTR


def one_class_split(
    train_labels: np.ndarray, test_labels: np.ndarray, normal_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the normal class's training images, test targets: 1 = anomaly = other class)."""
    return np.flatnonzero(train_labels == normal_class), (test_labels != normal_class).astype(np.int64)


VIEW_SETS = ("none", "flip", "flip-shift")


def scoring_views(images: np.ndarray, views: str = "flip-shift", shift: int = 2) -> list[np.ndarray]:
    """Copies of uint8 images (N, h, w, 3) to score and average, the images themselves first.

    "flip": + the horizontal mirror. "flip-shift": the image and its mirror, each as is and
    moved by `shift` pixels up, down, left and right (edges reflected): 10 views.
    """
    if views not in VIEW_SETS:
        raise ValueError(f"unknown test views {views!r}: expected one of {VIEW_SETS}")
    bases = [images] if views == "none" else [images, images[:, :, ::-1]]
    if views != "flip-shift":
        return [np.ascontiguousarray(b) for b in bases]
    s, (h, w) = shift, images.shape[1:3]
    out = [np.ascontiguousarray(b) for b in bases]
    for b in bases:
        padded = np.pad(b, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect")
        for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s)):
            out.append(np.ascontiguousarray(padded[:, s + dy : s + dy + h, s + dx : s + dx + w]))
    return out


def array_features(
    model: ADTR, images: np.ndarray, device: torch.device, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """Raw aligned features of uint8 images (N, h, w, 3), upscaled bilinearly to the model size:
    (N, C, gh, gw) float32 on the CPU (engine.extract_features, the one feature path)."""
    return extract_features(model, images, device, batch_size, progress)


def read_small_images(samples: Sequence[Sample], size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Image files as uint8 arrays (N, h, w, 3) at size (h, w), resized as every file is
    (data.transforms.resize_image): e.g. external anomalies at CIFAR-10's 32x32."""
    out = [batch.images.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
           for batch in iter_image_batches(samples, size, batch_size=64)]  # fmt: skip
    return np.concatenate(out) if out else np.zeros((0, *size, 3), np.uint8)


def fit_class(
    train_raw: torch.Tensor,
    model_cfg: ModelConfig,
    score_cfg: ScoreConfig,
    train_cfg: TrainConfig,
    device: torch.device,
    external_raw: torch.Tensor | None = None,
    progress: bool = False,
) -> ADTR:
    """Train a reconstructor on one class's raw features (N, C, h, w) with the fit pipeline
    (fit.fit_on_features); external images' raw features (M, C, h, w) become image-level
    anomalies (L_img). Returns the model in eval mode."""
    config = RunConfig(model_cfg, score_cfg, train_cfg)
    return fit_on_features(config, train_raw, device, external=external_raw, progress=progress).model


@torch.no_grad()
def score_features(model: ADTR, raw: torch.Tensor, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Image scores (N,) of raw features (N, C, h, w)."""
    scores = []
    for i in range(0, len(raw), batch_size):
        f = model.standardize(raw[i : i + batch_size].to(device))
        scores.append(model.score(f).anomaly_score.cpu())
    return torch.cat(scores).double().numpy()


def pooled(raw: torch.Tensor) -> torch.Tensor:
    """Globally average-pooled, L2-normalised features: (N, C, h, w) -> (N, C)."""
    return F.normalize(raw.mean(dim=(2, 3)), dim=1)


def knn_scores(train_pooled: torch.Tensor, test_pooled: torch.Tensor, k: int = 5) -> np.ndarray:
    """Baseline: mean distance to the k nearest training images in pooled feature space
    (`pooled`): (N_train, C), (N_test, C) -> (N_test,)."""
    d = torch.cdist(test_pooled, train_pooled)
    return d.topk(min(k, len(train_pooled)), largest=False).values.mean(1).double().numpy()


def run_class(
    normal_class: int,
    train_raw: torch.Tensor,
    train_labels: np.ndarray,
    test_raw: list[torch.Tensor],
    test_labels: np.ndarray,
    model_cfg: ModelConfig,
    score_cfg: ScoreConfig,
    train_cfg: TrainConfig,
    device: torch.device,
    external_raw: torch.Tensor | None = None,
    max_train: int | None = None,
    knn_features: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> dict:
    """Fit on one class, score the test set: AUROC of ADTR and of the k-NN baseline.

    `test_raw` holds the raw features of each test view (`scoring_views`), the plain images
    first; a score is the mean over views. "auroc_plain" and "knn_auroc" use the plain view
    only; "knn_auroc_views" averages the baseline over the same views. The baseline uses
    `knn_features` (pooled train, pooled test views; e.g. of another backbone) when given,
    else the pooled ADTR features.
    """
    idx, targets = one_class_split(train_labels, test_labels, normal_class)
    if max_train is not None:
        idx = idx[:max_train]
    if knn_features is not None:
        knn_train, knn_test = knn_features[0][idx], knn_features[1]
    else:
        knn_train, knn_test = pooled(train_raw[idx]), [pooled(v) for v in test_raw]
    t0 = time.perf_counter()
    model = fit_class(train_raw[idx], model_cfg, score_cfg, train_cfg, device, external_raw)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [score_features(model, v, device) for v in test_raw]
    score_s = time.perf_counter() - t0
    knn = [knn_scores(knn_train, v) for v in knn_test]
    return {
        "class": normal_class,
        "n_train": len(idx),
        "views": len(test_raw),
        "auroc": auroc(np.mean(scores, axis=0), targets),
        "auroc_plain": auroc(scores[0], targets),
        "knn_auroc": auroc(knn[0], targets),
        "knn_auroc_views": auroc(np.mean(knn, axis=0), targets),
        "fit_seconds": fit_s,
        "score_seconds": score_s,
    }
