"""Training-loop pieces: batch assembly, mask -> token labels, the non-finite guard, and the
run folder's refusal of other backbone weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY

from adtr.checkpoint import CONFIG_FILE, load_run
from adtr.config import TrainConfig
from adtr.engine import AnomalyPool, TrainingData, _batch, fit_reconstructor, token_labels
from adtr.errors import RunFolderError
from adtr.model import ADTR


def _features(n: int, offset: float = 0.0) -> torch.Tensor:
    """(n, 2, 2, 2) features whose values name their image: image i is filled with i + offset."""
    return (torch.arange(n, dtype=torch.float32) + offset).view(n, 1, 1, 1).expand(n, 2, 2, 2).clone()


def test_token_labels_are_area_shares():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # the whole top-left token
    mask[0, 2, 2:] = 1  # half of the bottom-right token
    assert token_labels(mask, (2, 2)).tolist() == [[[1.0, 0.0], [0.0, 0.5]]]
    assert token_labels(torch.ones(3, 64, 96), (4, 6)).shape == (3, 4, 6)


def test_batch_of_good_images_only():
    data = TrainingData(_features(6))
    f, labels, image_labels, pixel = _batch(data, torch.tensor([4, 1]), TrainConfig(), torch.Generator())
    assert f[:, 0, 0, 0].tolist() == [4.0, 1.0]
    assert labels.shape == (2, 2, 2) and not labels.any() and not image_labels.any() and pixel.all()


def test_batch_swaps_in_synthetic_copies_of_the_same_image():
    data = TrainingData(
        _features(6),
        synthetic=[
            AnomalyPool(
                _features(6, offset=100), torch.ones(6, 2, 2) * 0.5, torch.ones(6, dtype=torch.bool), ("synthetic",) * 6
            )
        ],
    )
    cfg = TrainConfig(synthetic_prob=1.0)
    f, labels, image_labels, pixel = _batch(data, torch.tensor([3, 5]), cfg, torch.Generator().manual_seed(0))
    assert f[:, 0, 0, 0].tolist() == [103.0, 105.0]  # image i's copy, not another image's
    assert (labels == 0.5).all() and image_labels.tolist() == [1.0, 1.0] and pixel.all()
    assert data.normal[3, 0, 0, 0] == 3.0  # the cached features are not overwritten


def test_batch_appends_labelled_anomalies():
    kinds = ("real", "external")
    anomalies = AnomalyPool(_features(2, offset=50), torch.zeros(2, 2, 2), torch.tensor([False, False]), kinds)
    data = TrainingData(_features(8), anomalies=anomalies)
    cfg = TrainConfig(anomaly_ratio=0.5)
    f, labels, image_labels, pixel = _batch(data, torch.arange(4), cfg, torch.Generator().manual_seed(0))
    assert len(f) == 6  # 4 good + round(0.5 * 4) anomalies
    assert f[:4, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert set(f[4:, 0, 0, 0].tolist()) <= {50.0, 51.0}
    assert image_labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert pixel.tolist() == [True] * 4 + [False] * 2  # image-level anomalies train L_img only


def test_non_finite_loss_stops_training():
    torch.manual_seed(0)
    model = ADTR(TINY)
    with torch.no_grad():
        features = model.extract(torch.rand(4, 3, 64, 64) * 255)
    features[2] = float("nan")
    cfg = TrainConfig(epochs=1, batch_size=4)
    with pytest.raises(FloatingPointError, match="training loss became nan at epoch 1"):
        fit_reconstructor(model, TrainingData(features), None, cfg, torch.device("cpu"), torch.Generator(),
                          progress=False)  # fmt: skip


def test_run_trained_with_other_backbone_weights_is_refused(tiny_run, tmp_path):
    _, run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    load_run(copy)  # as saved: loads
    doc = json.loads((copy / CONFIG_FILE).read_text())
    doc["backbone_sha256"] = "0" * 64
    (copy / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(RunFolderError, match="installed lite0 weights differ from the ones this run was trained"):
        load_run(copy)
