"""Prediction: image files or arrays -> anomaly score, map at the image's own size, decision.

A backend is what turns a batch of model-size images (B, 3, H, W), float 0..255, into an
`AnomalyOutput` (map (B, H, W), score (B,)): the PyTorch ADTR or export.OnnxModel. Higher
scores mean more anomalous; the run's thresholds give the normalised score and decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adtr.data.images import decode_for_model, read_image
from adtr.data.prefetch import map_ahead
from adtr.data.transforms import resize_image, resize_map
from adtr.errors import DataError
from adtr.model import AnomalyOutput
from adtr.thresholds import Thresholds

Backend = Callable[[torch.Tensor], AnomalyOutput]


@dataclass
class Prediction:
    path: str
    anomaly_score: float  # higher = more anomalous
    anomaly_map: np.ndarray  # (H, W) at the image's original size
    normalized_score: float  # 0..1, 0.5 = the run's threshold
    is_anomalous: bool  # anomaly_score >= the image threshold
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 when asked for (keep_images)


def make_prediction(name: str, score: float, anomaly_map: np.ndarray, thresholds: Thresholds) -> Prediction:
    """A Prediction with the run's normalised score and decision for `score`."""
    return Prediction(name, score, anomaly_map, float(thresholds.normalize(score)), thresholds.is_anomalous(score))


def iter_predictions(
    backend: Backend,
    paths: Sequence[str | Path],
    size: tuple[int, int],
    device: torch.device,
    thresholds: Thresholds,
    batch_size: int = 8,
    on_error: Callable[[Path, DataError], None] | None = None,
    keep_images: bool = False,
    progress: bool = True,
) -> Iterator[Prediction]:
    """Score image files one batch at a time, yielding one Prediction per file in order.

    Each file is decoded once and resized to size (h, w) in 2 threads, one batch ahead of the
    model (data.prefetch.map_ahead): the next batch decodes while this one is scored, and at
    most two batches of decoded images are in memory. `anomaly_map` is (H, W) at the file's
    size; with keep_images, `image` holds the decoded RGB uint8 (H, W, 3). An unreadable file
    raises DataError, or, with on_error, is reported as on_error(path, error) and left out.
    """

    def decode(path: Path) -> tuple[np.ndarray | tuple[int, int], torch.Tensor] | DataError:
        # Without keep_images only the model-size tensor and the (H, W) survive decoding,
        # so a batch of huge files never holds their full-size pixels.
        try:
            if keep_images:
                image = read_image(path)
                return image, resize_image(image, size)
            tensor, original = decode_for_model(path, size)
            return original, tensor
        except DataError as e:
            if on_error is None:
                raise
            return e

    files = [Path(p) for p in paths]
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for chunk, decoded in map_ahead(decode, files, batch_size):
        ok = []
        for path, item in zip(chunk, decoded, strict=True):
            if isinstance(item, DataError):
                on_error(path, item)  # type: ignore[misc]
                bar.update(1)
            else:
                ok.append((path, *item))
        if ok:
            with torch.no_grad():
                out = backend(torch.stack([t for _, _, t in ok]).to(device))
            scores = out.anomaly_score.cpu().tolist()
            maps = out.anomaly_map.cpu().numpy()  # (B, h, w) at the model's input size
            for (path, image, _), score, small in zip(ok, scores, maps, strict=True):
                original = image.shape[:2] if isinstance(image, np.ndarray) else image
                pred = make_prediction(str(path), float(score), resize_map(small, original), thresholds)
                if keep_images:
                    pred.image = image
                bar.update(1)
                yield pred
        # This batch's pixels go before the next batch is awaited: at most two batches in memory.
        ok = decoded = image = pred = None
    bar.close()


@torch.no_grad()
def predict_array(
    backend: Backend, image: np.ndarray, size: tuple[int, int], device: torch.device, thresholds: Thresholds, name: str
) -> Prediction:
    """Score one decoded RGB uint8 image (H, W, 3); the map comes back at (H, W)."""
    out = backend(resize_image(image, size)[None].to(device))
    anomaly_map = resize_map(out.anomaly_map[0].cpu().numpy(), image.shape[:2])
    return make_prediction(name, float(out.anomaly_score[0]), anomaly_map, thresholds)
