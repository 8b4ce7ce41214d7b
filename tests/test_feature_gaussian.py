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
    n, c, h, w, dims = 40, 6, 2, 3, 3
    shift = rng.normal(size=(1, c, h, w)) * 5  # a different mean per position
    scale = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.7]).reshape(1, c, 1, 1)
    good = torch.from_numpy(rng.normal(size=(n, c, h, w)) * scale + shift).float()
    channels, mean, precision = fit_feature_gaussian(good, dims=dims, batch_size=7)
    kept = channels.tolist()
    assert len(kept) == dims and mean.shape == (h * w, dims) and precision.shape == (h * w, dims, dims)
    query = torch.from_numpy(rng.normal(size=(2, c, h, w)) * 3).float()
    got = gaussian_distance(query, channels, mean, precision)
    assert got.shape == (2, h, w)
    x = good.double().numpy()
    for i in range(h):
        for j in range(w):
            v = x[:, kept, i, j]
            cov = np.cov(v, rowvar=False) + RIDGE * np.eye(dims)
            for b in range(2):
                d = query[b, kept, i, j].double().numpy() - v.mean(0)
                assert got[b, i, j].item() == pytest.approx(float(np.sqrt(d @ np.linalg.solve(cov, d))), rel=1e-4)
    # a position's own mean is at distance 0, whatever the channels not kept hold
    at_mean = torch.randn(1, c, h, w) * 100
    at_mean[:, channels] = mean.T.reshape(1, dims, h, w)
    assert gaussian_distance(at_mean, channels, mean, precision).abs().max() < 1e-3
    same = fit_feature_gaussian(good, dims=dims, batch_size=64)
    assert torch.allclose(same[2], precision, rtol=1e-5, atol=1e-6)


def test_joining_images_gives_the_gaussian_of_all_of_them():
    """merge_feature_gaussian(A's Gaussian, B) = fit_feature_gaussian(A and B), up to the stored
    precision's float32 rounding."""
    from adtr.feature_gaussian import merge_feature_gaussian

    torch.manual_seed(0)
    a = torch.randn(30, 8, 2, 2) * 2 + 1
    b = torch.randn(12, 8, 2, 2) + 3  # another mean: the join must move it
    channels, mean, precision = fit_feature_gaussian(a, dims=5)
    joined_mean, joined_precision = merge_feature_gaussian(len(a), channels, mean, precision, b)
    _, want_mean, want_precision = fit_feature_gaussian(torch.cat([a, b]), dims=5)
    assert torch.allclose(joined_mean, want_mean, atol=1e-5)
    assert torch.allclose(joined_precision, want_precision, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(joined_mean, mean, atol=0.1)
    assert merge_feature_gaussian(len(a), channels, mean, precision, b[:0])[0] is mean


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
    with pytest.raises(ValueError, match="not pooled_residual"):  # the scorer would not score the image
        ADTR(dataclasses.replace(TINY, image_scorer="cnn"), ScoreConfig(feature_gaussian=True,
                                                                        image_score="pooled_residual"))  # fmt: skip
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
def root(update_root):
    return update_root


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
    if use:  # the new good training images joined to the parent's Gaussian: that of all of them
        from adtr.data.folder import good_images
        from adtr.data.mvtec import train_samples
        from adtr.data.splits import split_validation
        from adtr.engine import extract_features

        def standardised(samples: list) -> torch.Tensor:
            return m.standardize(extract_features(m, samples, torch.device("cpu"), progress=False))

        old_samples, new_samples = train_samples(root), good_images(root / "new_good")
        old_train = range(len(old_samples))  # 12 good images: cross-fitted, every one trains the run
        new_train, _ = split_validation(len(new_samples), TRAIN.val_fraction, TRAIN.seed)
        both = torch.cat([standardised([old_samples[i] for i in old_train]),
                          standardised([new_samples[i] for i in new_train])])  # fmt: skip
        _, want_mean, want_precision = fit_feature_gaussian(both)
        u = updated.model_
        assert int(u.gaussian_count) == len(both) == int(m.gaussian_count) + len(new_train)
        assert torch.allclose(u.gaussian_mean, want_mean, atol=1e-4)
        assert torch.allclose(u.gaussian_precision, want_precision, rtol=1e-2, atol=1e-3)
        # new defects alone keep the parent's Gaussian as it is
        head = loaded.update(anomalies=root / "new_defects", steps=1)
        assert head.config.score.defect_head and head.config.score.feature_gaussian
        assert torch.equal(head.model_.gaussian_precision, m.gaussian_precision)
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
    code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / "p", "--feature-gaussian", "on",
                           "--image-score", "pooled_residual")  # fmt: skip
    assert code != 0 and "not pooled_residual" in err and not (tmp_path / "p" / CONFIG_FILE).exists()
    from adtr import cli

    parse = cli.build_parser().parse_args
    assert parse(["fit", "D", "--out", "R"]).feature_gaussian == "auto"
    code, _, _ = run_cli("fit", tiny_folder, "--out", tmp_path / "on", "--feature-gaussian", "on", "--steps", "2",
                         "--image-size", "64", "--quiet")  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "on" / CONFIG_FILE).read_text())["score"]["feature_gaussian"] is True


@pytest.mark.parametrize("key", ["feature_gaussian", "nearest_map"])
def test_a_training_state_resumes_across_auto_and_off_but_not_on(key):
    """A state saved with the Gaussian (or the memory bank, tests/test_memory_bank.py) on holds its
    tensors: resumed under auto or off it is refused as other settings; auto, off and a state saved
    before the key hold none and resume each other."""
    from adtr.checkpoint import _training_settings
    from adtr.config import RunConfig

    def doc(value: object) -> dict:
        d = RunConfig(score=ScoreConfig(**{key: None if value == "missing" else value})).to_dict()
        if value == "missing":
            del d["score"][key]
        return d

    for a, b in ((None, False), (None, "missing"), (False, "missing")):
        assert _training_settings(doc(a)) == _training_settings(doc(b))
    for other in (None, False, "missing"):
        assert _training_settings(doc(True)) != _training_settings(doc(other))
