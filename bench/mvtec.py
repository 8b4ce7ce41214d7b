"""Fit and test ADTR on MVTec AD categories with the CLI, as a user would.

    python bench/mvtec.py --root ../shared/data/mvtec --categories bottle [--epochs N] [--preset cpu]

Writes results/mvtec.json and results/mvtec.md: image AUROC, pixel AUROC, AUPRO, image
F1-max, fit seconds, inference images/s (batch 8, backbone included, decoding excluded) and
the peak memory of the fit and test processes. Expected on bottle with the defaults (2
cores): image AUROC ~0.996, pixel AUROC ~0.983, AUPRO ~0.95, fit ~3 min.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, adtr_command, machine, md_table, run_measured, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=DEFAULT_DATA / "mvtec", help="folder of MVTec categories")
    p.add_argument("--categories", default="bottle", help="comma-separated category names, or 'all'")
    p.add_argument("--out", type=Path, default=REPO / "results" / "mvtec", help="results stem (.json/.md)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench", help="where run folders go")
    p.add_argument("--epochs", type=int, default=None, help="override the default epoch count")
    p.add_argument("--preset", default="cpu", help="model preset (cpu or paper)")
    p.add_argument("--backbone", default="lite0")
    p.add_argument("--image-size", default="256")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.categories == "all":
        names = sorted(d.name for d in args.root.iterdir() if (d / "train").is_dir())
    else:
        names = [c.strip() for c in args.categories.split(",")]
    rows, results = [], []
    for cat in names:
        run = args.runs / cat
        fit_cmd = adtr_command() + ["fit", str(args.root / cat), "--out", str(run), "--force", "--quiet",
                                    "--preset", args.preset, "--backbone", args.backbone,
                                    "--image-size", args.image_size, "--seed", str(args.seed)]  # fmt: skip
        if args.epochs is not None:
            fit_cmd += ["--epochs", str(args.epochs)]
        fit_s, fit_mib, _ = run_measured(fit_cmd)
        metrics_path = run / "metrics.json"
        test_cmd = adtr_command() + ["test", str(run), str(args.root / cat), "--json", str(metrics_path)]
        test_cmd.append("--quiet")
        test_s, test_mib, _ = run_measured(test_cmd)
        m = json.loads(metrics_path.read_text())
        m.pop("scores", None)
        entry = {
            "category": cat,
            **{k: m.get(k) for k in ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "n_images"]},
            "fit_seconds": round(fit_s, 1),
            "test_seconds": round(test_s, 1),
            "images_per_second": round(m["images_per_second"], 1),
            "peak_mib_fit": round(fit_mib),
            "peak_mib_test": round(test_mib),
            "fit_command": shlex.join(fit_cmd),
            "test_command": shlex.join(test_cmd),
        }
        results.append(entry)
        rows.append([cat, m.get("image_auroc"), m.get("pixel_auroc"), m.get("aupro"), m.get("image_f1_max"),
                     entry["fit_seconds"], entry["images_per_second"], entry["peak_mib_fit"],
                     entry["peak_mib_test"]])  # fmt: skip
        print(rows[-1], flush=True)
    md = (
        f"# MVTec AD: ADTR ({args.preset} preset, {args.backbone}, {args.image_size})\n\n"
        f"Command: `python bench/mvtec.py {shlex.join(sys.argv[1:])}`\n\n"
        + md_table(
            ["category", "image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "fit s", "img/s (batch 8)",
             "peak MiB fit", "peak MiB test"],
            rows,
        )
        + "\n"
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(args.out, {"machine": machine(), "args": settings, "results": results}, md)


if __name__ == "__main__":
    main()
