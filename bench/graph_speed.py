"""Inference speed of exported ONNX graphs, side by side in ONE process (e.g. a graph exported
by this checkout against one exported by an earlier commit):

    python bench/graph_speed.py A.onnx B.onnx [...] [--repeats 30] [--out results/graph_speed]

Each graph gets its own ONNX Runtime session (2 intra-op threads, CPU), one warm-up call, then
--repeats rounds in which every graph scores the same random batch of 8 images in turn, so
drift in the machine's load hits all alike; the median ms per image is reported, and each
graph's speed relative to the first. The input size is read from the first graph's input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

BATCH, THREADS = 8, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("results/graph_speed"))
    args = ap.parse_args()
    sessions = {}
    for path in args.graphs:
        if not path.is_file():
            sys.exit(f"{path}: no such ONNX graph")
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        sessions[str(path)] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first = next(iter(sessions.values())).get_inputs()[0]
    h, w = first.shape[2:]
    images = (np.random.default_rng(0).random((BATCH, 3, h, w)) * 255).astype(np.float32)
    for s in sessions.values():
        s.run(None, {first.name: images})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {first.name: images})
            times[name].append((time.perf_counter() - start) * 1000 / BATCH)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[str(args.graphs[0])]
    rows = [{"graph": n, "ms_per_image": round(m, 3), "images_per_s": round(1000 / m, 1),
             "speed_vs_first": f"{base / m:.3f}"} for n, m in medians.items()]  # fmt: skip
    title = f"# ONNX graph speed ({h}x{w}, batch {BATCH}, {THREADS} threads; median of {args.repeats} rounds)"
    command = "python bench/graph_speed.py " + " ".join(sys.argv[1:])
    keys = ["graph", "ms_per_image", "images_per_s", "speed_vs_first"]
    table = md_table(["graph", "ms/img", "img/s", "speed vs first"], [[r[k] for k in keys] for r in rows])
    md = "\n".join([title, "", f"Command: `{command}`", "", table])
    write_results(args.out, {"command": command, "machine": machine(), "rows": rows}, md + "\n")


if __name__ == "__main__":
    main()
