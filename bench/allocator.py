"""Backbone feature time with glibc's default allocator and with adtr.runtime's settings.

Each measurement runs in its own process (the allocator is process-wide): random images
through the frozen backbone, after one warm-up batch; reports ms per image, user and kernel
CPU seconds, minor page faults and peak memory.

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

# (backbone, input size, batch): the MVTec default and the CIFAR-10 protocol's setting
SETTINGS = [("lite0", 256, 8), ("lite2", 128, 64)]
MODES = {"glibc default": {"ADTR_MALLOC": "default"}, "adtr.runtime": {}}


def child(backbone: str, size: int, batch: int, batches: int) -> None:
    import torch

    from adtr.config import ModelConfig
    from adtr.model import ADTR
    from adtr.runtime import configure_cpu

    tuned = configure_cpu(2)
    model = ADTR(ModelConfig(backbone=backbone, image_size=(size, size))).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model.extract(x)  # warm-up: first-call allocations and kernel selection
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(batches):
            model.extract(x)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "allocator_tuned": tuned,
        "ms_per_image": 1000 * wall / (batches * batch),
        "user_s": after.ru_utime - before.ru_utime,
        "kernel_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "peak_rss_mib": after.ru_maxrss / 1024,
    }))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "results" / "allocator")
    p.add_argument("--child", nargs=3, metavar=("BACKBONE", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.batches)
        return

    rows, results = [], []
    for backbone, size, batch in SETTINGS:
        for mode, env in MODES.items():
            cmd = [sys.executable, __file__, "--batches", str(args.batches), "--child", backbone, str(size), str(batch)]
            done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
            r = {"backbone": backbone, "image_size": size, "batch": batch, "mode": mode,
                 **json.loads(done.stdout.strip().splitlines()[-1])}  # fmt: skip
            results.append(r)
            setting = f"{backbone} {size}px, batch {batch}"
            rows.append([setting, mode, round(r["ms_per_image"], 2), round(r["user_s"], 1), round(r["kernel_s"], 1),
                         r["minor_faults"], round(r["peak_rss_mib"])])  # fmt: skip
            print(rows[-1], flush=True)
    header = ["setting", "allocator", "ms / image", "user CPU s", "kernel CPU s", "minor faults", "peak RSS MiB"]
    md = (
        "# Backbone features: glibc's allocator as is vs adtr.runtime\n\n"
        f"Command: `python bench/allocator.py --batches {args.batches}`; random images, "
        f"{args.batches} batches after a warm-up, 2 threads.\n\n" + md_table(header, rows) + "\n"
    )
    write_results(args.out, {"machine": machine(), "batches": args.batches, "results": results}, md)


if __name__ == "__main__":
    main()
