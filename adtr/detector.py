"""The Python API, mirroring the CLI: fit, predict, test, save, load.

    from adtr import ADTRDetector
    det = ADTRDetector().fit("mvtec/bottle")        # trains on train/good
    metrics = det.test("mvtec/bottle")              # image/pixel AUROC, AUPRO, F1-max
    preds = det.predict(["part.png"])               # score and map per image
    det.save("runs/bottle"); det = ADTRDetector.load("runs/bottle")

`anomaly_score` and `anomaly_map`: higher means more anomalous.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from adtr import __version__
from adtr.anomalies import get_generator
from adtr.calibration import calibrate, feature_scores, score_stats
from adtr.checkpoint import RunRecord, file_list_summary, load_record, load_run, save_run
from adtr.config import MODEL_PRESETS, ModelConfig, RunConfig, ScoreConfig, TrainConfig
from adtr.data.folder import anomaly_samples, has_masks, image_folder
from adtr.data.images import decode_for_model, image_size, read_image, read_mask, to_rgb_uint8
from adtr.data.mvtec import test_samples, train_samples
from adtr.data.samples import Sample
from adtr.data.splits import split_validation
from adtr.data.transforms import input_size_for, resize_image, resize_map
from adtr.engine import predict_samples
from adtr.errors import DataError, SettingsError
from adtr.fit import fit_on_features
from adtr.metrics import image_metrics, pixel_metrics
from adtr.model import ADTR

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    anomaly_score: float  # higher = more anomalous
    anomaly_map: np.ndarray  # (H, W) at the image's original size
    normalized_score: float  # 0..1, 0.5 = the run's threshold
    is_anomalous: bool  # anomaly_score >= the image threshold
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) uint8 when asked for (keep_images)


class ADTRDetector:
    """ADTR anomaly detector. Learned state ends in `_` and exists after fit or load."""

    def __init__(
        self,
        model: ModelConfig | None = None,
        score: ScoreConfig | None = None,
        train: TrainConfig | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ):
        self.config = RunConfig(
            model=model or MODEL_PRESETS["cpu"],
            score=score or ScoreConfig(),
            train=train or TrainConfig(),
        )
        self.device = torch.device(device)
        self.progress = progress

    # -- training ---------------------------------------------------------------------
    def fit(
        self,
        data: str | Path | Sequence[Sample],
        anomalies: str | Path | Sequence[Sample] | None = None,
        synthetic: Sequence[str] = (),
        external: str | Path | None = None,
        init: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> ADTRDetector:
        """Train on good images, optionally with anomalies.

        data: an MVTec category / plain folder (its good training images) or good samples.
        anomalies: labelled anomalous images: a folder in the MVTec test layout (masks in
            ground_truth/ give pixel labels), a plain folder of images (image labels), or samples.
        synthetic: names of synthetic anomaly generators (anomalies.GENERATORS).
        external: a folder of unrelated images, used as image-level anomalies.
        init: a run folder to start from (its model settings and weights); else from scratch.
        checkpoint_dir: save a resumable training state there after every epoch.
        resume: continue from the state in checkpoint_dir (same data and settings); the
            result equals an uninterrupted fit with the same seed.
        """
        samples = train_samples(Path(data)) if isinstance(data, (str, Path)) else list(data)
        if any(s.label != 0 for s in samples):
            raise DataError("the training data must be good images only (label 0); pass anomalies separately")
        labelled = anomaly_samples(Path(anomalies)) if isinstance(anomalies, (str, Path)) else list(anomalies or [])
        external_samples = image_folder(Path(external), label=1) if external is not None else []
        try:
            generators = [get_generator(name) for name in synthetic]
        except ValueError as e:
            raise SettingsError(str(e)) from None
        base = None
        if init is not None:
            base, base_config, _ = load_run(init, self.device)
            self.config.model, self.config.score = base_config.model, base_config.score
        if self.config.model.image_size is None:
            size = input_size_for([image_size(s.path) for s in samples])
            self.config.model = dataclasses.replace(self.config.model, image_size=size)
            log.info("input size %dx%d (height x width), from the training images' aspect ratio", *size)
        cfg = self.config
        t0 = time.perf_counter()
        train_idx, val_idx = split_validation(len(samples), cfg.train.val_fraction, cfg.train.seed)
        fitted = fit_on_features(cfg, samples, self.device, val_idx=val_idx, anomalies=labelled,
                                 external=external_samples, generators=generators, init=base,
                                 state_dir=checkpoint_dir, resume=resume, progress=self.progress)  # fmt: skip
        self.model_, self.history_ = fitted.model, fitted.history
        real = fitted.anomalies.of_kind("real").features if fitted.anomalies is not None else None
        self.thresholds_ = calibrate(fitted.model, fitted.val, fitted.train, real, cfg.train.false_alarm_rate,
                                     self.device)  # fmt: skip
        provenance = {
            "adtr_version": __version__,
            "data": {
                "train": file_list_summary([samples[i].path for i in train_idx]),
                "val": file_list_summary([samples[i].path for i in val_idx]),
                "anomaly_files": [str(s.path) for s in labelled + external_samples],
                "n_external": len(external_samples),
                "n_pixel_labelled": sum(s.mask_path is not None for s in labelled),
                "synthetic": list(synthetic),
                "init": str(init) if init is not None else None,
            },
            "fit_seconds": time.perf_counter() - t0,
            "feature_seconds": fitted.feature_seconds,
        }
        stats = score_stats(feature_scores(fitted.model, fitted.val, self.device)[0])
        self.record_ = RunRecord(cfg, self.thresholds_, stats, provenance, self.history_)
        return self

    @property
    def info_(self) -> dict[str, Any]:
        """The record as one flat dict (the layout before RunRecord): prefer `record_`."""
        r = self.record_
        return {**r.provenance, "score_stats": r.score_stats, "thresholds": r.thresholds.to_dict(),
                "history": r.history}  # fmt: skip

    # -- inference --------------------------------------------------------------------
    def _require_model(self) -> ADTR:
        if not hasattr(self, "model_"):
            raise RuntimeError("this detector is not fitted: call fit() or ADTRDetector.load()")
        return self.model_

    def predict(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 8,
        on_error: Callable[[Path, DataError], None] | None = None,
    ) -> list[Prediction]:
        """Score image files; maps come back at each image's original size.

        Without on_error an unreadable file raises DataError; with it, the file is reported
        as on_error(path, error) and the others are still scored. Holds every map: for many
        files, iterate over iter_predict() instead.
        """
        return list(self.iter_predict(paths, batch_size, on_error))

    def iter_predict(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 8,
        on_error: Callable[[Path, DataError], None] | None = None,
        keep_images: bool = False,
    ) -> Iterator[Prediction]:
        """Score image files one batch at a time, yielding one Prediction per file in order.

        Each file is decoded once (in 2 threads); only the current batch is in memory, so
        memory stays flat in the number of files. `anomaly_map` is (H, W) at the file's size;
        with keep_images, `image` holds the decoded RGB uint8 (H, W, 3), e.g. for an overlay.
        Errors as in predict(): DataError, or on_error(path, error) and the file is left out.
        """
        engine = self._engine().eval()
        size = self.config.model.image_size

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
        bar = tqdm(total=len(files), desc="predict", unit="img", disable=not self.progress)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                ok = []
                for path, item in zip(chunk, pool.map(decode, chunk), strict=True):
                    if isinstance(item, DataError):
                        on_error(path, item)  # type: ignore[misc]
                    else:
                        ok.append((path, *item))
                if ok:
                    with torch.no_grad():
                        out = engine(torch.stack([t for _, _, t in ok]).to(self.device))
                    scores = out.anomaly_score.cpu().tolist()
                    maps = out.anomaly_map.cpu().numpy()  # (B, h, w) at the model's input size
                    for (path, image, _), score, small in zip(ok, scores, maps, strict=True):
                        original = image.shape[:2] if isinstance(image, np.ndarray) else image
                        pred = self._prediction(str(path), float(score), resize_map(small, original))
                        if keep_images:
                            pred.image = image
                        bar.update(1)
                        yield pred
                bar.update(len(chunk) - len(ok))
        bar.close()

    def _engine(self):
        """The ONNX engine when use_onnx() was called, else the PyTorch model."""
        return getattr(self, "engine_", None) or self._require_model()

    def _prediction(self, name: str, score: float, anomaly_map: np.ndarray) -> Prediction:
        thr = self.thresholds_
        return Prediction(name, score, anomaly_map, float(thr.normalize(score)), thr.is_anomalous(score))

    @torch.no_grad()
    def predict_image(
        self, image: np.ndarray, name: str = "<image>", value_range: float | None = None, channel_order: str = "rgb"
    ) -> Prediction:
        """Score one image array, e.g. from a camera SDK, OpenCV or an upload.

        image: (H, W) grey, (H, W, 1), (H, W, 3), (H, W, 4) with alpha, or channel-first
            (1|3|4, H, W); uint8, uint16, or float with value_range (white = 1.0 or 255.0).
        channel_order: "rgb", or "bgr" for OpenCV arrays. Converted exactly as files are
            (data.images.to_rgb_uint8), so an array scores as its file does. Anything else
            raises DataError (a ValueError) naming the accepted shapes and dtypes.
        """
        image = to_rgb_uint8(image, name, value_range, channel_order)
        out = self._engine()(resize_image(image, self.config.model.image_size)[None].to(self.device))
        anomaly_map = resize_map(out.anomaly_map[0].cpu().numpy(), image.shape[:2])
        return self._prediction(name, float(out.anomaly_score[0]), anomaly_map)

    def test(
        self, data: str | Path | Sequence[Sample], batch_size: int = 8, report_dir: str | Path | None = None
    ) -> dict[str, Any]:
        """Metrics on labelled test data: an MVTec category / plain folder, or samples.

        With report_dir, also writes report_dir/index.html (report.py).
        """
        samples = test_samples(Path(data)) if isinstance(data, (str, Path)) else list(data)
        model = self._require_model()
        t0 = time.perf_counter()
        preds = predict_samples(model, samples, self.device, batch_size, self.progress)
        wall = time.perf_counter() - t0
        labels = np.array([s.label for s in samples])
        n_bad = int(labels.sum())
        result: dict[str, Any] = {"n_images": len(samples), "n_anomalous": n_bad, "skipped_metrics": {}}
        if 0 < n_bad < len(labels):
            result.update(image_metrics(preds.scores, labels))
        else:
            n_good = len(labels) - n_bad
            why = f"it needs both good and anomalous images; the test data has {n_good} good and {n_bad} anomalous"
            _skip_metrics(result, ["image_auroc", "image_f1_max"], why)
        _check_finite(samples, preds.scores, preds.maps)
        if has_masks(samples):
            masks = [
                read_mask(s.mask_path, size) if s.mask_path else np.zeros(size, dtype=bool)
                for s, size in zip(samples, preds.original_sizes, strict=True)
            ]
            _note_empty_masks(result, samples, masks)
            if not any(m.any() for m in masks) or all(m.all() for m in masks):
                _skip_pixel_metrics(result, "the masks hold no anomalous pixels, or no normal ones")
            else:
                # Maps are upsampled to each image's original size one at a time, as the metric reads them.
                result.update(pixel_metrics(_Resized(preds.maps, preds.original_sizes), masks))
        elif any(s.mask_path is not None for s in samples):
            _skip_pixel_metrics(result, "only some anomalous images have masks")
        elif n_bad == 0:
            _skip_pixel_metrics(result, "there are no anomalous images, so no defect pixels to find")
        else:
            _skip_pixel_metrics(result, "no masks found (expected ground_truth/<defect>/<name>_mask.png)")
        flagged = np.array([self.thresholds_.is_anomalous(v) for v in preds.scores])
        result["threshold"] = self.thresholds_.image
        if (labels == 0).any():
            result["false_alarm_rate_at_threshold"] = float(flagged[labels == 0].mean())
        else:
            _skip_metrics(result, ["false_alarm_rate_at_threshold"], "there are no good images")
        if (labels == 1).any():
            result["detection_rate_at_threshold"] = float(flagged[labels == 1].mean())
        else:
            _skip_metrics(result, ["detection_rate_at_threshold"], "there are no anomalous images")
        result["images_per_second"] = len(samples) / max(preds.model_seconds, 1e-9)
        result["images_per_second_with_decoding"] = len(samples) / max(wall, 1e-9)
        if report_dir is not None:
            from adtr.render import display_range
            from adtr.report import write_report

            vrange = display_range(self.record_.score_stats)
            result["report"] = str(
                write_report(report_dir, result, samples, preds.scores, preds.maps, self.thresholds_, vrange)
            )
        result["scores"] = [
            {"path": str(s.path), "label": s.label, "defect": s.defect, "score": float(v)}
            for s, v in zip(samples, preds.scores, strict=True)
        ]
        return result

    def use_onnx(self, path: str | Path) -> ADTRDetector:
        """Run predict() through onnxruntime with an exported model (adtr export)."""
        from adtr.export import OnnxModel

        self.engine_ = OnnxModel(path, self.config.model)
        return self

    # -- persistence ------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        """Write the run folder (checkpoint.save_run): weights, then config.json."""
        save_run(run_dir, self._require_model(), self.record_)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True) -> ADTRDetector:
        """A fitted detector from a run folder (either config.json layout); RunFolderError otherwise."""
        model, record = load_record(run_dir, device)
        det = cls(record.config.model, record.config.score, record.config.train, device=device, progress=progress)
        det.model_, det.record_, det.thresholds_, det.history_ = model, record, record.thresholds, record.history
        return det


def _check_finite(samples: Sequence[Sample], scores: np.ndarray, maps: Sequence[np.ndarray]) -> None:
    """Raise FloatingPointError naming the first image whose score or map is NaN or infinite.

    Metrics over such values mean nothing; the model, not the data, is at fault (a bug or a
    diverged fit), so this is not a user error.
    """
    for s, score, m in zip(samples, scores, maps, strict=True):
        if not np.isfinite(score) or not np.isfinite(m).all():
            raise FloatingPointError(
                f"{s.path}: the model's anomaly score or map is NaN or infinite; no metric can be computed"
            )


METRIC_NAMES = {
    "image_auroc": "image AUROC",
    "image_f1_max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "false_alarm_rate_at_threshold": "good flagged at threshold",
    "detection_rate_at_threshold": "anomalous flagged at threshold",
}


def _skip_metrics(result: dict[str, Any], metrics: Sequence[str], reason: str) -> None:
    """Record why each metric is missing in result["skipped_metrics"], and log one line per metric."""
    for key in metrics:
        result["skipped_metrics"][key] = reason
        log.warning("%s not computed: %s", METRIC_NAMES[key], reason)


def _skip_pixel_metrics(result: dict[str, Any], reason: str) -> None:
    """Say in the result and the log why pixel AUROC and AUPRO are missing."""
    result["pixel_metrics_skipped"] = reason
    _skip_metrics(result, ["pixel_auroc", "aupro"], reason)


def _note_empty_masks(result: dict[str, Any], samples: Sequence[Sample], masks: Sequence[np.ndarray]) -> None:
    """Warn about each anomalous image whose mask is all black: its pixels count as normal."""
    empty = [str(s.path) for s, m in zip(samples, masks, strict=True) if s.label == 1 and not m.any()]
    if not empty:
        return
    for path in empty:
        log.warning("%s: anomalous image with an empty (all black) mask: its pixels count as normal", path)
    result["empty_masks"] = empty
    result["pixel_metrics_note"] = (
        f"{len(empty)} of {int(sum(s.label for s in samples))} anomalous images have empty masks; "
        "their pixels count as normal in pixel AUROC and AUPRO"
    )


class _Resized(Sequence):
    """maps[i] upsampled to sizes[i] on access: full-resolution maps never all in memory."""

    def __init__(self, maps: list[np.ndarray], sizes: list[tuple[int, int]]):
        self.maps, self.sizes = maps, sizes

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int) -> np.ndarray:
        return resize_map(self.maps[i], self.sizes[i])
