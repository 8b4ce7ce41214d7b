"""The map's smoothing on saved runs: the test figures of each run at other Gaussian sigmas.

    python bench/smoothing_probe.py RUN:DATA [RUN:DATA ...] [--sigmas 1,1.5,2,3] [--out results/smoothing_probe]

RUN is a saved run (e.g. bench/kshot.py's RUNS/<set>/normal, fitted with the library's
defaults), DATA its category folder. The smoothing (ScoreConfig.smoothing_sigma, in input
pixels) sits after the model, so one fit gives every sigma: each run is loaded, its score
settings get the sigma (the anomaly map and the image scorer's map, which gives the image
score, are both smoothed with it), and its test images are scored with PyTorch. Writes OUT.json
and OUT.md: image AUROC / pixel AUROC / AUPRO per run and sigma (docs/design.md, "The map's
smoothing").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, run_data_pairs, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def probe(run: Path, data: Path, sigmas: list[float]) -> list[dict]:
    """One row per sigma: the run's test metrics with its smoothing set to that sigma."""
    rows = []
    det = ADTRDetector.load(run, progress=False, backend="torch")
    for sigma in sigmas:
        score = dataclasses.replace(det.config.score, smoothing_sigma=sigma)
        det.config = dataclasses.replace(det.config, score=score)
        det.model_.score_cfg = score  # rebuilds the map's upsampling with the new kernel
        metrics = det.test(data)
        rows.append({"run": str(run), "data": data.name, "sigma": sigma, **{k: metrics.get(k) for k in METRICS}})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="RUN:DATA, a saved run and its category folder")
    p.add_argument("--sigmas", default="1,1.5,2,3", help="comma-separated Gaussian sigmas in input pixels")
    p.add_argument("--out", type=Path, default=REPO / "results" / "smoothing_probe")
    args = p.parse_args()
    configure_cpu()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    rows = []
    for run, data in run_data_pairs(args.pairs):
        rows += probe(run, data, sigmas)
    command = invocation()
    table = md_table(["data", "sigma", "image AUROC", "pixel AUROC", "AUPRO"],
                     [[r["data"], r["sigma"], *(r[k] if r[k] is not None else "-" for k in METRICS)]
                      for r in rows])  # fmt: skip
    markdown = f"# The map's smoothing on saved runs\n\nCommand: `{command}`\n\n{table}\n"
    write_results(args.out, {"machine": machine(), "command": command, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
