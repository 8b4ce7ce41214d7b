"""Feature cache, the training loop and batched inference.

The backbone is frozen, so its features are computed once per image and kept in memory;
each epoch then only runs the reconstructor. Nothing here holds global state: the model,
data, device and random generator are passed in, so a distributed wrapper can drive the
same functions per process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adtr.anomalies import AnomalyGenerator
from adtr.config import ScoreConfig, TrainConfig, steps_for
from adtr.data.images import DataError, read_image, read_mask
from adtr.data.prefetch import map_ahead
from adtr.data.samples import Sample
from adtr.data.transforms import resize_batch, resize_image
from adtr.drift import ImageInfo, image_info
from adtr.losses import mixed_loss, mse_loss, reconstruction_loss
from adtr.model import ADTR
from adtr.predict import unletterbox

if TYPE_CHECKING:
    from adtr.distributed import DataParallel

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    images: torch.Tensor  # (B, 3, H, W) float 0..255 at the model size
    original_sizes: list[tuple[int, int]]  # (height, width) of each file
    indices: list[int]  # positions in the sample list
    infos: list[ImageInfo]  # size and colour mode of each file (drift.py)


def iter_image_batches(
    samples: Sequence[Sample],
    size: tuple[int, int],
    batch_size: int,
    workers: int = 2,
    on_error: Callable[[int, DataError], None] | None = None,
    letterbox: bool = False,
) -> Iterator[ImageBatch]:
    """Decode and resize images in threads, batch_size at a time, one batch ahead of the caller
    (data.prefetch.map_ahead: the next batch decodes while this one is used).

    A file that cannot be read raises DataError, or, with on_error, is reported as
    on_error(index, error) and left out of its batch. letterbox: keep each image's aspect
    ratio inside size (data.transforms.resize_image).
    """

    def load(i: int) -> tuple[torch.Tensor, ImageInfo] | DataError:
        try:
            image = read_image(samples[i].path)
        except DataError as e:
            if on_error is None:
                raise
            return e
        tensor = resize_image(image, size, letterbox)
        return tensor, image_info(tensor, image.shape[:2])

    for chunk, loaded in map_ahead(load, range(len(samples)), batch_size, workers):
        ok = []
        for i, item in zip(chunk, loaded, strict=True):
            if isinstance(item, DataError):
                on_error(i, item)  # type: ignore[misc]
            else:
                ok.append((i, item))
        if ok:
            infos = [info for _, (_, info) in ok]
            yield ImageBatch(torch.stack([t for _, (t, _) in ok]), [(x.height, x.width) for x in infos],
                             [i for i, _ in ok], infos)  # fmt: skip


def _batches(
    model: ADTR,
    samples: Sequence[Sample],
    batch_size: int,
    desc: str,
    progress: bool,
    on_error: Callable[[int, DataError], None] | None = None,
    letterbox: bool = False,
) -> Iterator[ImageBatch]:
    """Image batches at the model's input size, behind a progress bar."""
    batches = iter_image_batches(samples, model.cfg.image_size, batch_size, on_error=on_error, letterbox=letterbox)
    return tqdm(batches, total=math.ceil(len(samples) / batch_size), desc=desc, disable=not progress)


@torch.no_grad()
def extract_features(
    model: ADTR,
    samples: Sequence[Sample] | np.ndarray,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    on_info: Callable[[int, ImageInfo], None] | None = None,
) -> torch.Tensor:
    """Raw aligned backbone features (N, C, h, w), float32 on the CPU, of image files (samples:
    decoded once, resized by data.transforms.resize_image) or of in-memory uint8 images
    (N, H, W, 3) (resized by data.transforms.resize_batch). DataError for an unreadable file.
    on_info(index, ImageInfo) is called for each file (the run's input profile, drift.py)."""
    model.eval()
    out = []
    if isinstance(samples, np.ndarray):
        starts = range(0, len(samples), batch_size)
        for i in tqdm(starts, desc="features", disable=not progress):
            out.append(model.extract(resize_batch(samples[i : i + batch_size], model.cfg.image_size, device)).cpu())
    else:
        for batch in _batches(model, samples, batch_size, "features", progress):
            out.append(model.extract(batch.images.to(device)).cpu())
            if on_info is not None:
                for i, info in zip(batch.indices, batch.infos, strict=True):
                    on_info(i, info)
    return torch.cat(out)


ANOMALY_KINDS = ("real", "external", "synthetic")  # labelled defects, unrelated images, made here


@dataclass
class AnomalyPool:
    """Standardised features of anomalous samples with their labels on the token grid."""

    features: torch.Tensor  # (M, C, h, w)
    token_labels: torch.Tensor  # (M, h, w) share of anomalous pixels per token; 0 where unknown
    pixel_level: torch.Tensor  # (M,) bool: token_labels hold this sample's labels (else L_img)
    kinds: tuple[str, ...]  # (M,) each sample's origin, one of ANOMALY_KINDS

    def __post_init__(self) -> None:
        if len(self.kinds) != len(self.features) or not set(self.kinds) <= set(ANOMALY_KINDS):
            raise ValueError(f"kinds must name one of {ANOMALY_KINDS} per sample ({len(self.features)})")

    def __len__(self) -> int:
        return len(self.features)

    def of_kind(self, kind: str) -> AnomalyPool:
        """The samples of one kind, in their order: e.g. the real defects for thresholds."""
        keep = [i for i, k in enumerate(self.kinds) if k == kind]
        return AnomalyPool(self.features[keep], self.token_labels[keep], self.pixel_level[keep],
                           tuple(self.kinds[i] for i in keep))  # fmt: skip

    @staticmethod
    def cat(pools: Sequence[AnomalyPool]) -> AnomalyPool:
        """One pool of several, in order."""
        return AnomalyPool(torch.cat([p.features for p in pools]), torch.cat([p.token_labels for p in pools]),
                           torch.cat([p.pixel_level for p in pools]), sum((p.kinds for p in pools), ()))  # fmt: skip


@dataclass
class TrainingData:
    """What one fit sees. Without synthetic and anomalies the loss is the plain MSE."""

    normal: torch.Tensor  # (N, C, h, w) standardised features of good images
    synthetic: list[AnomalyPool] | None = None  # copies aligned with `normal`: [c].features[i] from image i
    anomalies: AnomalyPool | None = None  # real labelled anomalies and external images (pool.kinds)

    @property
    def supervised(self) -> bool:
        return bool(self.synthetic) or (self.anomalies is not None and len(self.anomalies) > 0)


def token_labels(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Masks (B, H, W) at any resolution -> share of anomalous pixels per token (B, h, w).

    The one way masks reach the token grid: area averaging, so a token half covered by a
    defect gets label 0.5 and weighs half in L_px.
    """
    return F.interpolate(mask[:, None].float(), size=grid, mode="area")[:, 0]


@torch.no_grad()
def anomaly_pool(
    model: ADTR,
    samples: Sequence[Sample],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    kinds: Sequence[str] | None = None,
) -> AnomalyPool:
    """Labelled anomalies: samples with a mask are pixel-level (L_px), others image-level (L_img).

    kinds: each sample's kind (ANOMALY_KINDS); default "real" for all.
    """
    model.eval()
    feats, labels, pixel = [], [], []
    grid = model.cfg.grid_size
    for batch in _batches(model, samples, batch_size, "anomalies", progress):
        feats.append(model.standardize(model.extract(batch.images.to(device))).cpu())
        for i, size in zip(batch.indices, batch.original_sizes, strict=True):
            s = samples[i]
            if s.mask_path is not None:
                mask = torch.from_numpy(read_mask(s.mask_path, size))
                labels.append(token_labels(mask[None], grid)[0])
            else:
                labels.append(torch.zeros(grid))
            pixel.append(s.mask_path is not None)
    kinds = tuple(kinds) if kinds is not None else ("real",) * len(samples)
    return AnomalyPool(torch.cat(feats), torch.stack(labels), torch.tensor(pixel, dtype=torch.bool), kinds)


@torch.no_grad()
def synthetic_pools(
    model: ADTR,
    samples: Sequence[Sample],
    generators: Sequence[AnomalyGenerator],
    copies: int,
    seed: int,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    first: int = 0,
) -> list[AnomalyPool]:
    """`copies` synthetic versions of every good image, made at the model's input size.

    Image i's copy c comes from numpy's Generator seeded with (seed, c, first + i), so the set
    is the same whatever the batch size, and a block of the images starting at position
    `first` (one rank's, distributed.block) gets its part of the whole set; each image picks
    one of the generators at random.
    """
    model.eval()
    grid = model.cfg.grid_size
    feats: list[list[torch.Tensor]] = [[] for _ in range(copies)]
    labels: list[list[torch.Tensor]] = [[] for _ in range(copies)]
    for batch in _batches(model, samples, batch_size, "synthetic", progress):
        originals = batch.images.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()  # (B, H, W, 3)
        for c in range(copies):
            images, masks = [], []
            for i, image in zip(batch.indices, originals, strict=True):
                rng = np.random.default_rng([seed, c, first + i])
                changed, mask = generators[int(rng.integers(len(generators)))](image, rng)
                images.append(torch.from_numpy(changed).permute(2, 0, 1).float())
                masks.append(torch.from_numpy(mask))
            feats[c].append(model.standardize(model.extract(torch.stack(images).to(device))).cpu())
            labels[c].append(token_labels(torch.stack(masks), grid))
    return [
        AnomalyPool(
            torch.cat(feats[c]),
            torch.cat(labels[c]),
            torch.ones(len(samples), dtype=torch.bool),
            ("synthetic",) * len(samples),
        )
        for c in range(copies)
    ]


def make_optimizer(model: ADTR, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the reconstructor's parameters; the fused kernel where the device has one
    (CPU and CUDA: 3x faster steps of the optimizer on 2 cores, docs/design.md)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(model.reconstructor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 matrix products natively (else bf16 is emulated, and on
    an AVX2-only CPU a training step was measured 10x slower in bf16 than in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Resolve cfg.precision ("auto", "fp32", "bf16") for this device; ValueError otherwise."""
    if cfg.precision == "auto":
        return native_bf16(device)
    if cfg.precision in ("fp32", "bf16"):
        if cfg.precision == "bf16" and not native_bf16(device):
            log.warning("bf16 training requested, but %s has no native bf16: expect it to be slower", device)
        return cfg.precision == "bf16"
    raise ValueError(f"unknown precision {cfg.precision!r}; choose 'auto', 'fp32' or 'bf16'")


def planned_epochs(n_train: int, cfg: TrainConfig, image_size: tuple[int, int] | None = None) -> int:
    """Epochs of a fit on n_train good images: cfg.epochs, or steps_for(cfg, image_size) rounded
    up to whole epochs."""
    if cfg.epochs is not None:
        return cfg.epochs
    return max(1, math.ceil(steps_for(cfg, image_size) / max(1, math.ceil(n_train / cfg.batch_size))))


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimisation step `step` (0-based) of epochs * steps_per_epoch."""
    total = epochs * steps_per_epoch
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        warm = min(1.0, (epoch + 1) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        return warm * (0.1 if epoch >= int(cfg.lr_drop_at * epochs) else 1.0)
    if cfg.schedule == "cosine":
        warmup = max(1, round(cfg.warmup_fraction * total))
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; choose 'cosine' or 'step'")


@torch.no_grad()
def validation_loss(model: ADTR, features: torch.Tensor, device: torch.device, batch_size: int = 32) -> float:
    """MSE of the reconstruction of held-out good features."""
    model.reconstructor.eval()
    total = 0.0
    for i in range(0, len(features), batch_size):
        f = features[i : i + batch_size].to(device)
        total += mse_loss(f, model.reconstructor(f)).item() * len(f)
    return total / max(1, len(features))


def _batch(
    data: TrainingData, idx: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (B, C, h, w), token labels (B, h, w), image labels (B,), pixel-level flags (B,).

    Each good image is swapped for one of its synthetic copies with probability
    cfg.synthetic_prob; then round(anomaly_ratio * batch) labelled anomalies are appended,
    drawn with replacement (a handful of real defects is oversampled, not diluted).
    """
    f = data.normal[idx]
    b, _, h, w = f.shape
    labels = torch.zeros(b, h, w)
    if data.synthetic:
        swap = torch.rand(b, generator=generator) < cfg.synthetic_prob
        copy = torch.randint(len(data.synthetic), (b,), generator=generator)
        for c, pool in enumerate(data.synthetic):
            pick = swap & (copy == c)
            f[pick] = pool.features[idx[pick]]
            labels[pick] = pool.token_labels[idx[pick]]
    image_labels = (labels.flatten(1).amax(1) > 0).float()
    pixel_level = torch.ones(b, dtype=torch.bool)
    if data.anomalies is not None and len(data.anomalies):
        n = max(1, round(cfg.anomaly_ratio * b))
        j = torch.randint(len(data.anomalies), (n,), generator=generator)
        f = torch.cat([f, data.anomalies.features[j]])
        labels = torch.cat([labels, data.anomalies.token_labels[j]])
        image_labels = torch.cat([image_labels, torch.ones(n)])
        pixel_level = torch.cat([pixel_level, data.anomalies.pixel_level[j]])
    return f, labels, image_labels, pixel_level


def fit_reconstructor(
    model: ADTR,
    data: TrainingData,
    val_features: torch.Tensor | None,
    cfg: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
    progress: bool = True,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, dict], None] | None = None,
    parallel: DataParallel | None = None,
) -> list[dict]:
    """Train model.reconstructor on standardised features.

    Normal-only data: MSE. With synthetic or labelled anomalies: L_px / L_img (losses.py).
    Returns one dict per epoch (loss, val_loss, lr, seconds). `on_epoch_end` is called after
    each epoch with (epoch, optimizer, record), e.g. to save a resumable checkpoint.
    parallel (distributed.DataParallel): train as one rank of several, each on its rows of the
    same global batches, gradients averaged by DistributedDataParallel; losses in the records
    are the global batches'.
    """
    rec = model.reconstructor
    net = rec if parallel is None else parallel.wrap(rec)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, device)
    history = []
    n = len(data.normal)
    epochs = planned_epochs(n, cfg, model.cfg.image_size)
    per_epoch = math.ceil(n / cfg.batch_size)
    bf16 = use_bf16(cfg, device)
    bar = tqdm(total=epochs * per_epoch, initial=start_epoch * per_epoch, desc="fit", unit="step",
               disable=not progress)  # fmt: skip
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if parallel is not None:
            parallel.start_epoch(epoch)
        net.train()
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for j, i in enumerate(range(0, n, cfg.batch_size)):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(epoch * per_epoch + j, per_epoch, epochs, cfg)
            f, token_labels, image_labels, pixel_level = _batch(data, perm[i : i + cfg.batch_size], cfg, generator)
            rows, share = len(f), 1.0
            if parallel is not None:  # this rank's rows of the global batch every rank drew
                keep, share = parallel.rows(rows)
                f, token_labels, image_labels, pixel_level = (
                    t[keep] for t in (f, token_labels, image_labels, pixel_level)
                )
            f = f.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                f_hat = net(f)
            f_hat = f_hat.float()  # the loss in fp32
            if data.supervised:
                loss = mixed_loss(f, f_hat, token_labels.to(device), image_labels.to(device),
                                  pixel_level.to(device), cfg.top_k, cfg.alpha)  # fmt: skip
            elif parallel is not None and cfg.loss == "hard":
                # one quantile and one normalisation over the global batch (a rank without rows
                # adds nothing): the loss is this rank's part of the global one, so share 1
                empty = share == 0

                def gather(t: torch.Tensor, empty: bool = empty) -> torch.Tensor:
                    return parallel.gather(t[:0] if empty else t)

                loss = reconstruction_loss(f, f_hat, cfg.loss, cfg.hard_quantile, cfg.easy_weight, gather=gather)
                share = 0.0 if empty else 1.0
            else:
                loss = reconstruction_loss(f, f_hat, cfg.loss, cfg.hard_quantile, cfg.easy_weight)
            batch_loss = loss.item() if parallel is None else parallel.batch_mean(loss, share)
            if not math.isfinite(batch_loss):  # every rank sees the global value, so all stop together
                raise FloatingPointError(f"training loss became {batch_loss} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            (loss if parallel is None else parallel.scale(loss, share)).backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(rec.parameters(), cfg.grad_clip)
            optimizer.step()
            total += batch_loss * rows
            bar.update(1)
        record = {
            "epoch": epoch + 1,
            "loss": total / n,
            "lr": optimizer.param_groups[0]["lr"],
            "precision": "bf16" if bf16 else "fp32",
            "seconds": time.perf_counter() - t0,
        }
        if val_features is not None and len(val_features):
            record["val_loss"] = validation_loss(model, val_features, device)
        history.append(record)
        shown = {"epoch": f"{epoch + 1}/{epochs}", "loss": f"{record['loss']:.4f}"}
        if "val_loss" in record:  # nothing held out: no validation figure, rather than "nan"
            shown["val"] = f"{record['val_loss']:.4f}"
        bar.set_postfix(shown)
        log.info("epoch %d: %s", epoch + 1, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, optimizer, record)
    bar.close()
    rec.eval()
    return history


class _ScorerView:
    """The image scorer where fit_reconstructor expects a model's `reconstructor`."""

    def __init__(self, model: ADTR):
        self.reconstructor = model.image_scorer
        self.cfg = model.cfg


def fit_image_scorer(
    model: ADTR,
    data: TrainingData,
    val_features: torch.Tensor | None,
    cfg: TrainConfig,
    device: torch.device,
    progress: bool = True,
    parallel: DataParallel | None = None,
) -> list[dict]:
    """Train model.image_scorer (ModelConfig.image_scorer) on the reconstructor's training data
    (good features, and the synthetic / labelled / external anomalies it trains with, under the
    same losses) for cfg.image_scorer_epochs times the epochs of cfg.steps, from its current
    weights. A larger input does not shorten them as steps_for does the reconstructor's: the
    scorer's step costs about 1/15 of the transformer's. Seeded by cfg.seed (shuffling and
    dropout), so that a resumed fit trains the same scorer. Returns one record per epoch, as
    fit_reconstructor."""
    scorer_cfg = dataclasses.replace(cfg, epochs=planned_epochs(len(data.normal), cfg) * cfg.image_scorer_epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        return fit_reconstructor(_ScorerView(model), data, val_features, scorer_cfg,  # type: ignore[arg-type]
                                 device, generator, progress=progress, parallel=parallel)  # fmt: skip


@dataclass
class Predictions:
    scores: np.ndarray  # (N,) image scores
    maps: list[np.ndarray]  # N maps (H, W) at the model's input size
    original_sizes: list[tuple[int, int]]
    indices: list[int]  # which samples these are (all of them unless on_error skipped some)
    model_seconds: float  # time spent in the model (backbone included, decoding excluded)
    infos: list[ImageInfo] = field(default_factory=list)  # size and colour of each image (drift.py); [] unknown


@torch.no_grad()
def predict_samples(
    model: ADTR,
    samples: Sequence[Sample],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    on_error: Callable[[int, DataError], None] | None = None,
    letterbox: bool = False,
    score: ScoreConfig | None = None,
) -> Predictions:
    """Score every sample with the full model (backbone + reconstructor), or a backend with its
    interface (backend.py).

    letterbox: keep each image's aspect ratio; its map and score then cover the image alone
    (predict.unletterbox, with the run's score settings `score`), and maps are (height, width)
    of its letterbox box, not the model size.
    """
    if letterbox and score is None:
        raise ValueError("letterbox needs the run's score settings")
    model.eval()
    scores: list[float] = []
    maps: list[np.ndarray] = []
    infos: list[ImageInfo] = []
    indices: list[int] = []
    seconds = 0.0
    for batch in _batches(model, samples, batch_size, "predict", progress, on_error, letterbox):
        t0 = time.perf_counter()
        out = model(batch.images.to(device))
        seconds += time.perf_counter() - t0
        batch_scores, batch_maps = out.anomaly_score.cpu().tolist(), list(out.anomaly_map.cpu().numpy())
        if letterbox:
            pairs = [unletterbox(m, size, model.cfg.image_size, score)
                     for m, size in zip(batch_maps, batch.original_sizes, strict=True)]  # fmt: skip
            batch_maps, batch_scores = [m for m, _ in pairs], [v for _, v in pairs]
        scores += batch_scores
        maps += batch_maps
        infos += batch.infos
        indices += batch.indices
    sizes = [(i.height, i.width) for i in infos]
    return Predictions(np.asarray(scores, dtype=np.float64), maps, sizes, indices, seconds, infos)
