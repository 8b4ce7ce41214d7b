"""Score choices a saved normal-only run could make without test images, against its test figures.

    python bench/map_probe.py RUN DATA [--copies 4] [--out results/map_probe_SET]

RUN is a normal-only run of the category DATA (e.g. bench/kshot.py's RUNS/<set>/normal, fitted
with the library's defaults); its held-out good images are recomputed from its config (the fit's
split_validation). Two questions, each with every candidate's test figures beside the choice:

1. The map's per-position weight w (the image scorer's is chosen by the fit,
   model.choose_position_weight; the map keeps 0.5): for each w of POSITION_WEIGHTS, the map's
   pixel AUROC and AUPRO on the test images, and two test-free criteria: the Gaussian negative
   log-likelihood choice on the held-out good images (the library's), and a synthetic proxy:
   `--copies` CutPaste / confetti versions of each held-out good image (adtr.engine.
   synthetic_pools), whose changed tokens are scored against their other tokens and the
   held-out good images' tokens on the token grid (token AUROC and token AUPRO per w).
2. The image score's top fraction (ScoreConfig.top_fraction, default 0.01; 0: the maximum) of
   the image scorer's map and of the reconstructor's map: image AUROC on the test images.
3. The residual's scale per position and channel (a diagonal PaDiM on the residual): each
   channel's residual divided by the square root of a x its mean square at that position + (1 - a)
   x its mean square over the grid (a 0: today's per-channel RMS), on the training images; then
   standardised per position as today: the image scorer's image AUROC (its weight chosen by the
   held-out likelihood, as the fit does, and at 1) and the map's pixel AUROC / AUPRO (weight 0.5).

Writes OUT.json and OUT.md (docs/design.md, "Score choices probed on saved runs").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, sample_masks, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.anomalies import get_generator  # noqa: E402
from adtr.data.images import image_size  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.splits import split_validation  # noqa: E402
from adtr.engine import extract_features, synthetic_pools  # noqa: E402
from adtr.evaluate import ResizedMaps  # noqa: E402
from adtr.fit import calibration_source  # noqa: E402
from adtr.metrics import image_metrics, pixel_metrics  # noqa: E402
from adtr.model import POSITION_WEIGHTS, choose_position_weight, map_image_score, shrunk_position_stats  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

TOP_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--copies", type=int, default=4, help="synthetic copies of each held-out good image")
    p.add_argument("--out", type=Path, default=None, help="results stem (default results/map_probe_<data name>)")
    args = p.parse_args()
    configure_cpu(2)
    det = ADTRDetector.load(args.run, progress=False, backend="torch")
    model, cfg, cpu = det.model_.eval(), det.config, torch.device("cpu")
    train, test = train_samples(args.data), test_samples(args.data)
    tr_idx, val_idx = split_validation(len(train), cfg.train.val_fraction, cfg.train.seed)
    if calibration_source(cfg.train.calibration, len(train), len(val_idx)) != "held_out" or len(val_idx) < 2:
        # a cross-fitted run trained on every image: its "held-out" images are training images
        raise SystemExit(f"{args.run}: not fitted with held-out good images (calibration from held-out images "
                         "needed); nothing to choose with")  # fmt: skip
    labels = np.array([s.label for s in test])
    sizes = [image_size(s.path) for s in test]

    def errors(f: torch.Tensor) -> torch.Tensor:  # the map's grid error before per-position standardisation
        return model._scaled_grid_errors(model.reconstructor, model.residual_scale, f)

    with torch.no_grad():
        f_train = model.standardize(extract_features(model, train, cpu, progress=False))
        f_test = model.standardize(extract_features(model, test, cpu, progress=False))
        generators = [get_generator("cutpaste"), get_generator("confetti")]
        pools = synthetic_pools(model, [train[i] for i in val_idx], generators, args.copies, cfg.train.seed, cpu,
                                progress=False)  # fmt: skip
        e_train, e_held, e_test = errors(f_train[tr_idx]), errors(f_train[val_idx]), errors(f_test)
        e_syn = torch.cat([errors(q.features) for q in pools])
        scorer = torch.cat([model.upsample(model.scorer_grid(b)) for b in model._batches(f_test, 16)])
        recon = torch.cat([model.upsample(model.residual_grid(model.residual(b), b))
                           for b in model._batches(f_test, 16)])  # fmt: skip
    changed = (torch.cat([q.token_labels for q in pools]) > 0).numpy()
    masks = sample_masks(test, sizes)
    weights = []
    for w in POSITION_WEIGHTS:
        mean, var = shrunk_position_stats(e_train, w)
        sd = var.clamp_min(1e-12).sqrt()
        syn, held = ((e_syn - mean) / sd).clamp_min(0).numpy(), ((e_held - mean) / sd).clamp_min(0).numpy()
        token_scores = np.concatenate([syn.ravel(), held.ravel()])
        token_labels = np.concatenate([changed.ravel(), np.zeros(held.size, bool)])
        proxy = pixel_metrics([*syn, *held], [*changed, *np.zeros(held.shape, bool)])
        rec = {"w": w, "proxy_token_auroc": image_metrics(token_scores, token_labels)["image_auroc"],
               "proxy_token_aupro": proxy["aupro"]}  # fmt: skip
        if masks is not None:
            with torch.no_grad():
                maps = model.score_maps(((e_test - mean) / sd).clamp_min(0)).anomaly_map.numpy()
            rec.update(pixel_metrics(ResizedMaps(list(maps), sizes), masks))
        weights.append(rec)
        print(rec, flush=True)
    fractions = []
    for frac in TOP_FRACTIONS:
        rec = {"top_fraction": frac}
        for name, m in (("scorer", scorer), ("map", recon)):
            if frac == 0:
                s = m.flatten(1).amax(1)
            else:
                s = map_image_score(m, dataclasses.replace(model.score_cfg, top_fraction=frac), model.cfg.image_size)
            rec[f"{name}_image_auroc"] = image_metrics(s.double().numpy(), labels)["image_auroc"]
        fractions.append(rec)
        print(rec, flush=True)
    scales = []
    with torch.no_grad():
        r = {name: {k: torch.cat([b - rec(b) for b in model._batches(x, 16)]) for k, x in
                    (("train", f_train[tr_idx]), ("held", f_train[val_idx]), ("test", f_test))}
             for name, rec in (("scorer", model.image_scorer), ("map", model.reconstructor))}  # fmt: skip
    for a in (0.0, 0.5, 1.0):
        rec = {"a": a}
        for name, res in r.items():
            per_channel = res["train"].pow(2).mean(dim=(0, 2, 3), keepdim=True)
            scale = (a * res["train"].pow(2).mean(0, keepdim=True) + (1 - a) * per_channel).sqrt().clamp_min(1e-6)
            e = {k: torch.linalg.vector_norm(v / scale, dim=1) for k, v in res.items()}
            if name == "scorer":
                w_auto = choose_position_weight(e["train"], e["held"])
                for key, w in (("scorer_image_auroc_auto", w_auto), ("scorer_image_auroc_w1", 1.0)):
                    mean, var = shrunk_position_stats(e["train"], w)
                    with torch.no_grad():
                        s = model.score_maps(((e["test"] - mean) / var.clamp_min(1e-12).sqrt()).clamp_min(0))
                    rec[key] = image_metrics(s.anomaly_score.double().numpy(), labels)["image_auroc"]
                rec["scorer_weight_auto"] = w_auto
            elif masks is not None:
                mean, var = shrunk_position_stats(e["train"], 0.5)
                with torch.no_grad():
                    maps = model.score_maps(((e["test"] - mean) / var.clamp_min(1e-12).sqrt()).clamp_min(0))
                pm = pixel_metrics(ResizedMaps(list(maps.anomaly_map.numpy()), sizes), masks)
                rec["map_pixel_auroc"], rec["map_aupro"] = pm["pixel_auroc"], pm["aupro"]
        scales.append(rec)
        print(rec, flush=True)
    choices = {"nll": choose_position_weight(e_train, e_held),
               "proxy_auroc": max(weights, key=lambda r: r["proxy_token_auroc"])["w"],
               "proxy_aupro": max(weights, key=lambda r: r["proxy_token_aupro"])["w"]}  # fmt: skip
    command = invocation()
    data = {"command": command, "machine": machine(), "run": str(args.run), "held_out": len(val_idx),
            "copies": args.copies, "position_weights": weights, "choices": choices, "top_fractions": fractions,
            "position_channel_scale": scales,
            "scorer_position_weight": model.score_cfg.scorer_position_weight}  # fmt: skip
    s_cols = ["a", "scorer_weight_auto", "scorer_image_auroc_auto", "scorer_image_auroc_w1"] + (
        ["map_pixel_auroc", "map_aupro"] if masks is not None else [])
    w_cols = ["w", "proxy_token_auroc", "proxy_token_aupro"] + (["pixel_auroc", "aupro"] if masks is not None else [])
    md = (f"# Score choices probed on a saved run\n\nCommand: `{command}` ({len(val_idx)} held-out good images, "
          f"{args.copies} synthetic copies each). Choices without test images: {choices}.\n\n"
          "The map's per-position weight (token-grid proxy on synthetic anomalies; test pixel metrics):\n\n"
          + md_table(w_cols, [[r.get(c, "-") for c in w_cols] for r in weights])
          + "\n\nThe image score's top fraction (0: the maximum), test image AUROC:\n\n"
          + md_table(["top fraction", "image scorer's map", "reconstructor's map"],
                     [[r["top_fraction"], r["scorer_image_auroc"], r["map_image_auroc"]] for r in fractions])
          + "\n\nThe residual's scale per position and channel (a; 0: today's per channel):\n\n"
          + md_table(s_cols, [[r.get(c, "-") for c in s_cols] for r in scales])
          + "\n")  # fmt: skip
    name = args.data.name
    write_results(args.out or REPO / "results" / f"map_probe_{name}", data, md)


if __name__ == "__main__":
    main()
