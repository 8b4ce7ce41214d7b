"""The distance to the nearest good feature as a map, probed on saved runs against their test figures.

    python bench/nearest_map_probe.py RUN:DATA [RUN:DATA ...] [--features all,all_pool3,deep_pool3]
                                      [--bank-sizes 4096] [--search-dims 0] [--weights 0.5,1,2]
                                      [--out results/nearest_map_probe]

RUN is a saved normal-only run (e.g. `adtr fit DATA --out RUN` with the library's defaults),
DATA its category folder with masks. For each feature choice and bank size, a memory bank
(adtr/memory_bank.py: greedy coreset of that many rows) of the run's training images' features
(its held-out good images excluded) maps each test image by the distance of each position to its
nearest row (PatchCore, Roth et al., CVPR 2022). Feature choices: "all", the run's standardised
features (every stage); "all_pool3", the same averaged over 3x3 neighbourhoods (PatchCore's local
aggregation); "deep_pool3", the stride-8 and stride-16 stages only (PatchCore's), averaged 3x3:
memory_bank.patch_features, what ScoreConfig.nearest_map uses; "deep_pool3_raw", the same on the
backbone's raw scale (PatchCore's: each channel weighed by its spread, not standardised). Pixel
AUROC and AUPRO of:
- the run's own map, and its reconstruction error alone (the same unless the run has a bank);
- the nearest distance alone;
- the reconstruction error + w x the nearest distance standardised by the held-out good images' distances
  (mean and std, clipped at 0, as ADTR.nearest_grid), for each w of --weights (deep_pool3 at 4096
  rows and w 1: the library's);
and the distance's milliseconds per test image (batches of 16, PyTorch). --search-dims: the nearest
row searched among the bank's first D principal components, the exact distance to the row found
(memory_bank.search_basis, ScoreConfig.nearest_search_dims; 0: exact), each D a row of its own,
with the share of the bank's variance those components explain and the test positions' mean
distance above the exact one (relative). Writes OUT.json and OUT.md
(docs/design.md, "The nearest good feature joins the map of a copying model").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, run_data_pairs, sample_masks, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.data.images import image_size  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.splits import split_validation  # noqa: E402
from adtr.engine import extract_features  # noqa: E402
from adtr.evaluate import ResizedMaps  # noqa: E402
from adtr.fit import calibration_source  # noqa: E402
from adtr.memory_bank import fit_memory_bank, nearest_distance, patch_features, search_basis  # noqa: E402
from adtr.metrics import pixel_metrics  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

FEATURES = ("all", "all_pool3", "deep_pool3", "deep_pool3_raw")


def probe(run: Path, data: Path, features: list[str], sizes: list[int], weights: list[float],
          search_dims: list[int]) -> dict:  # fmt: skip
    det = ADTRDetector.load(run, progress=False, backend="torch")
    model, cfg, cpu = det.model_.eval(), det.config, torch.device("cpu")
    train, test = train_samples(data), test_samples(data)
    tr_idx, val_idx = split_validation(len(train), cfg.train.val_fraction, cfg.train.seed)
    if calibration_source(cfg.train.calibration, len(train), len(val_idx)) != "held_out" or len(val_idx) < 2:
        raise SystemExit(f"{run}: not fitted with held-out good images; nothing to standardise with")
    shapes = [image_size(s.path) for s in test]
    masks = sample_masks(test, shapes)
    if masks is None:
        raise SystemExit(f"{data}: no masks for every anomalous test image; pixel metrics need them")
    with torch.no_grad():
        f_train = model.standardize(extract_features(model, train, cpu, progress=False))
        f_test = model.standardize(extract_features(model, test, cpu, progress=False))
        own, error = [], []  # the run's map and its reconstruction error, from one residual per batch
        for b in model._batches(f_test, 16):
            r = model.residual(b)
            own.append(model.residual_grid(r, b))
            error.append(model._grid_error(r, model.position_mean, model.position_std))
        own, error = torch.cat(own), torch.cat(error)

    def view(f: torch.Tensor, name: str) -> torch.Tensor:  # the features as the choice `name` sees them
        if name == "deep_pool3_raw":  # raw up to a shift per channel, which changes no distance
            return model.patch_features(f * model.feature_std)
        return {"all": f, "all_pool3": patch_features(f), "deep_pool3": model.patch_features(f)}[name]

    def metrics(grid: torch.Tensor) -> dict:
        with torch.no_grad():
            maps = model.upsample(grid.float())[:, 0].numpy()
        pm = pixel_metrics(ResizedMaps(list(maps), shapes), masks)
        return {"pixel_auroc": pm["pixel_auroc"], "aupro": pm["aupro"]}

    rows = [{"map": "the run's", **metrics(own)}]
    print(data.name, rows[-1], flush=True)
    if cfg.score.nearest_map:
        rows.append({"map": "the run's reconstruction error alone", **metrics(error)})
        print(data.name, rows[-1], flush=True)
    for name in features:
        for size in sizes:
            t0 = time.perf_counter()
            bank = fit_memory_bank(view(f_train[tr_idx], name), size=size)
            fit_s = time.perf_counter() - t0
            exact = None
            for dims in search_dims:
                basis = search_basis(bank, dims) if 0 < dims < bank.shape[1] else None
                what = f"{name}, {size} rows" + (f", searched in {dims} dims" if basis is not None else "")
                with torch.no_grad():
                    held = torch.cat([nearest_distance(view(b, name), bank, basis)
                                      for b in model._batches(f_train[val_idx], 16)])  # fmt: skip
                    t0 = time.perf_counter()
                    dist = torch.cat([nearest_distance(view(b, name), bank, basis) for b in model._batches(f_test, 16)])
                    ms = 1000 * (time.perf_counter() - t0) / len(f_test)
                held = held.double()
                z = ((dist - held.mean()) / held.std()).clamp_min(0).float()
                row = {"map": f"nearest ({what}) alone", "bank_s": round(fit_s, 1),
                       "ms_per_image": round(ms, 1), **metrics(dist)}  # fmt: skip
                if basis is None:
                    exact = dist
                else:
                    centred = bank.double() - bank.double().mean(0)
                    row["explained"] = round(float((centred @ basis.double()).pow(2).sum() / centred.pow(2).sum()), 4)
                    if exact is not None:
                        row["excess"] = round(float(((dist - exact) / exact.clamp_min(1e-6)).mean()), 4)
                rows.append(row)
                print(data.name, row, flush=True)
                for w in weights:
                    rows.append({"map": f"error + {w:g} x nearest ({what})", **metrics(error + w * z)})
                    print(data.name, rows[-1], flush=True)
    return {"run": str(run), "data": str(data), "set": data.name, "nearest_map": cfg.score.nearest_map,
            "held_out": len(val_idx), "rows": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="RUN:DATA")
    p.add_argument("--features", default="deep_pool3", help=f"comma-separated subset of {', '.join(FEATURES)}")
    p.add_argument("--bank-sizes", default="4096", help="comma-separated bank rows")
    p.add_argument("--weights", default="0.5,1,2", help="comma-separated weights of the standardised distance")
    p.add_argument("--search-dims", default="0", help="comma-separated dimensions of the bank's search (0: exact)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "nearest_map_probe")
    args = p.parse_args()
    features = args.features.split(",")
    if not set(features) <= set(FEATURES):
        raise SystemExit(f"--features: choose from {', '.join(FEATURES)}, got {args.features!r}")
    sizes = [int(s) for s in args.bank_sizes.split(",")]
    weights = [float(w) for w in args.weights.split(",")]
    configure_cpu(2)
    dims = [int(d) for d in args.search_dims.split(",")]
    sets = [probe(run, data, features, sizes, weights, dims) for run, data in run_data_pairs(args.pairs)]
    command = invocation()
    parts = ["# The nearest good feature as a map, probed on saved runs\n", f"`{command}`\n"]
    cols = ["map", "pixel_auroc", "aupro", "bank_s", "ms_per_image", "explained", "excess"]
    for d in sets:
        parts.append(f"## {d['set']} ({d['held_out']} held-out good images; the run's nearest_map: "
                     f"{d['nearest_map']})\n")  # fmt: skip
        parts.append(md_table(["map", "pixel AUROC", "AUPRO", "bank s", "ms/image", "variance explained",
                               "distance above exact"],
                              [[r.get(c, "") for c in cols] for r in d["rows"]]) + "\n")  # fmt: skip
    write_results(args.out, {"command": command, "machine": machine(), "sets": sets}, "\n".join(parts))


if __name__ == "__main__":
    main()
