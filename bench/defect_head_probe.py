"""How to use a few labelled defects: variants of a defect head on a saved normal-only run.

    python bench/defect_head_probe.py RUN DATA [--draws 0] [--desc r|abs|rabs|ctx|fr|frctx|rb|rbctx]
                                      [--hidden H] [--wds 1e-3] [--holdout TYPE] [--pseudo SHARE] [--loo GAINS]
                                      [--k K] [--asymmetric]

The probe behind adtr/defect_head.py (docs/design.md, "The defect head"). RUN is a normal-only
run of the category DATA (e.g. bench/kshot.py's RUNS/<set>/normal); per draw, 5 test anomalies
per defect type are drawn as bench/kshot.py draws them (pool 5) and leave the test set; the first
--k of them (default 5) fit the head. A
class-balanced logistic regression is fitted on token descriptors of the good training images
(label 0) and of the drawn defects (mask share > 0.5: 1, 0: 0; --desc r: adtr.defect_head's
own fit and token labels): --desc r (the scaled residual), abs (|r|), rabs (both), ctx (r and
its 3x3 neighbourhood's mean), fr (the standardised feature beside r), frctx (all three), rb
(r beside the bank residual: each position's patch feature minus its nearest memory-bank row;
runs with a memory bank), rbctx (rb and both residuals' 3x3 neighbourhood's means);
--hidden H: an MLP with H hidden units instead. Printed per weight decay (--wds): image AUROC
(the library's top-1% score, and the map's maximum), pixel AUROC, AUPRO of the normal run and of
the maps "head" (the head's logit alone, standardised on good tokens), "sum" (standardised
residual map + standardised logit), "sum.5" / "sum2" / "sum4" (the logit weighed 0.5 / 2 / 4:
the head's gain), "max" (the larger of the two).
--scorer adds the image AUROC of the image scorer's map joined with the head's logit (weights 0
to 4, as the map joins them) and of the larger of the scorer's map and the head-joined map. Sets
without masks (transistor) print image metrics only. A run whose map adds the nearest good
feature's distance (ScoreConfig.nearest_map) is probed on that map, as the product joins it.
--loo GAINS (e.g. 0,1,2,4) chooses the head's weight in the map without test images: each drawn
defect is left out in turn, a head fitted on the run's training split and the other defects (with
their pasted copies) maps it, and the weight whose map ranks its masked tokens highest against its
unmasked tokens and the held-out good images' tokens (token AUROC, pooled over the folds) is
printed beside each weight's AUROC; ties go to the smaller weight.
--asymmetric adds maps that weigh the head's positive and negative evidence apart: "asym2" /
"asym4" (positive logit at weight 2 / 4, negative at 1) and "relu1" / "relu4" (negative dropped).
--holdout TYPE drops that defect type's drawn images from training and scores only the good
and TYPE test images (a defect type the head never saw). --pseudo SHARE drops the masks:
positives are the tokens whose residual map is >= SHARE x its maximum (image labels only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adtr import ADTRDetector
from adtr.data.images import image_size, read_image, read_mask
from adtr.data.mvtec import test_samples, train_samples
from adtr.data.splits import kshot_split, split_validation
from adtr.data.transforms import resize_image, resize_map
from adtr.defect_head import fit_defect_head, head_positives
from adtr.engine import anomaly_pool, extract_features, token_labels
from adtr.metrics import auroc, image_metrics, pixel_metrics
from adtr.model import map_image_score
from adtr.runtime import configure_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--draws", default="0")
    p.add_argument("--k", type=int, default=5, help="defects per type that fit the head, of the 5 drawn (pool 5: "
                   "the same remaining test images for every k)")
    p.add_argument("--desc", choices=("r", "abs", "rabs", "ctx", "fr", "frctx", "rb", "rbctx"), default="r")
    p.add_argument("--hidden", type=int, default=0, help="an MLP head with this many hidden units (0: linear)")
    p.add_argument("--wds", default="1e-3")
    p.add_argument("--holdout", default=None)
    p.add_argument("--pseudo", type=float, default=None)
    p.add_argument("--paste", type=int, default=0,
                   help="also fit the head with this many copies of each masked defect pasted onto good images")
    p.add_argument("--paste-shift", choices=("none", "roll", "flip"), default="none",
                   help="where a pasted defect lands: where it was (none), moved (roll), moved or mirrored (flip)")
    p.add_argument("--backgrounds", type=int, default=0, help="paste onto this many good images (0: all)")
    p.add_argument("--paste-space", choices=("pixels", "features"), default="pixels",
                   help="paste the defect's masked pixels before the backbone, or its tokens' features after it")
    p.add_argument("--loo", default="",
                   help="comma-separated head weights (e.g. 0,1,2,4) to choose among by leaving each drawn "
                   "defect out in turn: heads fitted on the run's training split and the other defects score "
                   "the left-out defect's tokens against its unmasked ones and the held-out good images'")
    p.add_argument("--asymmetric", action="store_true",
                   help="also the maps asym2 / asym4 (the head's positive logit at weight 2 / 4, its negative at 1), "
                   "relu1 / relu4 (positive at 1 / 4, negative dropped)")
    p.add_argument("--scorer", action="store_true",
                   help="also print image AUROC of the image scorer's map joined with the head (gains 0, 1, 2, 4)")
    args = p.parse_args()
    if args.paste and (args.desc not in ("r", "rb", "rbctx") or args.hidden or args.pseudo is not None):
        p.error("--paste needs a linear head (--desc r, rb or rbctx, no --hidden) and masks (no --pseudo)")
    configure_cpu(2)
    det = ADTRDetector.load(args.run, progress=False)
    model = det.model_.eval()
    bank = model.score_cfg.nearest_map is True
    if args.desc in ("rb", "rbctx") and not bank:
        p.error("--desc rb and rbctx need a run with a memory bank (ScoreConfig.nearest_map)")
    dev = torch.device("cpu")
    test = test_samples(args.data)
    index = {s.path: i for i, s in enumerate(test)}
    f_train = model.standardize(extract_features(model, train_samples(args.data), dev, progress=False))
    f_test = model.standardize(extract_features(model, test, dev, progress=False))

    @torch.no_grad()
    def residual(f: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(model.residual_batches(f)))

    def grid(r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return model.residual_grid(r, f if bank else None)

    @torch.no_grad()
    def bank_residual(f: torch.Tensor) -> torch.Tensor:  # the model's own (ADTR.bank_residual), in batches
        return torch.cat([model.bank_residual(part) for part in f.split(8)])

    def desc_nchw(r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # the head's input (N, D, h, w)
        if args.desc == "rbctx":  # both residuals and their 3x3 neighbourhood's means
            d = torch.cat([r, bank_residual(f)], 1)
            return torch.cat([d, F.avg_pool2d(d, 3, 1, 1, count_include_pad=False)], 1)
        return torch.cat([r, bank_residual(f)], 1) if args.desc == "rb" else r

    def desc(r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, h, w, D)
        if args.desc in ("r", "rb", "rbctx"):
            d = desc_nchw(r, f)
        elif args.desc == "abs":
            d = r.abs()
        elif args.desc == "rabs":
            d = torch.cat([r, r.abs()], 1)
        elif args.desc == "ctx":  # the token's residual and its 3x3 neighbourhood's mean
            d = torch.cat([r, F.avg_pool2d(r, 3, 1, 1, count_include_pad=False)], 1)
        elif args.desc == "fr":  # the token's feature beside its residual
            d = torch.cat([f, r], 1)
        else:
            d = torch.cat([f, r, F.avg_pool2d(r, 3, 1, 1, count_include_pad=False)], 1)
        return d.permute(0, 2, 3, 1)

    def metrics(g: torch.Tensor, samples: list) -> dict:
        with torch.no_grad():
            out = model.score_maps(g)
        labels = np.array([s.label for s in samples])
        m = image_metrics(out.anomaly_score.double().numpy(), labels)
        m["image_max"] = image_metrics(out.anomaly_map.flatten(1).amax(1).double().numpy(), labels)["image_auroc"]
        if not any(s.mask_path for s in samples):  # image labels only (transistor)
            return {k: round(float(m[k]), 4) for k in ("image_auroc", "image_max")}
        maps, masks = [], []
        for s, mp in zip(samples, out.anomaly_map.numpy(), strict=True):
            size = image_size(s.path)  # (height, width)
            masks.append(read_mask(s.mask_path, size) if s.mask_path else np.zeros(size, bool))
            maps.append(resize_map(mp, size))
        m.update(pixel_metrics(maps, masks))
        return {k: round(float(m[k]), 4) for k in ("image_auroc", "image_max", "pixel_auroc", "aupro")}

    def train_head(xg: torch.Tensor, xa: torch.Tensor, ya: torch.Tensor, wd: float):
        x = torch.cat([xg, xa])
        y = torch.cat([torch.zeros(len(xg)), ya])
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mu) / sd
        t = (y > 0.5).float()
        weight = torch.where(t > 0, len(y) / (2 * t.sum()), len(y) / (2 * (len(y) - t.sum())))
        if args.hidden:
            torch.manual_seed(0)
            lin = torch.nn.Sequential(torch.nn.Linear(x.shape[1], args.hidden), torch.nn.GELU(),
                                      torch.nn.Linear(args.hidden, 1))
        else:
            lin = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (F.binary_cross_entropy_with_logits(lin(x)[:, 0], t, reduction="none") * weight).mean()
            loss = loss + wd * sum(m.weight.pow(2).sum() for m in lin.modules() if isinstance(m, torch.nn.Linear))
            loss.backward()
            return loss

        opt.step(closure)
        return lambda d: lin((d - mu) / sd)[..., 0].detach()

    r_train, r_test = residual(f_train), residual(f_test)
    if args.scorer:
        with torch.no_grad():
            s_train = torch.cat([model.scorer_grid(f) for f in f_train.split(16)])
            s_test = torch.cat([model.scorer_grid(f) for f in f_test.split(16)])

    def image_auroc(g: torch.Tensor, samples: list) -> float:
        with torch.no_grad():
            score = map_image_score(model.upsample(g), model.score_cfg, model.cfg.image_size)
        labels = np.array([s.label for s in samples])
        return round(float(image_metrics(score.double().numpy(), labels)["image_auroc"]), 4)
    goods = train_samples(args.data)
    if args.backgrounds:  # a seeded sample of the good images, as a run keeps
        order = torch.randperm(len(goods), generator=torch.Generator().manual_seed(0))[: args.backgrounds]
        goods = [goods[i] for i in sorted(order.tolist())]

    @torch.no_grad()
    def pasted(anomalies: list, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals (M, C, h, w) and token labels (M, h, w) of n copies of each masked defect's
        masked pixels pasted onto good training images (at the model's input size)."""
        size = model.cfg.image_size
        g = torch.Generator().manual_seed(seed)
        images, masks = [], []
        for s in anomalies:
            if not s.mask_path:
                continue
            img = resize_image(read_image(s.path), size)
            m = torch.from_numpy(read_mask(s.mask_path, image_size(s.path))).float()
            m = (F.interpolate(m[None, None], size=size, mode="area")[0] > 0.5).float()  # (1, H, W)
            for _ in range(n):
                good = resize_image(read_image(goods[int(torch.randint(len(goods), (1,), generator=g))].path), size)
                d, dm = img, m
                if args.paste_shift != "none":
                    ys, xs = torch.nonzero(dm[0], as_tuple=True)
                    if len(ys):  # move the defect's box to a random place where it fits
                        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                        ty = int(torch.randint(size[0] - (y1 - y0) + 1, (1,), generator=g))
                        tx = int(torch.randint(size[1] - (x1 - x0) + 1, (1,), generator=g))
                        d, dm = d.roll((ty - y0, tx - x0), (1, 2)), dm.roll((ty - y0, tx - x0), (1, 2))
                    if args.paste_shift == "flip" and bool(torch.rand(1, generator=g) < 0.5):
                        d, dm = d.flip(2), dm.flip(2)
                images.append(good * (1 - dm) + d * dm)
                masks.append(dm[0])
        x = torch.stack(images)
        f = torch.cat([model.standardize(model.extract(b)) for b in x.split(8)])
        return residual(f), token_labels(torch.stack(masks), model.cfg.grid_size), f

    @torch.no_grad()
    def pasted_features(f_anom: torch.Tensor, l_anom: torch.Tensor, n: int, seed: int):
        """The same in feature space: the tokens a mask touches, with their standardised features,
        moved into good training images' feature grids."""
        g = torch.Generator().manual_seed(seed)
        feats, labels = [], []
        for f, lab in zip(f_anom, l_anom, strict=True):
            m = (lab > 0).float()
            if not m.any():
                continue
            for _ in range(n):
                good = f_train[int(torch.randint(len(f_train), (1,), generator=g))]
                d, dl = f, lab
                if args.paste_shift != "none":
                    ys, xs = torch.nonzero(m, as_tuple=True)
                    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
                    ty = int(torch.randint(m.shape[0] - (y1 - y0) + 1, (1,), generator=g))
                    tx = int(torch.randint(m.shape[1] - (x1 - x0) + 1, (1,), generator=g))
                    d, dl = d.roll((ty - y0, tx - x0), (1, 2)), dl.roll((ty - y0, tx - x0), (0, 1))
                    if args.paste_shift == "flip" and bool(torch.rand(1, generator=g) < 0.5):
                        d, dl = d.flip(2), dl.flip(1)
                dm = (dl > 0).float()
                feats.append(good * (1 - dm) + d * dm)
                labels.append(dl)
        return residual(torch.stack(feats)), torch.stack(labels), torch.stack(feats)

    def loo(draw: int, r_anom: torch.Tensor, f_anom: torch.Tensor, labels: torch.Tensor, origin: torch.Tensor):
        """Each real defect left out in turn: a head on the training split's good images and the
        other defects (and their pasted copies) scores the left-out one's tokens; per weight, the
        pooled token AUROC of its positives against its unmasked tokens and the held-out good
        images' tokens, and the mean over the folds of each fold's AUROC."""
        cfg = det.config.train
        tr, val = split_validation(len(f_train), cfg.val_fraction, cfg.seed)
        tr, val = torch.as_tensor(tr), torch.as_tensor(val)
        gains = [float(g) for g in args.loo.split(",")]
        good_in, good_grid = desc_nchw(r_train[tr], f_train[tr]), grid(r_train[tr], f_train[tr])
        val_in, val_grid = desc_nchw(r_train[val], f_train[val]), grid(r_train[val], f_train[val])
        pooled = {g: ([], []) for g in gains}
        per_fold = {g: [] for g in gains}
        n_real = int(origin.max()) + 1
        for j in range(n_real):
            pos = head_positives(labels[j : j + 1])[0]
            if not pos.any():
                continue
            rest = origin != j
            h = fit_defect_head(good_in, good_grid, desc_nchw(r_anom[rest], f_anom[rest]), labels[rest])

            def z(inputs: torch.Tensor, g_map: torch.Tensor, h=h) -> tuple[torch.Tensor, torch.Tensor]:
                logit = (inputs.double() * h.weight.double().view(1, -1, 1, 1)).sum(1) + h.bias
                return (g_map - h.norm[0]) / h.norm[1], ((logit - h.norm[2]) / h.norm[3]).float()

            zg, zl = z(desc_nchw(r_anom[j : j + 1], f_anom[j : j + 1]), grid(r_anom[j : j + 1], f_anom[j : j + 1]))
            vg, vl = z(val_in, val_grid)
            neg_own = labels[j] == 0
            for g in gains:
                s_def, s_val = (zg + g * zl)[0], (vg + g * vl).flatten()
                p_scores = s_def[pos]
                n_scores = torch.cat([s_def[neg_own], s_val])
                pooled[g][0].append(p_scores)
                pooled[g][1].append(n_scores)
                y = np.r_[np.ones(len(p_scores)), np.zeros(len(n_scores))]
                per_fold[g].append(auroc(torch.cat([p_scores, n_scores]).double().numpy(), y))
        out = {}
        for g in gains:
            p_s, n_s = torch.cat(pooled[g][0]), torch.cat(pooled[g][1])
            y = np.r_[np.ones(len(p_s)), np.zeros(len(n_s))]
            out[g] = (round(float(auroc(torch.cat([p_s, n_s]).double().numpy(), y)), 4),
                      round(float(np.mean(per_fold[g])), 4))  # fmt: skip
        best = max(gains, key=lambda g: out[g])
        print("draw", draw, "loo (pooled AUROC, mean fold AUROC) per weight", out, "chosen", best, flush=True)

    for draw in [int(x) for x in args.draws.split(",")]:
        anomalies, rest = kshot_split(test, args.k, draw, pool_size=5)
        if args.holdout:
            anomalies = [s for s in anomalies if Path(s.path).parent.name != args.holdout]
            rest = [s for s in rest if Path(s.path).parent.name in (args.holdout, "good")]
        pool = anomaly_pool(model, anomalies, dev, progress=False)
        r_anom, labels, f_anom = residual(pool.features), pool.token_labels, pool.features
        sel = [index[s.path] for s in rest]
        base = grid(r_test[sel], f_test[sel])
        print("draw", draw, "normal", metrics(base, rest), flush=True)
        if args.pseudo is not None:
            g = grid(r_anom, f_anom)
            labels = (g >= args.pseudo * g.flatten(1).amax(1).view(-1, 1, 1)).float()
            keep = labels > 0.5
        else:
            keep = (labels > 0.5) | (labels == 0)
        if args.paste:
            if args.paste_space == "pixels":
                r_p, l_p, f_p = pasted(anomalies, args.paste, draw)
            else:
                masked = pool.pixel_level
                r_p, l_p, f_p = pasted_features(pool.features[masked], pool.token_labels[masked], args.paste, draw)
            print("draw", draw, "pasted copies", len(r_p), flush=True)
            r_anom, labels, f_anom = torch.cat([r_anom, r_p]), torch.cat([labels, l_p]), torch.cat([f_anom, f_p])
            keep = (labels > 0.5) | (labels == 0)
        if args.loo:
            origin = torch.arange(len(pool.features))
            if args.paste:  # each masked defect's copies, in the drawn order (pasted())
                masked = torch.tensor([bool(s.mask_path) for s in anomalies])
                origin = torch.cat([origin, origin[masked].repeat_interleave(args.paste)])
            loo(draw, r_anom, f_anom, labels, origin)
        xa, ya = desc(r_anom, f_anom)[keep], labels[keep]
        xg = desc(r_train, f_train).reshape(-1, xa.shape[1])
        g_train = grid(r_train, f_train)
        for wd in [float(x) for x in args.wds.split(",")]:
            if args.desc in ("r", "rb", "rbctx") and not args.hidden:  # the product's fit (float64, zero start)
                known = torch.zeros(len(labels), dtype=torch.bool) if args.pseudo is not None else None
                h = fit_defect_head(desc_nchw(r_train, f_train), g_train, desc_nchw(r_anom, f_anom), labels, known,
                                    weight_decay=wd)

                def head(d: torch.Tensor, h=h) -> torch.Tensor:
                    return d.double() @ h.weight.double() + h.bias
            else:
                head = train_head(xg, xa, ya, wd)
            with torch.no_grad():
                l_train = head(desc(r_train, f_train))
                zh = (head(desc(r_test[sel], f_test[sel])) - l_train.mean()) / l_train.std()
            zb = (base - g_train.mean()) / g_train.std()
            zh = zh.float()
            variants = {"head": zh, "sum": zb + zh, "sum.5": zb + 0.5 * zh, "sum2": zb + 2 * zh, "sum4": zb + 4 * zh,
                        "max": torch.maximum(zb, zh)}
            if args.asymmetric:  # the head's positive evidence at weight g, its negative at weight 1 (or 0: relu)
                pos, neg = zh.clamp_min(0), zh.clamp_max(0)
                variants.update({"asym2": zb + 2 * pos + neg, "asym4": zb + 4 * pos + neg, "relu1": zb + pos,
                                 "relu4": zb + 4 * pos})
            for name, g in variants.items():
                print("draw", draw, "wd", wd, name, metrics(g.clamp_min(0), rest), flush=True)
            if args.scorer:  # the image scorer's map, standardised on the good training tokens, joined with the head
                zs = (s_test[sel] - s_train.mean()) / s_train.std()
                out = {f"scorer+{g}xhead": image_auroc((zs + g * zh).clamp_min(0), rest) for g in (0, 1, 2, 4)}
                out["scorer"] = image_auroc(s_test[sel], rest)
                out["max(scorer,sum4)"] = image_auroc(torch.maximum(zs, zb + 4 * zh).clamp_min(0), rest)
                print("draw", draw, "wd", wd, "image", out, flush=True)


if __name__ == "__main__":
    main()
