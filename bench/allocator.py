"""Backbone and training time with glibc's default allocator and with adtr.runtime's settings.

Each measurement runs in its own process (the allocator is process-wide): random images
through the frozen backbone after one warm-up batch (ms per image, user and kernel CPU
seconds, minor page faults, peak memory), then reconstructor training steps on those
features (ms per step of batch 64, 2+2 layers).

    python bench/allocator.py [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine, md_table, write_results  # noqa: E402

# (backbone, input size, strides, feature batch, training batch): the MVTec default (--preset cpu)
# and the CIFAR-10 protocol's setting
SETTINGS = [("lite0", 256, (2, 4, 8, 16), 8, 16), ("lite2", 128, (2, 4, 8, 16, 32), 64, 64)]
TRAIN_STEPS = 10
MODES = {"glibc default": {"ADTR_MALLOC": "default"}, "adtr.runtime": {}}


def child(setting: int, batches: int) -> None:
    import torch

    from adtr.config import ModelConfig, ScoreConfig, TrainConfig
    from adtr.model import ADTR
    from adtr.oneclass import fit_class
    from adtr.runtime import configure_cpu

    backbone, size, strides, batch, train_batch = SETTINGS[setting]
    tuned = configure_cpu(2)
    cfg = ModelConfig(backbone=backbone, image_size=(size, size), strides=strides, num_encoder_layers=2,
                      num_decoder_layers=2, ffn_dim=512)  # fmt: skip
    model = ADTR(cfg).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model.extract(x)  # warm-up: first-call allocations and kernel selection
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.extract(x)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    raw = model.extract(x).repeat(TRAIN_STEPS * train_batch // batch, 1, 1, 1)  # one epoch = TRAIN_STEPS steps
    t0 = time.perf_counter()
    fit_class(raw, cfg, ScoreConfig(), TrainConfig(epochs=1, batch_size=train_batch), torch.device("cpu"))
    fit_ms = 1000 * (time.perf_counter() - t0) / TRAIN_STEPS
    print(json.dumps({
        "allocator_tuned": tuned,
        "ms_per_image": 1000 * wall / (batches * batch),
        "user_s": after.ru_utime - before.ru_utime,
        "kernel_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mib": after.ru_maxrss / 1024,
        "train_ms_per_step": fit_ms,
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "results" / "allocator")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.batches)
        return

    rows, results = [], []
    for i, (backbone, size, _, batch, train_batch) in enumerate(SETTINGS):
        for mode, env in MODES.items():
            cmd = [sys.executable, __file__, "--batches", str(args.batches), "--child", str(i)]
            done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            r = {"backbone": backbone, "image_size": size, "batch": batch, "mode": mode,
                 **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
            results.append(r)
            setting = f"{backbone} {size}px, batch {batch} (training {train_batch})"
            rows.append([setting, mode, round(r["ms_per_image"], 2), round(r["user_s"], 1), round(r["kernel_s"], 2),
                         r["minor_faults"], round(r["peak_rss_mib"]), round(r["train_ms_per_step"])])  # fmt: skip
            print(rows[-1], flush=True)
    header = [
        "setting",
        "allocator",
        "ms / image",
        "user CPU s",
        "kernel CPU s",
        "minor faults",
        "peak RSS MiB",
        "train ms / step",
    ]
    md = (
        "# Backbone features and training: glibc's allocator as is vs adtr.runtime\n\n"
        f"Command: `python bench/allocator.py --batches {args.batches}`; random images, "
        f"{args.batches} batches after a warm-up, 2 threads.\n\n" + md_table(header, rows) + "\n"
    )
    write_results(args.out, {"machine": machine(), "batches": args.batches, "results": results}, md)


if __name__ == "__main__":
    main()
