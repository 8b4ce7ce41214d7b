"""Which backend scores images: PyTorch, ONNX Runtime, or "auto", the fastest one that agrees.

"auto" (the default of predict, test, serve and ADTRDetector) runs ONNX Runtime on the
exported pipeline (export.py) when its image scores on export.check_images are within
1e-4 + 1e-5 x |score| (export.TOLERANCE, RELATIVE_TOLERANCE) of PyTorch fp32 and every check image
gets the same decision; else
PyTorch, with one logged line saying why. On 2 CPU cores ONNX Runtime scored 107.8 img/s
against 21-38 for PyTorch (results/deploy.md); `bench/speed.py` measures both.

The graph is cached in the run folder as RUN/model.onnx (GRAPH_FILE, the file `adtr export`
writes by default), written atomically at the end of fit (ADTRDetector.save) or on first
use for run folders written before. Its metadata holds the fingerprint of the weights and
settings it was built from: a graph whose fingerprint differs from the loaded model's is
rebuilt, so new weights never run through an old graph. Opening a cached graph re-checks
parity on this machine by running the graph alone on the check images (PyTorch's scores are
stored in it), a batch of 4. A run folder that cannot be written falls back to PyTorch
(auto) or is refused (onnx); a detector without a run folder builds its graph in a
temporary folder.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adtr.checkpoint import model_fingerprint
from adtr.errors import RunFolderError, SettingsError
from adtr.model import ADTR, AnomalyOutput

if TYPE_CHECKING:
    from adtr.export import OnnxModel, Parity
    from adtr.thresholds import Thresholds

log = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "onnx")
GRAPH_FILE = "model.onnx"

AUTO_HELP = (
    "auto runs ONNX Runtime on RUN/model.onnx (written at the end of fit or on first use, rebuilt when the "
    "weights change) when its image scores match PyTorch fp32 within 1e-4 + 1e-5 x |score| on check images "
    "with the same decisions, else PyTorch with a one-line notice; torch and onnx force one"
)


@dataclass(frozen=True)
class SelectedBackend:
    """The backend predict / test / serve run, and why."""

    name: str  # "torch" or "onnx"
    run: Callable[[torch.Tensor], AnomalyOutput]  # images (B, 3, H, W) float 0..255 -> map, score
    reason: str  # one line


def check_choice(choice: str) -> str:
    """`choice` if it is one of CHOICES; SettingsError otherwise."""
    if choice not in CHOICES:
        raise SettingsError(f"unknown backend {choice!r}; choose one of {', '.join(CHOICES)}")
    return choice


def select_backend(
    choice: str,
    model: ADTR,
    thresholds: Thresholds,
    run_dir: Path | str | None = None,
    device: torch.device | str = "cpu",
) -> SelectedBackend:
    """Resolve `choice` ("auto", "torch", "onnx") for a fitted model (module docstring).

    run_dir: where the graph is cached (None: built in a temporary folder, not kept).
    Raises SettingsError for "onnx" on a non-CPU device or without onnxruntime, and
    RunFolderError for "onnx" when run_dir cannot hold the graph. "onnx" runs even a graph
    that disagrees, with a warning; "auto" never does.
    """
    check_choice(choice)
    if choice == "torch":
        return SelectedBackend("torch", model, "forced (--backend torch)")
    if torch.device(device).type != "cpu":
        if choice == "onnx":
            raise SettingsError(f"--device {device}: the ONNX backend runs on the CPU only; drop --device or use torch")
        return SelectedBackend("torch", model, f"auto: PyTorch on {device} (ONNX Runtime runs on the CPU here)")

    def fallback(why: str) -> SelectedBackend:
        log.warning("backend auto: %s; scoring with PyTorch", why)
        return SelectedBackend("torch", model, f"auto: {why}")

    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        if choice == "onnx":
            raise SettingsError(f"--backend onnx: {e.name} is not installed (pip install {e.name})") from None
        return fallback(f"{e.name} is not installed")
    try:
        engine, parity = _cached_graph(model, thresholds, run_dir)
    except OSError as e:  # the run folder is read-only, full, ...
        target = Path(run_dir or ".") / GRAPH_FILE
        if choice == "onnx":
            raise RunFolderError(
                f"{target}: cannot write the ONNX graph ({e.strerror or e}); write it elsewhere with "
                "`adtr export RUN --out FILE` and pass --onnx FILE"
            ) from None
        return fallback(f"cannot write {target} ({e.strerror or e})")
    except Exception as e:  # an export the tracer or onnxruntime cannot handle: auto must still score
        if choice == "onnx":
            raise
        return fallback(f"the ONNX export failed ({type(e).__name__}: {e})")
    summary = f"max image-score difference {parity.max_difference:.1e} on 4 check images"
    if parity.agrees:
        return SelectedBackend("onnx", engine, f"ONNX Runtime agrees with PyTorch fp32 ({summary})")
    why = f"ONNX Runtime disagrees with PyTorch fp32 ({summary}, tolerance 1e-4 + 1e-5 x |score|" + (
        ")" if parity.same_decisions else ", decisions differ)"
    )
    if choice == "onnx":
        log.warning("backend onnx: %s; running it as asked", why)
        return SelectedBackend("onnx", engine, f"forced (--backend onnx); {why}")
    return fallback(why)


def _cached_graph(model: ADTR, thresholds: Thresholds, run_dir: Path | str | None) -> tuple[OnnxModel, Parity]:
    """The graph of `model` and its parity: RUN/model.onnx when it was built from these weights,
    else exported anew (into run_dir, or a temporary folder when run_dir is None)."""
    from adtr.export import FINGERPRINT_KEY, OnnxModel, check_parity, export_onnx, run_metadata

    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="adtr-graph-") as tmp:
            export_onnx(model, Path(tmp) / GRAPH_FILE, check=False)
            engine = OnnxModel(Path(tmp) / GRAPH_FILE, model.cfg)  # the session holds the graph in memory
        return engine, check_parity(engine, thresholds)
    path = Path(run_dir) / GRAPH_FILE
    engine = None
    if path.is_file():
        try:
            engine = OnnxModel(path, model.cfg)
        except Exception as e:  # onnxruntime's errors have no common class; a damaged file is rebuilt
            log.info("%s: unreadable (%s); rebuilding it", path, e)
    if engine is None or engine.metadata.get(FINGERPRINT_KEY) != model_fingerprint(model):
        if engine is not None:
            log.info("%s: built from other weights or settings; rebuilding it", path)
        export_onnx(model, path, metadata=run_metadata(model, thresholds), check=False)
        engine = OnnxModel(path, model.cfg)
    return engine, check_parity(engine, thresholds)
