"""Deployment figures for a run: PyTorch vs ONNX Runtime throughput, and a bounded load
test of the HTTP service on loopback.

    python bench/deploy.py --run runs/bench/bottle [--clients 4] [--requests 200] [--seconds 60]

Throughput: model only (backbone included, decoding excluded), batch 8 at the run's input
size, median of 5 timed repeats after 2 warm-ups, 2 threads. Load test: `adtr serve` on
127.0.0.1 with a free port, --clients threads posting real test images until --requests are
done or --seconds pass. Writes results/deploy.json and results/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, REPO, machine, md_table, running_service, write_results  # noqa: E402

from adtr import ADTRDetector  # noqa: E402
from adtr.data.folder import find_images  # noqa: E402
from adtr.export import OnnxModel, export_run  # noqa: E402
from adtr.runtime import configure_cpu  # noqa: E402
from adtr.serve import encode_multipart  # noqa: E402


def throughput(engine, size: tuple[int, int], batch: int = 8, repeats: int = 5) -> float:
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            engine(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def load_test(run: Path, images: list[Path], clients: int, requests: int, seconds: float) -> dict:
    with running_service(run) as url:
        bodies = [encode_multipart(p.name, p.read_bytes()) for p in images]
        deadline = time.perf_counter() + seconds
        counter = iter(range(requests))

        def client(_: int) -> list[tuple[float, int]]:
            done = []
            for i in counter:
                if time.perf_counter() > deadline:
                    break
                body, ctype = bodies[i % len(bodies)]
                req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": ctype})
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        r.read()
                        code = r.status
                except urllib.error.HTTPError as e:
                    code = e.code
                done.append((time.perf_counter() - t0, code))
            return done

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for part in pool.map(client, range(clients)) for r in part]
        wall = time.perf_counter() - t0
    latency = np.array([t for t, _ in results]) * 1000
    errors = sum(code != 200 for _, code in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "requests_per_second": len(results) / wall,
        "p50_ms": float(np.percentile(latency, 50)),
        "p99_ms": float(np.percentile(latency, 99)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "bench" / "bottle")
    p.add_argument("--images", type=Path, default=DEFAULT_DATA / "mvtec" / "bottle" / "test")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--out", type=Path, default=REPO / "results" / "deploy")
    args = p.parse_args()
    configure_cpu(2)
    det = ADTRDetector.load(args.run, progress=False)
    onnx_path = args.run / "model.onnx"
    diff = export_run(det, onnx_path).max_difference
    size = det.config.model.image_size
    torch_ips = throughput(det.model_, size)
    onnx_ips = throughput(OnnxModel(onnx_path, det.config.model, threads=2), size)
    images = find_images(args.images)[:40]
    load = load_test(args.run, images, args.clients, args.requests, args.seconds)
    results = {"torch_images_per_second": torch_ips, "onnx_images_per_second": onnx_ips,
               "onnx_max_score_difference": diff, "load_test": load}  # fmt: skip
    md = (
        f"# Deployment figures for {args.run}\n\nCommand: `python bench/deploy.py {shlex.join(sys.argv[1:])}`\n\n"
        + md_table(["engine", "images/s (batch 8, model only)"], [["PyTorch", torch_ips], ["ONNX Runtime", onnx_ips]])
        + f"\n\nONNX vs PyTorch max image-score difference: {diff:.2e}\n\n"
        + md_table(["clients", "requests", "errors", "requests/s", "p50 ms", "p99 ms"],
                   [[load["clients"], load["requests"], load["errors"], load["requests_per_second"], load["p50_ms"],
                     load["p99_ms"]]])
        + "\n"
    )  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(args.out, {"machine": machine(), "args": settings, "results": results}, md)
    print(json.dumps(load))


if __name__ == "__main__":
    main()
