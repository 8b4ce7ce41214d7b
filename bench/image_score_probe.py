"""Three ways to a better image score or map, probed on saved runs against their test figures.

    python bench/image_score_probe.py RUN:DATA [RUN:DATA ...] [--scorers JSON] [--no-fusion] [--no-flips]
                                      [--misses [--size-bins 100,300,1000]] [--padim]
                                      [--gaussian [--gaussian-covariance]] [--out results/image_score_probe]

RUN is a saved normal-only run with an image scorer (e.g. bench/kshot.py's RUNS/<set>/normal,
fitted with the library's defaults), DATA its category folder. Scored with PyTorch.

1. The image scorer retrained (`--scorers`, a JSON list of {"mult": M, "seed": S}): a fresh CNN
   (initialised under torch.manual_seed(1000 + S)) trained M times the epochs of the run's
   TrainConfig.steps at 256x256 (TrainConfig.image_scorer_epochs, the library's 5: the scorer
   does not shorten its budget for a larger input as the reconstructor does) with seed S on the run's training
   features, its statistics and per-position weight chosen as a fit does (on the run's
   held-out good images); the image AUROC of each, and of the mean of the first 2, 3, ...
   scorers' grid errors (a seed ensemble). Retrained scorers do not reproduce the run's own
   (another weight draw): compare them with each other.
2. Late fusion (unless `--no-fusion`): the run's image score and the maximum of its map (the
   transformer's), each z-scored with the mean and std of the run's held-out good images, summed
   at weight w of the map's: image AUROC per w.
3. PaDiM fusion (`--padim`): bench/references.py's PaDiM-Lite0 at the run's input size, fitted on
   the run's training images (its held-out good images excluded), scores the held-out and the test
   images; the run's image score and PaDiM's, each z-scored with the held-out good images' mean and
   std, summed at weight w of PaDiM's: image AUROC per w, beside the run's chosen per-position weight
   of its image scorer (which tells aligned parts from parts that lie anywhere).
4. A Gaussian per position of the run's features (`--gaussian`; adtr/feature_gaussian.py, the
   image score of aligned parts since ScoreConfig.feature_gaussian): fitted on the run's training
   images (held-out ones excluded) for each (dims, channel seed) of GAUSSIAN_VARIANTS, its
   distance grid scored as the run scores its image scorer's (upsampled, smoothed, top 1%): image
   AUROC of each, beside the run's own score and its scorer's per-position weight. With
   `--gaussian-covariance`, also the covariance's regularisation, 100 channels with seeds 0, 1, 2:
   ridges of GAUSSIAN_RIDGES (the product's, PaDiM's, is 0.01) and Ledoit-Wolf shrinkage towards
   the mean variance times I (Ledoit & Wolf, J. Multivariate Analysis 2004; the shrinkage per
   position).
5. Flipped views (unless `--no-flips`): the map averaged with the map of the image flipped
   left-right (and up-down), flipped back; image AUROC of the summed image scores, pixel AUROC
   and AUPRO of the averaged maps.

With `--misses`, where the test images have masks: where the run's image score loses, the
misordered (good, defective) pairs (a good image scored at or above a defective one) counted by
the size of the defective image's mask in original pixels (`--size-bins`), and the good images
scored highest.

Writes OUT.json and OUT.md (docs/design.md, "Three probes of the image score and the map").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, run_data_pairs, sample_masks, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.config import RunConfig  # noqa: E402
from adtr.data.images import image_size, read_image  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.samples import Sample  # noqa: E402
from adtr.data.splits import split_validation  # noqa: E402
from adtr.data.transforms import resize_image  # noqa: E402
from adtr.engine import TrainingData, extract_features, fit_image_scorer  # noqa: E402
from adtr.evaluate import ResizedMaps  # noqa: E402
from adtr.fit import calibration_source  # noqa: E402
from adtr.metrics import image_metrics, pixel_metrics  # noqa: E402
from adtr.model import ADTR, map_image_score  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

FUSION_WEIGHTS = (0.25, 0.5, 1.0)
SIZE_BINS = (100, 300, 1000)  # mask pixels: bins [0, 100), [100, 300), [300, 1000), [1000, ...)
GAUSSIAN_VARIANTS = ((100, 0), (100, 1), (100, 2), (64, 0), (192, 0))  # (dims, channel seed)
GAUSSIAN_RIDGES = (0.001, 0.003, 0.01, 0.03, 0.1, 1.0)
FLIPS = {"left-right": (-1,), "up-down": (-2,)}


def _auroc(scores: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Image AUROC of scores (N,) against 0/1 labels (N,)."""
    return float(image_metrics(np.asarray(scores, dtype=np.float64), labels)["image_auroc"])


def retrained_scorers(model: ADTR, run_cfg: RunConfig, f_train: torch.Tensor, tr_idx: list[int], val_idx: list[int],
                      f_test: torch.Tensor, labels: np.ndarray, variants: list[dict]) -> list[dict]:  # fmt: skip
    """Part 1: one row per retrained scorer, then one per seed ensemble of the first n."""
    rows, grids = [], []
    for v in variants:
        m = copy.deepcopy(model)
        m.score_cfg = dataclasses.replace(m.score_cfg, scorer_position_weight=None)  # chosen again, as a fit does
        torch.manual_seed(1000 + v["seed"])
        for layer in m.image_scorer.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        cfg = dataclasses.replace(run_cfg.train, image_scorer_epochs=v["mult"], seed=v["seed"])
        t0 = time.perf_counter()
        m.train()
        history = fit_image_scorer(m, TrainingData(f_train[tr_idx], None, None), f_train[val_idx], cfg,
                                   torch.device("cpu"), progress=False)  # fmt: skip
        m.eval()
        seconds = time.perf_counter() - t0
        m.set_residual_scale(f_train[tr_idx], held=f_train[val_idx])
        with torch.no_grad():
            g = torch.cat([m.scorer_grid(b) for b in m._batches(f_test, 16)])
            score = map_image_score(m.upsample(g), m.score_cfg, m.cfg.image_size)
        grids.append(g)
        row = {"scorer": f"x{v['mult']} seed {v['seed']}", "epochs": len(history),
               "val_loss": history[-1].get("val_loss"), "position_weight": m.score_cfg.scorer_position_weight,
               "train_s": round(seconds, 1), "image_auroc": _auroc(score, labels)}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    for n in range(2, len(grids) + 1):
        with torch.no_grad():
            score = map_image_score(model.upsample(sum(grids[:n]) / n), model.score_cfg, model.cfg.image_size)
        row = {"scorer": f"mean of the first {n}", "image_auroc": _auroc(score, labels)}
        rows.append(row)
        print(row, flush=True)
    return rows


def misses_by_size(model: ADTR, f_test: torch.Tensor, test: list[Sample], masks: list[np.ndarray],
                   bins: tuple[int, ...], top: int = 8) -> dict:  # fmt: skip
    """Misordered (good, defective) pairs of the run's image score, by the defective mask's
    pixels (rows), and the `top` good images scored highest (file name, score)."""
    labels = np.array([t.label for t in test])
    with torch.no_grad():
        s = torch.cat([model.score(b).anomaly_score for b in model._batches(f_test, 16)]).double().numpy()
    good_idx, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    good = s[good_idx]
    area = np.array([int(masks[i].sum()) for i in bad])
    missed = np.array([(good >= s[i]).sum() for i in bad])
    edges = [0, *bins, None]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (area >= lo) & (area < hi) if hi is not None else area >= lo
        rows.append({"mask_pixels": f"[{lo}, {hi})" if hi is not None else f">= {lo}", "images": int(sel.sum()),
                     "misordered_pairs": int(missed[sel].sum()),
                     "below_the_top_good": int((s[bad[sel]] <= good.max()).sum())})  # fmt: skip
    rows.append({"mask_pixels": "all", "images": len(bad), "misordered_pairs": int(missed.sum()),
                 "below_the_top_good": int((s[bad] <= good.max()).sum())})  # fmt: skip
    order = good_idx[np.argsort(-good, kind="stable")[:top]]
    top_good = [{"file": Path(test[i].path).name, "score": float(s[i])} for i in order]
    print(rows, top_good, flush=True)
    return {"rows": rows, "top_good": top_good}


def fusion(model: ADTR, f_held: torch.Tensor, f_test: torch.Tensor, labels: np.ndarray) -> dict:
    """Part 2: image AUROC of the run's score, its map's maximum, and their sums, each z-scored
    with the mean and std of the held-out good images' (f_held)."""

    def scores(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        own, peak = [], []
        with torch.no_grad():
            for b in model._batches(f, 16):
                out = model.score(b)
                own.append(out.anomaly_score)
                peak.append(out.anomaly_map.flatten(1).amax(1))
        return torch.cat(own).double().numpy(), torch.cat(peak).double().numpy()

    held, test = scores(f_held), scores(f_test)
    z = [(t - h.mean()) / max(float(h.std()), 1e-12) for t, h in zip(test, held, strict=True)]
    row = {"run_score": _auroc(test[0], labels), "map_max": _auroc(test[1], labels)}
    for w in FUSION_WEIGHTS:
        row[f"fused_w{w}"] = _auroc(z[0] + w * z[1], labels)
    print(row, flush=True)
    return row


def padim_fusion(model: ADTR, train: list[Sample], tr_idx: list[int], val_idx: list[int], test: list[Sample],
                 labels: np.ndarray, f_held: torch.Tensor, f_test: torch.Tensor) -> dict:  # fmt: skip
    """Part 3: the run's image score z-summed with PaDiM's (both z-scored on the held-out good images)."""
    from references import padim

    def run_scores(f: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model.score(b).anomaly_score for b in model._batches(f, 16)]).double().numpy()

    held = [train[i] for i in val_idx]
    ref = padim([train[i] for i in tr_idx], held + list(test), tuple(model.cfg.image_size))
    p_held, p_test = ref.scores[: len(held)].astype(np.float64), ref.scores[len(held) :].astype(np.float64)
    r_held, r_test = run_scores(f_held), run_scores(f_test)

    def z(t: np.ndarray, h: np.ndarray) -> np.ndarray:
        return (t - h.mean()) / max(float(h.std()), 1e-12)

    row = {"scorer_position_weight": model.score_cfg.scorer_position_weight,
           "run_score": _auroc(r_test, labels), "padim": _auroc(p_test, labels)}  # fmt: skip
    for w in FUSION_WEIGHTS:
        row[f"fused_w{w}"] = _auroc(z(r_test, r_held) + w * z(p_test, p_held), labels)
    print(row, flush=True)
    return row


def ledoit_wolf_gaussian(f: torch.Tensor, dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fit_feature_gaussian's (channels, mean, precision), on the CPU, the covariance per position shrunk
    towards its mean variance times I with Ledoit-Wolf's shrinkage (Ledoit & Wolf 2004,
    Lemma 3.2 / Theorem 3.3: delta = min(1, b^2 / d^2) on the maximum-likelihood covariance)."""
    from adtr.feature_gaussian import _positions

    c = f.shape[1]
    d = min(dims, c)
    channels = torch.randperm(c, generator=torch.Generator().manual_seed(seed))[:d].sort().values
    x = _positions(f, channels)  # (P, n, d)
    n = x.shape[1]
    mean = x.mean(1)
    xc = x - mean.unsqueeze(1)
    s = xc.transpose(1, 2) @ xc / n
    eye = torch.eye(d, dtype=torch.float64)
    mu = s.diagonal(dim1=1, dim2=2).mean(1)
    d2 = ((s - mu[:, None, None] * eye) ** 2).sum((1, 2))
    b2 = (((xc**2).sum(2) ** 2 - 2 * ((xc @ s) * xc).sum(2)).sum(1) / n + (s**2).sum((1, 2))) / n
    delta = torch.minimum(b2 / d2, torch.ones_like(b2))[:, None, None]
    cov = (1 - delta) * s + delta * mu[:, None, None] * eye + 1e-6 * eye
    return channels, mean.float(), torch.cholesky_inverse(torch.linalg.cholesky(cov)).float()


def feature_gaussians(model: ADTR, f_train: torch.Tensor, f_test: torch.Tensor, labels: np.ndarray,
                      covariance: bool = False) -> dict:  # fmt: skip
    """Part 4: image AUROC of a Gaussian per position of the features per (dims, channel seed),
    scored as the run scores its image scorer's grid; with covariance, per regularisation too."""
    from adtr.feature_gaussian import fit_feature_gaussian, gaussian_distance

    with torch.no_grad():
        own = torch.cat([model.score(b).anomaly_score for b in model._batches(f_test, 16)])
    row = {"scorer_position_weight": model.score_cfg.scorer_position_weight,
           "feature_gaussian": model.score_cfg.feature_gaussian, "run_score": _auroc(own, labels)}  # fmt: skip

    def auroc_of(params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
        with torch.no_grad():
            grid = torch.cat([gaussian_distance(b, *params) for b in model._batches(f_test, 16)])
            score = map_image_score(model.upsample(grid), model.score_cfg, model.cfg.image_size)
        return _auroc(score, labels)

    for dims, seed in GAUSSIAN_VARIANTS:
        row[f"dims {dims} seed {seed}"] = auroc_of(fit_feature_gaussian(f_train, dims=dims, seed=seed))
    if covariance:
        for seed in (0, 1, 2):
            for ridge in GAUSSIAN_RIDGES:
                row[f"ridge {ridge:g} seed {seed}"] = auroc_of(fit_feature_gaussian(f_train, seed=seed, ridge=ridge))
            row[f"ledoit-wolf seed {seed}"] = auroc_of(ledoit_wolf_gaussian(f_train, 100, seed))
    print(row, flush=True)
    return row


def flipped_views(model: ADTR, test: list[Sample], labels: np.ndarray, masks: list[np.ndarray] | None,
                  sizes: list[tuple[int, int]]) -> list[dict]:  # fmt: skip
    """Part 3: the run's map and score alone, and averaged with flipped views."""
    views = {"none": (), **FLIPS}
    maps: dict[str, list[torch.Tensor]] = {k: [] for k in views}
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in views}
    with torch.no_grad():
        for i in range(0, len(test), 8):
            x = torch.stack([resize_image(read_image(s.path), model.cfg.image_size) for s in test[i : i + 8]])
            for name, dims in views.items():
                out = model(x.flip(dims) if dims else x)
                maps[name].append(out.anomaly_map.flip(dims) if dims else out.anomaly_map)
                scores[name].append(out.anomaly_score)
    m = {k: torch.cat(v) for k, v in maps.items()}
    s = {k: torch.cat(v) for k, v in scores.items()}
    rows = []
    for name, keys in (("none", ["none"]), ("+ left-right", ["none", "left-right"]),
                       ("+ left-right + up-down", ["none", "left-right", "up-down"])):  # fmt: skip
        row = {"views": name, "image_auroc": _auroc(sum(s[k] for k in keys), labels)}
        if masks is not None:
            mean_map = (sum(m[k] for k in keys) / len(keys)).numpy()
            row.update({k: v for k, v in pixel_metrics(ResizedMaps(list(mean_map), sizes), masks).items()
                        if k in ("pixel_auroc", "aupro")})  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    return rows


def probe(run: Path, data: Path, variants: list[dict], do_fusion: bool, do_flips: bool,
          bins: tuple[int, ...] | None = None, do_padim: bool = False, do_gaussian: bool = False,
          gaussian_covariance: bool = False) -> dict:  # fmt: skip
    """Every part asked for, on one saved run and its category folder (bins: mask pixel edges
    of the misses table; None: no misses table)."""
    det = ADTRDetector.load(run, progress=False, backend="torch")
    model, cfg, cpu = det.model_.eval(), det.config, torch.device("cpu")
    if model.image_scorer is None or not model.uses_image_scorer:
        raise SystemExit(f"{run}: the run's image score does not come from an image scorer")
    train, test = train_samples(data), test_samples(data)
    tr_idx, val_idx = split_validation(len(train), cfg.train.val_fraction, cfg.train.seed)
    if calibration_source(cfg.train.calibration, len(train), len(val_idx)) != "held_out" or len(val_idx) < 2:
        raise SystemExit(f"{run}: not fitted with held-out good images; nothing to standardise or choose with")
    labels = np.array([s.label for s in test])
    sizes = [image_size(s.path) for s in test]
    masks = sample_masks(test, sizes)
    with torch.no_grad():
        f_train = model.standardize(extract_features(model, train, cpu, progress=False))
        f_test = model.standardize(extract_features(model, test, cpu, progress=False))
    out: dict = {"run": str(run), "data": str(data), "set": data.name, "held_out": len(val_idx)}
    if bins is not None and masks is not None:
        out["misses"] = misses_by_size(model, f_test, test, masks, bins)
    if variants:
        out["scorers"] = retrained_scorers(model, cfg, f_train, tr_idx, val_idx, f_test, labels, variants)
    if do_fusion:
        out["fusion"] = fusion(model, f_train[val_idx], f_test, labels)
    if do_padim:
        out["padim"] = padim_fusion(model, train, tr_idx, val_idx, test, labels, f_train[val_idx], f_test)
    if do_gaussian:
        out["gaussian"] = feature_gaussians(model, f_train[tr_idx], f_test, labels, gaussian_covariance)
    if do_flips:
        out["flips"] = flipped_views(model, test, labels, masks, sizes)
    return out


def markdown(sets: list[dict], command: str) -> str:
    """The results as Markdown: one section per set, one table per part."""
    parts = ["# Image score and map probes on saved runs\n", f"`{command}`\n"]
    for d in sets:
        parts.append(f"## {d['set']} ({d['held_out']} held-out good images)\n")
        if "misses" in d:
            parts.append("Where the image score loses: misordered (good, defective) pairs by the defect's mask size:\n")
            keys = ("mask_pixels", "images", "misordered_pairs", "below_the_top_good")
            header = ["mask pixels", "defective images", "misordered pairs", "scored at or below the top good"]
            parts.append(md_table(header, [[r[k] for k in keys] for r in d["misses"]["rows"]]) + "\n")
            parts.append("Good images scored highest:\n")
            parts.append(md_table(["file", "score"], [[t["file"], t["score"]] for t in d["misses"]["top_good"]]) + "\n")
        if "scorers" in d:
            parts.append("Image scorer retrained (image AUROC):\n")
            keys = ("epochs", "val_loss", "position_weight", "train_s")
            rows = [[r["scorer"], *(r.get(k, "") for k in keys), r["image_auroc"]] for r in d["scorers"]]
            parts.append(md_table(["scorer", "epochs", "val loss", "weight", "train s", "image AUROC"], rows) + "\n")
        if "fusion" in d:
            parts.append("Late fusion with the map's maximum (image AUROC):\n")
            parts.append(md_table(list(d["fusion"]), [list(d["fusion"].values())]) + "\n")
        if "padim" in d:
            parts.append("Fusion with PaDiM-Lite0's image score (image AUROC):\n")
            parts.append(md_table(list(d["padim"]), [list(d["padim"].values())]) + "\n")
        if "gaussian" in d:
            parts.append("A Gaussian per position of the run's features, image AUROC by variant:\n")
            parts.append(md_table(["variant", "image AUROC"], [list(kv) for kv in d["gaussian"].items()]) + "\n")
        if "flips" in d:
            parts.append("Flipped views:\n")
            keys = [k for k in ("image_auroc", "pixel_auroc", "aupro") if k in d["flips"][0]]
            parts.append(md_table(["views", *keys], [[r["views"], *(r[k] for k in keys)] for r in d["flips"]]) + "\n")
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", help="RUN:DATA")
    p.add_argument("--scorers", default="[]", help='JSON list of {"mult": M, "seed": S}: scorers to retrain')
    p.add_argument("--no-fusion", action="store_true")
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--gaussian", action="store_true", help="a Gaussian per position of the run's features")
    p.add_argument("--gaussian-covariance", action="store_true",
                   help="with --gaussian: the covariance's ridge (GAUSSIAN_RIDGES) and Ledoit-Wolf shrinkage")
    p.add_argument("--padim", action="store_true", help="fuse the run's image score with PaDiM-Lite0's")
    p.add_argument("--misses", action="store_true", help="where the run's image score loses, by defect size")
    p.add_argument("--size-bins", default=",".join(map(str, SIZE_BINS)), help="mask pixel bin edges (ascending)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "image_score_probe")
    args = p.parse_args()
    variants = json.loads(args.scorers)
    if not isinstance(variants, list) or not all(isinstance(v, dict) and {"mult", "seed"} <= set(v) for v in variants):
        raise SystemExit('--scorers: a JSON list of {"mult": M, "seed": S} objects')
    if args.gaussian_covariance and not args.gaussian:
        raise SystemExit("--gaussian-covariance needs --gaussian")
    configure_cpu(2)
    pairs = run_data_pairs(args.pairs)
    bins = tuple(int(b) for b in args.size_bins.split(","))
    if any(b <= a for a, b in zip((0, *bins), bins, strict=False)):
        raise SystemExit(f"--size-bins: positive ascending pixel counts, got {args.size_bins!r}")
    sets = [probe(run, data, variants, not args.no_fusion, not args.no_flips, bins if args.misses else None,
                  args.padim, args.gaussian, args.gaussian_covariance)
            for run, data in pairs]  # fmt: skip
    command = invocation()
    write_results(args.out, {"command": command, "machine": machine(), "sets": sets}, markdown(sets, command))


if __name__ == "__main__":
    main()
