"""One rank of tests/test_distributed.py's 2-process fit, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py DATA OUT

On the same data and settings as the test's single-process fit (CONFIG), it writes, from rank 0:
    OUT/two        the uninterrupted 2-process run
    OUT/resumed    a 2-process fit stopped after epoch 2 of 3 (state kept in OUT/resumed), then resumed
and from every rank OUT/rank-R.json: how often this rank wrote the resumable state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from conftest import TINY

from adtr import distributed, fit
from adtr.checkpoint import save_run
from adtr.config import RunConfig, TrainConfig


# No dropout: what is left between 1 and 2 processes is the order of floating-point sums.
# 8 images: 7 train, 1 held out; batches of 3 rows give 3, 3, 1: uneven splits across the two
# ranks and, in the last batch, a rank without rows (it runs a stand-in row with weight 0).
# ADTR_TEST_LOSS picks the normal-only loss: "hard" checks its global quantile and weights.
# fp32: bf16 kernels round differently with the thread count (1 per rank here, 2 in the single
# process) on CPUs with AMX, which would hide what this compares; the bf16 path is the same code.
def config_for(loss: str) -> RunConfig:
    """The settings of both fits; with the hard loss also the image scorer (without its input
    dropout, for the same reason), trained on both ranks as the reconstructor is."""
    model = dataclasses.replace(TINY, dropout=0.0, image_scorer="cnn" if loss == "hard" else None,
                                image_scorer_dropout=0.0)  # fmt: skip
    # query_fallback off: 8 images cross-fit, whose fallback check (a query fit on two thirds) would
    # fall back on these few epochs; this test is of the query fit's ranks and resume
    return RunConfig(model, train=TrainConfig(epochs=3, batch_size=3, seed=3, loss=loss, precision="fp32",
                                              query_fallback=None))


CONFIG = config_for(os.environ.get("ADTR_TEST_LOSS", "mse"))


class Stop(Exception):
    """Stands for a kill after an epoch: the state on disk is what a kill would leave."""


def main(data: Path, out: Path) -> None:
    device = distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    writes = 0
    save_state = fit.save_train_state

    def counting_save(*args, **kwargs) -> None:
        nonlocal writes
        writes += 1
        save_state(*args, **kwargs)

    fit.save_train_state = counting_save
    model, record = fit.fit_run(CONFIG, data, device, progress=False)
    if distributed.is_main():
        save_run(out / "two", model, record)

    start_epoch = distributed.DataParallel.start_epoch

    def stop_at_third(self, epoch: int) -> None:
        if epoch == 2:
            raise Stop
        start_epoch(self, epoch)

    distributed.DataParallel.start_epoch = stop_at_third
    try:
        fit.fit_run(CONFIG, data, device, state_dir=out / "resumed", progress=False)
        raise AssertionError("the fit was not stopped")
    except Stop:
        pass
    distributed.DataParallel.start_epoch = start_epoch
    distributed.barrier()
    model, record = fit.fit_run(CONFIG, data, device, state_dir=out / "resumed", resume=True, progress=False)
    if distributed.is_main():
        save_run(out / "resumed", model, record)
    doc = {"rank": distributed.rank(), "world": distributed.world_size(), "state_writes": writes}
    (out / f"rank-{distributed.rank()}.json").write_text(json.dumps(doc))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
