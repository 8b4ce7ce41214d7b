"""A short real fit on a development set other than bottle beats chance clearly (issue 13)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import DATA, require_category

from adtr import ADTRDetector
from adtr.config import MODEL_PRESETS, TrainConfig
from adtr.data import mvtec

TRANSISTOR = DATA / "mvtec" / "transistor"


@pytest.fixture(scope="module")
def transistor() -> Path:
    return require_category(TRANSISTOR)


@pytest.mark.slow
def test_short_fit_on_transistor_beats_chance(transistor):
    """64 good transistors, the default recipe at 128x128 for 60 steps; tested on 20 good
    and 20 defective (misplaced and damaged-case) parts of the official test split."""
    train = mvtec.train_samples(transistor)[:64]
    test = mvtec.test_samples(transistor)
    good = [s for s in test if s.label == 0][:20]
    bad = [s for s in test if s.defect in ("misplaced", "damaged_case")]
    model = dataclasses.replace(MODEL_PRESETS["cpu"], image_size=(128, 128))
    det = ADTRDetector(model, train=TrainConfig(steps=60, seed=0), progress=False).fit(train)
    assert det.history_[-1]["val_loss"] < det.history_[0]["val_loss"]
    metrics = det.test(good + bad)
    assert metrics["n_images"] == 40
    assert metrics["image_auroc"] > 0.75, metrics
