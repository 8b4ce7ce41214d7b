"""`adtr update` against a full re-fit: k new defects of one type added to a deployed run.

    python bench/update.py [--data ../shared/data/mvtec/bottle] [--defect broken_large] [--k 5]
                           [--image-size 128] [--steps 100] [--update-steps 50] [--seed 0]
                           [--parent RUN] [--threads 2]

A parent run is fitted on the good training images (normal-only, --steps; or --parent, a run
this bench saved before, whose settings then replace --image-size and --steps); k defects of
--defect are drawn (seeded, data.splits.kshot_split) and leave the test set; then
  update:  the saved parent continued with the k defects (ADTRDetector.update, --update-steps),
           without the training images (its replay features);
  re-fit:  a fit from scratch on the training images + the k defects (--steps).
All three are tested on the SAME remaining test images. Reported per mode: image AUROC, pixel
AUROC, AUPRO, the gain over the parent, wall and process CPU seconds of the fit / update, and
the forgetting guard. Writes results/update.json (files drawn, settings, machine) and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.config import MODEL_PRESETS, TrainConfig, parse_image_size  # noqa: E402
from adtr.data import mvtec  # noqa: E402
from adtr.data.splits import kshot_split  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402
from adtr.update import DEFAULT_STEPS  # noqa: E402

METRICS = ["image_auroc", "pixel_auroc", "aupro"]


def timed(call):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle")
    p.add_argument("--defect", default="broken_large", help="defect type the new defects are drawn from")
    p.add_argument("--k", type=int, default=5, help="new defects")
    p.add_argument("--image-size", default="128", help="input size N or HxW (small: the bench must stay short)")
    p.add_argument("--steps", type=int, default=100, help="steps of the parent fit and of the re-fit")
    p.add_argument("--update-steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parent", type=Path, default=None, help="reuse this parent run instead of fitting one")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine other jobs load)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "update")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "update_bench")
    args = p.parse_args()
    configure_cpu(args.threads)
    model = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=parse_image_size(args.image_size))
    train = TrainConfig(steps=args.steps, seed=args.seed)
    if args.parent is not None:
        parent = ADTRDetector.load(args.parent, progress=False)
        model, train = parent.config.model, parent.config.train
    test = mvtec.test_samples(args.data)
    new_defects, _ = kshot_split([s for s in test if s.defect == args.defect], args.k, args.seed)
    drawn = {s.path for s in new_defects}
    remaining = [s for s in test if s.path not in drawn]

    rows = []

    def record(mode: str, det: ADTRDetector, wall: float, cpu: float) -> None:
        m = det.test(remaining)
        rows.append({"mode": mode, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     **{k: m[k] for k in METRICS}})  # fmt: skip
        print(rows[-1], flush=True)

    if args.parent is None:
        parent, wall, cpu = timed(lambda: ADTRDetector(model, train=train, progress=False).fit(args.data))
        parent.save(args.runs / "parent")
    else:  # its fit is not timed again: wall seconds as it recorded them
        wall, cpu = parent.record_.provenance["fit_seconds"], float("nan")
    record(f"parent (normal-only fit, {train.steps} steps)", parent, wall, cpu)
    loaded = ADTRDetector.load(args.parent or args.runs / "parent", progress=False)
    updated, wall, cpu = timed(lambda: loaded.update(anomalies=new_defects, steps=args.update_steps))
    updated.save(args.runs / "updated")
    record(f"update: +{args.k} {args.defect}, {args.update_steps} steps", updated, wall, cpu)
    fresh = ADTRDetector(model, train=train, progress=False)
    refit, wall, cpu = timed(lambda: fresh.fit(args.data, anomalies=new_defects))
    record(f"re-fit: train/good + {args.k} {args.defect}, {train.steps} steps", refit, wall, cpu)
    for row in rows:
        row["gain"] = {k: row[k] - rows[0][k] for k in METRICS}
    guard = updated.record_.provenance["update"]["forgetting_guard"]

    md = (
        f"# `adtr update` vs a full re-fit on {args.data.name}\n\n"
        f"Command: `python bench/update.py {shlex.join(sys.argv[1:])}`. {args.k} `{args.defect}` images drawn "
        f"(seed {args.seed}) and removed from the test set; every row on the same {len(remaining)} remaining test "
        f"images ({sum(s.label for s in remaining)} anomalous). Input {'x'.join(map(str, model.image_size))}, cpu "
        "preset. Seconds: the fit or update call (features, training, calibration), wall and process CPU time, "
        f"{args.threads} torch threads.\n\n"
        + md_table(["mode", "image AUROC", "pixel AUROC", "AUPRO", "gain image / pixel / AUPRO", "wall s", "CPU s"],
                   [[r["mode"], *(r[k] for k in METRICS), " / ".join(f"{r['gain'][k]:+.4f}" for k in METRICS),
                     r["wall_seconds"], r["cpu_seconds"]] for r in rows])
        + "\n\nUpdate gain minus re-fit gain (points): "
        + ", ".join(f"{k} {100 * (rows[1]['gain'][k] - rows[2]['gain'][k]):+.2f}" for k in METRICS)
        + f".\nForgetting guard: {guard['false_alarm_rate']:.1%} of the parent's {guard['n']} validation good "
        f"images flagged at the new threshold, parent {guard['parent_false_alarm_rate']:.1%} "
        f"({'passed' if guard['passed'] else 'failed'}).\n"
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"machine": machine(), "args": settings, "new_defects": sorted(map(str, drawn)),
           "test_files": [str(s.path) for s in remaining], "results": rows, "forgetting_guard": guard}  # fmt: skip
    write_results(args.out, doc, md)


if __name__ == "__main__":
    main()
