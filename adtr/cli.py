"""Command line: `adtr fit`, `adtr update`, `adtr test`, `adtr predict`, `adtr export`, `adtr serve`.

The verbs follow anomalib's. Errors about data or run folders print one line naming the
file and exit with status 2; nothing already written is overwritten without --force.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from adtr import distributed
from adtr.anomalies import GENERATORS
from adtr.backend import AUTO_HELP, CHOICES
from adtr.calibration import MIN_HELD_OUT
from adtr.checkpoint import check_fit_target
from adtr.config import (
    CALIBRATIONS,
    IMAGE_SCORERS,
    LABELLED_ANOMALY_USES,
    LOSSES,
    MIN_FALSE_ALARM_RATE,
    MODEL_PRESETS,
    RECONSTRUCTOR_KINDS,
    RESIDUAL_NORMS,
    ModelConfig,
    ScoreConfig,
    TrainConfig,
    parse_image_size,
)
from adtr.data.images import PIXEL_LIMIT_ENV
from adtr.defect_head import describe_default_gain
from adtr.errors import ADTRError, DataError, SettingsError
from adtr.memory_bank import BANK_SIZE, MAX_ROWS
from adtr.runtime import configure_cpu
from adtr.update import DEFAULT_STEPS, RETRAIN, RETRAIN_RATIO

METRIC_ROWS = [
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO (FPR <= 0.3)"),
    ("image_f1_max", "image F1-max"),
    ("false_alarm_rate_at_threshold", "good flagged at thr."),
    ("detection_rate_at_threshold", "anomalous flagged"),
    ("n_images", "test images"),
    ("images_per_second", "images/s (model only)"),
    ("backend", "backend"),
]


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument(
        "--max-pixels",
        type=_pixels,
        default=None,
        help="largest accepted image (width x height, e.g. 50000000 or 5e7), checked from the header before "
        "decoding (default: $ADTR_MAX_PIXELS, else 100000000; serve: 50000000)",
    )


def _add_nproc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc",
        type=_positive_int,
        default=1,
        help="processes on this machine, through torchrun (default: 1); for several machines run "
        "`torchrun --nnodes ... -m adtr` (README)",
    )


def _add_backend(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument(
        "--backend",
        "--engine",  # the name before 0.2; kept so that existing scripts run
        dest="backend",
        choices=CHOICES,
        default="auto",
        help=f"inference backend (default: auto): {AUTO_HELP}{extra}",
    )


def _pixels(text: str) -> int:
    try:
        number = float(text.replace("_", ""))  # "1e8" allowed
        value = int(number) if number == int(number) else 0  # "2.5" refused
    except (ValueError, OverflowError):  # "lots", "nan"; "inf"
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of pixels")
    return value


# Types of the numeric options: a bad value ends in argparse's one-line error (exit status 2).
# The checks are comparisons, so NaN fails every one of them.
def _number(text: str, kind: type, ok: Callable[[float], bool], what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


def _seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1")


def _port(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 65535, "a port number from 1 to 65535")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def _fallback(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    return _number(text, float, lambda v: 0 < v < math.inf, "'off' or a finite number > 0")


def _step_pixels(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    return _number(text, int, lambda v: v >= 1, "'off' or a whole number >= 1")


def _head_paste(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    if text.strip().lower() == "off":
        return 0
    return _number(text, int, lambda v: v >= 0, "'auto', 'off' or a whole number >= 0")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def _fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _rate(text: str) -> float:
    return _number(text, float, lambda v: MIN_FALSE_ALARM_RATE <= v < 1, f"a rate in [{MIN_FALSE_ALARM_RATE:g}, 1)")


def _output(path: Path | None, option: str, folder: bool) -> None:
    """SettingsError when path cannot be written as a folder (folder=True) or as a file."""
    if path is None:
        return
    if path.exists() and path.is_dir() != folder:
        kind, wanted = ("a file", "a folder") if folder else ("a folder", "a file")
        raise SettingsError(f"{option} {path}: exists and is {kind}; give {wanted}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise SettingsError(f"{option} {path}: {parent} is a file, not a folder")
    # Writable? Tried with a nameless temporary file where the output would go (the nearest
    # folder that exists), so that an unwritable place fails now, not after the work.
    where = next(p for p in (path, *path.parents) if p.exists())
    where = where if where.is_dir() else where.parent
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise SettingsError(f"{option} {path}: cannot write in {where} ({e.strerror or e})") from None


def _image_scorer(choice: str | None, preset: ModelConfig) -> str | None:
    """--image-scorer: None (not given) keeps the preset's; "off" is none."""
    return preset.image_scorer if choice is None else None if choice == "off" else choice


def _add_letterbox(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--letterbox",
        action="store_true",
        help="keep each image's aspect ratio, padding the rest of the model input (not scored), instead of "
        "stretching it to the model's input; for images of another aspect ratio than the training images "
        "(runs fitted with --image-scorer off: the image scorer sees the whole input)",
    )


def _add_anomaly_sources(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--anomalies and --external, as fit and update read them."""
    p.add_argument(
        "--anomalies",
        type=Path,
        default=None,
        help="labelled anomalies: DIR/<defect>/*.png with optional DIR/ground_truth/<defect>/"
        "<name>_mask.png (pixel labels), or a plain folder of images (image labels)",
    )
    p.add_argument(
        "--external",
        type=Path,
        default=None,
        help="folder of unrelated images, used as image-level anomalies",
    )


AUTO_ON_OFF = {"auto": None, "on": True, "off": False}  # a choice the fit makes (None) or the user's


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
        "--reconstructor",
        choices=RECONSTRUCTOR_KINDS,
        default=d_model.reconstructor,
        help="what reconstructs the features: ADTR's transformer, or the per-position MLP / convolutional "
        "autoencoder baselines; the CNN trains about 15x faster and, with --steps 1000 (one seed), reached 0.997 "
        "image AUROC on MVTec transistor but lost localisation on bsdata (both with --token-patch 1; "
        f"docs/design.md, 'The reconstructor ablation') (default: {d_model.reconstructor})",
    )
    p.add_argument(
        "--image-scorer",
        choices=[k or "off" for k in IMAGE_SCORERS],
        default=None,
        help="a second reconstructor, trained 5x the epochs of --steps (at any input size) on the same data, "
        "that gives the image score (the "
        "map stays the reconstructor's; with a defect head its map is joined with the head's output; not with "
        "--image-score pooled_residual, where the reconstructor scores the image): on the development sets "
        "with stride-16 maps (--token-patch 1) image AUROC 0.9826 against 0.9754 on average, transistor 0.996 "
        "against 0.970, for about 1/3 more "
        "training time and an inference cost within the machine's noise; "
        "'off' scores the image from the map (docs/design.md, "
        f"'The image scorer') (default: the preset's, {d_model.image_scorer} for cpu, off for paper)",
    )
    p.add_argument(
        "--token-patch",
        type=int,
        choices=[1, 2, 4],  # divide the largest stride, 16; finer grids: replay and memory grow 4x a step
        default=None,
        help="feature-grid positions per token side: the map's grid is N times finer than the transformer's "
        "16x16-pixel tokens (stride 16 / N); 2 gained 1.4 AUPRO points on the development sets (3.6 on "
        "bsdata's small pits) for about 12%% of the inference speed against 1, the paper's stride-16 map "
        "(docs/design.md, 'A finer map with the image scorer') (default: the preset's, "
        f"{d_model.token_patch} for cpu, 1 for paper; with --init, the init run's)",
    )
    p.add_argument(
        "--image-size",
        default=None,
        help="input size N or HxW (height x width), multiples of 32 (default: the training images' aspect "
        "ratio, short side 256 up to 1.875x 256x256 pixels, e.g. 256x256 for square images, 224x544 for 1130x460)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=d_train.steps,
        help="optimisation steps at an input of --step-pixels pixels or fewer (a larger input trains "
        "proportionally fewer; the image scorer keeps its budget), rounded up to whole epochs "
        f"(default: {d_train.steps})",
    )
    p.add_argument(
        "--step-pixels",
        type=_step_pixels,
        default=d_train.step_pixels,
        metavar="PIXELS|off",
        help="the input size in pixels --steps are counted at: an input of more pixels trains --steps x PIXELS / "
        "its pixels (as many tokens seen, about the same fit time); 'off' trains --steps at any size "
        f"(default: {d_train.step_pixels}, 256x256)",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs; overrides --steps and --step-pixels"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d_train.batch_size,
        help=f"training batch size (default: {d_train.batch_size})",
    )
    p.add_argument(
        "--lr", type=_positive_float, default=d_train.lr, help=f"AdamW learning rate (default: {d_train.lr})"
    )
    p.add_argument("--seed", type=_seed, default=d_train.seed, help=f"random seed (default: {d_train.seed})")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=d_train.val_fraction,
        help=f"share of good images held out for validation and thresholds (default: {d_train.val_fraction})",
    )
    p.add_argument(
        "--false-alarm-rate",
        type=_rate,
        default=d_train.false_alarm_rate,
        help="accepted share of good images flagged; the threshold needs about 1/rate good images the model did "
        f"not train on, and the fit warns with fewer (default: {d_train.false_alarm_rate})",
    )
    p.add_argument(
        "--calibration",
        choices=list(CALIBRATIONS),
        default=d_train.calibration,
        help="scores behind the threshold: held-out good images, or cross-fitted ones (each good image scored by "
        f"one of {d_train.calibration_folds} models fitted without it; {d_train.calibration_folds} more fits); "
        f"auto: cross-fitted when fewer than {MIN_HELD_OUT} images would be held out (default: auto)",
    )
    p.add_argument(
        "--smoothing-sigma",
        type=_non_negative_float,
        default=ScoreConfig().smoothing_sigma,
        help=f"Gaussian smoothing of maps in input pixels, 0 = off (default: {ScoreConfig().smoothing_sigma:g})",
    )
    p.add_argument(
        "--image-score",
        choices=["top_mean", "max_pool", "mean", "pooled_residual"],
        default=ScoreConfig().image_score,
        help="image score: the mean of the map's top 1%%, the max of the average-pooled map, the map's mean "
        "(each of the image scorer's map, where the run has one), or the norm of the image-averaged feature "
        f"residual (semantic anomalies) (default: {ScoreConfig().image_score})",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=TrainConfig().loss,
        help="normal-only training loss: 'hard' weighs each batch's worst-reconstructed 10%% of positions "
        "10x the others (Dinomaly's loose loss), 'mse' weighs all alike (docs/design.md) "
        f"(default: {TrainConfig().loss})",
    )
    p.add_argument(
        "--query-fallback",
        type=_fallback,
        default=TrainConfig().query_fallback,
        metavar="LOSS|off",
        help="fit again without the learnable query when its validation loss (held-out good images) ends above "
        "LOSS: the query could not model the good parts (unaligned, fine-textured surfaces; docs/design.md); "
        "chosen for the default step budget (a much shorter fit may fall back for lack of training); needs "
        f"held-out good images; 'off' keeps the query (default: {TrainConfig().query_fallback})",
    )
    p.add_argument(
        "--residual-norm",
        choices=RESIDUAL_NORMS,
        default=ScoreConfig().residual_norm,
        help="'channel' divides each feature channel's residual by its RMS on the training images before the "
        "norm: much better on fine-textured surfaces (MPDD metal_plate), worse on others (docs/design.md) "
        f"(default: {ScoreConfig().residual_norm})",
    )
    p.add_argument(
        "--feature-gaussian",
        choices=tuple(AUTO_ON_OFF),
        default="auto",
        help="the image score from a Gaussian per position of the features (PaDiM) instead of the image scorer: "
        "'auto' where the held-out good images choose the scorer's per-position statistics (aligned parts; "
        "bsdata image AUROC 0.9488 -> 0.9608, the other development sets unchanged); adds about 40 KB per "
        "feature-grid position to the weights and as much to the exported graph (76 MB each at 224x544) "
        "(docs/design.md, 'A Gaussian per position scores "
        "aligned parts' images') (default: auto)",
    )
    p.add_argument(
        "--nearest-map",
        choices=tuple(AUTO_ON_OFF),
        default="auto",
        help="the map adds the distance to the nearest good feature of a memory bank (PatchCore) to the "
        "reconstruction error: 'auto' where the reconstructor is the transformer without the query (a "
        "copying model, as the query fallback fits: metal_plate AUPRO 0.9156 -> 0.94); adds "
        f"{BANK_SIZE} feature rows (2.4 MB with Lite0) to the weights and the graph (docs/design.md, 'The "
        "nearest good feature joins the map of a copying model') (default: auto)",
    )
    p.add_argument(
        "--nearest-search-dims",
        type=int,
        default=ScoreConfig().nearest_search_dims,
        metavar="D",
        help="with the memory bank, search each position's nearest row among the bank's first D principal "
        "components, then take the exact distance to it: a cheaper search (0, or the bank's channels or more: exact; "
        "metal_plate's graph 13%% faster at 32, its maps within 0.05 point) (docs/design.md, 'The bank searched in "
        "a subspace') (default: %(default)s)",
    )
    g = p.add_argument_group("anomaly-available training (FCDD-style losses L_px / L_img)")
    _add_anomaly_sources(g)
    g.add_argument(
        "--head-gain",
        type=_positive_float,
        default=None,
        help="weight of the defect head's logit against the residual map in the anomaly map (the image score "
        "joins it to the image scorer's map with weight 1): larger finds the "
        "labelled defect types better, smaller keeps types the head never saw as visible as without it "
        f"(docs/design.md) (default: {describe_default_gain()})",
    )
    g.add_argument(
        "--labelled-anomalies",
        choices=LABELLED_ANOMALY_USES,
        default=TrainConfig().labelled_anomalies,
        help="what the labelled anomalies train: 'head' keeps the normal-only reconstructor and fits a defect "
        "head on its residual (much better with a few real defects, docs/design.md); 'loss' fine-tunes the "
        f"reconstructor with the paper's L_px / L_img (default: {TrainConfig().labelled_anomalies})",
    )
    g.add_argument(
        "--head-paste",
        type=_head_paste,
        default=TrainConfig().head_paste,
        metavar="N|auto|off",
        help="copies of each masked defect pasted onto good training images at random places for the defect "
        "head: 'auto' pastes 10 where the parts lie anywhere (the fit's map statistics say so) and none where "
        "they are aligned, as measured (docs/design.md, 'Defects pasted onto good images') (default: auto)",
    )
    g.add_argument(
        "--synthetic",
        default="",
        help=f"comma-separated synthetic anomaly generators: {', '.join(sorted(GENERATORS))}",
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
    _add_nproc(p)
    _add_common(p)

    p = sub.add_parser(
        "update",
        help="continue a run with new defects or good images",
        description="Continue a fitted run with newly found defects, new good images or external images, without "
        "its training data; thresholds are recalibrated and the run is refused if more of its validation good "
        "images would be flagged (false-alarm rate above the parent's + 1 point). RUN is only read.",
    )
    p.add_argument("run", type=Path, help="run folder to continue (written by adtr fit or adtr update)")
    p.add_argument("--out", type=Path, required=True, help="new run folder to create (never RUN itself)")
    _add_anomaly_sources(p)
    p.add_argument(
        "--good",
        type=Path,
        default=None,
        help="new good images: an MVTec category or folder with good/, or a plain folder of images (a product "
        "change, a new lighting); a run's memory bank keeps its rows and grows for them, up to "
        f"{MAX_ROWS} rows (docs/design.md, 'An update's memory bank grows')",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        help=f"optimisation steps from RUN's weights (default: {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--retrain",
        choices=RETRAIN,
        default="auto",
        help="whether new good images (--good) train the reconstructor, the network behind the anomaly map: auto "
        f"(default) where their reconstruction loss is above {RETRAIN_RATIO:g}x that of RUN's held-out good images "
        "(it cannot rebuild them; training a reconstructor that can further costs its maps), always, never. "
        "--external images and anomalies under --labelled-anomalies loss always train it (never is refused with "
        "them); the image scorer learns new good images in any case, unless a Gaussian per position scores the "
        "images (docs/design.md, 'An update trains the reconstructor only for new good images it cannot "
        "rebuild')",
    )
    p.add_argument(
        "--head-gain",
        type=_positive_float,
        default=None,
        help="weight of the defect head's logit against the residual map, instead of RUN's (a run without one "
        f"gets {describe_default_gain()}; without this option, RUN's weight is kept, or follows that rule where "
        "the rule gave it); 1 keeps defect types the head never saw as visible as without it (docs/design.md)",
    )
    p.add_argument(
        "--allow-forgetting",
        action="store_true",
        help="save the update with a warning when the forgetting guard fails (default: refuse, nothing written)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing run folder at --out")
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
    p.add_argument("--batch-size", type=_positive_int, default=8, help="inference batch size (default: 8)")
    _add_backend(p)
    _add_letterbox(p)
    _add_common(p)

    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description="Score images: CSV + JSON lines of scores and a heatmap overlay PNG per image, written as "
        "each image finishes; scores.json at the end.",
    )
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("paths", type=Path, nargs="+", help="image files or folders (searched recursively)")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder for scores.csv, scores.jsonl, scores.json, heatmaps/"
    )
    p.add_argument("--no-heatmaps", action="store_true", help="write scores only")
    _add_backend(p, "; --onnx FILE runs that graph")
    p.add_argument(
        "--onnx", type=Path, default=None, help="ONNX file to run as it is (from adtr export; default: RUN/model.onnx)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=8, help="inference batch size (default: 8)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished results in --out and score only the other images (after an interrupted run)",
    )
    _add_letterbox(p)
    _add_nproc(p)
    _add_common(p)

    p = sub.add_parser("export", help="export a run to ONNX", description="Export the whole pipeline to ONNX.")
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("--out", type=Path, default=None, help="ONNX file to write (default: RUN/model.onnx)")
    _add_common(p, device=False)  # the export traces the model on the CPU

    p = sub.add_parser("serve", help="HTTP inspection service", description="Serve a run over HTTP (FastAPI).")
    p.add_argument("run", type=Path, help="run folder written by adtr fit")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--max-upload-mb", type=_positive_float, default=20, help="largest accepted request in MiB (default: 20)"
    )
    _add_backend(p)
    _add_letterbox(p)
    _add_common(p)
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("adtr.engine").setLevel(logging.WARNING)  # per-epoch lines: the bar shows them
    if getattr(args, "device", None) is not None:
        try:
            torch.device(args.device)
        except RuntimeError as e:
            raise SettingsError(f"--device {args.device}: {e}") from None
    if args.max_pixels is not None:  # read by data.images.pixel_limit wherever images are decoded
        os.environ[PIXEL_LIMIT_ENV] = str(args.max_pixels)
    configure_cpu(args.threads)
    if distributed.launched():  # one rank of several, started by torchrun
        if args.command not in ("fit", "predict"):
            raise SettingsError(f"adtr {args.command} runs in one process; torchrun is for fit and predict")
        args.device = str(distributed.init_from_env(args.device))
        if not distributed.is_main():  # rank 0 reports; the others only warn
            logging.getLogger().setLevel(logging.WARNING)
            args.quiet = True


def _warn_ignored_with_init(args: argparse.Namespace) -> None:
    """Warn about model and score options given with --init: the init run's settings are kept."""
    defaults = build_parser().parse_args(["fit", "DATA", "--out", "RUN"])  # the parser's own defaults
    names = ("preset", "backbone", "image_size", "reconstructor", "image_scorer", "token_patch", "smoothing_sigma",
             "image_score", "residual_norm", "feature_gaussian", "nearest_map", "nearest_search_dims")  # fmt: skip
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name) != getattr(defaults, name)]
    if given:
        logging.getLogger("adtr").warning("%s ignored: with --init the init run's model and score settings are "
                                          "kept (fit without --init to change them)", ", ".join(given))


def cmd_fit(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector

    if distributed.is_main():  # the rank that writes the run folder
        check_fit_target(args.out, resume=args.resume, force=args.force)
        _output(args.out, "--out", folder=True)
    image_size = _image_size(args.image_size)
    try:
        preset = MODEL_PRESETS[args.preset]
        model = dataclasses.replace(preset, backbone=args.backbone, image_size=image_size,
                                    reconstructor=args.reconstructor,
                                    image_scorer=_image_scorer(args.image_scorer, preset),
                                    token_patch=args.token_patch or preset.token_patch)  # fmt: skip
        train = TrainConfig(
            steps=args.steps,
            step_pixels=args.step_pixels,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            val_fraction=args.val_fraction,
            false_alarm_rate=args.false_alarm_rate,
            calibration=args.calibration,
            loss=args.loss,
            labelled_anomalies=args.labelled_anomalies,
            head_paste=args.head_paste,
            query_fallback=args.query_fallback,
        )
        gaussian = AUTO_ON_OFF[args.feature_gaussian]
        if gaussian and (model.image_scorer is None or args.image_score == "pooled_residual"):
            raise SettingsError("--feature-gaussian on replaces the image scorer's score: it needs an image "
                                "scorer (not --image-scorer off) and an image score from a map (not "
                                "pooled_residual)")  # fmt: skip
        score = ScoreConfig(smoothing_sigma=args.smoothing_sigma, image_score=args.image_score,
                            residual_norm=args.residual_norm, head_gain=args.head_gain,
                            feature_gaussian=gaussian,
                            nearest_map=AUTO_ON_OFF[args.nearest_map],
                            nearest_search_dims=args.nearest_search_dims)  # fmt: skip
    except ValueError as e:  # a config's own checks
        raise SettingsError(str(e)) from None
    if args.init is not None:
        _warn_ignored_with_init(args)
    det = ADTRDetector(model, score, train, device=args.device, progress=not args.quiet)
    synthetic = [name.strip() for name in args.synthetic.split(",") if name.strip()]
    det.fit(args.data, anomalies=args.anomalies, synthetic=synthetic, external=args.external, init=args.init,
            checkpoint_dir=args.out, resume=args.resume)  # fmt: skip
    if not distributed.is_main():
        return 0
    det.save(args.out)  # also writes and checks RUN/model.onnx for the default backend
    last = det.history_[-1] if det.history_ else {}
    chosen = det.selected_backend()
    validation = f"validation loss {last['val_loss']:.4f}" if "val_loss" in last else "no held-out images"
    trained = (f"final loss {last.get('loss', float('nan')):.4f}, {validation}" if det.history_
               else "reconstructor kept from --init, defect head fitted")  # fmt: skip
    fallback = det.record_.provenance.get("query_fallback")
    if fallback:  # the warning scrolled past with the progress bars: say it again in the summary
        trained += (f"; fitted without the learnable query (its validation loss {fallback['query_val_loss']:.4f} "
                    f"was above {fallback['threshold']:g})")  # fmt: skip
    print(
        f"fitted in {det.record_.provenance['fit_seconds']:.0f} s; {trained}; run saved to {args.out}\n"
        f"{det.thresholds_.describe()}\n"
        f"backend for predict / test / serve: {chosen.name} ({chosen.reason})"
    )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector

    if args.out.resolve() == args.run.resolve():
        raise SettingsError(f"--out {args.out}: the update goes to a new folder; {args.run} is never changed")
    check_fit_target(args.out, force=args.force)
    _output(args.out, "--out", folder=True)
    det = ADTRDetector.load(args.run, device=args.device, progress=not args.quiet)
    new = det.update(anomalies=args.anomalies, good=args.good, external=args.external, steps=args.steps,
                     allow_forgetting=args.allow_forgetting, head_gain=args.head_gain,
                     retrain=args.retrain)  # fmt: skip
    new.save(args.out)  # also writes and checks RUN2/model.onnx for the default backend, as fit does
    update, seconds = new.record_.provenance["update"], new.record_.provenance["fit_seconds"]
    guard = update["forgetting_guard"]
    flagged = (f"{guard['false_alarm_rate']:.1%} (parent {guard['parent_false_alarm_rate']:.1%})"
               if guard["n"] else "not checked (no validation images)")  # fmt: skip
    chosen = new.selected_backend()
    trained = (f"the reconstructor trained {update['steps']} steps" if update["steps"] else
               "the reconstructor kept as it is") + f": {update['reconstructor_reason']}"  # fmt: skip
    if update["image_scorer_trained"]:
        trained += "; the image scorer trained"
    print(f"updated in {seconds:.0f} s ({trained}); {args.run}'s validation good images flagged: "
          f"{flagged}; run saved to {args.out}\n"
          f"backend for predict / test / serve: {chosen.name} ({chosen.reason})")  # fmt: skip
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

    _output(args.json, "--json", folder=False)
    _output(args.report, "--report", folder=True)
    det = ADTRDetector.load(args.run, device=args.device, progress=not args.quiet, backend=args.backend)
    metrics = det.test(args.data, batch_size=args.batch_size, report_dir=args.report, letterbox=args.letterbox)
    metrics = {"run": str(args.run), "data": str(args.data), **metrics}
    print(format_metrics(metrics))
    print(metrics["calibration"]["description"])  # e.g. a threshold from 3 images, and the rate it implies
    if args.json:
        from adtr.outputs import write_metrics

        write_metrics(args.json, metrics)
        print(f"metrics written to {args.json}")
    if args.report:
        print(f"report written to {metrics['report']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector
    from adtr.outputs import collect_images, predict_to_folder

    if args.onnx is not None and args.backend == "torch":
        raise SettingsError("--onnx FILE runs the ONNX backend: drop --backend torch, or drop --onnx")
    _check_onnx_device("onnx" if args.onnx is not None else args.backend, args.device)
    _output(args.out, "--out", folder=True)
    files = collect_images(args.paths)
    if not files:
        raise DataError("no images to score among: " + ", ".join(map(str, args.paths)))
    det = ADTRDetector.load(args.run, device=args.device, progress=not args.quiet, backend=args.backend)
    if args.onnx is not None:
        det.use_onnx(args.onnx)
    det.selected_backend()  # before any output: auto may export the graph, forced onnx may refuse
    det.check_letterbox(args.letterbox)
    if distributed.active():
        from adtr.sharding import predict_sharded

        summary = predict_sharded(det, files, args.out, heatmaps=not args.no_heatmaps, resume=args.resume,
                                  batch_size=args.batch_size, run_dir=args.run, letterbox=args.letterbox)  # fmt: skip
    else:
        from adtr.sharding import PARTS, fold_parts

        if (args.out / PARTS).is_dir():  # an interrupted sharded run: its finished rows count with --resume
            fold_parts(args.out, files, not args.no_heatmaps, resume=args.resume)
        summary = predict_to_folder(det, files, args.out, heatmaps=not args.no_heatmaps, resume=args.resume,
                                    batch_size=args.batch_size, run_dir=args.run, letterbox=args.letterbox)  # fmt: skip
    if not distributed.is_main():
        return 1 if summary.failed else 0
    skipped = f", {summary.skipped} already done" if summary.skipped else ""
    warned = f", {summary.n_warned} unlike the training images (see input_warnings)" if summary.n_warned else ""
    print(
        f"scored {len(summary.rows)} images ({summary.n_anomalous} anomalous{warned}){skipped}, "
        f"{len(summary.failed)} failed, backend {summary.backend}; results in {args.out}"
    )
    return 1 if summary.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from adtr.detector import ADTRDetector
    from adtr.export import export_run

    _output(args.out, "--out", folder=False)
    det = ADTRDetector.load(args.run, progress=False)
    out = args.out or args.run / "model.onnx"
    parity = export_run(det, out)
    verdict = "agrees" if parity.agrees else (
        "DISAGREES: outside 1e-4 + 1e-5 x |score| or another decision; `--backend auto` will not use it")
    print(f"exported {out}; onnxruntime vs PyTorch, max image-score difference {parity.max_difference:.2e}: "
          f"{verdict}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from adtr.serve import serve

    _check_onnx_device(args.backend, args.device)
    serve(args.run, args.host, args.port, int(args.max_upload_mb * 1024 * 1024), args.backend, args.device,
          quiet=args.quiet, max_pixels=args.max_pixels, letterbox=args.letterbox)  # fmt: skip
    return 0


def _check_onnx_device(backend: str | None, device: str) -> None:
    if backend == "onnx" and device != "cpu":
        raise SettingsError(f"--device {device}: the ONNX backend runs on the CPU only; drop --device or use torch")


COMMANDS = {"fit": cmd_fit, "update": cmd_update, "test": cmd_test, "predict": cmd_predict, "export": cmd_export,
            "serve": cmd_serve}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status.

    User errors (adtr.errors.ADTRError: data, run folder, settings) print one line and give
    status 2. Any other exception is a bug and propagates with its traceback (status 1).
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and not distributed.launched():
        return distributed.launch(sys.argv[1:] if argv is None else argv, args.nproc)
    try:
        _setup(args)
        status = COMMANDS[args.command](args)
        distributed.shutdown()  # after success only: a failed rank exits, and torchrun stops the others
        return status
    except ADTRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
