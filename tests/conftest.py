"""Shared fixtures. Real data is found through ADTR_DATA (default: ../shared/data from the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adtr import ADTRDetector
from adtr.config import ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ADTR_DATA", REPO.parent / "shared" / "data"))
BOTTLE = DATA / "mvtec" / "bottle"

torch.set_num_threads(2)


def require_category(root: Path) -> Path:
    """root, an MVTec-layout category of the real data; skipped where absent, failed in CI."""
    if not (root / "train" / "good").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{root.name} not found at {root}: CI must run the real-data tests")
        pytest.skip(f"{root.name} not found at {root} (set ADTR_DATA)")
    return root


@pytest.fixture(scope="session")
def bottle() -> Path:
    return require_category(BOTTLE)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A plain-folder dataset: 6 good gray squares, 2 with a white blob plus masks."""
    rng = np.random.default_rng(0)
    root = tmp_path / "parts"
    for i in range(6):
        img = np.full((64, 64, 3), 120, np.uint8) + rng.integers(0, 5, (64, 64, 3), dtype=np.uint8)
        write_png(root / "good" / f"{i:03d}.png", img)
    for i in range(2):
        img = np.full((64, 64, 3), 120, np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:30, 20:30] = 255
        img[mask > 0] = 255
        write_png(root / "blob" / f"{i:03d}.png", img)
        write_png(root / "ground_truth" / "blob" / f"{i:03d}_mask.png", mask)
    return root


TINY = ModelConfig(image_size=(64, 64), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4,
                   ffn_dim=64)  # fmt: skip


@pytest.fixture(scope="session")
def update_root(tmp_path_factory):
    """A category folder for fits and updates: good/ (12 random 64x64 images), new_good/ (4, a
    wider range of values) and new_defects/ (2 with a bright masked blob, type "blob")."""
    root = tmp_path_factory.mktemp("update_data")
    rng = np.random.default_rng(0)
    for i in range(12):
        write_png(root / "good" / f"{i:03d}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    for i in range(4):
        write_png(root / "new_good" / f"{i:03d}.png", rng.integers(90, 150, (64, 64, 3), dtype=np.uint8))
    for i in range(2):
        image = rng.integers(100, 140, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[20:34, 24:40] = 255
        image[mask > 0] = 250
        write_png(root / "new_defects" / "blob" / f"{i:03d}.png", image)
        write_png(root / "new_defects" / "ground_truth" / "blob" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(detector, run folder, image files): a tiny model fitted on 8 random 64x64 images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(8):
        write_png(root / "good" / f"{i}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    # One fit: its single held-out image calibrates (cross-fitting, the default for so few, is
    # tested in test_calibration.py and would fit three more models here).
    # query_fallback off: two epochs on noise never model it, and the fallback would make this
    # shared run a no-query one (the fallback has its own tests, test_fit.py)
    train = TrainConfig(epochs=2, batch_size=4, calibration="held_out", query_fallback=None)
    det = ADTRDetector(TINY, train=train, progress=False).fit(root)
    run = tmp_path_factory.mktemp("run")
    det.save(run)
    return det, run, sorted((root / "good").iterdir())


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Call `adtr` in this process: run_cli(args...) -> (exit status, stdout, stderr).

    The allocator policy and log levels the CLI sets for a real run are process-wide, so they
    are left alone here (ADTR_MALLOC=default) or restored afterwards.
    """
    import logging

    from adtr import cli

    monkeypatch.setenv("ADTR_MALLOC", "default")
    loggers = [logging.getLogger(), logging.getLogger("adtr.engine")]
    levels = [lg.level for lg in loggers]
    handlers = list(logging.getLogger().handlers)
    threads = torch.get_num_threads()

    def call(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
    logging.getLogger().handlers[:] = handlers
    torch.set_num_threads(threads)
