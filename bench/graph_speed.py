"""Inference speed of exported ONNX graphs, side by side in ONE process (e.g. a graph exported
by this checkout against one exported by an earlier commit):

    python bench/graph_speed.py A.onnx B.onnx [...] [--repeats 30] [--out results/graph_speed]

Each graph gets its own ONNX Runtime session (2 intra-op threads, CPU), one warm-up call, then
--repeats rounds in which every graph scores the same random batch of 8 images in turn, so
drift in the machine's load hits all alike; the median ms per image is reported, and each
graph's speed relative to the first. The input size is read from the first graph's input.
--profile N: afterwards, each graph runs N more batches in a session with ONNX Runtime's profiler
on, and the time of each operator type (summed over its nodes, ms per image) is reported for the
operators that take at least 1% of some graph's time (the profile files are removed).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="batches per graph run with ONNX Runtime's profiler: time per operator type")
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
    doc = {"command": command, "machine": machine(), "rows": rows}
    if args.profile:
        ops = {str(path): profile(path, images, first.name, args.profile) for path in args.graphs}
        shown = sorted({op for per in ops.values() for op, ms in per.items() if ms >= 0.01 * sum(per.values())})
        doc["ms_per_image_by_operator"] = ops
        md += "\n\n" + f"Time per operator type, ms per image ({args.profile} profiled batches of {BATCH}; " + \
            "operators at >= 1% of some graph's time):\n\n" + md_table(
                ["graph", *shown], [[name, *(f"{per.get(op, 0.0):.2f}" for op in shown)] for name, per in ops.items()])
    write_results(args.out, doc, md + "\n")


def profile(path: Path, images: np.ndarray, input_name: str, batches: int) -> dict[str, float]:
    """ms per image of each operator type of a graph (summed over its nodes), from ONNX Runtime's
    profiler over `batches` runs of the batch, after one unprofiled warm-up run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {input_name: images})  # profiled too: its events are dropped below
    for _ in range(batches):
        session.run(None, {input_name: images})
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        os.remove(trace)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # the warm-up run's nodes left out
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            total[e["args"]["op_name"]] += e["dur"] / 1000  # microseconds -> ms
    return {op: round(ms / (batches * len(images)), 3) for op, ms in total.most_common()}


if __name__ == "__main__":
    main()
