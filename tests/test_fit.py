"""The fit pipeline (adtr/fit.py): one sequence for files and features, anomaly kinds explicit."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from adtr.config import RunConfig, TrainConfig
from adtr.engine import AnomalyPool, TrainingData
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


def _same_weights(a: ADTR, b: ADTR) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_query_fallback_refits_without_the_query_as_a_direct_fit_would(raw, tmp_path):
    import dataclasses

    from adtr.fit import no_query_config

    cpu = torch.device("cpu")
    # random features cannot be reconstructed: a validation loss far above 1e-6
    low = RunConfig(TINY, train=TrainConfig(epochs=2, batch_size=4, query_fallback=1e-6))
    fell = fit_on_features(low, raw, cpu, val_idx=[0, 1], state_dir=tmp_path, progress=False)
    assert not fell.model.cfg.use_query and fell.model.reconstructor.transformer.query_embed is None
    assert len(fell.history) == 2 and all(h["query_val_loss"] > 1e-6 for h in fell.history)
    direct = dataclasses.replace(low, model=dataclasses.replace(TINY, use_query=False))
    assert _same_weights(fell.model, fit_on_features(direct, raw, cpu, val_idx=[0, 1], progress=False).model)
    # init (an update, --init) keeps its model: a query one stays one
    kept = fit_on_features(RunConfig(TINY, train=TrainConfig(epochs=1, batch_size=4, query_fallback=1e6)), raw, cpu,
                           val_idx=[0, 1], progress=False).model  # fmt: skip
    assert fit_on_features(low, raw, cpu, val_idx=[0, 1], init=kept, progress=False).model.cfg.use_query
    # a loss below the threshold, no held-out images, a query variant the user chose: the query stays
    high = RunConfig(TINY, train=TrainConfig(epochs=2, batch_size=4, query_fallback=1e6))
    assert no_query_config(dataclasses.replace(low, model=dataclasses.replace(TINY, normalize_features=False))) is None
    kept = fit_on_features(high, raw, cpu, val_idx=[0, 1], progress=False)
    assert kept.model.cfg.use_query and "query_val_loss" not in kept.history[-1]
    assert fit_on_features(low, raw, cpu, progress=False).model.cfg.use_query
    assert no_query_config(dataclasses.replace(low, model=dataclasses.replace(TINY, neighbor_mask=3))) is None
    assert no_query_config(dataclasses.replace(low, train=TrainConfig(query_fallback=None))) is None
    with pytest.raises(ValueError, match="query fallback"):
        TrainConfig(query_fallback=0.0)


def test_without_held_out_images_a_third_of_them_decides_the_fallback(raw, tiny_run):
    import dataclasses

    from adtr import ADTRDetector
    from adtr.fit import probe_split

    cpu = torch.device("cpu")
    assert probe_split(5, 0) is None and probe_split(6, 0) is not None and len(probe_split(6, 0)) == 2
    assert probe_split(12, 3) == sorted(torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()[0::3])
    low = RunConfig(TINY, train=TrainConfig(epochs=2, batch_size=4, query_fallback=1e-6))
    fell = fit_on_features(low, raw, cpu, progress=False, probe_fallback=True)
    assert not fell.model.cfg.use_query and len(fell.history) == 2
    assert all(h["query_val_loss"] > 1e-6 for h in fell.history)
    # the check leaves the fit as a direct no-query fit on every image would be
    direct = dataclasses.replace(low, model=dataclasses.replace(TINY, use_query=False))
    assert _same_weights(fell.model, fit_on_features(direct, raw, cpu, progress=False).model)
    # below the threshold, or too few images to check (5), or not asked: the query stays
    high = RunConfig(TINY, train=TrainConfig(epochs=2, batch_size=4, query_fallback=1e6))
    kept = fit_on_features(high, raw, cpu, progress=False, probe_fallback=True)
    assert kept.model.cfg.use_query and "query_val_loss" not in kept.history[-1]
    assert fit_on_features(low, raw[:5], cpu, progress=False, probe_fallback=True).model.cfg.use_query
    assert fit_on_features(low, raw, cpu, progress=False).model.cfg.use_query
    # a fit whose calibration is cross-fitted checks it so, and records it
    root = tiny_run[2][0].parent.parent
    train = TrainConfig(epochs=2, batch_size=4, calibration="crossfit", query_fallback=1e-6)
    det = ADTRDetector(TINY, train=train, progress=False).fit(root)
    assert not det.config.model.use_query and det.record_.provenance["query_fallback"]["query_val_loss"] > 1e-6


def test_a_run_that_fell_back_records_it_and_loads_as_fitted(tiny_run, tmp_path):
    from adtr import ADTRDetector

    root = tiny_run[2][0].parent.parent
    train = TrainConfig(epochs=2, batch_size=4, calibration="held_out", query_fallback=1e-6)
    det = ADTRDetector(TINY, train=train, progress=False).fit(root)
    fallback = det.record_.provenance["query_fallback"]
    assert not det.config.model.use_query and fallback["threshold"] == 1e-6 and fallback["query_val_loss"] > 1e-6
    det.save(tmp_path / "run")
    back = ADTRDetector.load(tmp_path / "run")
    assert not back.config.model.use_query and back.record_.provenance["query_fallback"] == fallback
    files = tiny_run[2][:3]
    assert [p.anomaly_score for p in back.predict(files)] == [p.anomaly_score for p in det.predict(files)]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("saves", [1, 3])  # killed in the query fit's first epoch, in the fallback's first
def test_a_fit_killed_before_or_after_its_fallback_resumes_to_the_same_result(raw, tmp_path, monkeypatch, saves):
    import adtr.fit as fit

    cpu = torch.device("cpu")
    config = RunConfig(TINY, train=TrainConfig(epochs=2, batch_size=4, query_fallback=1e-6))
    whole = fit_on_features(config, raw, cpu, val_idx=[0, 1], progress=False)
    save, calls = fit.save_train_state, []

    def killed(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == saves:
            raise _Stop

    monkeypatch.setattr(fit, "save_train_state", killed)
    with pytest.raises(_Stop):
        fit_on_features(config, raw, cpu, val_idx=[0, 1], state_dir=tmp_path, progress=False)
    monkeypatch.setattr(fit, "save_train_state", save)
    resumed = fit_on_features(config, raw, cpu, val_idx=[0, 1], state_dir=tmp_path, resume=True, progress=False)
    assert not resumed.model.cfg.use_query and _same_weights(whole.model, resumed.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert [h["query_val_loss"] for h in resumed.history] == [h["query_val_loss"] for h in whole.history]


def test_cross_fitting_folds_keep_the_final_models_reconstructor(raw, monkeypatch):
    import adtr.fit as fit

    config = RunConfig(TINY, train=TrainConfig(epochs=1, batch_size=4, query_fallback=1e-6, calibration_folds=2))
    folds, real = [], fit.fit_on_features

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        folds.append(result.model.cfg.use_query)
        return result

    monkeypatch.setattr(fit, "fit_on_features", spy)
    fit.crossfit_scores(config, [None] * 6, raw[:6], torch.device("cpu"), progress=False)
    assert folds == [True, True]  # each fold holds images out, but none falls back on its own


def test_an_input_larger_than_step_pixels_shortens_the_reconstructor_not_the_image_scorer(raw):
    import dataclasses

    cpu = torch.device("cpu")
    model = dataclasses.replace(TINY, image_scorer="cnn")  # 64x64 = 4096 pixels
    fits = {}
    for step_pixels in (None, 2048):  # 10 training images, 3 steps per epoch: 6 steps or 3
        train = TrainConfig(steps=6, batch_size=4, step_pixels=step_pixels, image_scorer_epochs=2)
        fits[step_pixels] = fit_on_features(RunConfig(model, train=train), raw, cpu, val_idx=[0, 1], progress=False)
    assert len(fits[None].history) == 2 and len(fits[2048].history) == 1
    assert not _same_weights(fits[None].model.reconstructor, fits[2048].model.reconstructor)
    # the scorer trained 2 x 2 epochs in both fits, from the same seed: the same weights
    assert _same_weights(fits[None].model.image_scorer, fits[2048].model.image_scorer)


def test_image_scorer_trains_longer_scores_the_image_and_resumes_the_same(raw, tmp_path):
    import copy
    import dataclasses

    from adtr.engine import fit_image_scorer

    cpu = torch.device("cpu")
    config = RunConfig(dataclasses.replace(TINY, image_scorer="cnn"),
                       train=TrainConfig(epochs=2, batch_size=4, image_scorer_epochs=3))  # fmt: skip
    torch.manual_seed(config.train.seed)  # as the fit builds its model
    initial = ADTR(config.model).image_scorer.state_dict()
    fitted = fit_on_features(config, raw, cpu, val_idx=[0, 1], state_dir=tmp_path, progress=False)
    m = fitted.model
    assert len(fitted.history) == 2  # the reconstructor's epochs only
    trained = m.image_scorer.state_dict()
    assert not all(torch.equal(initial[k], trained[k]) for k in initial)
    for name in ("scorer_residual_scale", "scorer_position_std"):
        assert not torch.equal(m.get_buffer(name), torch.ones_like(m.get_buffer(name))), name
    # the scorer's per-position weight, unset in the config, chosen on the two held-out images
    from adtr.model import choose_position_weight

    with torch.no_grad():
        grid = lambda f: torch.linalg.vector_norm((f - m.image_scorer(f)) / m.scorer_residual_scale, dim=1)  # noqa: E731
        assert m.score_cfg.scorer_position_weight == choose_position_weight(grid(fitted.train), grid(fitted.val))
    assert len(fit_image_scorer(copy.deepcopy(m), TrainingData(fitted.train), None, config.train, cpu,
                                progress=False)) == 2 * 3  # fmt: skip
    with torch.no_grad():
        out, own = m.score(fitted.val), m.score_maps(m.residual_grid(m.residual(fitted.val), fitted.val))
        assert torch.equal(out.anomaly_map, own.anomaly_map)  # the map is the reconstructor's
        assert torch.equal(out.anomaly_score, m.score_maps(m.scorer_grid(fitted.val)).anomaly_score)
        assert not torch.allclose(out.anomaly_score, own.anomaly_score)
    # resumed after the reconstructor's last saved epoch: the scorer is trained again, to the same weights
    again = fit_on_features(config, raw, cpu, val_idx=[0, 1], state_dir=tmp_path, resume=True, progress=False)
    assert _same_weights(m, again.model) and again.model.score_cfg == m.score_cfg
    # an update (init) continues the scorer from its weights
    cont = fit_on_features(config, raw, cpu, val_idx=[0, 1], init=copy.deepcopy(m), progress=False).model
    assert not all(torch.equal(trained[k], cont.image_scorer.state_dict()[k]) for k in trained)
    # the scorer leaves the map as it is but for the map's per-position weight, which follows the
    # scorer's (model.map_position_weight_for): a fit without it at that weight is the same model
    assert m.score_cfg.map_position_weight == min(0.5, m.score_cfg.scorer_position_weight)
    same_map = dataclasses.replace(config.score, map_position_weight=m.score_cfg.map_position_weight)
    plain = dataclasses.replace(config, model=dataclasses.replace(config.model, image_scorer=None), score=same_map)
    other = fit_on_features(plain, raw, cpu, val_idx=[0, 1], progress=False).model
    kept = {k: v for k, v in m.state_dict().items() if not k.startswith(("image_scorer.", "scorer_"))}
    assert kept.keys() == other.state_dict().keys()
    assert all(torch.equal(kept[k], other.state_dict()[k]) for k in kept)
    with torch.no_grad():
        assert torch.equal(other.score(fitted.val).anomaly_map, out.anomaly_map)
