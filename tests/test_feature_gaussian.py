"""The Gaussian per position of the features (adtr/feature_gaussian.py) and the image score it
gives aligned parts (ScoreConfig.feature_gaussian): known values, the fit's choice, the run
folder and ONNX round trips, updates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors import safe_open

from adtr import ADTRDetector
from adtr.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from adtr.config import ScoreConfig, TrainConfig
from adtr.feature_gaussian import RIDGE, fit_feature_gaussian, gaussian_distance
from adtr.model import ADTR


def test_the_distance_is_the_mahalanobis_distance_to_each_positions_gaussian():
    """Against numpy on a constructed set: every position its own mean and covariance (+ the
    ridge), all channels kept (dims >= C), accumulated over batches of images as in one."""
    rng = np.random.default_rng(0)
    n, c, h, w = 40, 3, 2, 3
    shift = rng.normal(size=(1, c, h, w)) * 5  # a different mean per position
    good = torch.from_numpy(rng.normal(size=(n, c, h, w)) * [[[[1.0]], [[2.0]], [[0.5]]]] + shift).float()
    channels, mean, precision = fit_feature_gaussian(good, dims=8, batch_size=7)
    assert channels.tolist() == [0, 1, 2] and mean.shape == (h * w, c) and precision.shape == (h * w, c, c)
    query = torch.from_numpy(rng.normal(size=(2, c, h, w)) * 3).float()
    got = gaussian_distance(query, channels, mean, precision)
    assert got.shape == (2, h, w)
    x = good.double().numpy()
    for i in range(h):
        for j in range(w):
            v = x[:, :, i, j]
            cov = np.cov(v, rowvar=False) + RIDGE * np.eye(c)
            for b in range(2):
                d = query[b, :, i, j].double().numpy() - v.mean(0)
                assert got[b, i, j].item() == pytest.approx(float(np.sqrt(d @ np.linalg.solve(cov, d))), rel=1e-4)
    # a position's own mean is at distance 0
    at_mean = mean.T.reshape(1, c, h, w)
    assert gaussian_distance(at_mean, channels, mean, precision).abs().max() < 1e-3
    same = fit_feature_gaussian(good, dims=8, batch_size=64)
    assert torch.allclose(same[2], precision, rtol=1e-5, atol=1e-6)


def test_a_seeded_sorted_subset_of_the_channels_and_two_images_at_least():
    good = torch.randn(5, 30, 2, 2)
    a, b, other = (fit_feature_gaussian(good, dims=10, seed=s)[0] for s in (0, 0, 1))
    assert len(a) == 10 and torch.equal(a, b) and not torch.equal(a, other)
    assert torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    with pytest.raises(ValueError, match="at least two"):
        fit_feature_gaussian(good[:1])


def test_the_gaussian_needs_an_image_scorer_and_is_fixed_when_the_model_is_built():
    with pytest.raises(ValueError, match="needs an image scorer"):
        ADTR(TINY, ScoreConfig(feature_gaussian=True))
    m = ADTR(dataclasses.replace(TINY, image_scorer="cnn"), ScoreConfig(feature_gaussian=False))
    assert not any(k.startswith("gaussian_") for k in m.state_dict())
    with pytest.raises(ValueError, match="use with_score"):
        m.score_cfg = dataclasses.replace(m.score_cfg, feature_gaussian=True)
    with pytest.raises(ValueError, match="no feature Gaussian"):
        m.set_feature_gaussian(torch.zeros(2, m.channels, *TINY.grid_size))
    with pytest.raises(ValueError, match="true, false or null"):
        ScoreConfig(feature_gaussian=1)


TRAIN = TrainConfig(epochs=1, batch_size=4, val_fraction=0.25, image_scorer_epochs=1, query_fallback=None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from conftest import write_png

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(12):
        write_png(root / "good" / f"{i:03d}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    for i in range(4):
        write_png(root / "new_good" / f"{i:03d}.png", rng.integers(90, 150, (64, 64, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_fit_uses_the_gaussian_where_the_scorers_weight_is_1_and_a_run_keeps_it(root, tmp_path, weight):
    """Weight 1 (aligned parts): the image score is the Gaussian's, its tensors are saved, a load
    scores the same, an update with new good images refits it; weight 0.5: no Gaussian, nothing
    stored. A run saved before the key reads False."""
    model = dataclasses.replace(TINY, image_scorer="cnn")
    det = ADTRDetector(model, ScoreConfig(scorer_position_weight=weight), train=TRAIN, progress=False,
                       backend="torch").fit(root)  # fmt: skip
    use = weight == 1.0
    m = det.model_
    assert det.config.score.feature_gaussian is use and m.score_cfg.feature_gaussian is use
    f = m.standardize(m.extract(torch.rand(3, 3, 64, 64) * 255))
    with torch.no_grad():
        out = m.score(f)
        if use:
            grid = gaussian_distance(f, m.gaussian_channels, m.gaussian_mean, m.gaussian_precision)
            assert torch.equal(out.anomaly_score, m.score_maps(grid).anomaly_score)
            assert m.gaussian_precision.abs().sum() > 0
    det.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["score"]["feature_gaussian"] is use
    with safe_open(str(tmp_path / "run" / WEIGHTS_FILE), "pt") as fh:
        assert any(k.startswith("gaussian_") for k in fh.keys()) is use
    files = sorted((root / "new_good").iterdir())
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert [p.anomaly_score for p in loaded.predict(files)] == [p.anomaly_score for p in det.predict(files)]
    updated = loaded.update(good=root / "new_good", steps=1)
    assert updated.config.score.feature_gaussian is use
    if use:  # refitted on the update's good features (the replay sample and the new images)
        assert not torch.equal(updated.model_.gaussian_mean, m.gaussian_mean)
    if not use:  # a run saved before the key: no Gaussian
        doc = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
        del doc["score"]["feature_gaussian"]
        (tmp_path / "run" / CONFIG_FILE).write_text(json.dumps(doc))
        old = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
        assert old.config.score.feature_gaussian is False


def test_the_gaussians_image_score_exports_to_onnx(root, tmp_path):
    pytest.importorskip("onnxruntime")
    from adtr.export import export_run

    model = dataclasses.replace(TINY, image_scorer="cnn")
    det = ADTRDetector(model, ScoreConfig(scorer_position_weight=1.0), train=TRAIN, progress=False,
                       backend="torch").fit(root)  # fmt: skip
    assert det.config.score.feature_gaussian
    parity = export_run(det, tmp_path / "m.onnx")
    assert parity.agrees, parity
    files = sorted((root / "new_good").iterdir())
    a = np.array([p.anomaly_score for p in det.predict(files)])
    b = np.array([p.anomaly_score for p in det.use_onnx(tmp_path / "m.onnx").predict(files)])
    assert np.abs(a - b).max() < 1e-4 + 1e-5 * np.abs(a).max()


def test_the_cli_option_sets_it_and_refuses_it_without_an_image_scorer(run_cli, tiny_folder, tmp_path):
    code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / "r", "--feature-gaussian", "on",
                           "--image-scorer", "off")  # fmt: skip
    assert code != 0 and "--feature-gaussian on" in err and "needs an image scorer" in err
    assert not (tmp_path / "r" / CONFIG_FILE).exists()
    from adtr import cli

    parse = cli.build_parser().parse_args
    assert parse(["fit", "D", "--out", "R"]).feature_gaussian == "auto"
    code, _, _ = run_cli("fit", tiny_folder, "--out", tmp_path / "on", "--feature-gaussian", "on", "--steps", "2",
                         "--image-size", "64", "--quiet")  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "on" / CONFIG_FILE).read_text())["score"]["feature_gaussian"] is True
