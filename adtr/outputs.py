"""Files the CLI writes: `adtr test --json` (write_metrics) and `adtr predict`, whose results
are written one image at a time, so that an interrupted run keeps them:

    OUT/heatmaps/<name>.png   overlay of each image's anomaly map (render.py), written atomically
    OUT/scores.csv            one row per scored image, appended and flushed as it finishes;
                              input_warnings: the ways the image departs from the training
                              images (drift.py), "; "-joined (a list in the JSON files)
    OUT/scores.jsonl          the same rows as JSON lines, appended and flushed likewise
    OUT/scores.json           every row plus the files that failed and the backend, written
                              atomically at the end

Each row names the backend that scored it ("torch" or "onnx", backend.py).

A row is written after its heatmap, so a row on disk means a finished image. With resume,
images whose row (and heatmap, when heatmaps are wanted) exist are skipped; a row cut short
by the interruption is dropped and its image scored again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adtr.data.folder import find_images
from adtr.data.images import DataError
from adtr.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from adtr.render import defect_boxes, display_range, heatmap_png

if TYPE_CHECKING:
    import numpy as np

    from adtr.detector import ADTRDetector

log = logging.getLogger(__name__)

SCORES_CSV, SCORES_JSONL, SCORES_JSON, HEATMAPS = "scores.csv", "scores.jsonl", "scores.json", "heatmaps"
FIELDS = ["path", "anomaly_score", "normalized_score", "is_anomalous", "defect_boxes", "input_warnings", "backend",
          "heatmap"]  # fmt: skip


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """`adtr test --json`: metrics and per-image scores as one JSON file, written atomically."""
    atomic_write_json(path, metrics)


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Image files named by paths: files as given, folders searched as data/folder.find_images does.

    A missing path raises DataError; a folder without images is logged and skipped; a named
    file that is not an image is kept, so that scoring reports it as a failure.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found:
                log.warning("%s: no image files in this folder", p)
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: file not found")
    unique = []
    for f in files:  # a file named twice (or inside a named folder too) is scored once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def output_names(files: Sequence[Path]) -> list[str]:
    """Unique heatmap names from paths relative to their common folder (a/b.png -> a__b)."""
    resolved = [Path(f).resolve() for f in files]
    parents = [str(r.parent) for r in resolved]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    names = ["__".join(r.relative_to(common).with_suffix("").parts) for r in resolved]
    counts = Counter(names)
    # Files that differ only by extension (x.png, x.jpg) keep it, so no heatmap overwrites another.
    return [
        n if counts[n] == 1 else "__".join(r.relative_to(common).parts).replace(".", "_")
        for n, r in zip(names, resolved, strict=True)
    ]


@dataclass
class PredictSummary:
    rows: list[dict[str, Any]]  # every finished row, resumed ones first
    failed: list[dict[str, str]] = field(default_factory=list)  # {path, error} of unreadable files
    skipped: int = 0  # images with finished outputs from an earlier run (resume)
    backend: str = ""  # what scored this run's images: "torch" or "onnx"

    @property
    def n_anomalous(self) -> int:
        return sum(bool(r["is_anomalous"]) for r in self.rows)

    @property
    def n_warned(self) -> int:
        """Rows whose image departs from the training images (input_warnings)."""
        return sum(bool(r.get("input_warnings")) for r in self.rows)


def finished_rows(out_dir: Path, heatmaps: bool) -> list[dict[str, Any]]:
    """Rows of scores.jsonl whose image is finished (its heatmap exists, when heatmaps are wanted)."""
    path = Path(out_dir) / SCORES_JSONL
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last row of a killed run may be cut short
            continue
        if heatmaps and not (row.get("heatmap") and Path(row["heatmap"]).is_file()):
            continue
        rows.append(row)
    return rows


def _csv_text(rows: list[dict[str, Any]], fieldnames: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(_csv_row(r) for r in rows)
    return out.getvalue()


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as scores.csv holds it: the input warnings joined into one cell."""
    return {**row, "input_warnings": "; ".join(row.get("input_warnings") or [])}


def write_rows(folder: Path, rows: list[dict[str, Any]], heatmaps: bool) -> None:
    """folder/scores.csv and scores.jsonl holding exactly rows, each written atomically."""
    atomic_write_text(Path(folder) / SCORES_CSV, _csv_text(rows, FIELDS if heatmaps else FIELDS[:-1]))
    atomic_write_text(Path(folder) / SCORES_JSONL, "".join(json.dumps(r) + "\n" for r in rows))


def _write_heatmap(target: Path, image: np.ndarray, anomaly_map: np.ndarray, vrange: tuple[float, float]) -> None:
    atomic_write_bytes(target, heatmap_png(image, anomaly_map, vrange))


def predict_to_folder(
    detector: ADTRDetector,
    files: Sequence[Path],
    out_dir: Path,
    heatmaps: bool = True,
    resume: bool = False,
    batch_size: int = 8,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    run_dir: Path | None = None,
    names: Mapping[str, str] | None = None,
    scores_dir: Path | None = None,
    letterbox: bool = False,
) -> PredictSummary:
    """Score files with detector.iter_predict and write each result as it finishes (layout above).

    resume: skip files with finished outputs in out_dir (rows of files not asked for now are
    dropped); otherwise earlier scores files are replaced. on_result(row) is called after
    each row is on disk. run_dir is named in scores.json. Unreadable files are logged and
    listed in the summary's `failed`; memory stays flat in the number of files.
    One rank of a sharded predict (adtr/sharding.py) passes the heatmap names of all files
    (names: path -> name, default output_names(files)) and its own scores_dir for the scores
    files (default out_dir); heatmaps always go to out_dir/heatmaps. letterbox as in
    ADTRDetector.iter_predict.
    """
    out_dir = Path(out_dir)
    scores_dir = out_dir if scores_dir is None else Path(scores_dir)
    fieldnames = FIELDS if heatmaps else FIELDS[:-1]
    wanted = set(map(str, files))
    rows = [r for r in finished_rows(scores_dir, heatmaps) if r["path"] in wanted] if resume else []
    # Start both append files from the finished rows alone: consistent, and no cut-short line.
    write_rows(scores_dir, rows, heatmaps)
    done = {r["path"] for r in rows}
    todo = [Path(f) for f in files if str(f) not in done]
    backend = detector.selected_backend().name
    summary = PredictSummary(rows, skipped=len(files) - len(todo), backend=backend)
    if summary.skipped:
        log.info("%d images already scored in %s: skipped", summary.skipped, out_dir)
    if names is None:
        names = dict(zip(map(str, files), output_names(files), strict=True))
    vrange = display_range(detector.record_.score_stats)

    def failed(path: Path, error: DataError) -> None:
        log.error("%s", error)
        summary.failed.append({"path": str(path), "error": str(error)})

    def finish(row: dict[str, Any]) -> None:  # a row on disk means a finished image: after its heatmap
        writer.writerow(_csv_row(row))
        csv_file.flush()
        jsonl_file.write(json.dumps(row) + "\n")
        jsonl_file.flush()
        rows.append(row)
        if on_result is not None:
            on_result(row)

    # Heatmaps are coloured, PNG-encoded and written in a thread while the model scores the
    # next images (zlib and ONNX Runtime release the GIL; encoding a 900x900 overlay costs
    # about as much as scoring it). At most batch_size wait, each holding its full-size image.
    pending: deque[tuple[Future | None, dict[str, Any]]] = deque()

    def drain(keep: int) -> None:
        """Finish rows in order while their heatmap is done, or until at most `keep` wait."""
        while pending and (len(pending) > keep or pending[0][0] is None or pending[0][0].done()):
            job, row = pending.popleft()
            if job is not None:
                job.result()  # raises the writer's error here
            finish(row)

    with (
        open(scores_dir / SCORES_CSV, "a", newline="", encoding="utf-8") as csv_file,
        open(scores_dir / SCORES_JSONL, "a", encoding="utf-8") as jsonl_file,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="adtr-heatmaps") as heatmap_writer,
    ):
        writer = csv.DictWriter(csv_file, fieldnames=fieldnames, extrasaction="ignore")
        for pred in detector.iter_predict(todo, batch_size, on_error=failed, keep_images=heatmaps, letterbox=letterbox):
            row: dict[str, Any] = {
                "path": pred.path,
                "anomaly_score": pred.anomaly_score,
                "normalized_score": pred.normalized_score,
                "is_anomalous": pred.is_anomalous,
                "defect_boxes": json.dumps(defect_boxes(detector.thresholds_, pred.anomaly_map, pred.is_anomalous)),
                "input_warnings": pred.input_warnings,
                "backend": backend,
            }
            job = None
            if heatmaps:
                target = out_dir / HEATMAPS / f"{names[pred.path]}.png"
                job = heatmap_writer.submit(_write_heatmap, target, pred.image, pred.anomaly_map, vrange)
                row["heatmap"] = str(target)
            pending.append((job, row))
            drain(keep=batch_size)
        drain(keep=0)
    doc = {"run": str(run_dir), "backend": backend, "predictions": rows, "failed": summary.failed}
    atomic_write_json(scores_dir / SCORES_JSON, doc)
    return summary
