"""ONNX export of the whole pipeline, and an onnxruntime engine with the model's interface.

The exported graph takes RGB images as float32 0..255, shape (batch, 3, H, W) at the run's
input size (resizing stays outside, as for the PyTorch model), and returns the anomaly map
(batch, H, W) and the image score (batch,): backbone, standardisation, transformer and
scoring are all inside. The batch dimension is dynamic.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from adtr.errors import RunFolderError
from adtr.fileio import atomic_write
from adtr.model import ADTR, AnomalyOutput

if TYPE_CHECKING:
    from adtr.detector import ADTRDetector

OPSET = 17


def export_onnx(model: ADTR, out: Path | str, metadata: dict | None = None, check: bool = True) -> float:
    """Write the model to an ONNX file atomically; return the max |score| difference found
    by onnxruntime against PyTorch on a random batch of 2 (when check is True, else 0)."""
    import onnx

    model = model.eval()
    h, w = model.cfg.image_size
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255

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
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(proto, str(tmp))

    atomic_write(out, write)
    if not check:
        return 0.0
    engine = OnnxModel(out, model.cfg)
    with torch.no_grad():
        ours = model(example).anomaly_score
    return float((engine(example).anomaly_score - ours).abs().max())


def export_run(detector: ADTRDetector, out: Path | str) -> float:
    """Export a fitted detector to `out` with its input size and thresholds as ONNX metadata.

    Returns the parity check's max image-score difference (export_onnx). The export runs on
    the CPU whatever the detector's device.
    """
    meta = {"image_size": list(detector.config.model.image_size), "thresholds": detector.thresholds_.to_dict()}
    return export_onnx(detector.model_.cpu(), out, metadata=meta)


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

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        anomaly_map, score = self.session.run(None, {"images": images.cpu().numpy().astype(np.float32)})
        return AnomalyOutput(torch.from_numpy(anomaly_map), torch.from_numpy(score))
