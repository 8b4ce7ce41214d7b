"""The Python API, mirroring the CLI: fit, predict, test, save, load, update.

    from adtr import ADTRDetector
    det = ADTRDetector().fit("mvtec/bottle")        # trains on train/good
    metrics = det.test("mvtec/bottle")              # image/pixel AUROC, AUPRO, F1-max
    preds = det.predict(["part.png"])               # score and map per image
    det.save("runs/bottle"); det = ADTRDetector.load("runs/bottle")
    new = det.update(anomalies="new_defects/")      # continued without the training images
    new.save("runs/bottle_v2")                      # runs/bottle is left as it was

`anomaly_score` and `anomaly_map`: higher means more anomalous. Scoring runs the backend
that `backend` names ("auto": ONNX Runtime where it agrees with PyTorch, backend.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adtr.backend import SelectedBackend, check_choice, select_backend
from adtr.checkpoint import RunRecord, load_record, save_run
from adtr.config import MODEL_PRESETS, ModelConfig, RunConfig, ScoreConfig, TrainConfig
from adtr.data.images import to_rgb_uint8
from adtr.data.mvtec import test_samples
from adtr.data.samples import Sample
from adtr.drift import input_warnings
from adtr.engine import predict_samples
from adtr.errors import DataError, SettingsError
from adtr.evaluate import evaluate, score_rows
from adtr.fit import fit_run
from adtr.model import ADTR
from adtr.predict import Prediction, Scoring, iter_predictions, predict_array
from adtr.update import DEFAULT_STEPS, update_run

log = logging.getLogger(__name__)


class ADTRDetector:
    """ADTR anomaly detector: a facade over fit.py, update.py, predict.py, evaluate.py and checkpoint.py.

    Learned state ends in `_` and exists after fit or load: model_ (ADTR), record_ (the run's
    checkpoint.RunRecord: settings, calibration, provenance, history, replay features, input
    profile), and from it thresholds_, history_ and inputs_ (drift.InputProfile of the training
    images; None for runs saved before it, which skip the input checks); run_dir_ is the run
    folder it was saved to or loaded from (None after fit or update; update() names it as the
    parent), and backend_ the SelectedBackend, chosen on first use (selected_backend()).

    backend: what scores images: "auto" (default: ONNX Runtime where its scores match PyTorch
    fp32 within 1e-4 + 1e-5 x |score|, with the graph cached in the run folder; else PyTorch),
    "torch" or "onnx".
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        score: ScoreConfig | None = None,
        train: TrainConfig | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
        backend: str = "auto",
    ):
        self.backend = check_choice(backend)
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
        fitted = fit_run(self.config, data, self.device, anomalies=anomalies, synthetic=synthetic, external=external,
                         init=init, state_dir=checkpoint_dir, resume=resume, progress=self.progress)  # fmt: skip
        self.run_dir_ = None  # new weights: no run folder (and no cached graph) until save()
        return self._adopt(*fitted)

    def update(
        self,
        anomalies: str | Path | Sequence[Sample] | None = None,
        good: str | Path | Sequence[Sample] | None = None,
        external: str | Path | Sequence[Sample] | None = None,
        steps: int = DEFAULT_STEPS,
        allow_forgetting: bool = False,
        head_gain: float | None = None,
        retrain: str = "auto",
    ) -> ADTRDetector:
        """A new detector: this saved run continued with new data, without its training images
        (update.update_run; save it to a new folder). This detector and its folder are unchanged.

        anomalies: new labelled defects (as in fit). good: new good images (an MVTec category or
            folder with good/, or a plain folder of images). external: unrelated images.
        steps: optimisation steps from this run's weights. head_gain: the defect head's weight in
        the map instead of this run's (ScoreConfig.head_gain). retrain: "auto", "always" or
        "never": whether new good images train the reconstructor (auto: where it cannot rebuild
        them, update.reconstruction_check). Raises ForgettingError when more of
        this run's validation good images would be flagged (false-alarm rate above this run's
        + 1 point), unless allow_forgetting; RunFolderError for a run saved before adtr kept
        replay features; SettingsError when called before save() or load().
        """
        self._require_model()
        if getattr(self, "run_dir_", None) is None:
            raise SettingsError("save() this detector or load() it first: an update records its parent's folder")
        model, record = update_run(self.model_, self.record_, self.run_dir_, self.device, anomalies=anomalies,
                                   good=good, external=external, steps=steps, allow_forgetting=allow_forgetting,
                                   head_gain=head_gain, retrain=retrain, progress=self.progress)  # fmt: skip
        det = ADTRDetector(record.config.model, record.config.score, record.config.train, self.device, self.progress,
                           self.backend)  # fmt: skip
        det.run_dir_ = None  # new weights: no run folder until save()
        return det._adopt(model, record)

    def _adopt(self, model: ADTR, record: RunRecord) -> ADTRDetector:
        """Take a fitted model and its record (from fit_run or a run folder) as learned state."""
        self.model_, self.record_ = model, record
        self.config, self.thresholds_, self.history_ = record.config, record.thresholds, record.history
        self.inputs_ = record.inputs
        self.backend_: SelectedBackend | None = None  # chosen on first use, for these weights
        return self

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
        letterbox: bool = False,
    ) -> list[Prediction]:
        """Score image files; maps come back at each image's original size.

        Without on_error an unreadable file raises DataError; with it, the file is reported
        as on_error(path, error) and the others are still scored. Holds every map: for many
        files, iterate over iter_predict() instead. letterbox as in iter_predict().
        """
        return list(self.iter_predict(paths, batch_size, on_error, letterbox=letterbox))

    def iter_predict(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 8,
        on_error: Callable[[Path, DataError], None] | None = None,
        keep_images: bool = False,
        letterbox: bool = False,
    ) -> Iterator[Prediction]:
        """Score image files one batch at a time, yielding one Prediction per file in order.

        Each file is decoded once, in 2 threads, one batch ahead of the model; at most two
        batches are in memory, so memory stays flat in the number of files. `anomaly_map` is (H, W) at the file's size;
        with keep_images, `image` holds the decoded RGB uint8 (H, W, 3), e.g. for an overlay.
        Each image is checked against the training images (drift.py): departures are logged
        and listed in `input_warnings`. letterbox: keep each image's aspect ratio (padding the
        rest of the model input, which is not scored) instead of stretching it.
        Errors as in predict(): DataError, or on_error(path, error) and the file is left out;
        SettingsError for letterbox with the pooled_residual image score.
        """
        self.check_letterbox(letterbox)
        return iter_predictions(self._backend().eval(), paths, self.config.model.image_size, self.device,
                                self.thresholds_, batch_size, on_error, keep_images, self.progress,
                                **self._scoring(letterbox))  # fmt: skip

    def _scoring(self, letterbox: bool) -> dict[str, Any]:
        """The keyword arguments of predict.iter_predictions / predict_array for this run."""
        return {"score": self.config.score, "profile": self.inputs_, "letterbox": letterbox,
                "image_scorer": self._require_model().uses_image_scorer}

    def check_letterbox(self, letterbox: bool) -> None:
        """SettingsError, before any image is read, when this run's image score cannot be letterboxed."""
        Scoring(self.config.model.image_size, self.thresholds_, **self._scoring(letterbox))

    def selected_backend(self) -> SelectedBackend:
        """The backend predict / test run (name, callable, reason), chosen on the first call by
        backend.select_backend from `backend`, or set by use_onnx(). With "auto" this may write
        RUN/model.onnx; errors as select_backend (SettingsError, RunFolderError for "onnx")."""
        if getattr(self, "backend_", None) is None:
            self.backend_ = select_backend(self.backend, self._require_model(), self.thresholds_,
                                           getattr(self, "run_dir_", None), self.device)  # fmt: skip
        return self.backend_

    def _backend(self):
        return self.selected_backend().run

    def predict_image(
        self,
        image: np.ndarray,
        name: str = "<image>",
        value_range: float | None = None,
        channel_order: str = "rgb",
        letterbox: bool = False,
    ) -> Prediction:
        """Score one image array, e.g. from a camera SDK, OpenCV or an upload.

        image: (H, W) grey, (H, W, 1), (H, W, 3), (H, W, 4) with alpha, or channel-first
            (1|3|4, H, W); uint8, uint16, or float with value_range (white = 1.0 or 255.0).
        channel_order: "rgb", or "bgr" for OpenCV arrays. Converted exactly as files are
            (data.images.to_rgb_uint8), so an array scores as its file does. Anything else
            raises DataError (a ValueError) naming the accepted shapes and dtypes.
        letterbox and input_warnings: as in iter_predict().
        """
        image = to_rgb_uint8(image, name, value_range, channel_order)
        return predict_array(self._backend(), image, self.config.model.image_size, self.device, self.thresholds_, name,
                             **self._scoring(letterbox))  # fmt: skip

    def test(
        self,
        data: str | Path | Sequence[Sample],
        batch_size: int = 8,
        report_dir: str | Path | None = None,
        letterbox: bool = False,
    ) -> dict[str, Any]:
        """Metrics on labelled test data: an MVTec category / plain folder, or samples.

        result["calibration"] holds the thresholds and what they rest on (source, number of
        calibration images, implied false-alarm rate, a sentence). With report_dir, also writes
        report_dir/index.html (report.py). Images that depart
        from the training images are logged and listed in result["input_warnings"] (path ->
        warnings) and in their score rows; letterbox as in iter_predict().
        """
        samples = test_samples(Path(data)) if isinstance(data, (str, Path)) else list(data)
        self.check_letterbox(letterbox)
        t0 = time.perf_counter()
        preds = predict_samples(self._backend(), samples, self.device, batch_size, self.progress,
                                letterbox=letterbox, score=self.config.score)  # fmt: skip
        result = evaluate(samples, preds, self.thresholds_, wall_seconds=time.perf_counter() - t0)
        result["backend"] = self.selected_backend().name
        # what the decisions rest on, so a report on a tiny calibration set says so (issue 14)
        result["calibration"] = {**self.thresholds_.to_dict(), "description": self.thresholds_.describe()}
        names = [samples[i].path for i in preds.indices]
        warnings = input_warnings(self.inputs_, names, preds.infos, letterbox) if preds.infos else {}
        if warnings:
            result["input_warnings"] = warnings
        if report_dir is not None:
            from adtr.render import display_range
            from adtr.report import write_report

            vrange = display_range(self.record_.score_stats)
            result["report"] = str(
                write_report(report_dir, result, samples, preds.scores, preds.maps, self.thresholds_, vrange)
            )
        result["scores"] = score_rows(samples, preds.scores, warnings)
        return result

    def use_onnx(self, path: str | Path) -> ADTRDetector:
        """Score through onnxruntime with this exported graph (adtr export); a graph built from
        other weights or settings than this run's (its fingerprint), or whose scores on the check
        images disagree with those it was exported with, is used all the same, with a warning."""
        from adtr.checkpoint import model_fingerprint
        from adtr.export import FINGERPRINT_KEY, OnnxModel, check_parity

        engine = OnnxModel(path, self.config.model)
        fingerprint = engine.metadata.get(FINGERPRINT_KEY)
        if fingerprint is None:
            log.warning("%s: exported without a fingerprint (before adtr stored one): whether it is this run's "
                        "model cannot be checked", path)  # fmt: skip
        elif fingerprint != model_fingerprint(self._require_model()):
            log.warning("%s: built from other weights or settings than this run's (its fingerprint differs): "
                        "its scores are not this run's", path)  # fmt: skip
        parity = check_parity(engine, self.thresholds_)
        if not parity.agrees:
            log.warning("%s: ONNX Runtime's scores differ from those the graph was exported with (max difference "
                        "%.1e on the check images): another onnxruntime or a broken file?", path,
                        parity.max_difference)  # fmt: skip
        self.backend_ = SelectedBackend("onnx", engine, f"{path} (--onnx)")
        return self

    # -- persistence ------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        """Write the run folder (checkpoint.save_run): weights, then config.json; then, unless
        backend is "torch", the parity-checked ONNX graph the backend runs (RUN/model.onnx)."""
        save_run(run_dir, self._require_model(), self.record_)
        self.run_dir_, self.backend_ = Path(run_dir), None
        if self.backend != "torch":
            self.selected_backend()

    @classmethod
    def load(
        cls, run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True, backend: str = "auto"
    ) -> ADTRDetector:
        """A fitted detector from a run folder (either config.json layout); RunFolderError otherwise.

        The backend is chosen on first use (selected_backend()), so loading stays cheap.
        """
        model, record = load_record(run_dir, device)
        det = cls(record.config.model, record.config.score, record.config.train, device, progress, backend)
        det._adopt(model, record)
        det.run_dir_ = Path(run_dir)
        return det
