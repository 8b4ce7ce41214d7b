"""The fit pipeline (adtr/fit.py): one sequence for files and features, anomaly kinds explicit."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from adtr.config import RunConfig, TrainConfig
from adtr.engine import AnomalyPool
from adtr.errors import SettingsError
from adtr.fit import fit_on_features
from adtr.model import ADTR
from adtr.oneclass import fit_class


def _pool(n: int, kind: str, offset: float) -> AnomalyPool:
    return AnomalyPool(torch.full((n, 2, 1, 1), offset), torch.zeros(n, 1, 1), torch.zeros(n, dtype=torch.bool),
                       (kind,) * n)  # fmt: skip


def test_pool_kinds_select_and_concatenate():
    pool = AnomalyPool.cat([_pool(2, "real", 1.0), _pool(3, "external", 2.0)])
    assert pool.kinds == ("real", "real", "external", "external", "external") and len(pool) == 5
    assert pool.of_kind("real").features.flatten().tolist() == [1.0] * 4
    assert len(pool.of_kind("synthetic")) == 0
    with pytest.raises(ValueError, match="kinds"):
        AnomalyPool(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1), torch.zeros(2, dtype=torch.bool), ("real",))


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    torch.manual_seed(0)
    return ADTR(TINY).extract(torch.rand(12, 3, 64, 64) * 255)


def test_features_path_marks_external_images_and_matches_the_one_class_fit(raw):
    config = RunConfig(TINY, train=TrainConfig(epochs=1, batch_size=4))
    fitted = fit_on_features(config, raw[:8], torch.device("cpu"), val_idx=[0, 1], external=raw[8:], progress=False)
    assert len(fitted.train) == 6 and len(fitted.val) == 2 and len(fitted.history) == 1
    assert fitted.anomalies.kinds == ("external",) * 4 and len(fitted.anomalies.of_kind("real")) == 0
    # the one-class protocol runs the same pipeline: same seed, same weights
    a = fit_on_features(config, raw[:8], torch.device("cpu"), external=raw[8:], progress=False).model
    b = fit_class(raw[:8], config.model, config.score, config.train, torch.device("cpu"), external_raw=raw[8:])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_synthetic_anomalies_need_images(raw):
    with pytest.raises(SettingsError, match="synthetic anomalies are made from images"):
        fit_on_features(RunConfig(TINY), raw, torch.device("cpu"), generators=[lambda im, rng: (im, im[..., 0] > 0)])


def test_in_memory_images_take_the_one_feature_path():
    import numpy as np

    from adtr.data.transforms import resize_batch
    from adtr.engine import extract_features

    torch.manual_seed(0)
    model = ADTR(TINY)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    f = extract_features(model, images, torch.device("cpu"), batch_size=2, progress=False)
    assert f.shape[0] == 5 and torch.equal(f[:2], model.extract(resize_batch(images[:2], (64, 64))))
    assert resize_batch(images, (64, 64)).shape == (5, 3, 64, 64)
