"""`adtr update` against a full re-fit: k new defects of one type added to a deployed run.

    python bench/update.py [--data ../shared/data/mvtec/bottle] [--defect broken_large] [--k 5]
                           [--image-size 128] [--steps 100] [--update-steps 50] [--seed 0]
                           [--parent RUN] [--threads 2] [--resume]

A parent run is fitted on the good training images (normal-only, --steps; or --parent, a run
this bench saved before, whose settings then replace --image-size and --steps); k defects of
--defect are drawn (seeded, data.splits.kshot_split) and leave the test set; then
  update:  the saved parent continued with the k defects (ADTRDetector.update, --update-steps),
           without the training images (its replay features);
  re-fit:  a fit from scratch on the training images + the k defects (--steps).
All three are tested on the SAME remaining test images. Reported per mode: image AUROC, pixel
AUROC, AUPRO, the gain over the parent, wall and process CPU seconds of the fit / update, and
the forgetting guard. Writes results/update.json (files drawn, settings, machine) and .md.
On a loaded machine a run may be cut short: finished rows are kept in RUNS/rows.json and the
re-fit saves a resumable state, so `--resume` (same settings) continues where it stopped; a
resumed re-fit's seconds are only those of its last part, and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.checkpoint import has_train_state  # noqa: E402
from adtr.config import MODEL_PRESETS, TrainConfig, parse_image_size  # noqa: E402
from adtr.data import mvtec  # noqa: E402
from adtr.data.splits import kshot_split  # noqa: E402
from adtr.fileio import atomic_write_json  # noqa: E402
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
    p.add_argument("--resume", action="store_true", help="keep what an interrupted run with these settings finished")
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

    settings = {"data": str(args.data), "defect": args.defect, "k": args.k, "seed": args.seed,
                "image_size": list(model.image_size), "steps": train.steps,
                "update_steps": args.update_steps}  # fmt: skip
    done_path = args.runs / "rows.json"
    done = json.loads(done_path.read_text()) if args.resume and done_path.is_file() else {}
    done = done.get("rows", {}) if done.get("settings") == settings else {}
    rows = []
    command = f"python bench/update.py {shlex.join(sys.argv[1:])}"

    def row(mode: str, make) -> None:
        """Fit or update (make() -> detector, wall s, CPU s), test on the remaining images, keep the row."""
        if mode not in done:
            det, wall, cpu = make()
            m = det.test(remaining)
            seconds = {"wall_seconds": wall, "cpu_seconds": cpu}  # None: not measured in this run
            done[mode] = {"mode": mode, **{k: v if v is None else round(v, 1) for k, v in seconds.items()},
                          **{k: m[k] for k in METRICS}, "command": command}  # fmt: skip
            if det.record_.provenance.get("update"):
                done[mode]["forgetting_guard"] = det.record_.provenance["update"]["forgetting_guard"]
            atomic_write_json(done_path, {"settings": settings, "rows": done})
        rows.append(done[mode])
        print(rows[-1], flush=True)

    def fit_parent():
        if args.parent is not None:  # not timed again: the wall seconds it recorded
            return parent, parent.record_.provenance["fit_seconds"], None
        fitted = timed(lambda: ADTRDetector(model, train=train, progress=False).fit(args.data))
        fitted[0].save(args.runs / "parent")
        return fitted

    def update():
        loaded = ADTRDetector.load(args.parent or args.runs / "parent", progress=False)
        updated = timed(lambda: loaded.update(anomalies=new_defects, steps=args.update_steps))
        updated[0].save(args.runs / "updated")
        return updated

    def refit():
        state = args.runs / "refit"
        resume = args.resume and has_train_state(state)
        fresh = ADTRDetector(model, train=train, progress=False)
        det, wall, cpu = timed(lambda: fresh.fit(args.data, anomalies=new_defects, checkpoint_dir=state, resume=resume))
        return det, (None if resume else wall), (None if resume else cpu)

    row(f"parent (normal-only fit, {train.steps} steps)", fit_parent)
    row(f"update: +{args.k} {args.defect}, {args.update_steps} steps (none where only the defect head is fitted)",
        update)
    row(f"re-fit: train/good + {args.k} {args.defect}, {train.steps} steps", refit)
    for r in rows:
        r["gain"] = {k: r[k] - rows[0][k] for k in METRICS}
    guard = rows[1]["forgetting_guard"]

    md = (
        f"# `adtr update` vs a full re-fit on {args.data.name}\n\n"
        f"Command: `{command}`. {args.k} `{args.defect}` images drawn "
        f"(seed {args.seed}) and removed from the test set; every row on the same {len(remaining)} remaining test "
        f"images ({sum(s.label for s in remaining)} anomalous). Input {'x'.join(map(str, model.image_size))}, cpu "
        "preset. Seconds: the fit or update call (features, training, calibration), wall and process CPU time "
        f"(torch threads: {args.threads}; None: not measured by this run)."
        + (f" The parent is {args.parent}, fitted by an earlier run of this bench." if args.parent else "")
        + "\n\n"
        + md_table(["mode", "image AUROC", "pixel AUROC", "AUPRO", "gain image / pixel / AUPRO", "wall s", "CPU s"],
                   [[r["mode"], *(r[k] for k in METRICS), " / ".join(f"{r['gain'][k]:+.4f}" for k in METRICS),
                     r["wall_seconds"], r["cpu_seconds"]] for r in rows])
        + "\n\nUpdate gain minus re-fit gain (points): "
        + ", ".join(f"{k} {100 * (rows[1]['gain'][k] - rows[2]['gain'][k]):+.2f}" for k in METRICS)
        + f".\nForgetting guard: {guard['false_alarm_rate']:.1%} of the parent's {guard['n']} validation good "
        f"images flagged at the new threshold, parent {guard['parent_false_alarm_rate']:.1%} "
        f"({'passed' if guard['passed'] else 'failed'}).\n\nEach row's command (rows of an interrupted run are "
        "kept by --resume):\n\n" + "".join(f"- {r['mode']}: `{r['command']}`\n" for r in rows)
    )  # fmt: skip
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc = {"machine": machine(), "args": arguments, "new_defects": sorted(map(str, drawn)),
           "test_files": [str(s.path) for s in remaining], "results": rows, "forgetting_guard": guard}  # fmt: skip
    write_results(args.out, doc, md)


if __name__ == "__main__":
    main()
