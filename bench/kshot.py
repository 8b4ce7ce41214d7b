"""Anomaly-available training without leaks: normal-only vs +synthetic vs +k real, per set.

    python bench/kshot.py [--sets metal_plate,bsdata,transistor] [--ks 1,3,5,10] [--draws 0,1,2]
                          [--modes normal,synthetic,masks,labels] [--synthetic confetti,cutpaste]
                          [--external DIR] [--references patchcore,padim] [--head-gain G]
                          [--scratch] [--out results/kshot]

Per set and draw (seed), max(ks) test anomalies per defect type are drawn (adtr.data.splits.
kshot_split); the first k train and ALL of them leave the test set, so every mode and both
references of a draw are evaluated on the SAME remaining images (ks above what a defect type
allows are skipped, said in the output). Modes:
- normal: the default fit on the good images (independent of the draw: fitted once per set);
- synthetic: + each generator's synthetic anomalies (once per set, from the normal model);
- masks: + k real anomalies per defect type with their masks, from the normal model: the
  default use, a defect head on the normal model's residual (adtr/defect_head.py);
- masks_loss: the same through the paper's L_px (fine-tuning the normal model; --labelled-anomalies loss);
- labels: the same anomalies with image labels only (masks dropped): the defect head on
  pseudo-labels (the residual map's top tokens);
- labels_loss: the same through the paper's L_img (--labelled-anomalies loss);
- external: + the images of --external as image-level anomalies (once per set).
synthetic and external start from the normal model and train the default budget again (the
paper's schedule, SPEC section 2); with --scratch they are fresh fits with the anomalies from the
first step, the normal fit's budget, so that only the anomalies differ from a normal-only run of
the same version (a --reuse'd run saved by an older version may score differently).
The references (bench/references.py) cannot use the anomalies: fitted once per set on the
good images and scored on every test image; each draw's metrics are computed on its
remaining images. Writes OUT.json (k, draws and every training-anomaly file) and OUT.md
(per set: mean and spread over draws per mode and k; fit seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, DEV_SETS, REPO, machine, md_table, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.config import ScoreConfig, TrainConfig  # noqa: E402
from adtr.data.folder import has_masks  # noqa: E402
from adtr.data.images import image_size, read_mask  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.splits import kshot_split  # noqa: E402
from adtr.data.transforms import input_size_for, resize_map  # noqa: E402
from adtr.metrics import image_metrics, pixel_metrics  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402

METRICS = ["image_auroc", "pixel_auroc", "aupro"]
MODES = ("normal", "synthetic", "masks", "masks_loss", "labels", "labels_loss", "external")


def _metrics_of(det: ADTRDetector, samples: list) -> dict:
    m = det.test(samples)
    return {k: m.get(k) for k in METRICS}


def _reference_metrics(ref, test: list, keep: list) -> dict:
    """Metrics of a reference's outputs (over all of `test`) restricted to the samples `keep`."""
    index = {s.path: i for i, s in enumerate(test)}
    idx = [index[s.path] for s in keep]
    labels = np.array([s.label for s in keep])
    out = dict.fromkeys(METRICS)
    out.update(image_metrics(ref.scores[idx], labels))
    if has_masks(keep):
        sizes = [ref.original_sizes[i] for i in idx]
        masks = [
            read_mask(s.mask_path, sz) if s.mask_path else np.zeros(sz, bool) for s, sz in zip(keep, sizes, strict=True)
        ]
        if any(m.any() for m in masks) and not all(m.all() for m in masks):  # as evaluate.evaluate
            maps = [resize_map(ref.maps[i], sz) for i, sz in zip(idx, sizes, strict=True)]
            out.update(pixel_metrics(maps, masks))
    return {k: out.get(k) for k in METRICS}


def _pool_size(test: list, ks: list[int]) -> tuple[int, list[int]]:
    """The largest k every defect type allows (it must keep >= 1 test image) and the ks kept."""
    per_type: dict[str, int] = {}
    for s in test:
        if s.label == 1:
            per_type[s.defect] = per_type.get(s.defect, 0) + 1
    if not per_type:
        raise SystemExit("the test set holds no anomalous images")
    allowed = [k for k in ks if k < min(per_type.values())]
    if not allowed:
        raise SystemExit(f"no k in {ks} fits: the smallest defect type has {min(per_type.values())} images")
    return max(allowed), allowed


def bench_set(name: str, root: Path, args: argparse.Namespace, ks: list[int], modes: list[str]) -> list[dict]:
    test = test_samples(root)
    pool, ks_set = _pool_size(test, ks)
    skipped = sorted(set(ks) - set(ks_set))
    if skipped:
        print(f"{name}: k = {skipped} skipped (too few images of a defect type)", flush=True)
    draws = {d: kshot_split(test, 0, d, pool_size=pool)[1] for d in args.draws}
    if {"masks", "masks_loss"} & set(modes) and not all(s.mask_path for s in test if s.label == 1):
        modes = [m for m in modes if m not in ("masks", "masks_loss")]  # image labels only: "labels" is the mode
        print(f"{name}: no masks, the masks mode is skipped", flush=True)
    rows: list[dict] = []

    def add(mode: str, k: int | None, fit_s: float | None, per_draw: dict[int, dict], **extra) -> None:
        for d, m in per_draw.items():
            rows.append(
                {
                    "set": name,
                    "mode": mode,
                    "k": k,
                    "draw": d,
                    "fit_seconds": fit_s,
                    **m,
                    **extra,
                    "remaining_images": len(draws[d]),
                    "remaining_anomalous": sum(s.label for s in draws[d]),
                }
            )
            print(rows[-1], flush=True)

    for ref_name in args.references:
        from references import REFERENCES

        train = train_samples(root)
        size = input_size_for([image_size(s.path) for s in train])
        ref = REFERENCES[ref_name](train, test, size)
        add(ref_name, None, round(ref.fit_seconds, 1), {d: _reference_metrics(ref, test, r) for d, r in draws.items()})

    base = args.runs / name / "normal"

    def fit(labelled_anomalies: str = "head", **fit_args) -> tuple[ADTRDetector, float]:
        t0 = time.perf_counter()
        train_cfg = TrainConfig(labelled_anomalies=labelled_anomalies, head_paste=args.head_paste)
        train_cfg = train_cfg if args.steps is None else dataclasses.replace(train_cfg, steps=args.steps)
        det = ADTRDetector(score=ScoreConfig(head_gain=args.head_gain), train=train_cfg, progress=False)
        det.fit(root, **fit_args)
        return det, round(time.perf_counter() - t0, 1)

    if args.reuse and base.is_dir():  # the normal-only fit does not depend on the draw or the mode
        normal = ADTRDetector.load(base, progress=False)
        fit_s = round(normal.record_.provenance["fit_seconds"], 1)
        print(f"{name}: normal-only run loaded from {base}", flush=True)
    else:
        normal, fit_s = fit()
        normal.save(base)
    if "normal" in modes:
        add("normal", None, fit_s, {d: _metrics_of(normal, r) for d, r in draws.items()})
    start = None if args.scratch else base  # the paper's schedule: from the normal-only model
    tag = ", from scratch" if args.scratch else ""
    if "synthetic" in modes:
        for gen in args.synthetic:
            det, fit_s = fit(synthetic=[gen], init=start)
            add(f"synthetic ({gen}{tag})", None, fit_s, {d: _metrics_of(det, r) for d, r in draws.items()})
    if "external" in modes:
        det, fit_s = fit(external=args.external, init=start)
        add("external (from scratch)" if args.scratch else "external", None, fit_s,
            {d: _metrics_of(det, r) for d, r in draws.items()})
    for d in args.draws:
        for k in ks_set:
            anomalies, rest = kshot_split(test, k, d, pool_size=pool)
            assert [s.path for s in rest] == [s.path for s in draws[d]]  # every mode on the same images
            files = [str(s.path) for s in anomalies]
            if "masks" in modes:
                det, fit_s = fit(anomalies=anomalies, init=base)
                add("masks", k, fit_s, {d: _metrics_of(det, rest)}, train_anomalies=files,
                    head_gain=det.config.score.head_gain)
            if "masks_loss" in modes:
                det, fit_s = fit("loss", anomalies=anomalies, init=base)
                add("masks_loss", k, fit_s, {d: _metrics_of(det, rest)}, train_anomalies=files)
            unmasked = [dataclasses.replace(s, mask_path=None) for s in anomalies]
            if "labels" in modes:
                det, fit_s = fit(anomalies=unmasked, init=base)
                add("labels", k, fit_s, {d: _metrics_of(det, rest)}, train_anomalies=files,
                    head_gain=det.config.score.head_gain)
            if "labels_loss" in modes:
                det, fit_s = fit("loss", anomalies=unmasked, init=base)
                add("labels_loss", k, fit_s, {d: _metrics_of(det, rest)}, train_anomalies=files)
    return rows


def summary(rows: list[dict]) -> list[list]:
    """Per (set, mode, k): mean and spread (sample std) over draws of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["mode"], r["k"]), []).append(r)
    out = []
    for (set_name, mode, k), rs in groups.items():
        cells = []
        for m in METRICS:
            v = [r[m] for r in rs if r[m] is not None]
            if not v:
                cells.append("-")
            elif len(v) == 1:
                cells.append(f"{v[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}")
        fit_s = [r["fit_seconds"] for r in rs if r["fit_seconds"] is not None]
        out.append([set_name, mode, "-" if k is None else k, len(rs), *cells, f"{statistics.median(fit_s):.0f}"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="root holding the development sets")
    p.add_argument("--sets", default="metal_plate,bsdata,transistor")
    p.add_argument("--ks", default="1,3,5,10", help="comma-separated real anomalies per defect type")
    p.add_argument("--draws", default="0,1,2", help="comma-separated seeds of the anomaly draw")
    p.add_argument("--modes", default=",".join(m for m in MODES if m != "external"))
    p.add_argument("--synthetic", default="confetti", help="generators for the synthetic mode")
    p.add_argument("--external", type=Path, default=None, help="folder of unrelated images (external mode)")
    p.add_argument("--references", default="patchcore,padim", help="reference methods ('' = none)")
    p.add_argument("--steps", type=int, default=None, help="steps of every fit (default: the library's)")
    p.add_argument("--head-gain", type=float, default=None,
                   help="the defect head's gain (default: the library's, defect_head.default_gain)")
    p.add_argument("--head-paste", type=int, default=None,
                   help="copies of each masked defect pasted for the head (default: the library's rule)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "kshot")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "kshot")
    p.add_argument("--reuse", action="store_true", help="load the normal-only runs an earlier call saved in --runs")
    p.add_argument("--scratch", action="store_true",
                   help="synthetic and external modes: fresh fits with the anomalies from the first step (default: "
                   "from the normal-only model, the default budget again)")
    args = p.parse_args()
    configure_cpu(2)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    args.draws = [int(d) for d in args.draws.split(",") if d.strip()]
    args.synthetic = [s.strip() for s in args.synthetic.split(",") if s.strip()]
    args.references = [r.strip() for r in args.references.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if "external" in modes and args.external is None:
        raise SystemExit("the external mode needs --external DIR (a folder of unrelated images)")
    sets = [n.strip() for n in args.sets.split(",") if n.strip()]
    for name in sets:  # every set's draws checked before the first fit
        if name not in DEV_SETS:
            raise SystemExit(f"unknown set {name!r}; choose from {sorted(DEV_SETS)}")
        _pool_size(test_samples(args.data / DEV_SETS[name]), ks)
    rows: list[dict] = []
    for name in sets:
        rows += bench_set(name, args.data / DEV_SETS[name], args, ks, modes)
        write(args, rows)  # after each set, so a later failure keeps the finished sets


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    md = (
        "# Anomaly-available training (leak-free k-shot)\n\n"
        f"Command: `python bench/kshot.py {shlex.join(sys.argv[1:])}`. Per set and draw, max(k) anomalies "
        "per defect type leave the test set; every mode and reference of a draw is tested on the same "
        "remaining images. Metrics: mean ± sample std over the draws (one value: one draw). The anomaly "
        "modes start from the normal-only model: masks / labels keep its reconstructor and fit the defect "
        "head (fit s: features of the good images + the head); the other modes train the default budget "
        "again (those marked 'from scratch': a fresh fit with the anomalies, the normal fit's budget). "
        "fit s: median.\n\n"
        + md_table(["set", "mode", "k", "draws", "image AUROC", "pixel AUROC", "AUPRO", "fit s"], summary(rows))
        + "\n"
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(args.out, {"machine": machine(), "args": settings, "results": rows}, md)


if __name__ == "__main__":
    main()
