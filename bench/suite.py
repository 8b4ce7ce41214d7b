"""The quality suite: fit and test every development set, adtr beside PatchCore and PaDiM.

    python bench/suite.py [--sets bottle,transistor,metal_plate,bsdata] [--variant NAME|JSON]
                          [--methods adtr,patchcore,padim] [--image-size N|HxW] [--out results/suite]

Per set and method: image AUROC, pixel AUROC and AUPRO (where masks exist), fit seconds,
inference images/s (batch 8, backbone included, decoding excluded) and the peak memory of
the process. Each (set, method) runs in a child process of its own so that its time and
peak memory are its own. adtr runs through its Python API with its defaults, changed only by
--variant: a name from VARIANTS or a JSON object of settings (field names of ModelConfig,
ScoreConfig, TrainConfig), so every ablation runs the same way. The references
(bench/references.py) use adtr's backbone, data reading and metrics, and the input size adtr
chooses for the set (or --image-size for all). The figures published in issue 13 for the
references are printed beside ours. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, DEV_SETS, REPO, machine, md_table, run_measured, write_results  # noqa: E402

SETS = DEV_SETS
METHODS = ("adtr", "patchcore", "padim")
METRICS = ("image_auroc", "pixel_auroc", "aupro")

# Named variants for ablations; {} = the defaults.
VARIANTS: dict[str, dict] = {
    "default": {},
    "previous-default": {"epochs": 10, "schedule": "step", "image_size": [256, 256]},
    "no-query": {"use_query": False},
    "mlp": {"reconstructor": "mlp"},
    "cnn": {"reconstructor": "cnn"},
}

# Issue 13's reference figures (both references on Lite0; bsdata at 256x640): image AUROC,
# pixel AUROC, AUPRO; None where the set has no masks.
PUBLISHED = {
    "patchcore": {
        "bottle": (1.000, 0.984, 0.935),
        "transistor": (0.9996, None, None),
        "metal_plate": (1.000, 0.993, 0.946),
        "bsdata": (0.940, 0.986, 0.718),
    },
    "padim": {
        "bottle": (0.996, 0.981, 0.922),
        "transistor": (0.910, None, None),
        "metal_plate": (0.562, 0.954, 0.837),
        "bsdata": (0.960, 0.986, 0.784),
    },
}


def parse_variant(text: str) -> tuple[str, dict]:
    if text in VARIANTS:
        return text, VARIANTS[text]
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        raise SystemExit(f"--variant {text!r}: neither a name ({', '.join(VARIANTS)}) nor a JSON object") from None
    if not isinstance(settings, dict):
        raise SystemExit(f"--variant {text!r}: the JSON must be an object of settings")
    return json.dumps(settings, sort_keys=True), settings


def run_child(set_name: str, method: str, data_root: Path, settings: dict, image_size: str | None) -> dict:
    """One (set, method) in this process; returns its metrics."""
    import numpy as np

    from adtr.config import parse_image_size
    from adtr.data.images import image_size as file_size
    from adtr.data.images import read_mask
    from adtr.data.mvtec import test_samples, train_samples
    from adtr.data.transforms import input_size_for, resize_map
    from adtr.runtime import configure_cpu

    configure_cpu()
    root = data_root / SETS[set_name]
    size = parse_image_size(image_size) if image_size else None
    if method == "adtr":
        from adtr import ADTRDetector
        from adtr.config import RunConfig, with_overrides

        overrides = dict(settings)
        if size is not None:
            overrides["image_size"] = size
        cfg = with_overrides(RunConfig(model=ADTRDetector().config.model), overrides)
        det = ADTRDetector(cfg.model, cfg.score, cfg.train, progress=False)
        t0 = time.perf_counter()
        det.fit(root)
        fit_seconds = time.perf_counter() - t0
        m = det.test(root)
        out = {k: m.get(k) for k in METRICS}
        out.update(
            fit_seconds=fit_seconds,
            images_per_second=m["images_per_second"],
            image_size=list(det.config.model.image_size),
            epochs=len(det.history_),
            val_loss=det.history_[-1].get("val_loss") if det.history_ else None,
            use_query=det.config.model.use_query,
            # the learnable query's validation loss when the fit fell back to no query (TrainConfig.query_fallback)
            query_val_loss=det.history_[-1].get("query_val_loss") if det.history_ else None,
            # what scored the test images: a fallback to PyTorch halves the speed (docs/design.md, "Deployment")
            backend=det.selected_backend().name,
        )
        return out
    from references import REFERENCES

    from adtr.metrics import image_metrics, pixel_metrics

    train, test = train_samples(root), test_samples(root)
    size = size or input_size_for([file_size(s.path) for s in train])
    ref = REFERENCES[method](train, test, size)
    labels = np.array([s.label for s in test])
    out = {k: None for k in METRICS}
    out.update(image_metrics(ref.scores, labels))
    if all(s.mask_path is not None for s in test if s.label == 1):
        masks = [read_mask(s.mask_path, sz) if s.mask_path else np.zeros(sz, bool)
                 for s, sz in zip(test, ref.original_sizes, strict=True)]  # fmt: skip
        maps = [resize_map(m, sz) for m, sz in zip(ref.maps, ref.original_sizes, strict=True)]
        out.update(pixel_metrics(maps, masks))
    out = {k: out.get(k) for k in METRICS}
    out.update(fit_seconds=ref.fit_seconds, images_per_second=ref.images_per_second, image_size=list(size))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data root holding the development sets")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    p.add_argument("--methods", default="adtr", help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--variant", default="default", help="adtr settings: a name from VARIANTS or a JSON object")
    p.add_argument("--image-size", default=None, help="input size for every set and method (default: adtr's)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "suite", help="results stem (.json/.md)")
    p.add_argument("--child", nargs=2, metavar=("SET", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    variant_name, settings = parse_variant(args.variant)
    if args.child:
        print(json.dumps(run_child(*args.child, args.data, settings, args.image_size)))
        return

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in sets:
        if name not in SETS:
            raise SystemExit(f"--sets: unknown set {name!r}; choose from {', '.join(SETS)}")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    results = []
    for name in sets:
        for method in methods:
            cmd = [sys.executable, __file__, "--child", name, method, "--data", str(args.data),
                   "--variant", json.dumps(settings)]  # fmt: skip
            if args.image_size:
                cmd += ["--image-size", args.image_size]
            wall, peak_mib, stdout = run_measured(cmd)
            entry = {"set": name, "method": method, **json.loads(stdout.strip().splitlines()[-1]),
                     "wall_seconds": wall, "peak_mib": peak_mib}  # fmt: skip
            results.append(entry)
            print(json.dumps(entry), flush=True)

    def fmt(v: float | None) -> str | float:
        return "-" if v is None else v

    def published(method: str, set_name: str) -> str:
        return " / ".join("-" if v is None else f"{v:.3f}" for v in PUBLISHED[method][set_name])

    def reconstructor(e: dict) -> str:
        if e["method"] != "adtr":
            return "-"
        val = "-" if e.get("val_loss") is None else f"{e['val_loss']:.3f}"
        if e.get("query_val_loss") is not None:
            return f"no query (fallback: query's {e['query_val_loss']:.3f}), {val}"
        return f"{'query' if e.get('use_query', True) else 'no query'}, {val}"

    rows = []
    for e in results:
        if e["method"] == "adtr":
            ref = "; ".join(f"{m}: {published(m, e['set'])}" for m in PUBLISHED)
        else:
            ref = published(e["method"], e["set"])
        rows.append([
            e["set"], e["method"], "x".join(map(str, e["image_size"])), reconstructor(e), *(fmt(e[k]) for k in METRICS),
            round(e["fit_seconds"], 1), f"{e['images_per_second']:.1f}" + (f" ({e['backend']})" if e.get("backend")
                                                                           else ""), round(e["peak_mib"]), ref,
        ])  # fmt: skip
    means = []
    for method in methods:
        mine = [e for e in results if e["method"] == method]
        row = [f"mean over {len(mine)} sets", method, "", ""]
        for k in METRICS:
            vals = [e[k] for e in mine if e[k] is not None]
            row.append(sum(vals) / len(vals) if vals else "-")
        row += [round(sum(e["fit_seconds"] for e in mine), 1), "", "", ""]
        means.append(row)
    header = ["set", "method", "input HxW", "reconstructor, val loss", "image AUROC", "pixel AUROC", "AUPRO",
              "fit s", "img/s (backend)", "peak MiB",
              "issue 13 figures (image / pixel / AUPRO)"]  # fmt: skip
    md = (
        f"# Quality suite: variant `{variant_name}`\n\n"
        f"Command: `python bench/suite.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Settings changed from the defaults: `{json.dumps(settings)}`. Means over sets are over the sets that "
        "have the metric (pixel AUROC and AUPRO: sets with masks).\n\n" + md_table(header, rows + means) + "\n"
    )
    write_results(
        args.out,
        {"machine": machine(), "variant": variant_name, "settings": settings, "command": sys.argv, "results": results},
        md,
    )


if __name__ == "__main__":
    main()
