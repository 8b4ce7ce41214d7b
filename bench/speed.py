"""Speed in ONE run, on the same images: backbone, whole pipeline per engine, decoding, training step.

    python bench/speed.py [--repeats 3] [--images 48] [--out results/speed]

Every measurement runs in a child process of its own (its peak memory is its own), is
repeated --repeats times, and the median is reported with its ratio to a baseline measured
in the same run, since the machine is shared and noisy. Lite0, 256x256, batch 8, 2 threads:
- backbone only: PyTorch vs ONNX Runtime (images/s, random input, decoding excluded);
- whole pipeline (backbone + reconstructor + scoring) per engine, decoding excluded, and the
  reconstructor's share of the PyTorch time;
- whole pipeline with decoding and resizing of real 900x900 PNGs (MVTec bottle test images,
  threads decoding ahead of the model, adtr.engine.iter_image_batches), per engine;
- the training step of the reconstructor (batch 16, 16x16 tokens, cpu preset): before this
  change (torch.nn.MultiheadAttention with attention dropout 0.1, AdamW foreach) vs now
  (fused scaled-dot-product attention, no attention dropout, fused AdamW), fp32 and bf16
  autocast (bf16 is emulated, hence slow, on CPUs without native bf16).
The model's weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, write_results  # noqa: E402

SIZE = (256, 256)
BATCH = 8


def _model():
    import dataclasses

    from adtr.config import MODEL_PRESETS
    from adtr.model import ADTR

    return ADTR(dataclasses.replace(MODEL_PRESETS["cpu"], image_size=SIZE)).eval()


def _rate(fn, n_images: int, repeats: int = 5) -> float:
    fn()  # warm-up: first-call allocations and kernel choice
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def child(kind: str, images: int) -> dict:
    import torch

    from adtr.runtime import configure_cpu

    configure_cpu(2)
    torch.manual_seed(0)
    x = torch.rand(BATCH, 3, *SIZE) * 255
    out: dict = {}
    with torch.no_grad():
        if kind in ("backbone_torch", "backbone_onnx", "pipeline_torch", "pipeline_onnx", "reconstructor"):
            model = _model()
            if kind == "backbone_torch":
                out["images_per_second"] = _rate(lambda: model.extract(x), BATCH)
            elif kind == "pipeline_torch":
                out["images_per_second"] = _rate(lambda: model(x), BATCH)
            elif kind == "reconstructor":
                f = model.standardize(model.extract(x))
                out["images_per_second"] = _rate(lambda: model.score(f), BATCH)
            else:
                out["images_per_second"] = _onnx_rate(model, x, backbone_only=kind == "backbone_onnx")
        elif kind.startswith("decode_"):
            out["images_per_second"] = _decode_rate(kind.removeprefix("decode_"), images)
        elif kind.startswith("train_"):
            out["ms_per_step"] = _train_step_ms(*kind.split("_")[1:])
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _onnx_rate(model, x, backbone_only: bool) -> float:
    import torch

    from adtr.export import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        if backbone_only:
            import onnxruntime as ort

            class Backbone(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.m = m

                def forward(self, images):
                    return self.m.extract(images)

            torch.onnx.export(Backbone(model), (x,), str(path), input_names=["images"], opset_version=17, dynamo=False)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"images": x.numpy()}
            return _rate(lambda: session.run(None, feed), len(x))
        export_onnx(model, path, check=False)
        engine = OnnxModel(path, model.cfg, threads=2)
        return _rate(lambda: engine(x), len(x))


def _decode_rate(engine_name: str, n: int) -> float:
    """Real 900x900 PNGs decoded and resized in threads ahead of the model, then scored."""
    from adtr.data.mvtec import test_samples
    from adtr.engine import iter_image_batches
    from adtr.export import OnnxModel, export_onnx

    samples = (test_samples(DEFAULT_DATA / "mvtec" / "bottle") * 4)[:n]
    model = _model()
    with tempfile.TemporaryDirectory() as tmp:
        engine = model
        if engine_name == "onnx":
            export_onnx(model, Path(tmp) / "m.onnx", check=False)
            engine = OnnxModel(Path(tmp) / "m.onnx", model.cfg, threads=2)

        def run() -> None:
            for batch in iter_image_batches(samples, SIZE, BATCH):
                engine(batch.images)

        return _rate(run, len(samples), repeats=1)


def _train_step_ms(variant: str, precision: str) -> float:
    import dataclasses

    import torch
    from torch import nn

    from adtr.config import MODEL_PRESETS
    from adtr.model import TransformerReconstructor
    from adtr.transformer import Attention

    cfg = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=SIZE)
    rec = TransformerReconstructor(192, cfg)
    if variant == "before":  # the attention and optimizer this change replaced

        class MHA(nn.MultiheadAttention):
            def forward(self, q, k, v, mask=None):  # noqa: ARG002
                return super().forward(q, k, v, need_weights=False)[0]

        for module in list(rec.modules()):
            for child_name, sub in list(module.named_children()):
                if isinstance(sub, Attention):
                    setattr(module, child_name, MHA(cfg.hidden_dim, cfg.num_heads, dropout=0.1, batch_first=True))
    opt = torch.optim.AdamW(rec.parameters(), lr=1e-4, fused=variant != "before")
    f = torch.randn(16, 192, 16, 16)
    rec.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = rec(f)
        loss = ((out.float() - f) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return 1000 / _rate(step, 1, repeats=3 if precision == "bf16" else 5)


KINDS = [
    ("backbone_torch", "backbone only, PyTorch"),
    ("backbone_onnx", "backbone only, ONNX Runtime"),
    ("pipeline_torch", "whole pipeline, PyTorch"),
    ("pipeline_onnx", "whole pipeline, ONNX Runtime"),
    ("reconstructor", "reconstructor + scoring only, PyTorch"),
    ("decode_torch", "900x900 PNGs decoded + resized + whole pipeline, PyTorch"),
    ("decode_onnx", "900x900 PNGs decoded + resized + whole pipeline, ONNX Runtime"),
    ("train_before_fp32", "training step, before (MHA + attention dropout, AdamW foreach), fp32"),
    ("train_after_fp32", "training step, now (fused attention, fused AdamW), fp32"),
    ("train_after_bf16", "training step, now, bf16 autocast"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=48, help="real PNGs in the decoding measurements")
    p.add_argument("--kinds", default=",".join(k for k, _ in KINDS), help="comma-separated subset")
    p.add_argument("--out", type=Path, default=REPO / "results" / "speed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images)))
        return
    wanted = args.kinds.split(",")
    runs: dict[str, list[dict]] = {k: [] for k in wanted}
    for r in range(args.repeats):  # interleaved, so that drift in the machine's load hits every kind alike
        for kind in wanted:
            cmd = [sys.executable, __file__, "--child", kind, "--images", str(args.images)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(r, kind, runs[kind][-1], flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    rows = []
    for kind, label in KINDS:
        if kind not in med:
            continue
        m = med[kind]
        value = f"{m['images_per_second']:.1f} img/s" if "images_per_second" in m else f"{m['ms_per_step']:.0f} ms/step"
        rows.append([label, value, round(m["peak_mib"])])
    ratios = {}

    def ratio(name: str, a: str, b: str, key: str) -> None:
        if a in med and b in med:
            ratios[name] = med[a][key] / med[b][key]

    ratio("ONNX / PyTorch, whole pipeline", "pipeline_onnx", "pipeline_torch", "images_per_second")
    ratio("ONNX / PyTorch, backbone only", "backbone_onnx", "backbone_torch", "images_per_second")
    ratio("with decoding / model only, PyTorch", "decode_torch", "pipeline_torch", "images_per_second")
    ratio("with decoding / model only, ONNX Runtime", "decode_onnx", "pipeline_onnx", "images_per_second")
    ratio("training step before / now (fp32): speed-up", "train_before_fp32", "train_after_fp32", "ms_per_step")
    ratio("training step bf16 / fp32 (time)", "train_after_bf16", "train_after_fp32", "ms_per_step")
    if "reconstructor" in med and "pipeline_torch" in med:
        ratios["reconstructor's share of PyTorch inference time"] = (
            med["pipeline_torch"]["images_per_second"] / med["reconstructor"]["images_per_second"]
        )
    md = (
        f"# Speed (Lite0, {SIZE[0]}x{SIZE[1]}, batch {BATCH}, 2 threads; median of {args.repeats} runs)\n\n"
        f"Command: `python bench/speed.py {' '.join(sys.argv[1:])}`\n\n"
        + md_table(["measurement", "median", "peak MiB"], rows)
        + "\n\n"
        + md_table(["ratio (same run)", "value"], [[k, round(v, 3)] for k, v in ratios.items()])
        + "\n"
    )
    write_results(args.out, {"machine": machine(), "runs": runs, "median": med, "ratios": ratios}, md)


if __name__ == "__main__":
    main()
