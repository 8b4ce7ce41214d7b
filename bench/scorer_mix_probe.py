"""The map mixed with the image scorer's map, on saved runs: the test figures per mixing weight.

    python bench/scorer_mix_probe.py RUN:DATA [RUN:DATA ...] [--weights 0,0.25,0.5,0.75,1]
                                     [--out results/scorer_mix_probe]

RUN is a saved normal-only run with an image scorer (e.g. bench/kshot.py's RUNS/<set>/normal,
fitted with the library's defaults), DATA its category folder. Both of the run's maps are
standardised per position on the token grid (ADTR.residual_grid, ADTR.scorer_grid), so they can
be mixed there: grid = (1 - a) x the reconstructor's + a x the image scorer's, then upsampled and
smoothed as the run does. For each weight a the mixed map gives the pixel AUROC / AUPRO and its
image score (ScoreConfig.image_score) the image AUROC; a 0 is the run's map, a 1 the run's image
score. Scored with PyTorch. Writes OUT.json and OUT.md (docs/design.md, "The map mixed with the
image scorer's").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, run_data_pairs, sample_masks, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.data.images import image_size  # noqa: E402
from adtr.data.mvtec import test_samples  # noqa: E402
from adtr.engine import extract_features  # noqa: E402
from adtr.evaluate import ResizedMaps  # noqa: E402
from adtr.metrics import image_metrics, pixel_metrics  # noqa: E402
from adtr.model import map_image_score  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def probe(run: Path, data: Path, weights: list[float]) -> list[dict]:
    """One row per mixing weight: the run's test metrics with the mixed map."""
    model = ADTRDetector.load(run, progress=False, backend="torch").model_.eval()
    if model.image_scorer is None:
        raise SystemExit(f"{run}: the run has no image scorer to mix with")
    test = test_samples(data)
    labels = np.array([s.label for s in test])
    sizes = [image_size(s.path) for s in test]
    masks = sample_masks(test, sizes)
    with torch.no_grad():
        f = model.standardize(extract_features(model, test, torch.device("cpu"), progress=False))
        own = torch.cat([model.residual_grid(model.residual(b), b) for b in model._batches(f, 16)])
        scorer = torch.cat([model.scorer_grid(b) for b in model._batches(f, 16)])
    rows = []
    for a in weights:
        with torch.no_grad():
            m = model.upsample((1 - a) * own + a * scorer)
            score = map_image_score(m, model.score_cfg, model.cfg.image_size)
        row = {"run": str(run), "data": data.name, "weight": a, "pixel_auroc": None, "aupro": None,
               "image_auroc": image_metrics(score.double().numpy(), labels)["image_auroc"]}  # fmt: skip
        if masks is not None:
            row.update({k: v for k, v in pixel_metrics(ResizedMaps(list(m[:, 0].numpy()), sizes), masks).items()
                        if k in METRICS})  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="RUN:DATA, a saved run and its category folder")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="comma-separated weights of the scorer's map")
    p.add_argument("--out", type=Path, default=REPO / "results" / "scorer_mix_probe")
    args = p.parse_args()
    configure_cpu()
    weights = [float(w) for w in args.weights.split(",")]
    if not all(0 <= w <= 1 for w in weights):
        raise SystemExit(f"--weights: each must be in [0, 1], got {args.weights}")
    rows = []
    for run, data in run_data_pairs(args.pairs):
        rows += probe(run, data, weights)
    command = invocation()
    table = md_table(["data", "scorer's weight", "image AUROC", "pixel AUROC", "AUPRO"],
                     [[r["data"], r["weight"], *(r[k] if r[k] is not None else "-" for k in METRICS)]
                      for r in rows])  # fmt: skip
    markdown = f"# The map mixed with the image scorer's map, on saved runs\n\nCommand: `{command}`\n\n{table}\n"
    write_results(args.out, {"machine": machine(), "command": command, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
