"""CIFAR-10 one-class protocol (SPEC section 3): for each class, fit on its 5,000 training
images, score all 10,000 test images (anomaly = any other class), AUROC per class and mean.
A k-NN baseline on pooled Lite0 features (the floor to beat; --knn-backbone) runs side by side.
Defaults (Lite2, 128x128, all five stages, pooled-residual score, 16 epochs) were chosen with
--validate; docs/design.md has the measurements.

    python bench/cifar10.py --root ../shared/data/cifar10-jpeg [--classes airplane,cat] [--json FILE]
    python bench/cifar10.py --root ... --validate     # choose settings without the test set

--validate replaces the test set with a held-out 10% of every class's TRAINING images, so
settings (input size, image score, epochs) are chosen without touching test images.
Backbone features are computed once per image and setting and shared by all classes.
Writes results/cifar10.json and .md (or --json FILE and FILE with .md).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

from adtr.config import ModelConfig, ScoreConfig, TrainConfig, parse_image_size  # noqa: E402
from adtr.data.cifar10 import CLASSES, load_cifar10  # noqa: E402
from adtr.data.folder import image_folder  # noqa: E402
from adtr.data.splits import split_per_class  # noqa: E402
from adtr.model import ADTR  # noqa: E402
from adtr.oneclass import (  # noqa: E402
    VIEW_SETS,
    array_features,
    pooled,
    read_small_images,
    run_class,
    scoring_views,
)
from adtr.runtime import configure_cpu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA / "cifar10-jpeg",
                   help="image folders, cifar-10-batches-py/ or cifar-10-python.tar.gz")  # fmt: skip
    p.add_argument("--classes", default="all", help="comma-separated class names, or all")
    p.add_argument("--json", type=Path, default=REPO / "results" / "cifar10.json")
    p.add_argument("--image-size", default="128", help="upscaled input size (multiple of 32)")
    p.add_argument("--strides", default="2,4,8,16,32", help="backbone stages used")
    p.add_argument("--backbone", default="lite2")
    p.add_argument("--knn-backbone", default="lite0", help="backbone of the k-NN baseline (the floor: lite0)")
    p.add_argument("--image-score", default="pooled_residual", choices=["mean", "max_pool", "pooled_residual"])
    p.add_argument("--test-views", default="flip-shift", choices=VIEW_SETS,
                   help="average each test image's score over its mirror image and 2-pixel shifts")  # fmt: skip
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--max-train", type=int, default=None, help="use at most N training images per class")
    p.add_argument("--external", type=Path, default=None, help="folder of unrelated images: image-level anomalies")
    p.add_argument("--max-external", type=int, default=5000)
    p.add_argument("--validate", action="store_true", help="evaluate on held-out TRAINING images, not the test set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    configure_cpu(2)
    dev = torch.device("cpu")

    classes = CLASSES if args.classes == "all" else [c.strip() for c in args.classes.split(",")]
    t_start = time.perf_counter()
    train_images, train_labels = load_cifar10(args.root, "train")
    if args.validate:
        kept, held = split_per_class(train_labels)
        test_images, test_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[kept], train_labels[kept]
    else:
        test_images, test_labels = load_cifar10(args.root, "test")
    load_s = time.perf_counter() - t_start

    size = parse_image_size(args.image_size)
    strides = tuple(int(s) for s in args.strides.split(","))
    model_cfg = ModelConfig(
        backbone=args.backbone,
        image_size=size,
        strides=strides,
        hidden_dim=args.hidden_dim,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        ffn_dim=2 * args.hidden_dim,
    )
    score_cfg = ScoreConfig(image_score=args.image_score, smoothing_sigma=0.0, pool_size=max(strides))
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, seed=args.seed)  # fmt: skip

    t0 = time.perf_counter()
    extractor = ADTR(model_cfg, score_cfg)
    # Only the classes asked for need training features; the test features serve them all.
    wanted = np.isin(train_labels, [CLASSES.index(c) for c in classes])
    train_raw = array_features(extractor, train_images[wanted], dev)
    train_labels = train_labels[wanted]
    views = scoring_views(test_images, args.test_views)
    test_raw = [array_features(extractor, v, dev) for v in views]
    knn_features = None
    if args.knn_backbone != args.backbone:
        knn_extractor = ADTR(dataclasses.replace(model_cfg, backbone=args.knn_backbone), score_cfg)
        knn_features = (pooled(array_features(knn_extractor, train_images[wanted], dev)),
                        [pooled(array_features(knn_extractor, v, dev)) for v in views])  # fmt: skip
    external_raw = None
    if args.external is not None:
        files = image_folder(args.external, label=1)[: args.max_external]
        ext = read_small_images(files, (32, 32))
        external_raw = array_features(extractor, ext, dev)
    feature_s = time.perf_counter() - t0

    rows, results = [], []
    for name in classes:
        r = run_class(CLASSES.index(name), train_raw, train_labels, test_raw, test_labels, model_cfg, score_cfg,
                      train_cfg, dev, external_raw, args.max_train, knn_features)  # fmt: skip
        r["class_name"] = name
        results.append(r)
        rows.append([name, r["n_train"], r["auroc"], r["auroc_plain"], r["knn_auroc"], r["knn_auroc_views"],
                     round(r["fit_seconds"], 1)])  # fmt: skip
        print(rows[-1], flush=True)
    columns = ("auroc", "auroc_plain", "knn_auroc", "knn_auroc_views")
    means = {k: float(np.mean([r[k] for r in results])) for k in columns}
    rows.append(["**mean**", "", *means.values(), ""])
    wall = time.perf_counter() - t_start
    what = "validation (held-out training images)" if args.validate else "test"
    md = (
        f"# CIFAR-10 one-class, {what}: {args.root.name}\n\n"
        f"Command: `python bench/cifar10.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Input {size[0]}x{size[1]} upscaled from 32x32, {args.backbone} stages at strides {strides}, "
        f"hidden dim {args.hidden_dim}, {args.layers}+{args.layers} layers, image score {args.image_score}, "
        f"{args.epochs} epochs. Test views: {args.test_views} ({len(views)}: a score is the mean over them; "
        f"'plain' = the image alone). k-NN baseline (k=5) on pooled {args.knn_backbone} features of the same "
        "stages: the floor is its plain column. "
        f"Features {feature_s:.0f} s (once, shared), "
        f"total wall time {wall / 60:.1f} min on {torch.get_num_threads()} threads.\n"
        + (f"External anomalies: {args.external} ({len(external_raw)} images).\n" if external_raw is not None else "")
        + "\n" + md_table(["class", "train images", f"ADTR AUROC ({args.backbone})", "ADTR plain",
                          f"k-NN AUROC (pooled {args.knn_backbone}), plain", "k-NN, views", "fit s"], rows)  # fmt: skip
        + "\n"
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"machine": machine(), "args": settings, "mean_auroc": means["auroc"],
           "mean_auroc_plain": means["auroc_plain"], "knn_mean_auroc": means["knn_auroc"],
           "knn_mean_auroc_views": means["knn_auroc_views"],
           "feature_seconds": feature_s, "load_seconds": load_s, "wall_seconds": wall, "results": results}  # fmt: skip
    write_results(args.json.with_suffix(""), doc, md)


if __name__ == "__main__":
    main()
