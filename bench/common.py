"""Helpers shared by the benchmarks: timed child processes, JSON + Markdown output."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from adtr.data.folder import has_masks
from adtr.data.images import read_mask
from adtr.data.samples import Sample
from adtr.fileio import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# The development sets (issue 13): name -> folder under the data root.
DEV_SETS = {
    "bottle": "mvtec/bottle",
    "transistor": "mvtec/transistor",
    "metal_plate": "mpdd/metal_plate",
    "bsdata": "bsdata",
}
DEFAULT_DATA = Path(os.environ.get("ADTR_DATA", REPO.parent / "shared" / "data"))


def adtr_command() -> list[str]:
    """The CLI as a user runs it, from the same interpreter (and PYTHONPATH) as the bench."""
    return [sys.executable, "-m", "adtr.cli"]


@contextmanager
def running_service(run: Path, threads: int = 2, timeout: float = 60.0) -> Iterator[str]:
    """`adtr serve RUN` as a user starts it, on a free loopback port; yields its URL once
    /health answers, and stops it on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(adtr_command() + ["serve", str(run), "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"adtr serve {run} did not start (exit status {proc.poll()})") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS in MiB of that process, stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024.0, out.read()


def invocation() -> str:
    """The command line this benchmark was run with, quoted for a shell: `python bench/X.py ARGS`."""
    return " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *(shlex.quote(a) for a in sys.argv[1:])])


def run_data_pairs(pairs: list[str]) -> list[tuple[Path, Path]]:
    """RUN:DATA arguments -> (saved run folder, category folder) pairs; SystemExit naming a bad one."""
    out = []
    for pair in pairs:
        run, sep, data = pair.partition(":")
        if not sep:
            raise SystemExit(f"{pair!r}: expected RUN:DATA")
        out.append((Path(run), Path(data)))
    return out


def sample_masks(samples: list[Sample], sizes: list[tuple[int, int]]) -> list[np.ndarray] | None:
    """Bool masks (H, W) of the samples at their (height, width) sizes (all False for a good
    image), or None when some anomalous sample has no mask (no pixel metrics then)."""
    if not has_masks(samples):
        return None
    return [read_mask(s.mask_path, z) if s.mask_path else np.zeros(z, bool)
            for s, z in zip(samples, sizes, strict=True)]  # fmt: skip


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_results(stem: Path, data: dict, markdown: str) -> None:
    atomic_write_json(stem.with_suffix(".json"), data)
    atomic_write_text(stem.with_suffix(".md"), markdown)
    print(markdown)
    print(f"written {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
