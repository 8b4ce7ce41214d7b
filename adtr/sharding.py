"""`adtr predict` over the ranks of a process group (torchrun, adtr/distributed.py).

The files still to score are sorted by path and split into one contiguous block per rank;
each rank streams its block through outputs.predict_to_folder, so its rows are on disk as
each image finishes:

    OUT/heatmaps/<name>.png         written by the rank that scored the image (names from the
                                    whole file list, as one process names them)
    OUT/parts/rank-R/scores.csv     rank R's rows, appended and flushed as they finish
    OUT/parts/rank-R/scores.jsonl   the same rows as JSON lines
    OUT/parts/rank-R/scores.json    rank R's rows and failed files, when its block is done

After a barrier, rank 0 merges them into OUT/scores.csv, scores.jsonl and scores.json
(atomically, in the order one process writes them: the order of the file list) and removes
OUT/parts, so the outputs are those of a single-process run. With resume, rank 0 first folds
the finished rows of OUT/ and of every OUT/parts/rank-*/ (from a run with any number of
ranks) into OUT/scores.jsonl; those files are skipped and the others are split again.
Every rank writes under OUT, so with several machines OUT must be on a shared file system.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adtr import distributed
from adtr.fileio import atomic_write_json
from adtr.outputs import SCORES_JSON, PredictSummary, finished_rows, output_names, predict_to_folder, write_rows

if TYPE_CHECKING:
    from adtr.detector import ADTRDetector

log = logging.getLogger(__name__)

PARTS = "parts"


def part_dir(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / PARTS / f"rank-{rank}"


def collect(out_dir: Path, files: Sequence[Path], heatmaps: bool) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(finished rows, failed files) of OUT and all its parts, for the files asked for, each
    file once, in the order of files. A file that failed and was then scored counts as scored."""
    order = {str(f): i for i, f in enumerate(files)}
    rows: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, str]] = {}
    parts = sorted((Path(out_dir) / PARTS).glob("rank-*"))
    for folder in [Path(out_dir), *parts]:
        for row in finished_rows(folder, heatmaps):
            if row["path"] in order:
                rows.setdefault(row["path"], row)
        if folder != Path(out_dir) and (folder / SCORES_JSON).is_file():
            for item in json.loads((folder / SCORES_JSON).read_text(encoding="utf-8"))["failed"]:
                if item["path"] in order:
                    failed.setdefault(item["path"], item)
    still_failed = [item for p, item in failed.items() if p not in rows]
    return sorted(rows.values(), key=lambda r: order[r["path"]]), sorted(still_failed, key=lambda r: order[r["path"]])


def predict_sharded(
    detector: ADTRDetector,
    files: Sequence[Path],
    out_dir: Path,
    heatmaps: bool = True,
    resume: bool = False,
    batch_size: int = 8,
    run_dir: Path | None = None,
    letterbox: bool = False,
) -> PredictSummary:
    """Score files on every rank of the process group, each rank its block (layout above).

    Called by every rank with the same files. Returns, on every rank, the summary of the
    whole run (rows and failed files of all ranks, in the order of files; skipped: files
    finished by an earlier run). Errors and letterbox as outputs.predict_to_folder.
    """
    out_dir = Path(out_dir)
    backend = detector.selected_backend().name
    if distributed.is_main():  # before any rank starts: one consistent OUT/scores.jsonl, no parts
        fold_parts(out_dir, files, heatmaps, resume)
    distributed.barrier()
    done = {r["path"] for r in finished_rows(out_dir, heatmaps)} if resume else set()
    todo = sorted((Path(f) for f in files if str(f) not in done), key=str)
    mine = [todo[i] for i in distributed.block(len(todo))]
    names = dict(zip(map(str, files), output_names(files), strict=True))  # as one process names them
    predict_to_folder(detector, mine, out_dir, heatmaps, resume=False, batch_size=batch_size, run_dir=run_dir,
                      names=names, scores_dir=part_dir(out_dir, distributed.rank()), letterbox=letterbox)  # fmt: skip
    distributed.barrier()
    rows, failed = collect(out_dir, files, heatmaps)
    distributed.barrier()  # every rank has read the parts before rank 0 removes them
    if distributed.is_main():
        write_rows(out_dir, rows, heatmaps)
        doc = {"run": str(run_dir), "backend": backend, "predictions": rows, "failed": failed}  # as one process
        atomic_write_json(out_dir / SCORES_JSON, doc)
        shutil.rmtree(out_dir / PARTS, ignore_errors=True)
    distributed.barrier()
    return PredictSummary(rows, failed, skipped=len(done), backend=backend)


def fold_parts(out_dir: Path, files: Sequence[Path], heatmaps: bool, resume: bool) -> None:
    """Start OUT/scores.csv and .jsonl from the finished rows of OUT and of every OUT/parts/rank-*
    (an interrupted sharded run, with any number of ranks) with resume, or empty without, and
    remove OUT/parts. Run by one process (rank 0, or a single-process `predict --resume`)."""
    out_dir = Path(out_dir)
    rows = collect(out_dir, files, heatmaps)[0] if resume else []
    write_rows(out_dir, rows, heatmaps)
    shutil.rmtree(out_dir / PARTS, ignore_errors=True)
