"""Prediction: image files or arrays -> anomaly score, map at the image's own size, decision.

A backend is what turns a batch of model-size images (B, 3, H, W), float 0..255, into an
`AnomalyOutput` (map (B, H, W), score (B,)): the PyTorch ADTR or export.OnnxModel. Higher
scores mean more anomalous; the run's thresholds give the normalised score and decision.
Each image is checked against the run's input profile (drift.py): the ways it departs from
the training images are logged and kept in `Prediction.input_warnings`. With letterbox, an
image keeps its aspect ratio (data.transforms) and only its own region is scored (unletterbox).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adtr.config import ScoreConfig
from adtr.data.images import decode_for_model, read_image
from adtr.data.prefetch import map_ahead
from adtr.data.transforms import crop_to_box, letterbox_box, resize_image, resize_map
from adtr.drift import ImageInfo, InputProfile, check, image_info
from adtr.errors import DataError, SettingsError
from adtr.model import MAP_SCORES, AnomalyOutput, map_image_score
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
    input_warnings: list[str] = field(default_factory=list)  # departures from the training images (drift.py)


@dataclass
class Scoring:
    """What turns a backend's output into predictions: the run's input size, thresholds, image
    score settings and input profile (None for runs saved before it: no checks), and whether
    images are letterboxed rather than stretched. SettingsError for letterbox with a score that
    needs the whole input (pooled_residual)."""

    size: tuple[int, int]
    thresholds: Thresholds
    score: ScoreConfig = field(default_factory=ScoreConfig)
    profile: InputProfile | None = None
    letterbox: bool = False
    image_scorer: bool = False  # the run's image score comes from its image scorer, not the map

    def __post_init__(self) -> None:
        if self.letterbox and self.score.image_score not in MAP_SCORES:
            raise SettingsError(
                f"letterbox needs an image score computed from the map ({', '.join(MAP_SCORES)}); this run uses "
                f"{self.score.image_score!r}"
            )
        if self.letterbox and self.image_scorer:
            # letterboxing rescores the map over the image's own region; the scorer's map is not
            # an output, and its score over the whole input would count the padding
            raise SettingsError("letterbox scores the image from the map of its own region, but this run's "
                                "image score comes from its image scorer: fit with --image-scorer off to "
                                "letterbox")  # fmt: skip

    def predict(self, name: str, score: float, small_map: np.ndarray, info: ImageInfo) -> Prediction:
        """The Prediction of one image from the backend's score and map (h, w) at the model's input size."""
        original = (info.height, info.width)
        if self.letterbox:
            small_map, score = unletterbox(small_map, original, self.size, self.score)
        warnings = check(self.profile, info, name, self.letterbox)
        t = self.thresholds
        return Prediction(name, score, resize_map(small_map, original), float(t.normalize(score)),
                          t.is_anomalous(score), input_warnings=warnings)  # fmt: skip


def unletterbox(
    anomaly_map: np.ndarray, original: tuple[int, int], size: tuple[int, int], score: ScoreConfig
) -> tuple[np.ndarray, float]:
    """(map of the image's own region, its image score) from a letterboxed input's map (h, w).

    The padding around the image is cut off before scoring, so it never counts as a defect;
    the score is the run's map score (model.map_image_score) over that region alone.
    """
    region = np.ascontiguousarray(crop_to_box(anomaly_map, letterbox_box(original, size)))
    value = map_image_score(torch.from_numpy(region)[None, None], score, region.shape)
    return region, float(value[0])


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
    *,
    score: ScoreConfig | None = None,
    profile: InputProfile | None = None,
    letterbox: bool = False,
    image_scorer: bool = False,
) -> Iterator[Prediction]:
    """Score image files one batch at a time, yielding one Prediction per file in order.

    Each file is decoded once and resized to size (h, w) in 2 threads, one batch ahead of the
    model (data.prefetch.map_ahead): the next batch decodes while this one is scored, and at
    most two batches of decoded images are in memory. `anomaly_map` is (H, W) at the file's
    size; with keep_images, `image` holds the decoded RGB uint8 (H, W, 3). An unreadable file
    raises DataError, or, with on_error, is reported as on_error(path, error) and left out.
    score, profile, letterbox: the run's image score settings (needed for letterbox), its input
    profile (each image is checked against it) and whether to letterbox (Scoring).
    """
    scoring = Scoring(size, thresholds, score or ScoreConfig(), profile, letterbox, image_scorer)

    def decode(path: Path) -> tuple[np.ndarray | None, torch.Tensor, ImageInfo] | DataError:
        # Without keep_images only the model-size tensor and the (H, W) survive decoding,
        # so a batch of huge files never holds their full-size pixels.
        try:
            if keep_images:
                image = read_image(path)
                tensor = resize_image(image, size, letterbox)
                return image, tensor, image_info(tensor, image.shape[:2])
            tensor, original = decode_for_model(path, size, letterbox=letterbox)
            return None, tensor, image_info(tensor, original)
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
                out = backend(torch.stack([t for _, _, t, _ in ok]).to(device))
            scores = out.anomaly_score.cpu().tolist()
            maps = out.anomaly_map.cpu().numpy()  # (B, h, w) at the model's input size
            for (path, image, _, info), value, small in zip(ok, scores, maps, strict=True):
                pred = scoring.predict(str(path), float(value), small, info)
                pred.image = image
                bar.update(1)
                yield pred
        # This batch's pixels go before the next batch is awaited: at most two batches in memory.
        ok = decoded = image = pred = None
    bar.close()


@torch.no_grad()
def predict_array(
    backend: Backend,
    image: np.ndarray,
    size: tuple[int, int],
    device: torch.device,
    thresholds: Thresholds,
    name: str,
    *,
    score: ScoreConfig | None = None,
    profile: InputProfile | None = None,
    letterbox: bool = False,
    image_scorer: bool = False,
) -> Prediction:
    """Score one decoded RGB uint8 image (H, W, 3); the map comes back at (H, W). score,
    profile, letterbox as in iter_predictions."""
    scoring = Scoring(size, thresholds, score or ScoreConfig(), profile, letterbox, image_scorer)
    tensor = resize_image(image, size, letterbox)
    out = backend(tensor[None].to(device))
    info = image_info(tensor, image.shape[:2])
    return scoring.predict(name, float(out.anomaly_score[0]), out.anomaly_map[0].cpu().numpy(), info)
