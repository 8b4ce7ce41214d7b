"""ONNX export of the whole pipeline, and an onnxruntime engine with the model's interface.

The exported graph takes RGB images as float32 0..255, shape (batch, 3, H, W) at the run's
input size (resizing stays outside, as for the PyTorch model), and returns the anomaly map
(batch, H, W) and the image score (batch,): backbone, standardisation, transformer and
scoring are all inside. The batch dimension is dynamic.

Every graph carries, in its metadata, the fingerprint of the weights and settings it was
built from (checkpoint.model_fingerprint) and PyTorch fp32's image scores on `check_images`:
`check_parity` then compares ONNX Runtime with PyTorch on any machine by running the graph
alone (DETR's test_all.py checks its export against onnxruntime within a tolerance likewise).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adtr.checkpoint import model_fingerprint
from adtr.errors import RunFolderError
from adtr.fileio import atomic_write
from adtr.model import ADTR, AnomalyOutput

if TYPE_CHECKING:
    from adtr.detector import ADTRDetector
    from adtr.thresholds import Thresholds

OPSET = 17
# The one decision rule (thresholds.py), stated in the graph's metadata.
DECISION_RULE = "anomalous when anomaly_score >= thresholds.image; defect pixel when anomaly_map >= thresholds.pixel"
# Largest accepted |ONNX Runtime - PyTorch fp32| image score: TOLERANCE + RELATIVE_TOLERANCE x
# |PyTorch's score|. Float32 rounding grows with the magnitude: a run whose scores are standardised
# by small per-position variances (bottle: the check images score 257-332) differs by 1.2e-4,
# about 5e-7 of the score, which the absolute 1e-4 alone refused.
TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-5
FINGERPRINT_KEY = "adtr_model_sha256"  # metadata: checkpoint.model_fingerprint of the exported model
REFERENCE_KEY = "adtr_check_scores"  # metadata: PyTorch fp32 image scores of check_images


def check_images(size: tuple[int, int]) -> torch.Tensor:
    """Four fixed RGB images (4, 3, H, W), float 0..255: mid grey, a colour ramp, a pseudo-random
    texture and grey with a bright square. Integer arithmetic only, no random generator, so
    any machine and library version rebuilds them bit for bit."""
    h, w = size
    i = torch.arange(h, dtype=torch.int64)[None, :, None]
    j = torch.arange(w, dtype=torch.int64)[None, None, :]
    c = torch.arange(3, dtype=torch.int64)[:, None, None]
    grey = torch.full((3, h, w), 128, dtype=torch.int64)
    ramp = ((i * 255) // max(h - 1, 1) + (j * 255) // max(w - 1, 1)) // 2 + 40 * c - 40
    texture = (i * 7919 + j * 104729 + c * 1299709) ** 2 % 65521 % 256
    spot = grey.clone()
    spot[:, h // 3 : h // 2, w // 3 : w // 2] = 250
    images = torch.stack([grey, ramp.expand(3, h, w), texture, spot])
    return images.clamp(0, 255).float()


@torch.no_grad()
def reference_scores(model: ADTR) -> list[float]:
    """PyTorch fp32 image scores of check_images at the model's input size (4 floats)."""
    return model.eval()(check_images(model.cfg.image_size)).anomaly_score.tolist()


def export_onnx(model: ADTR, out: Path | str, metadata: dict | None = None, check: bool = True) -> float:
    """Write the model to an ONNX file atomically, with `metadata` plus the model's fingerprint
    and its PyTorch scores on check_images; return the max |score| difference of onnxruntime
    against those scores (when check is True, else 0; check_parity judges it against
    TOLERANCE + RELATIVE_TOLERANCE x |score|). The export runs on the CPU."""
    import onnx

    model = model.cpu().eval()
    example = check_images(model.cfg.image_size)[:1]  # any batch traces the same graph; 1 is quickest
    meta = {**(metadata or {}), FINGERPRINT_KEY: model_fingerprint(model), REFERENCE_KEY: reference_scores(model)}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=["anomaly_map", "anomaly_score"],
                dynamic_axes={
                    "images": {0: "batch"},
                    "anomaly_map": {0: "batch"},
                    "anomaly_score": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(proto, str(tmp))

    atomic_write(out, write)
    if not check:
        return 0.0
    return check_parity(OnnxModel(out, model.cfg)).max_difference


def export_run(detector: ADTRDetector, out: Path | str) -> Parity:
    """Export a fitted detector to `out` with its input size and thresholds as ONNX metadata.

    Returns the written graph's parity with PyTorch (check_parity, with the run's thresholds).
    The export runs on the CPU whatever the detector's device.
    """
    export_onnx(detector.model_, out, metadata=run_metadata(detector.model_, detector.thresholds_), check=False)
    return check_parity(OnnxModel(out, detector.model_.cfg), detector.thresholds_)


def run_metadata(model: ADTR, thresholds: Thresholds) -> dict[str, Any]:
    """What a graph of a run carries besides export_onnx's keys: input size, thresholds and the
    decision rule (DECISION_RULE), for consumers of the ONNX file alone."""
    return {"image_size": list(model.cfg.image_size), "thresholds": thresholds.to_dict(), "decision": DECISION_RULE}


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against PyTorch fp32 on check_images."""

    max_difference: float  # max |image score difference|; inf when the graph holds no reference
    same_decisions: bool  # every check image on the same side of the image threshold
    within_tolerance: bool = False  # every difference <= TOLERANCE + RELATIVE_TOLERANCE x |score|

    @property
    def agrees(self) -> bool:
        return self.within_tolerance and self.same_decisions


def check_parity(engine: OnnxModel, thresholds: Thresholds | None = None) -> Parity:
    """Run the graph on check_images and compare with the PyTorch scores stored in it at export.

    Only ONNX Runtime runs (one batch of 4): PyTorch's side was computed by export_onnx, from
    the weights the graph was built from (whether those are a run's is the fingerprint's
    question, FINGERPRINT_KEY). A graph without stored scores (written before they were) gets an
    infinite difference.
    """
    reference = engine.metadata.get(REFERENCE_KEY)
    if not isinstance(reference, list) or len(reference) != 4:
        return Parity(math.inf, False)
    got = engine(check_images(engine.cfg.image_size)).anomaly_score.double().tolist()
    diff = max(abs(a - b) for a, b in zip(got, reference, strict=True))
    within = all(abs(a - b) <= TOLERANCE + RELATIVE_TOLERANCE * abs(b) for a, b in zip(got, reference, strict=True))
    same = thresholds is None or all(
        thresholds.is_anomalous(a) == thresholds.is_anomalous(b) for a, b in zip(got, reference, strict=True)
    )
    return Parity(diff if math.isfinite(diff) else math.inf, same, within)  # NaN: not within


class OnnxModel:
    """onnxruntime session that quacks like ADTR for inference: cfg, eval(), __call__."""

    def __init__(self, path: Path | str, cfg, threads: int | None = None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise RunFolderError(f"{path}: ONNX model not found (create it with adtr export)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.cfg = cfg
        self.path = Path(path)

    @property
    def metadata(self) -> dict[str, Any]:
        """The graph's metadata (export_onnx's keys and the caller's), values decoded from JSON."""
        out: dict[str, Any] = {}
        for key, value in self.session.get_modelmeta().custom_metadata_map.items():
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
        return out

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        anomaly_map, score = self.session.run(None, {"images": images.cpu().numpy().astype(np.float32)})
        return AnomalyOutput(torch.from_numpy(anomaly_map), torch.from_numpy(score))
