"""Several processes on torch.distributed, launched by torchrun: ranks, collectives, the fit's hooks.

    torchrun --nproc-per-node N -m adtr fit DATA --out RUN ...        (one machine: adtr fit --nproc N)
    torchrun --nproc-per-node N -m adtr predict RUN FOLDER --out DIR  (adtr/sharding.py)

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_from_env` joins the process group through them (env:// rendezvous). The
backend follows the device, gloo for CPUs and NCCL for CUDA (each rank on cuda:LOCAL_RANK),
unless ADTR_DIST_BACKEND names one. In a single process (no torchrun, or WORLD_SIZE=1) every
helper here is the identity, so fit.py and engine.py call them unconditionally.

The fit is data parallel (Li et al., "PyTorch Distributed", VLDB 2020: DistributedDataParallel):
- each rank extracts the backbone features of one contiguous block of the images (`block`);
- the per-channel feature statistics are reduced exactly: float64 sums, sums of squares and
  counts over all ranks (`set_feature_stats`), not an average of per-rank means;
- the standardised features are all-gathered (`gather_rows`), so every rank holds the
  single-process feature cache in its order, and the shuffling generator (same seed
  everywhere) draws the same global batches as one process does;
- each global batch is split by rows across ranks (`DataParallel.rows`); a rank's mean loss
  is weighted by its share of the batch, and DistributedDataParallel averages the gradients,
  so every step applies the single-process gradient up to the order of floating-point sums.
  Dropout masks are drawn per rank (seeded by seed, epoch and rank), so they differ from one
  process's: that, not the data, is what separates a 2-process fit from a 1-process one.
Rank 0 alone writes files (the resumable state after each epoch, the run folder); on resume
it sends the state to the other ranks (`files_from_main`), so no shared file system is needed
for a fit; predict writes heatmaps from every rank and does need one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from adtr.checkpoint import STATE_DIR, STATE_JSON, STATE_WEIGHTS
from adtr.engine import ANOMALY_KINDS, AnomalyPool
from adtr.errors import SettingsError
from adtr.model import ADTR

log = logging.getLogger(__name__)

BACKEND_ENV = "ADTR_DIST_BACKEND"
BACKENDS = ("gloo", "nccl")


# -- process group ----------------------------------------------------------------------
def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one rank of a process group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one that writes files and talks to the user (True in a single process)."""
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """gloo for CPUs, NCCL for CUDA, or ADTR_DIST_BACKEND; SettingsError for a backend that
    cannot work (an unknown name, NCCL without CUDA)."""
    name = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if name not in BACKENDS:
        raise SettingsError(f"{BACKEND_ENV}={name}: choose one of {', '.join(BACKENDS)}")
    if name == "nccl" and device.type != "cuda":
        raise SettingsError(f"{BACKEND_ENV}=nccl runs on CUDA devices only; pass --device cuda or use gloo")
    return name


def init_from_env(device: str | torch.device) -> torch.device:
    """Join torchrun's process group; returns this rank's device.

    A CUDA device becomes cuda:LOCAL_RANK (one GPU per process on each machine). Without
    torchrun (WORLD_SIZE unset or 1) nothing is started and the device comes back as given.
    SettingsError for a bad backend (backend_for).
    """
    device = torch.device(device)
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend)
    log.info("rank %d of %d (%s, %s)", rank(), world_size(), backend, device)
    return device


def shutdown() -> None:
    """Wait for every rank, then leave the process group (after a successful command only: a
    rank that failed exits at once, and torchrun stops the others)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def agree(decision: bool) -> bool:
    """Rank 0's decision on every rank (a branch every rank must take alike, whatever
    rounding made each rank compute); the decision itself in one process."""
    if not active():
        return decision
    flag = torch.tensor([int(decision)], dtype=torch.int64, device=_comm_device())
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _comm_device() -> torch.device:
    """Where collectives run: NCCL moves CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- data split across ranks ------------------------------------------------------------
def block(n: int, r: int | None = None, world: int | None = None) -> range:
    """Rank r's contiguous share of n items in order (this rank's by default): ranks get
    n // world items or one more, rank 0 first; empty for some ranks when n < world."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return range(n * r // world, n * (r + 1) // world)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's block of rows (n_r, ...) concatenated in rank order, on every rank, on
    local's device. The trailing shape and dtype must agree across ranks."""
    if not active():
        return local
    dev, world = _comm_device(), world_size()
    x = local.to(dev, torch.uint8) if local.dtype == torch.bool else local.to(dev)  # gloo moves no bool
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(x)], dtype=torch.int64, device=dev))
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=dev)  # all_gather wants equal shapes
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(local.device, local.dtype)


def gather_pool(pool: AnomalyPool) -> AnomalyPool:
    """An anomaly pool made of every rank's block, in rank order, on every rank."""
    codes = gather_rows(torch.tensor([ANOMALY_KINDS.index(k) for k in pool.kinds], dtype=torch.int64))
    return AnomalyPool(gather_rows(pool.features), gather_rows(pool.token_labels), gather_rows(pool.pixel_level),
                       tuple(ANOMALY_KINDS[i] for i in codes.tolist()))  # fmt: skip


# -- feature statistics -----------------------------------------------------------------
def channel_sums(raw: torch.Tensor) -> torch.Tensor:
    """Per-channel sums, sums of squares and counts of features (N, C, h, w): (2C + 1,) float64."""
    x = raw.double()
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64)
    return torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])


def stats_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (C,) float64, from channel_sums added over blocks: the same quantities
    as ADTR.set_feature_stats on all blocks at once (unbiased std, at least 1e-6). In float64
    the cancellation in q - s^2/n costs about 1e-16 * (mean^2 / var) of the variance."""
    c = (len(sums) - 1) // 2
    s, q, n = sums[:c], sums[c : 2 * c], sums[-1]
    mean = s / n
    var = (q - s * mean).clamp_min(0) / (n - 1)
    return mean, var.sqrt().clamp_min(1e-6)


def set_feature_stats(model: ADTR, raw_train: torch.Tensor) -> None:
    """ADTR.set_feature_stats over the training features of all ranks, raw_train (n_r, C, h, w)
    being this rank's: the sums are all-reduced, so the result does not depend on the split."""
    if not active():
        model.set_feature_stats(raw_train.to(model.feature_mean.device))
        return
    sums = channel_sums(raw_train).to(_comm_device())
    dist.all_reduce(sums)
    mean, std = stats_from_sums(sums.cpu())
    model.feature_mean.copy_(mean.float().view(1, -1, 1, 1))
    model.feature_std.copy_(std.float().view(1, -1, 1, 1))


# -- training ---------------------------------------------------------------------------
class DataParallel:
    """What engine.fit_reconstructor needs to train on several ranks with DistributedDataParallel.

    Every rank draws the same global batch (B rows); `rows` gives this rank's block of it and
    the share of the batch mean it carries. The loss backpropagated is the local mean times
    share * world, and DDP averages over ranks, so the gradient is the global batch mean's.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.rank, self.world = rank(), world_size()

    def wrap(self, module: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def start_epoch(self, epoch: int) -> None:
        """Seed torch's global generator (dropout) from (seed, epoch, rank): ranks draw different
        masks, and a resumed fit draws the same ones without storing every rank's generator."""
        torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]))

    def rows(self, n: int) -> tuple[slice, float]:
        """This rank's rows of a global batch of n rows, and their share of the batch mean.

        A rank left without rows (n < world) runs row 0 with share 0: DistributedDataParallel
        needs every rank in every step's gradient reduction."""
        r = block(n, self.rank, self.world)
        if len(r) == 0:
            return slice(0, 1), 0.0
        return slice(r.start, r.stop), len(r) / n

    def batch_mean(self, loss: torch.Tensor, share: float) -> float:
        """The global batch's mean loss from this rank's mean `loss` and its share (all ranks)."""
        total = (loss.detach().float() * share).reshape(1).to(_comm_device())
        dist.all_reduce(total)
        return float(total.item())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's values (n_r, ...), concatenated in rank order (gather_rows): the hard
        loss's quantile and weight sum over the global batch."""
        return gather_rows(values)

    def scale(self, loss: torch.Tensor, share: float) -> torch.Tensor:
        """The loss to backpropagate: DDP divides the summed gradients by the world size."""
        return loss * (share * self.world)


def data_parallel(seed: int, device: torch.device) -> DataParallel | None:
    """The training hook for this process group, or None in a single process."""
    return DataParallel(seed, device) if active() else None


# -- files ------------------------------------------------------------------------------
@contextmanager
def files_from_main(folder: Path | str, names: Sequence[str]) -> Iterator[Path]:
    """folder on rank 0; on the other ranks a temporary folder holding rank 0's copies of the
    files `names` (relative paths), so that every rank reads what rank 0 has, with or without a
    shared file system. A file rank 0 lacks is missing everywhere."""
    folder = Path(folder)
    if not active():
        yield folder
        return
    dev = _comm_device()
    if is_main():
        blobs = [(folder / n).read_bytes() if (folder / n).is_file() else None for n in names]
        sizes = torch.tensor([-1 if b is None else len(b) for b in blobs], dtype=torch.int64)
        payload = torch.from_numpy(np.frombuffer(b"".join(b or b"" for b in blobs), dtype=np.uint8).copy())
    else:
        sizes = torch.zeros(len(names), dtype=torch.int64)
    sizes = sizes.to(dev)
    dist.broadcast(sizes, 0)
    total = int(sizes.clamp_min(0).sum())
    if not is_main():
        payload = torch.empty(total, dtype=torch.uint8)
    if total:
        buffer = payload.to(dev)
        dist.broadcast(buffer, 0)
        payload = buffer.cpu()
    if is_main():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="adtr-rank") as tmp:
        offset = 0
        for name, size in zip(names, sizes.cpu().tolist(), strict=True):
            if size >= 0:
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(payload[offset : offset + size].numpy().tobytes())
                offset += size
        yield Path(tmp)


def train_state_from_main(run_dir: Path | str) -> contextlib.AbstractContextManager[Path]:
    """A run folder holding rank 0's resumable training state (checkpoint.save_train_state), on
    every rank: run_dir itself on rank 0 (files_from_main)."""
    return files_from_main(run_dir, [f"{STATE_DIR}/{STATE_JSON}", f"{STATE_DIR}/{STATE_WEIGHTS}"])


# -- launching --------------------------------------------------------------------------
def without_nproc(argv: Sequence[str]) -> list[str]:
    """argv less `--nproc N` / `--nproc=N`: what each launched process runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(argv: Sequence[str], nproc: int) -> int:
    """`adtr ... --nproc N`: run `adtr ARGV` in nproc processes on this machine through torchrun
    (torch.distributed.run --standalone: a local rendezvous on a free port); its exit status.
    torchrun sets OMP_NUM_THREADS=1 per process unless it is set (or --threads is given)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "adtr", *without_nproc(argv)]  # fmt: skip
    # The processes import the adtr this one runs (a checkout may shadow an installed one).
    here = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(cmd, check=False, env={**os.environ, "PYTHONPATH": path}).returncode
