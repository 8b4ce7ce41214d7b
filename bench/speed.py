"""Speed in ONE run, on the same images (issue 12): backbone, whole pipeline per backend and
for the default, decoding included and excluded, the training step, peak memory of each.

    python bench/speed.py [--repeats 3] [--images 48] [--kinds K1,K2] [--out results/speed]

About 4-6 minutes on 2 quiet cores with the defaults. Lite0, cpu preset, 256x256, batch 8,
2 threads. The parent writes one run folder (seeded random weights: speed does not depend on
them) and, through the default backend, its cached ONNX graph, plus a backbone-only graph;
so no child exports anything. Every measurement then runs in a child process of its own,
--repeats times, interleaved with the others so that drift in the machine's load hits every
kind alike; the median is reported, with ratios taken within the run (the machine is shared
and noisy). Peak memory: the child's peak resident set size (getrusage ru_maxrss), i.e. the
interpreter, torch, the model and the measurement together. Linux carries a process's peak
RSS across exec, so a child exec'd straight from this (large) parent would report the parent's
peak whenever its own is lower: each child is started by a shell that forks it (fresh_child).

- backbone_*: the frozen backbone alone, random 0..255 input, PyTorch vs ONNX Runtime;
- pipeline_*: backbone + reconstructor + scoring, random input (decoding excluded), through
  ADTRDetector.load(RUN, backend=...): torch, onnx, and auto (the default; the row says which
  it chose); reconstructor: PyTorch's reconstructor + scoring alone on the same features;
- predict_*: real 900x900 PNGs (MVTec bottle test images, cycled up to --images) through
  adtr's streaming predict (predict.iter_predictions: decoding and resizing one batch ahead in
  2 threads, the model, maps back to 900x900, decisions; no heatmap files), after one warm-up
  batch; decode_only: the same decoding and resizing with no model (the floor of predict_*);
  predict_folder: what `adtr predict` does by default (outputs.predict_to_folder: the default
  backend, scores files and a heatmap PNG per image), on the distinct files among them;
- train_*: the library's training loop (engine.fit_reconstructor on random features: batch 16,
  16x16 tokens, 192 channels, 4 steps per epoch, the second epoch timed): fp32, the default
  precision ("auto": bf16 autocast where the CPU computes bf16 natively, else fp32, in which
  case the row repeats fp32's figures), and before issue 12's training speed-ups
  (nn.MultiheadAttention with attention dropout 0.1, AdamW foreach).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

SIZE = (256, 256)
BATCH = 8
THREADS = 2
TRAIN_BATCH, TRAIN_STEPS = 16, 4  # steps per epoch; the second of two epochs is timed
BOTTLE_TEST = DEFAULT_DATA / "mvtec" / "bottle" / "test"

KINDS = [
    ("backbone_torch", "backbone only, PyTorch"),
    ("backbone_onnx", "backbone only, ONNX Runtime"),
    ("pipeline_torch", "whole pipeline, PyTorch"),
    ("pipeline_onnx", "whole pipeline, ONNX Runtime"),
    ("pipeline_auto", "whole pipeline, default backend (auto)"),
    ("pipeline_no_scorer", "whole pipeline without the image scorer, default backend (auto)"),
    ("reconstructor", "reconstructor + image scorer + scoring only, PyTorch"),
    ("predict_torch", "900x900 PNGs: decode + resize + whole pipeline, PyTorch"),
    ("predict_onnx", "900x900 PNGs: decode + resize + whole pipeline, ONNX Runtime"),
    ("predict_auto", "900x900 PNGs: decode + resize + whole pipeline, default backend (auto)"),
    ("decode_only", "900x900 PNGs: decode + resize only (2 threads, no model)"),
    ("predict_folder", "900x900 PNGs: `adtr predict` to a folder (scores + heatmap PNGs), default backend"),
    ("train_before", "training step, before issue 12 (MHA + attention dropout, AdamW foreach), fp32"),
    ("train_fp32", "training step, fp32"),
    ("train_default", "training step, default precision (auto)"),
]


def fresh_child(cmd: list[str]) -> list[str]:
    """cmd behind /bin/sh, which forks it (no exec: "; exit $?" stops the shell's exec shortcut):
    its ru_maxrss is then its own, not the high-water mark it would inherit from this process."""
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]


def _rate(fn, n_images: int, repeats: int = 5) -> float:
    """Images per second of fn() on n_images: median of `repeats` timed calls after one warm-up."""
    fn()  # first-call allocations and kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def bottle_images(n: int) -> list[Path]:
    """The first n of the bottle test PNGs (900x900), cycled when there are fewer."""
    files = sorted(BOTTLE_TEST.rglob("*.png"))
    if not files:
        raise SystemExit(f"no PNGs under {BOTTLE_TEST} (set ADTR_DATA)")
    return [files[i % len(files)] for i in range(n)]


def prepare(tmp: Path) -> Path:
    """A run folder with a seeded random Lite0 model and its cached graph (the default backend's),
    and TMP/backbone.onnx; returns the run folder."""
    import torch

    from adtr import ADTRDetector, __version__
    from adtr.checkpoint import RunRecord, save_run
    from adtr.config import MODEL_PRESETS, RunConfig, ScoreConfig, TrainConfig
    from adtr.model import ADTR
    from adtr.thresholds import Thresholds

    torch.manual_seed(0)
    config = RunConfig(dataclasses.replace(MODEL_PRESETS["cpu"], image_size=SIZE), ScoreConfig(), TrainConfig())
    model = ADTR(config.model, config.score).eval()
    thresholds = Thresholds(image=1.0, pixel=1.0, low=0.0, method="quantile", n_good=1, false_alarm_rate=0.0)
    record = RunRecord(config, thresholds, {"n": 0}, {"adtr_version": __version__})
    run = tmp / "run"
    save_run(run, model, record)
    chosen = ADTRDetector.load(run, progress=False).selected_backend()
    print(f"prepared {run}: default backend {chosen.name} ({chosen.reason})", flush=True)
    # the same weights without the image scorer (built after the reconstructor: the same seed gives both)
    torch.manual_seed(0)
    plain = RunConfig(dataclasses.replace(config.model, image_scorer=None), config.score, config.train)
    save_run(tmp / "run_no_scorer", ADTR(plain.model, plain.score).eval(), RunRecord(plain, thresholds, {"n": 0},
             {"adtr_version": __version__}))  # fmt: skip
    ADTRDetector.load(tmp / "run_no_scorer", progress=False).selected_backend()  # its cached graph

    class Backbone(torch.nn.Module):
        def __init__(self, m: ADTR):
            super().__init__()
            self.m = m

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.m.extract(images)

    x = torch.rand(1, 3, *SIZE) * 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(Backbone(model), (x,), str(tmp / "backbone.onnx"), input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=17, dynamo=False)  # fmt: skip
    return run


def child(kind: str, run: Path, n_images: int) -> dict:
    import torch

    from adtr.runtime import configure_cpu

    configure_cpu(THREADS)
    torch.manual_seed(0)
    out: dict = {}
    with torch.no_grad():
        if kind.startswith(("backbone_", "pipeline_", "reconstructor")):
            out.update(_model_only(kind, run))
        elif kind == "predict_folder":
            out.update(_predict_folder(run, list(dict.fromkeys(bottle_images(n_images)))))
        elif kind.startswith("predict_"):
            out.update(_predict(kind.removeprefix("predict_"), run, bottle_images(n_images)))
        elif kind == "decode_only":
            out.update(_decode_only(bottle_images(n_images)))
    if kind.startswith("train_"):
        out["ms_per_step"] = _train_step_ms(kind.removeprefix("train_"))
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _model_only(kind: str, run: Path) -> dict:
    import torch

    from adtr import ADTRDetector

    x = torch.rand(BATCH, 3, *SIZE) * 255
    if kind == "backbone_onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(str(run.parent / "backbone.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}
        return {"images_per_second": _rate(lambda: session.run(None, feed), BATCH)}
    if kind == "pipeline_no_scorer":
        kind, run = "pipeline_auto", run.parent / "run_no_scorer"
    backend = kind.removeprefix("pipeline_") if kind.startswith("pipeline_") else "torch"
    det = ADTRDetector.load(run, progress=False, backend=backend)
    chosen = det.selected_backend()
    model = det.model_
    if kind == "backbone_torch":
        return {"images_per_second": _rate(lambda: model.extract(x), BATCH)}
    if kind == "reconstructor":
        f = model.standardize(model.extract(x))
        return {"images_per_second": _rate(lambda: model.score(f), BATCH)}
    return {"images_per_second": _rate(lambda: chosen.run(x), BATCH), "backend": chosen.name}


def _predict(backend: str, run: Path, files: list[Path]) -> dict:
    from adtr import ADTRDetector
    from adtr.predict import iter_predictions

    det = ADTRDetector.load(run, progress=False, backend=backend)
    chosen = det.selected_backend()

    def run_all(paths: list[Path]) -> int:
        preds = iter_predictions(chosen.run, paths, SIZE, det.device, det.thresholds_, BATCH, progress=False)
        return sum(1 for _ in preds)

    run_all(files[:BATCH])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    n = run_all(files)
    return {"images_per_second": n / (time.perf_counter() - t0), "backend": chosen.name}


def _predict_folder(run: Path, files: list[Path]) -> dict:
    """What `adtr predict RUN FILES --out DIR` does, heatmaps included (outputs.predict_to_folder)."""
    from adtr import ADTRDetector
    from adtr.outputs import predict_to_folder

    det = ADTRDetector.load(run, progress=False)
    chosen = det.selected_backend()
    with tempfile.TemporaryDirectory() as tmp:
        predict_to_folder(det, files[:BATCH], Path(tmp) / "warm-up", batch_size=BATCH, run_dir=run)
        t0 = time.perf_counter()
        summary = predict_to_folder(det, files, Path(tmp) / "out", batch_size=BATCH, run_dir=run)
        seconds = time.perf_counter() - t0
    return {"images_per_second": len(summary.rows) / seconds, "backend": chosen.name}


def _decode_only(files: list[Path]) -> dict:
    from adtr.data.images import decode_for_model
    from adtr.data.prefetch import map_ahead

    def run_all(paths: list[Path]) -> int:
        return sum(len(r) for _, r in map_ahead(lambda p: decode_for_model(p, SIZE), paths, BATCH))

    run_all(files[:BATCH])
    t0 = time.perf_counter()
    n = run_all(files)
    return {"images_per_second": n / (time.perf_counter() - t0)}


def _train_step_ms(variant: str) -> float:
    """Milliseconds per step of engine.fit_reconstructor, second epoch (the first warms up)."""
    import torch
    from torch import nn

    from adtr.config import MODEL_PRESETS, TrainConfig
    from adtr.engine import TrainingData, fit_reconstructor
    from adtr.model import ADTR
    from adtr.transformer import Attention

    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=SIZE)
    model = ADTR(cfg)
    train = TrainConfig(epochs=2, batch_size=TRAIN_BATCH, precision="fp32" if variant != "default" else "auto")
    optimizer = None
    if variant == "before":  # the attention and optimizer issue 12's training change replaced

        class MHA(nn.MultiheadAttention):
            def forward(self, q, k, v, mask=None):  # noqa: ARG002
                return super().forward(q, k, v, need_weights=False)[0]

        for module in list(model.reconstructor.modules()):
            for name, sub in list(module.named_children()):
                if isinstance(sub, Attention):
                    setattr(module, name, MHA(cfg.hidden_dim, cfg.num_heads, dropout=0.1, batch_first=True))
        optimizer = torch.optim.AdamW(model.reconstructor.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                      foreach=True)  # fmt: skip
    h, w = cfg.grid_size
    features = torch.randn(TRAIN_BATCH * TRAIN_STEPS, model.channels, h, w, generator=torch.Generator().manual_seed(0))
    history = fit_reconstructor(model, TrainingData(features), None, train, torch.device("cpu"),
                                torch.Generator().manual_seed(0), progress=False, optimizer=optimizer)  # fmt: skip
    return 1000 * history[-1]["seconds"] / TRAIN_STEPS


def default_precision() -> str:
    import torch

    from adtr.config import TrainConfig
    from adtr.engine import use_bf16

    return "bf16" if use_bf16(TrainConfig(), torch.device("cpu")) else "fp32"


def summarise(med: dict, precision: str) -> tuple[list[list], dict[str, float]]:
    """Rows (label, median, peak MiB) and the ratios the issue's targets are stated in."""
    rows = []
    for kind, label in KINDS:
        if kind in med:
            m = med[kind]
            value = f"{m['images_per_second']:.1f} img/s" if "images_per_second" in m else f"{m['ms_per_step']:.0f} ms"
            chose = f" -> {m['backend']}" if "backend" in m and kind.endswith(("_auto", "_folder")) else ""
            chose += " = fp32 here (no native bf16)" if m.get("same_as") == "train_fp32" else ""
            rows.append([label + chose, value, round(m["peak_mib"])])
    ratios: dict[str, float] = {}

    def ips(kind: str) -> float | None:
        return med[kind]["images_per_second"] if kind in med else None

    def ratio(name: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None:
            ratios[name] = a / b

    fastest = max((ips(k) for k in ("pipeline_torch", "pipeline_onnx") if k in med), default=None)
    ratio("default / fastest backend, whole pipeline (target >= 0.9)", ips("pipeline_auto"), fastest)
    ratio("ONNX Runtime / PyTorch, whole pipeline", ips("pipeline_onnx"), ips("pipeline_torch"))
    ratio("with the image scorer / without, whole pipeline, default backend", ips("pipeline_auto"),
          ips("pipeline_no_scorer"))  # fmt: skip
    ratio("ONNX Runtime / PyTorch, backbone only", ips("backbone_onnx"), ips("backbone_torch"))
    # time shares: 1 / rate is the time per image
    ratio("reconstructor's share of inference time, PyTorch (target <= 0.25)", ips("pipeline_torch"),
          ips("reconstructor"))  # fmt: skip
    if ips("backbone_onnx") and ips("pipeline_onnx"):
        share = 1 - ips("pipeline_onnx") / ips("backbone_onnx")
        ratios["reconstructor's share of inference time, ONNX Runtime (1 - backbone / pipeline time)"] = share
    for backend in ("torch", "onnx", "auto"):
        target = " (target >= 0.8)" if backend == "auto" else ""
        ratio(f"with decoding / model only, {backend}{target}", ips(f"predict_{backend}"), ips(f"pipeline_{backend}"))
    ratio("decoding alone / model only, default backend", ips("decode_only"), ips("pipeline_auto"))
    ratio("`adtr predict` with heatmaps / without (streaming predict), default backend", ips("predict_folder"),
          ips("predict_auto"))  # fmt: skip
    if "train_fp32" in med and "train_default" in med:
        ratios[f"training step fp32 / default ({precision}): speed-up (target >= 1.5)"] = (
            med["train_fp32"]["ms_per_step"] / med["train_default"]["ms_per_step"]
        )
    if "train_before" in med and "train_fp32" in med:
        ratios["training step before / now (fp32): speed-up"] = (
            med["train_before"]["ms_per_step"] / med["train_fp32"]["ms_per_step"]
        )
    return rows, ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="child processes per measurement (median; default 3)")
    p.add_argument("--images", type=int, default=48, help="900x900 PNGs in the predict measurements (default 48)")
    p.add_argument("--kinds", default=",".join(k for k, _ in KINDS), help="comma-separated subset of the rows")
    p.add_argument("--out", type=Path, default=REPO / "results" / "speed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.run, args.images)))
        return
    wanted = [k for k in args.kinds.split(",") if k]
    unknown = set(wanted) - {k for k, _ in KINDS}
    if unknown:
        raise SystemExit(f"unknown kinds: {', '.join(sorted(unknown))}")
    precision = default_precision()
    # With no native bf16 the default precision IS fp32: its row repeats fp32's measurement.
    measured = [k for k in wanted if not (k == "train_default" and precision == "fp32" and "train_fp32" in wanted)]
    t_start = time.perf_counter()
    runs: dict[str, list[dict]] = {k: [] for k in measured}
    from adtr.runtime import configure_cpu

    configure_cpu(THREADS)
    with tempfile.TemporaryDirectory(prefix="adtr-speed-") as tmp:
        run = prepare(Path(tmp))
        for r in range(args.repeats):
            for kind in measured:
                cmd = [sys.executable, __file__, "--child", kind, "--run", str(run), "--images", str(args.images)]
                res = subprocess.run(fresh_child(cmd), capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
                runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(r, kind, runs[kind][-1], flush=True)
    med = {
        k: {m: (statistics.median(x[m] for x in v) if m != "backend" else v[0][m]) for m in v[0]}
        for k, v in runs.items()
    }
    if "train_default" in wanted and "train_default" not in med:
        med["train_default"] = {**med["train_fp32"], "same_as": "train_fp32"}
    rows, ratios = summarise(med, precision)
    minutes = (time.perf_counter() - t_start) / 60
    md = (
        f"# Speed (Lite0, {SIZE[0]}x{SIZE[1]}, batch {BATCH}, {THREADS} threads; median of {args.repeats} runs)\n\n"
        f"Command: `python bench/speed.py {' '.join(sys.argv[1:])}` ({minutes:.1f} minutes). Each row is a child "
        "process of its own; peak MiB is its peak resident set size (ru_maxrss). Default training precision "
        f"here: {precision}"
        + (" (no native bf16: the default row repeats fp32's)" if precision == "fp32" else "")
        + ".\n\n"
        + md_table(["measurement", "median", "peak MiB"], rows)
        + "\n\n"
        + md_table(["ratio (same run)", "value"], [[k, round(v, 3)] for k, v in ratios.items()])
        + "\n"
    )
    doc = {"machine": machine(), "default_precision": precision, "images": args.images, "repeats": args.repeats,
           "minutes": minutes, "runs": runs, "median": med, "ratios": ratios}  # fmt: skip
    write_results(args.out, doc, md)


if __name__ == "__main__":
    main()
