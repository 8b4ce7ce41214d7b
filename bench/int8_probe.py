"""Where a run's ONNX graph spends its time, and whether int8 quantization would buy speed.

    python bench/int8_probe.py RUN DATA [--n 40] [--out results/int8_probe]

RUN is a run folder with its exported graph (RUN/model.onnx, as `adtr fit` writes it); DATA its
category (MVTec layout). Three measurements on this machine, 2 threads, batch 8:
  - the share of kernel time per operator type (ONNX Runtime's profiler, 6 batches of noise);
  - the graph in float32 against the same graph with every Conv statically quantized to int8
    (onnxruntime.quantization, QDQ, per-channel weights, activations calibrated on 32 good
    training images): images per second (median of 3 passes over 40 test images) and the image
    AUROC on the first --n good and --n defective test images;
  - the correlation of the two graphs' image scores and maps.
Not a product feature: it decides whether one is worth building (docs/design.md, "int8").
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, invocation, machine, md_table, write_results  # noqa: E402

from adtr.data.images import read_image  # noqa: E402
from adtr.data.mvtec import test_samples, train_samples  # noqa: E402
from adtr.data.transforms import resize_image  # noqa: E402
from adtr.metrics import image_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--n", type=int, default=40, help="good and defective test images each")
    p.add_argument("--out", type=Path, default=REPO / "results" / "int8_probe")
    args = p.parse_args()
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = args.run / "model.onnx"
    dims = onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim
    size = (dims[2].dim_value, dims[3].dim_value)

    def load(samples: list) -> np.ndarray:
        return np.stack([resize_image(read_image(s.path), size).numpy() for s in samples]).astype(np.float32)

    calib = load(train_samples(args.data)[:32])
    test = test_samples(args.data)
    chosen = [s for s in test if s.label == 0][: args.n] + [s for s in test if s.label == 1][: args.n]
    x, y = load(chosen), np.array([s.label for s in chosen])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    with tempfile.TemporaryDirectory() as tmp:
        pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(quantized), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip

        def run(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            outs = [session.run(None, {"images": x[i : i + 8]}) for i in range(0, len(x), 8)]
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(0, 40, 8):
                    session.run(None, {"images": x[i : i + 8]})
                seconds.append((time.perf_counter() - t0) / min(40, len(x)))
            return np.concatenate([o[1] for o in outs]), np.concatenate([o[0] for o in outs]), float(np.median(seconds))

        fp32, int8 = run(src), run(quantized)

    profile_options = ort.SessionOptions()
    profile_options.intra_op_num_threads = 2
    profile_options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        profile_options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(src), profile_options, providers=["CPUExecutionProvider"])
        noise = np.random.default_rng(0).uniform(0, 255, (8, 3, *size)).astype(np.float32)
        for _ in range(6):
            session.run(None, {"images": noise})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    shares = {op: round(t / total, 3) for op, t in by_op.most_common(8)}

    rows = [[name, round(1 / sec, 1), image_metrics(score.astype(np.float64), y)["image_auroc"]]
            for name, (score, _, sec) in (("float32", fp32), ("int8 Conv (QDQ)", int8))]  # fmt: skip
    corr_score = float(np.corrcoef(fp32[0], int8[0])[0, 1])
    corr_map = float(np.corrcoef(fp32[1].ravel(), int8[1].ravel())[0, 1])
    data = {"machine": machine(), "command": invocation(), "input": list(size), "images": len(chosen),
            "rows": [dict(zip(("graph", "img_per_s", "image_auroc"), r, strict=True)) for r in rows],
            "score_correlation": corr_score, "map_correlation": corr_map, "op_time_share": shares}  # fmt: skip
    md = "\n".join([
        "# int8 quantization of the exported graph, and where the graph spends its time", "",
        f"Command: `{invocation()}`. Input {size[0]}x{size[1]}, batch 8, 2 threads; {len(chosen)} test images.", "",
        md_table(["graph", "img/s", "image AUROC"], rows), "",
        f"Correlation of the two graphs' image scores {corr_score:.3f}, of their maps {corr_map:.3f}.", "",
        "Kernel time per operator type (float32 graph): "
        + ", ".join(f"{op} {share:.1%}" for op, share in shares.items()) + ".",
    ])  # fmt: skip
    write_results(args.out, data, md + "\n")


if __name__ == "__main__":
    main()
