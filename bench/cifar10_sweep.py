"""Choose CIFAR-10 one-class settings on the validation split (never the test set).

Features of each backbone are computed once; every variant (training settings, stages used)
is fitted on each chosen class and scored with every image score from the same fit.

    python bench/cifar10_sweep.py --backbones lite0,lite2 \
        --variants '[{}, {"epochs": 16}, {"hidden_dim": 512}, {"strides": [16, 32]}]'

A variant sets any of: strides, hidden_dim, layers, epochs, lr. Writes
results/cifar10_sweep.json and .md (or --json FILE).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

from adtr.config import ModelConfig, ScoreConfig, TrainConfig  # noqa: E402
from adtr.data.cifar10 import CLASSES, load_cifar10  # noqa: E402
from adtr.data.splits import split_per_class  # noqa: E402
from adtr.metrics import auroc  # noqa: E402
from adtr.model import ADTR  # noqa: E402
from adtr.oneclass import array_features, fit_class, knn_scores, one_class_split, pooled, score_features  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

ALL_STRIDES = (2, 4, 8, 16, 32)
SCORES = ("mean", "max_pool", "pooled_residual")


def stage_channels(model: ADTR, strides: tuple[int, ...]) -> torch.Tensor:
    """Indices of the channels of `strides` in the all-stage feature tensor."""
    bounds = np.cumsum([0] + [level.channels for level in model.backbone.levels])
    return torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(ALL_STRIDES) if s in strides])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA / "cifar10-jpeg")
    p.add_argument("--classes", default="bird,cat,horse", help="the hardest classes by default")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--backbones", default="lite0,lite2")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--variants", default="[{}]", help="JSON list of dicts (see above)")
    p.add_argument("--json", type=Path, default=REPO / "results" / "cifar10_sweep.json")
    args = p.parse_args()
    configure_cpu(2)
    dev = torch.device("cpu")
    variants = json.loads(args.variants)
    classes = [CLASSES.index(c.strip()) for c in args.classes.split(",")]
    size = (args.image_size, args.image_size)

    t_start = time.perf_counter()
    images, labels = load_cifar10(args.root, "train")
    kept, held = split_per_class(labels)
    train_images, train_labels, val_images, val_labels = images[kept], labels[kept], images[held], labels[held]
    idx = np.concatenate([np.flatnonzero(train_labels == c)[: args.max_train] for c in classes])
    train_images, train_labels = train_images[idx], train_labels[idx]

    rows, results = [], []
    for backbone in args.backbones.split(","):
        extractor = ADTR(ModelConfig(backbone=backbone, image_size=size, strides=ALL_STRIDES))
        train_all = array_features(extractor, train_images, dev)
        val_all = array_features(extractor, val_images, dev)
        for v in variants:
            strides = tuple(v.get("strides", ALL_STRIDES))
            keep = stage_channels(extractor, strides)
            train_raw, val_raw = train_all[:, keep], val_all[:, keep]
            hidden, layers = v.get("hidden_dim", 256), v.get("layers", 2)
            model_cfg = ModelConfig(backbone=backbone, image_size=size, strides=strides, hidden_dim=hidden,
                                    num_encoder_layers=layers, num_decoder_layers=layers,
                                    ffn_dim=2 * hidden)  # fmt: skip
            train_cfg = TrainConfig(epochs=v.get("epochs", 8), batch_size=64, lr=v.get("lr", 1e-3), seed=0)
            per_score: dict[str, list[float]] = {s: [] for s in SCORES}
            knn = []
            t0 = time.perf_counter()
            for c in classes:
                normal, targets = one_class_split(train_labels, val_labels, c)
                model = fit_class(train_raw[normal], model_cfg, ScoreConfig(), train_cfg, dev)
                for s in SCORES:
                    model.score_cfg = ScoreConfig(image_score=s, smoothing_sigma=0.0, pool_size=max(strides))
                    per_score[s].append(auroc(score_features(model, val_raw, dev), targets))
                knn.append(auroc(knn_scores(pooled(train_raw[normal]), pooled(val_raw)), targets))
            r = {"backbone": backbone, **v, **{s: float(np.mean(a)) for s, a in per_score.items()},
                 "knn": float(np.mean(knn)), "per_class": per_score, "seconds": time.perf_counter() - t0}  # fmt: skip
            results.append(r)
            rows.append([backbone, json.dumps(v), *(r[s] for s in SCORES), r["knn"], round(r["seconds"])])
            print(rows[-1], flush=True)
    names = ", ".join(CLASSES[c] for c in classes)
    md = (
        f"# CIFAR-10 one-class settings on the validation split ({names})\n\n"
        f"Command: `python bench/cifar10_sweep.py {shlex.join(sys.argv[1:])}`\n\n"
        f"{args.max_train} training images per class; the held-out last 10% of every class's training "
        f"images is the test set. {args.image_size}x{args.image_size} input; defaults: all five stages, "
        f"hidden dim 256, 2+2 layers, 8 epochs. Mean AUROC over the classes; k-NN on pooled features of the "
        f"same stages. Wall time {(time.perf_counter() - t_start) / 60:.1f} min.\n\n"
        + md_table(["backbone", "variant", *SCORES, "k-NN", "fit+score s"], rows)
        + "\n"
    )  # fmt: skip
    doc = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    write_results(args.json.with_suffix(""), doc, md)


if __name__ == "__main__":
    main()
