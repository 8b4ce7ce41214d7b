"""Command line: `adtr fit`, `adtr test`, `adtr predict`, `adtr export`, `adtr serve`.

The verbs follow anomalib's. Errors about data or run folders print one line naming the
file and exit with status 2; nothing already written is overwritten without --force.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path

from adtr.anomalies import GENERATORS
from adtr.checkpoint import CONFIG_FILE, clear_train_state, has_train_state
from adtr.config import MODEL_PRESETS, ScoreConfig, TrainConfig, parse_image_size
from adtr.data.images import is_image_file, read_image
from adtr.errors import ADTRError, DataError, RunFolderError, SettingsError
from adtr.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from adtr.runtime import configure_cpu
from adtr.thresholds import bounding_boxes

log = logging.getLogger("adtr")

METRIC_ROWS = [
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO (FPR <= 0.3)"),
    ("image_f1_max", "image F1-max"),
    ("false_alarm_rate_at_threshold", "good flagged at thr."),
    ("detection_rate_at_threshold", "anomalous flagged"),
    ("n_images", "test images"),
    ("images_per_second", "images/s (model only)"),
]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adtr", description="ADTR anomaly detection: train on good images, score and localise anomalies."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d_train, d_model = TrainConfig(), MODEL_PRESETS["cpu"]

    p = sub.add_parser("fit", help="train a model on good images", description="Train ADTR on good images.")
    p.add_argument("data", type=Path, help="MVTec category folder (uses train/good) or a folder with good/")
    p.add_argument("--out", type=Path, required=True, help="run folder to create (weights + config.json)")
    p.add_argument(
        "--preset",
        choices=sorted(MODEL_PRESETS),
        default="cpu",
        help="model size: 'cpu' (default, fast on CPUs) or 'paper' (SPEC's 4+4 layers)",
    )
    p.add_argument(
        "--backbone",
        choices=["lite0", "lite1", "lite2"],
        default=d_model.backbone,
        help=f"frozen EfficientNet-Lite backbone (default: {d_model.backbone})",
    )
    p.add_argument(
        "--image-size",
        default=None,
        help="input size N or HxW (height x width), multiples of 32 (default: the training images' aspect "
        "ratio at about 256x256 pixels, e.g. 256x256 for square images, 160x384 for 1130x460)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=d_train.steps,
        help=f"optimisation steps, rounded up to whole epochs (default: {d_train.steps})",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs; overrides --steps")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d_train.batch_size,
        help=f"training batch size (default: {d_train.batch_size})",
    )
    p.add_argument("--lr", type=float, default=d_train.lr, help=f"AdamW learning rate (default: {d_train.lr})")
    p.add_argument("--seed", type=int, default=d_train.seed, help=f"random seed (default: {d_train.seed})")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d_train.val_fraction,
        help=f"share of good images held out for validation (default: {d_train.val_fraction})",
    )
    p.add_argument(
        "--smoothing-sigma",
        type=float,
        default=ScoreConfig().smoothing_sigma,
        help="Gaussian smoothing of maps in input pixels, 0 = off (default: 4)",
    )
    p.add_argument(
        "--image-score",
        choices=["max_pool", "mean", "pooled_residual"],
        default=ScoreConfig().image_score,
        help="image score: max of the average-pooled map, the map's mean, or the norm of the image-averaged "
        "feature residual (semantic anomalies) (default: max_pool)",
    )
    g = p.add_argument_group("anomaly-available training (FCDD-style losses L_px / L_img)")
    g.add_argument(
        "--anomalies",
        type=Path,
        default=None,
        help="labelled anomalies: DIR/<defect>/*.png with optional DIR/ground_truth/<defect>/"
        "<name>_mask.png (pixel labels), or a plain folder of images (image labels)",
    )
    g.add_argument(
        "--synthetic",
        default="",
        help=f"comma-separated synthetic anomaly generators: {', '.join(sorted(GENERATORS))}",
    )
    g.add_argument(
        "--external",
        type=Path,
        default=None,
        help="folder of unrelated images, used as image-level anomalies",
    )
    g.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this run folder (normal-only fit); its model settings are kept",
    )
    p.add_argument("--force", action="store_true", help="replace an existing run folder's files")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted fit in --out from its last finished epoch (same data and options)",
    )
    _add_common(p)

    p = sub.add_parser("test", help="metrics on labelled test data", description="Evaluate a run on test data.")
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("data", type=Path, help="MVTec category (uses test/ and ground_truth/) or labelled folder")
    p.add_argument("--json", type=Path, default=None, help="write metrics and per-image scores to this JSON file")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="write a self-contained HTML report (curves, histograms, heatmap grids) to DIR/index.html",
    )
    p.add_argument("--batch-size", type=int, default=8, help="inference batch size (default: 8)")
    _add_common(p)

    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description="Score images: CSV + JSON of scores and a heatmap overlay PNG per image.",
    )
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("paths", type=Path, nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder for scores.csv, scores.json, heatmaps/")
    p.add_argument("--no-heatmaps", action="store_true", help="write scores only")
    p.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="inference engine: PyTorch, or onnxruntime with an exported model (default: torch)",
    )
    p.add_argument("--onnx", type=Path, default=None, help="ONNX file for --engine onnx (default: RUN/model.onnx)")
    p.add_argument("--batch-size", type=int, default=8, help="inference batch size (default: 8)")
    _add_common(p)

    p = sub.add_parser("export", help="export a run to ONNX", description="Export the whole pipeline to ONNX.")
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("--out", type=Path, default=None, help="ONNX file to write (default: RUN/model.onnx)")
    _add_common(p)

    p = sub.add_parser("serve", help="HTTP inspection service", description="Serve a run over HTTP (FastAPI).")
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted request in MiB (default: 20)")
    p.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="PyTorch, or onnxruntime with RUN/model.onnx from adtr export (default: torch)",
    )
    _add_common(p)
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("adtr.engine").setLevel(logging.WARNING)  # per-epoch lines: the bar shows them
    configure_cpu(args.threads)


def cmd_fit(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector

    if (args.out / CONFIG_FILE).exists() and not args.force:
        raise RunFolderError(f"{args.out}: already holds a run; choose another --out or pass --force")
    if has_train_state(args.out) and not (args.resume or args.force):
        raise RunFolderError(f"{args.out}: holds an interrupted fit; pass --resume to continue it or --force")
    if args.resume and not has_train_state(args.out):
        raise RunFolderError(f"{args.out}: no interrupted fit to resume")
    model = dataclasses.replace(
        MODEL_PRESETS[args.preset],
        backbone=args.backbone,
        image_size=_image_size(args.image_size),
    )
    train = TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_fraction=args.val_fraction,
    )
    score = ScoreConfig(smoothing_sigma=args.smoothing_sigma, image_score=args.image_score)
    det = ADTRDetector(model, score, train, device=args.device, progress=not args.quiet)
    synthetic = [name.strip() for name in args.synthetic.split(",") if name.strip()]
    det.fit(args.data, anomalies=args.anomalies, synthetic=synthetic, external=args.external, init=args.init,
            checkpoint_dir=args.out, resume=args.resume)  # fmt: skip
    det.save(args.out)
    clear_train_state(args.out)
    last = det.history_[-1] if det.history_ else {}
    print(
        f"fitted in {det.info_['fit_seconds']:.0f} s; final loss {last.get('loss', float('nan')):.4f}, "
        f"validation loss {last.get('val_loss', float('nan')):.4f}; run saved to {args.out}"
    )
    return 0


def _image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        return parse_image_size(text)
    except ValueError as e:
        raise SettingsError(f"--image-size: {e}") from None


def format_metrics(metrics: dict) -> str:
    lines = []
    for key, name in METRIC_ROWS:
        if key in metrics:
            v = metrics[key]
            lines.append(f"{name:<24} {v:>10.4f}" if isinstance(v, float) else f"{name:<24} {v:>10}")
    return "\n".join(lines)


def cmd_test(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector

    det = ADTRDetector.load(args.run, device=args.device, progress=not args.quiet)
    metrics = det.test(args.data, batch_size=args.batch_size, report_dir=args.report)
    metrics = {"run": str(args.run), "data": str(args.data), **metrics}
    print(format_metrics(metrics))
    if args.json:
        atomic_write_json(args.json, metrics)
        print(f"metrics written to {args.json}")
    if args.report:
        print(f"report written to {metrics['report']}")
    return 0


def _collect_images(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image_file(q))
            if not found:
                log.warning("%s: no image files in this folder", p)
            files += found
        elif p.exists():
            files.append(p)  # named explicitly: a non-image file is reported as an error
        else:
            raise DataError(f"{p}: file not found")
    return files


def _output_names(files: list[Path]) -> list[str]:
    """Unique heatmap names from paths relative to their common folder (a/b.png -> a__b)."""
    resolved = [f.resolve() for f in files]
    parents = [str(r.parent) for r in resolved]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    return ["__".join(r.relative_to(common).with_suffix("").parts) for r in resolved]


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from adtr.detector import ADTRDetector
    from adtr.visualize import display_range, overlay

    det = ADTRDetector.load(args.run, device=args.device, progress=not args.quiet)
    if args.engine == "onnx":
        det.use_onnx(args.onnx or args.run / "model.onnx")
    files = _collect_images(args.paths)
    if not files:
        raise DataError("no images to score among: " + ", ".join(map(str, args.paths)))
    failures: list[dict] = []

    def report(path: Path, error: DataError) -> None:
        log.error("%s", error)
        failures.append({"path": str(path), "error": str(error)})

    preds = det.predict(files, batch_size=args.batch_size, on_error=report)
    names = dict(zip(map(str, files), _output_names(files), strict=True))
    vmin, vmax = display_range(det.info_.get("score_stats", {}))
    thr = det.thresholds_
    rows = []
    for p in preds:
        boxes = bounding_boxes(thr.defect_mask(p.anomaly_map)) if p.is_anomalous else []
        row = {
            "path": p.path,
            "anomaly_score": p.anomaly_score,
            "normalized_score": p.normalized_score,
            "is_anomalous": p.is_anomalous,
            "defect_boxes": json.dumps(boxes),
        }
        if not args.no_heatmaps:
            heat = overlay(read_image(p.path), p.anomaly_map, vmin, vmax)
            buf = io.BytesIO()
            Image.fromarray(heat).save(buf, format="PNG")
            target = args.out / "heatmaps" / f"{names[p.path]}.png"
            atomic_write_bytes(target, buf.getvalue())
            row["heatmap"] = str(target)
        rows.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["path", "anomaly_score"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / "scores.csv", out.getvalue())
    atomic_write_json(args.out / "scores.json", {"run": str(args.run), "predictions": rows, "failed": failures})
    flagged = sum(r["is_anomalous"] for r in rows)
    print(f"scored {len(rows)} images ({flagged} anomalous), {len(failures)} failed; results in {args.out}")
    return 1 if failures else 0


def cmd_export(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector
    from adtr.export import export_onnx

    det = ADTRDetector.load(args.run, progress=False)
    out = args.out or args.run / "model.onnx"
    meta = {"image_size": list(det.config.model.image_size), "thresholds": det.thresholds_.to_dict()}
    diff = export_onnx(det.model_, out, metadata=meta)
    print(f"exported {out}; onnxruntime vs PyTorch, max image-score difference {diff:.2e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from adtr.serve import serve

    serve(args.run, args.host, args.port, int(args.max_upload_mb * 1024 * 1024), args.engine)
    return 0


COMMANDS = {"fit": cmd_fit, "test": cmd_test, "predict": cmd_predict, "export": cmd_export, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status.

    User errors (adtr.errors.ADTRError: data, run folder, settings) print one line and give
    status 2. Any other exception is a bug and propagates with its traceback (status 1).
    """
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return COMMANDS[args.command](args)
    except ADTRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
