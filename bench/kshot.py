"""Anomaly-available training on MVTec, without leaks: normal-only vs +synthetic vs +k real.

    python bench/kshot.py --data ../shared/data/mvtec/bottle [--ks 1,3,5] [--seed 0]

For every defect type, max(ks) test images are drawn (seeded); the first k train, and all
of them leave the test set, so every mode is evaluated on the SAME remaining images. The
anomaly-available modes start from the normal-only model (the paper's schedule) and train
for --epochs more. Writes results/kshot.json (with k, the seed and every file used) and
results/kshot.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.config import TrainConfig  # noqa: E402
from adtr.data import mvtec  # noqa: E402
from adtr.data.splits import kshot_split  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

METRICS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle")
    p.add_argument("--ks", default="1,3,5", help="comma-separated numbers of real anomalies per defect type")
    p.add_argument("--synthetic", default="confetti", help="generators for the synthetic mode ('' = skip)")
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="epochs of every fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "results" / "kshot")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "kshot")
    args = p.parse_args()
    configure_cpu(2)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    pool = max(ks)
    test = mvtec.test_samples(args.data)
    _, remaining = kshot_split(test, 0, args.seed, pool_size=pool)
    train_cfg = TrainConfig(epochs=args.epochs, seed=args.seed)

    def run(name: str, **fit_args) -> dict:
        t0 = time.perf_counter()
        det = ADTRDetector(train=train_cfg, progress=False).fit(args.data, **fit_args)
        fit_s = time.perf_counter() - t0
        m = det.test(remaining)
        row = {"mode": name, "fit_seconds": round(fit_s, 1), **{k: m[k] for k in METRICS}}
        print(row, flush=True)
        return row | {"detector": det}

    results = []
    normal = run("normal-only")
    base = args.runs / "normal"
    normal.pop("detector").save(base)
    results.append(normal)
    if args.synthetic:
        synth = [s.strip() for s in args.synthetic.split(",")]
        r = run(f"+synthetic ({'+'.join(synth)})", synthetic=synth, init=base)
        r.pop("detector")
        results.append(r)
    for k in ks:
        anomalies, rest = kshot_split(test, k, args.seed, pool_size=pool)
        assert [s.path for s in rest] == [s.path for s in remaining]
        r = run(f"+{k} real per defect", anomalies=anomalies, init=base)
        r.pop("detector")
        results.append(r | {"k": k, "train_anomalies": [str(s.path) for s in anomalies]})

    md = (
        f"# Anomaly-available training on {args.data.name} (leak-free k-shot)\n\n"
        f"Command: `python bench/kshot.py {shlex.join(sys.argv[1:])}`. {pool} anomalies per defect type "
        f"held out (seed {args.seed}); all rows on the same {len(remaining)} remaining test images "
        f"({sum(s.label for s in remaining)} anomalous). {args.epochs} epochs per fit; the anomaly modes "
        "start from the normal-only model.\n\n"
        + md_table(["mode", "image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "fit s"],
                   [[r["mode"], *(r[k] for k in METRICS), r["fit_seconds"]] for r in results])
        + "\n"
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    files = [str(s.path) for s in remaining]
    doc = {"machine": machine(), "args": settings, "test_files": files, "results": results}
    write_results(args.out, doc, md)


if __name__ == "__main__":
    main()
