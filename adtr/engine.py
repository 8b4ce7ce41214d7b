"""Feature cache, the training loop and batched inference.

The backbone is frozen, so its features are computed once per image and kept in memory;
each epoch then only runs the reconstructor. Nothing here holds global state: the model,
data, device and random generator are passed in, so a distributed wrapper can drive the
same functions per process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adtr.config import TrainConfig
from adtr.data.images import DataError, read_image
from adtr.data.samples import Sample
from adtr.data.transforms import resize_image
from adtr.model import ADTR

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B, 3, H, W) float 0..255 at the model size
    original_sizes: list[tuple[int, int]]  # (height, width) of each file
    indices: list[int]  # positions in the sample list


def iter_image_batches(
    samples: Sequence[Sample],
    size: tuple[int, int],
    batch_size: int,
    workers: int = 2,
    on_error: Callable[[int, DataError], None] | None = None,
) -> Iterator[ImageBatch]:
    """Decode and resize images in threads (PIL releases the GIL), batch_size at a time.

    A file that cannot be read raises DataError, or, with on_error, is reported as
    on_error(index, error) and left out of its batch.
    """

    def load(i: int) -> tuple[torch.Tensor, tuple[int, int]] | DataError:
        try:
            image = read_image(samples[i].path)
        except DataError as e:
            if on_error is None:
                raise
            return e
        return resize_image(image, size), image.shape[:2]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(samples), batch_size):
            idx = list(range(start, min(start + batch_size, len(samples))))
            loaded = list(pool.map(load, idx))
            ok = []
            for i, item in zip(idx, loaded, strict=True):
                if isinstance(item, DataError):
                    on_error(i, item)  # type: ignore[misc]
                else:
                    ok.append((i, item))
            if ok:
                yield ImageBatch(
                    torch.stack([t for _, (t, _) in ok]), [s for _, (_, s) in ok], [i for i, _ in ok]
                )


@torch.no_grad()
def extract_features(
    model: ADTR,
    samples: Sequence[Sample],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Raw aligned backbone features of all samples: (N, C, h, w) float32 on the CPU."""
    model.eval()
    out = []
    batches = iter_image_batches(samples, model.cfg.image_size, batch_size)
    for batch in tqdm(
        batches, total=math.ceil(len(samples) / batch_size), desc="features", disable=not progress
    ):
        out.append(model.extract(batch.images.to(device)).cpu())
    return torch.cat(out)


def _lr_factor(epoch: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (epoch + 1) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
    drop = 0.1 if epoch >= int(cfg.lr_drop_at * cfg.epochs) else 1.0
    return warm * drop


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_loss(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    return torch.mean((f - f_hat) ** 2)


@torch.no_grad()
def validation_loss(model: ADTR, features: torch.Tensor, device: torch.device, batch_size: int = 32) -> float:
    model.reconstructor.eval()
    total = 0.0
    for i in range(0, len(features), batch_size):
        f = features[i : i + batch_size].to(device)
        total += mse_loss(f, model.reconstructor(f)).item() * len(f)
    return total / max(1, len(features))


def fit_reconstructor(
    model: ADTR,
    train_features: torch.Tensor,
    val_features: torch.Tensor | None,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    progress: bool = True,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, dict], None] | None = None,
) -> list[dict]:
    """Train model.reconstructor on standardised features (N, C, h, w) with MSE.

    Returns one dict per epoch (loss, val_loss, lr, seconds). `on_epoch_end` is called after
    each epoch with (epoch, optimizer, record), e.g. to save a resumable checkpoint.
    """
    rec = model.reconstructor
    if optimizer is None:
        optimizer = torch.optim.AdamW(rec.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    n = len(train_features)
    bar = tqdm(
        range(start_epoch, cfg.epochs),
        desc="fit",
        disable=not progress,
        initial=start_epoch,
        total=cfg.epochs,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(epoch, cfg)
        rec.train()
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            f = train_features[perm[i : i + cfg.batch_size]].to(device)
            inputs = f
            if cfg.feature_jitter > 0:
                noise = torch.randn(f.shape, generator=generator).to(device)
                inputs = f + cfg.feature_jitter * noise
            loss = mse_loss(f, rec(inputs))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(rec.parameters(), cfg.grad_clip)
            optimizer.step()
            total += loss.item() * len(f)
        record = {
            "epoch": epoch + 1,
            "loss": total / n,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if val_features is not None and len(val_features):
            record["val_loss"] = validation_loss(model, val_features, device)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{record.get('val_loss', float('nan')):.4f}")
        log.info("epoch %d: %s", epoch + 1, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, record)
    rec.eval()
    return history


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) image scores
    maps: list[np.ndarray]  # N maps (H, W) at the model's input size
    original_sizes: list[tuple[int, int]]
    indices: list[int]  # which samples these are (all of them unless on_error skipped some)
    model_seconds: float  # time spent in the model (backbone included, decoding excluded)


@torch.no_grad()
def predict_samples(
    model: ADTR,
    samples: Sequence[Sample],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    on_error: Callable[[int, DataError], None] | None = None,
) -> Predictions:
    """Score every sample with the full model (backbone + reconstructor)."""
    model.eval()
    scores: list[float] = []
    maps: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    indices: list[int] = []
    seconds = 0.0
    batches = iter_image_batches(samples, model.cfg.image_size, batch_size, on_error=on_error)
    for batch in tqdm(
        batches, total=math.ceil(len(samples) / batch_size), desc="predict", disable=not progress
    ):
        t0 = time.perf_counter()
        out = model(batch.images.to(device))
        seconds += time.perf_counter() - t0
        scores += out.anomaly_score.cpu().tolist()
        maps += list(out.anomaly_map.cpu().numpy())
        sizes += batch.original_sizes
        indices += batch.indices
    return Predictions(np.asarray(scores, dtype=np.float64), maps, sizes, indices, seconds)
