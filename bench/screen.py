"""Recipe screening on cached features: many reconstructor variants, each trained on the same
backbone features of the development sets, several image scores per fit.

    python bench/screen.py --sets metal_plate,transistor \
        --variants '[{"steps": 200}, {"steps": 200, "align": "area"}]' [--out results/screen]

Cheaper than bench/suite.py for ablations: each set's features are extracted once per (input
size, strides, alignment) and kept in memory; a variant then costs only its training. A
variant sets any field of ModelConfig, ScoreConfig or TrainConfig (config.with_overrides),
applied to the library's defaults (so `{}` is today's default) — `align`, `strides`,
`image_size` and `token_patch` change the features. Training uses the held-out good images only for the
validation loss; test images are only scored. Per fit: validation loss, image AUROC with the
configured score and with the top-1% mean and the map maximum of the same maps, pixel AUROC
and AUPRO (sets with masks). `--quick` scores the configured score only (no free score
variants, no synthetic proxy: a cheap variant then costs little more than its fit). Writes
OUT.json and OUT.md.

Ensembles: `--keep DIR` saves each fit's test token-grid maps; `--ensembles '[[{}, {"use_query":
false}]]' --combine sum|max` scores the members' maps combined (members already in DIR are
loaded, others fitted first), e.g. to see whether two reconstructors' errors complement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, DEV_SETS, REPO, machine, md_table, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.anomalies import get_generator  # noqa: E402
from adtr.config import RunConfig, with_overrides  # noqa: E402
from adtr.data.images import image_size, read_mask  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.splits import split_validation  # noqa: E402
from adtr.data.transforms import input_size_for  # noqa: E402
from adtr.engine import (  # noqa: E402
    TrainingData,
    extract_features,
    fit_image_scorer,
    fit_reconstructor,
    synthetic_pools,
)
from adtr.evaluate import ResizedMaps  # noqa: E402
from adtr.fit import with_nearest_map  # noqa: E402
from adtr.metrics import image_metrics, pixel_metrics  # noqa: E402
from adtr.model import (  # noqa: E402
    ADTR,
    choose_position_weight,
    gaussian_kernel1d,
    map_image_score,
    shrunk_position_stats,
    upsample_map,
)
from adtr.runtime import configure_cpu  # noqa: E402

_features: dict[tuple, dict] = {}
DEVICE = torch.device("cpu")  # --device: where features are extracted and models trained; scoring stays on the CPU


def features(name: str, root: Path, cfg: RunConfig) -> dict:
    """Raw aligned features of a set's training and test images, cached per feature setting."""
    key = (name, cfg.model.image_size, cfg.model.strides, cfg.model.align, cfg.model.backbone, cfg.model.grid_size,
           cfg.model.feature_pool)  # fmt: skip
    if key not in _features:
        train, test = train_samples(root), test_samples(root)
        model = ADTR(cfg.model).to(DEVICE)
        _features[key] = {
            "train": extract_features(model, train, DEVICE, progress=False),
            "test": extract_features(model, test, DEVICE, progress=False),
            "labels": np.array([s.label for s in test]),
            "masks": [s.mask_path for s in test],
            "sizes": [image_size(s.path) for s in test],
        }
    return _features[key]


def run(name: str, root: Path, variant: dict, keep: Path | None = None, quick: bool = False) -> dict:
    """Fit one variant on one set and score its test images. keep: a folder where the test
    images' token-grid maps (the default score's, before the defect head) are saved for
    ensembles (`--ensembles`), with the result."""
    cfg = with_overrides(RunConfig(model=ADTRDetector().config.model), variant)
    if cfg.model.image_size is None:
        cfg = with_overrides(cfg, {"image_size": input_size_for([image_size(s.path) for s in train_samples(root)])})
    d = features(name, root, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = ADTR(cfg.model, cfg.score)
        train_idx, val_idx = split_validation(len(d["train"]), cfg.train.val_fraction, cfg.train.seed)
        model.set_feature_stats(d["train"][train_idx])
        f = model.standardize(d["train"])
        model.to(DEVICE)
        t0 = time.perf_counter()
        history = fit_reconstructor(model, TrainingData(f[train_idx]), f[val_idx], cfg.train, DEVICE,
                                    torch.Generator().manual_seed(cfg.train.seed), progress=False)  # fmt: skip
        if model.uses_image_scorer:  # as adtr.fit does
            fit_image_scorer(model, TrainingData(f[train_idx]), f[val_idx], cfg.train, DEVICE,
                             progress=False)  # fmt: skip
        fit_seconds = time.perf_counter() - t0
    model.cpu().eval()
    if cfg.score.residual_norm != "none":
        model.set_residual_scale(f[train_idx], held=f[val_idx] if val_idx else None)  # as adtr.fit does
    model = with_nearest_map(model, f[train_idx], f[val_idx] if val_idx else None)  # likewise the memory bank
    with torch.no_grad():
        test = model.standardize(d["test"])
        outs = [model.score(test[i : i + 16]) for i in range(0, len(test), 16)]
        extra = {} if quick else _residual_scores(model, f[train_idx], test, d, f[val_idx])
        grids = torch.cat([model.residual_grid(model.residual(b), b) for b in model._batches(test, 16)])
    scores = torch.cat([o.anomaly_score for o in outs]).double().numpy()
    maps = [m for o in outs for m in o.anomaly_map.numpy()]
    flat = torch.from_numpy(np.stack(maps)).flatten(1)
    labels = d["labels"]
    res = {"set": name, "variant": variant, "fit_seconds": round(fit_seconds, 1), "epochs": len(history),
           "scorer_position_weight": model.score_cfg.scorer_position_weight,
           "val_loss": history[-1].get("val_loss"),
           "image_auroc": image_metrics(scores, labels)["image_auroc"],
           "image_auroc_top1": image_metrics(flat.topk(max(1, round(0.01 * flat.shape[1])), 1).values.mean(1)
                                             .double().numpy(), labels)["image_auroc"],
           "image_auroc_max": image_metrics(flat.amax(1).double().numpy(), labels)["image_auroc"]}  # fmt: skip
    has_masks = labels.any() and all(m is not None for m, y in zip(d["masks"], labels, strict=True) if y == 1)
    masks = None
    if has_masks:
        masks = [read_mask(m, s) if m else np.zeros(s, bool) for m, s in zip(d["masks"], d["sizes"], strict=True)]
        res.update(pixel_metrics(ResizedMaps(maps, d["sizes"]), masks))
    for name_, (score_, maps_, *weight) in extra.items():
        res[f"image_auroc_{name_}"] = image_metrics(score_, labels)["image_auroc"]
        if weight:
            res[f"weight_{name_}"] = weight[0]
        if masks is not None and maps_ is not None:
            pm = pixel_metrics(ResizedMaps(maps_, d["sizes"]), masks)
            res[f"pixel_auroc_{name_}"], res[f"aupro_{name_}"] = pm["pixel_auroc"], pm["aupro"]
    if val_idx and not quick:  # no held-out images (val_fraction 0, tiny sets): no proxy
        res.update(_proxy(model, root, f[val_idx], val_idx, cfg.train.seed))
    if keep is not None:
        path = _kept(keep, name, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"grids": grids, "result": json.dumps(res)}, path)  # scratch cache, not a checkpoint
    return res


def _proxy(model: ADTR, root: Path, val: torch.Tensor, val_idx: list[int], seed: int, copies: int = 4) -> dict:
    """Test-free figures of a fit: the held-out good images against `copies` synthetic
    anomalies (CutPaste or confetti, one picked per copy) made from each of them. proxy_image:
    image AUROC; proxy_token: AUROC of the token-grid map against the changed tokens."""
    train = train_samples(root)
    held = [train[i] for i in val_idx]
    gens = [get_generator("cutpaste"), get_generator("confetti")]
    pools = synthetic_pools(model, held, gens, copies, seed, torch.device("cpu"), progress=False)
    with torch.no_grad():
        good = torch.cat([model.score(val[i : i + 16]).anomaly_score for i in range(0, len(val), 16)])
        bad = torch.cat([model.score(p.features[i : i + 16]).anomaly_score for p in pools
                         for i in range(0, len(p.features), 16)])  # fmt: skip
        grid = torch.cat([model.residual_grid(model.residual(b), b) for p in pools
                          for b in model._batches(p.features, 16)])  # fmt: skip
    labels = torch.cat([p.token_labels for p in pools]) > 0
    image = torch.cat([good, bad]).double().numpy()
    y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    token = image_metrics(grid.flatten().double().numpy(), labels.flatten().numpy())["image_auroc"]
    return {"proxy_image": image_metrics(image, y)["image_auroc"], "proxy_token": token}


def _kept(keep: Path, name: str, variant: dict) -> Path:
    key = hashlib.sha1(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:12]
    return keep / name / f"{key}.pt"


def ensemble(name: str, root: Path, members: list[dict], keep: Path, combine: str = "sum") -> list[dict]:
    """The members' token-grid maps (each already standardised per position on its own
    training images: residual_norm "channel_position") combined by `combine` ("sum" or
    "max"), scored like one model's map. Members fitted before with the same `keep` folder
    are loaded, not refitted. Returns the results of the members fitted here, then the ensemble's."""
    grids, fitted = [], []
    for v in members:
        if with_overrides(RunConfig(), v).score.residual_norm != "channel_position":
            raise SystemExit(f"ensemble member {v}: the maps add unweighted only as channel_position maps")
        path = _kept(keep, name, v)
        if not path.exists():
            fitted.append(run(name, root, v, keep))
            print(json.dumps(fitted[-1]), flush=True)
        grids.append(torch.load(path, weights_only=True)["grids"])
    cfg = with_overrides(RunConfig(model=ADTRDetector().config.model), members[0])
    if cfg.model.image_size is None:
        cfg = with_overrides(cfg, {"image_size": input_size_for([image_size(s.path) for s in train_samples(root)])})
    model = ADTR(cfg.model, cfg.score)
    o = model.score_maps(sum(grids) if combine == "sum" else torch.stack(grids).amax(0))
    test = test_samples(root)
    labels, sizes = np.array([s.label for s in test]), [image_size(s.path) for s in test]
    res = {"set": name, "variant": {"ensemble": members, "combine": combine},
           "image_auroc": image_metrics(o.anomaly_score.double().numpy(), labels)["image_auroc"]}  # fmt: skip
    if labels.any() and all(s.mask_path is not None for s in test if s.label == 1):
        masks = [read_mask(s.mask_path, z) if s.mask_path else np.zeros(z, bool)
                 for s, z in zip(test, sizes, strict=True)]  # fmt: skip
        res.update(pixel_metrics(ResizedMaps(list(o.anomaly_map.numpy()), sizes), masks))
    return [*fitted, res]


def _residual_scores(model: ADTR, train: torch.Tensor, test: torch.Tensor, d: dict, val: torch.Tensor) -> dict:
    """Alternative scores of the same fit, computed from the feature residual (screening only).

    plain: the residual as it is (residual_norm "none"); chan: residual divided by its
    per-channel RMS on the training images before the norm (no
    channel group dominates by count or by unpredictable texture); pos: grid error standardised
    per position with the training images' mean and std; pooled: the norm of the image-averaged
    residual; pooled_chan: the same after the chan division; combo: see below; sigma2 / sigma8:
    pos_chan_half's grid smoothed with sigma 2 / 8 input pixels instead of the configured one;
    held / trainval: pos_chan_half with its statistics (channel RMS, position mean and variance)
    from the held-out good images `val` / from training and held-out images together (a
    model fits its training images more closely than unseen good ones); whiten / whiten_plain:
    the Mahalanobis norm of the residual under its training covariance (see below); stage /
    cosine: every backbone stage weighed alike, and a cosine map as Dinomaly's, on standardised features;
    scorer / map_scorer (models whose image scorer scores the image): the image scorer's grid
    error as the map, and the sum of both standardised grids; pos_w* / pos_auto / scorer_auto:
    the per-position statistics' weight (below).
    Returns {name: (image scores (N,), maps list or None)}.
    """

    def residuals(f: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(model.residual_batches(f, scaled=False)))

    def halfway(e_train: torch.Tensor, e_test: torch.Tensor) -> tuple:
        """e_test standardised per position with e_train's statistics shrunk halfway to the grid's."""
        mu, var = 0.5 * e_train.mean(0) + 0.5 * e_train.mean(), 0.5 * e_train.var(0) + 0.5 * e_train.var()
        o = model.score_maps(((e_test - mu) / var.sqrt().clamp_min(1e-6)).clamp_min(0))
        return o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy())

    r_train, r_test = residuals(train), residuals(test)
    rms = r_train.pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
    out = {}
    o = model.score_maps(torch.linalg.vector_norm(r_test, dim=1))
    out["plain"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    g = torch.linalg.vector_norm(r_test / rms, dim=1)
    o = model.score_maps(g)
    out["chan"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    o = model.score_maps(torch.linalg.vector_norm(r_test / rms.sqrt(), dim=1))  # half way: sqrt of the RMS
    out["chan_sqrt"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    e_train = torch.linalg.vector_norm(r_train, dim=1)
    mu, sd = e_train.mean(0), e_train.std(0).clamp_min(1e-6)
    g = ((torch.linalg.vector_norm(r_test, dim=1) - mu) / sd).clamp_min(0)
    o = model.score_maps(g)
    out["pos"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    # pos_chan / pos_chan_half: the chan grid error standardised per position, with the
    # per-position mean and variance used as they are, or averaged half and half with the
    # whole-grid ones (shrinkage: unaligned parts get less of the per-position estimate's noise).
    c_train, c_test = torch.linalg.vector_norm(r_train / rms, dim=1), torch.linalg.vector_norm(r_test / rms, dim=1)
    for name_, w in (("pos_chan", 1.0), ("pos_chan_half", 0.5)):
        mu = w * c_train.mean(0) + (1 - w) * c_train.mean()
        var = w * c_train.var(0) + (1 - w) * c_train.var()
        o = model.score_maps(((c_test - mu) / var.sqrt().clamp_min(1e-6)).clamp_min(0))
        out[name_] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
        if name_ == "pos_chan_half":
            half_grid = ((c_test - mu) / var.sqrt().clamp_min(1e-6)).clamp_min(0)
    sigmas = (("sigma2", 2.0), ("sigma8", 8.0)) if model.score_cfg.image_score != "pooled_residual" else ()
    for name_, sigma in sigmas:
        m = upsample_map(half_grid, model.cfg.image_size, gaussian_kernel1d(sigma))
        s_ = map_image_score(m, model.score_cfg, model.cfg.image_size)
        out[name_] = (s_.double().numpy(), list(m[:, 0].numpy()))
    if len(val) > 1:
        r_val = residuals(val)
        for name_, r_ref in (("held", r_val), ("trainval", torch.cat([r_train, r_val]))):
            rms_ = r_ref.pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
            c_ref, c_t = torch.linalg.vector_norm(r_ref / rms_, dim=1), torch.linalg.vector_norm(r_test / rms_, dim=1)
            out[name_] = halfway(c_ref, c_t)
    # whiten: the residual's full channel covariance over the training images' positions (shrunk
    # 1% towards its mean variance), the Mahalanobis norm of each position's residual instead of
    # the per-channel RMS (a Gaussian model of the reconstruction error, PaDiM's distance applied
    # to the residual, one covariance for the whole grid), then standardised per position halfway
    # as the default; whiten_plain: the Mahalanobis norm as it is.
    x = r_train.permute(0, 2, 3, 1).reshape(-1, r_train.shape[1]).double()
    cov = torch.cov(x.T)
    cov = 0.99 * cov + 0.01 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    prec = torch.linalg.cholesky(torch.linalg.inv(cov))  # prec @ prec.T = cov^-1

    def mahalanobis(r: torch.Tensor) -> torch.Tensor:
        y = r.permute(0, 2, 3, 1).double() @ prec
        return torch.linalg.vector_norm(y, dim=-1).float()

    w_train, w_test = mahalanobis(r_train), mahalanobis(r_test)
    o = model.score_maps(w_test)
    out["whiten_plain"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    out["whiten"] = halfway(w_train, w_test)
    # stage: every backbone stage weighs the same (the mean over stages of the chan error's mean
    # square per channel) instead of by its channel count; cosine: like Dinomaly's map (Guo et al.,
    # CVPR 2025, sec. 3.4), the mean over stages of 1 - cos(f, f_hat) of the standardised
    # features. Both then standardised per position halfway, as the default.
    bounds = np.cumsum([0] + [level.channels for level in model.backbone.levels])
    stages = list(zip(bounds[:-1], bounds[1:], strict=True))

    def stage_error(r: torch.Tensor) -> torch.Tensor:
        return torch.stack([(r[:, a:b] / rms[:, a:b]).pow(2).mean(1) for a, b in stages]).mean(0).sqrt()

    def cosine_error(f: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        f_hat = f - r
        return torch.stack([1 - F.cosine_similarity(f[:, a:b], f_hat[:, a:b], dim=1) for a, b in stages]).mean(0)

    out["stage"] = halfway(stage_error(r_train), stage_error(r_test))
    out["cosine"] = halfway(cosine_error(train, r_train), cosine_error(test, r_test))
    # pos_w*: the chan grid error standardised per position with the per-position statistics
    # weighted w (1 - w: the whole grid's), as pos_chan (w 1) and pos_chan_half (w 0.5) do;
    # pos_auto / scorer_auto: w chosen without test images, by the Gaussian negative
    # log-likelihood of the held-out good images' grid errors under each w's mean and variance
    # (the library's choose_position_weight, which the fit applies to the image scorer);
    # pos_mean / pos_mean_half: the per-position mean weighted 1 / 0.5 and the whole grid's variance.

    def shrunk(ref: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = shrunk_position_stats(ref, w)
        return mean, var.clamp_min(1e-12)

    c_tr = torch.linalg.vector_norm(r_train / rms, dim=1)
    c_te = torch.linalg.vector_norm(r_test / rms, dim=1)
    for w in (0.0, 0.25, 0.75):
        mu, var = shrunk(c_tr, w)
        o = model.score_maps(((c_te - mu) / var.sqrt()).clamp_min(0))
        out[f"pos_w{int(w * 100)}"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    for name_, w in (("pos_mean", 1.0), ("pos_mean_half", 0.5)):
        mu, var = shrunk(c_tr, w)[0], c_tr.var()
        o = model.score_maps(((c_te - mu) / var.sqrt()).clamp_min(0))
        out[name_] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    if len(val) > 1:
        w_map = choose_position_weight(c_tr, torch.linalg.vector_norm(residuals(val) / rms, dim=1))
        mu, var = shrunk(c_tr, w_map)
        o = model.score_maps(((c_te - mu) / var.sqrt()).clamp_min(0))
        out["pos_auto"] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()), w_map)
        if model.image_scorer is not None:
            s_tr, s_te, s_val = (model._scaled_grid_errors(model.image_scorer, model.scorer_residual_scale, x)
                                 for x in (train, test, val))  # fmt: skip
            w_s = choose_position_weight(s_tr, s_val)
            for name_, w in (("scorer_auto", w_s), ("scorer_w100", 1.0)):
                mu, var = shrunk(s_tr, w)
                o = model.score_maps(((s_te - mu) / var.sqrt()).clamp_min(0))
                out[name_] = (o.anomaly_score.double().numpy(), None, w)
    if model.image_scorer is not None and model.uses_image_scorer:
        # scorer / map+scorer: the image scorer's grid error as the map, and the sum of both
        # standardised grids (the long-trained CNN's map joined with the reconstructor's)
        batches = list(model._batches(test, 16))
        s_grid = torch.cat([model.scorer_grid(b) for b in batches])
        m_grid = torch.cat([model.residual_grid(model.residual(b), b) for b in batches])
        for name_, g in (("scorer", s_grid), ("map_scorer", m_grid + s_grid)):
            o = model.score_maps(g)
            out[name_] = (o.anomaly_score.double().numpy(), list(o.anomaly_map.numpy()))
    out["pooled"] = (torch.linalg.vector_norm(r_test.mean(dim=(2, 3)), dim=1).double().numpy(), None)
    out["pooled_chan"] = (torch.linalg.vector_norm((r_test / rms).mean(dim=(2, 3)), dim=1).double().numpy(), None)
    # combo: the chan map's top-1% mean and pooled_chan, each standardised by its mean and std
    # over the training images, summed (local defects and whole-image departures both count).
    top_train = model.score_maps(torch.linalg.vector_norm(r_train / rms, dim=1)).anomaly_score.double().numpy()
    pooled_train = torch.linalg.vector_norm((r_train / rms).mean(dim=(2, 3)), dim=1).double().numpy()
    z = lambda v, ref: (v - ref.mean()) / max(ref.std(), 1e-9)  # noqa: E731
    out["combo"] = (z(out["chan"][0], top_train) + z(out["pooled_chan"][0], pooled_train), None)
    return out


def _fmt(v: object) -> object:
    return round(v, 4) if isinstance(v, float) else v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", default="metal_plate,transistor")
    p.add_argument("--variants", default="[{}]", help="JSON list of settings objects")
    p.add_argument("--out", type=Path, default=REPO / "results" / "screen")
    p.add_argument("--keep", type=Path, default=None, help="folder for the fits' test maps (ensembles reuse them)")
    p.add_argument("--ensembles", default="[]", help="JSON list of lists of settings objects: combined maps")
    p.add_argument("--quick", action="store_true", help="only the configured score: no free variants, no proxy")
    p.add_argument("--combine", choices=("sum", "max"), default="sum", help="how an ensemble combines its maps")
    p.add_argument("--device", default="cpu", help="where features are extracted and models trained (e.g. cuda); "
                   "the CPU figures are the ones reported, another device's only screen")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2: the target machine)")
    args = p.parse_args()
    configure_cpu(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    variants, ensembles = json.loads(args.variants), json.loads(args.ensembles)
    if ensembles and args.keep is None:
        p.error("--ensembles needs --keep (the folder of the members' maps)")
    results = []
    for v in variants:
        for name in args.sets.split(","):
            results.append(run(name, args.data / DEV_SETS[name], v, args.keep, args.quick))
            print(json.dumps(results[-1]), flush=True)
    for members in ensembles:
        for name in args.sets.split(","):
            results.extend(ensemble(name, args.data / DEV_SETS[name], members, args.keep, args.combine))
            print(json.dumps(results[-1]), flush=True)
    keys = ["image_auroc", "image_auroc_top1", "image_auroc_max", "pixel_auroc", "aupro", "image_auroc_plain",
            "pixel_auroc_plain", "aupro_plain", "image_auroc_chan_sqrt", "pixel_auroc_chan_sqrt", "aupro_chan_sqrt",
            "image_auroc_chan",
            "pixel_auroc_chan", "aupro_chan", "image_auroc_pos", "pixel_auroc_pos", "aupro_pos",
            "image_auroc_pos_chan", "pixel_auroc_pos_chan", "aupro_pos_chan", "image_auroc_pos_chan_half",
            "pixel_auroc_pos_chan_half", "aupro_pos_chan_half", "image_auroc_pooled",
            "image_auroc_pooled_chan", "image_auroc_combo",
            *(f"{m}_{v}"
              for v in ("sigma2", "sigma8", "held", "trainval", "whiten_plain", "whiten", "stage", "cosine", "scorer",
                        "map_scorer", "pos_w0", "pos_w25", "pos_w75", "pos_auto", "pos_mean", "pos_mean_half")
              for m in ("image_auroc", "pixel_auroc", "aupro")),
            "weight_pos_auto", "image_auroc_scorer_auto", "weight_scorer_auto", "image_auroc_scorer_w100",
            "proxy_image", "proxy_token", "val_loss", "fit_seconds"]  # fmt: skip
    rows = [[r["set"], json.dumps(r["variant"]), *(_fmt(r.get(k, "-")) for k in keys)] for r in results]
    md = (
        f"# Recipe screening\n\nCommand: `python bench/screen.py {' '.join(sys.argv[1:])}`\n\n"
        + md_table(
            [
                "set",
                "variant",
                "image AUROC",
                "map's image AUROC (top 1%)",
                "image AUROC (max)",
                "pixel AUROC",
                "AUPRO",
                "plain: image",
                "plain: pixel",
                "plain: AUPRO",
                "chan sqrt: image",
                "chan sqrt: pixel",
                "chan sqrt: AUPRO",
                "chan: image",
                "chan: pixel",
                "chan: AUPRO",
                "pos: image",
                "pos: pixel",
                "pos: AUPRO",
                "pos chan: image",
                "pos chan: pixel",
                "pos chan: AUPRO",
                "pos chan half: image",
                "pos chan half: pixel",
                "pos chan half: AUPRO",
                "pooled: image",
                "pooled chan: image",
                "combo: image",
                *(
                    f"{v}: {m}"
                    for v in ("sigma 2", "sigma 8", "held", "trainval", "whiten plain", "whiten", "stage", "cosine",
                              "scorer", "map+scorer", "pos w0", "pos w0.25", "pos w0.75", "pos auto", "pos mean",
                              "pos mean half")
                    for m in ("image", "pixel", "AUPRO")
                ),
                "pos auto: weight",
                "scorer auto: image",
                "scorer auto: weight",
                "scorer w1: image",
                "proxy: image",
                "proxy: token",
                "val loss",
                "fit s",
            ],
            rows,
        )  # fmt: skip
        + "\n"
    )
    write_results(args.out, {"machine": machine(), "command": sys.argv, "results": results}, md)


if __name__ == "__main__":
    main()
