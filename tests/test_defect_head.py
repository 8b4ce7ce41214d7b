"""The defect head (adtr/defect_head.py): a logistic regression on the frozen residual, fitted
with labelled anomalies' masks; the fit, update, save/load and ONNX paths that carry it."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, write_png
from PIL import Image
from safetensors.torch import load_file, save_file

from adtr import ADTRDetector
from adtr.checkpoint import STATE_DIR, STATE_JSON, _state_hash, model_fingerprint, saved_config_matches
from adtr.config import RunConfig, ScoreConfig, TrainConfig
from adtr.defect_head import DEFAULT_GAIN, MASK_GAIN, combine, default_gain, describe_default_gain, fit_defect_head
from adtr.errors import DataError, RunFolderError, SettingsError
from adtr.model import ADTR
from adtr.replay import REPLAY_FILE


def _residuals(n: int, seed: int, c: int = 8, hw: int = 4) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def test_head_separates_a_defect_direction_and_standardises_on_good_tokens():
    good = _residuals(20, 0)
    defects = _residuals(4, 1)
    labels = torch.zeros(4, 4, 4)
    labels[:, 1:3, 1:3] = 1.0
    defects[:, 3] += 4.0 * labels  # the defect moves channel 3 where the mask is
    good_map = good.norm(dim=1)
    head = fit_defect_head(good, good_map, defects, labels)
    assert head.weight.shape == (8,) and int(head.weight.abs().argmax()) == 3 and head.weight[3] > 0
    logit = (defects * head.weight.view(1, -1, 1, 1)).sum(1) + head.bias
    assert logit[labels > 0].min() > logit[labels == 0].max()
    # on the good tokens both standardised maps have mean 0 and std 1
    good_logit = (good * head.weight.view(1, -1, 1, 1)).sum(1) + head.bias
    z = (good_logit - head.norm[2]) / head.norm[3]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-3
    assert torch.allclose(head.norm[:2], torch.stack([good_map.mean(), good_map.std()]), atol=1e-5)
    # combine: the standardised residual map + gain x the standardised logit, negatives set to 0
    grid, lg = torch.tensor([[[3.0, 0.0, 3.0]]]), torch.tensor([[[1.0, -5.0, -0.25]]])
    norm = torch.tensor([1.0, 2.0, 0.0, 0.5])
    assert torch.equal(combine(grid, lg, norm, 1.0), torch.tensor([[[3.0, 0.0, 0.5]]]))
    assert torch.equal(combine(grid, lg, norm, 4.0), torch.tensor([[[9.0, 0.0, 0.0]]]))


def test_default_gain_needs_several_masked_defects():
    # none (pseudo-labels): as much as the map; one or two: half of what three or more weigh
    assert [default_gain(n) for n in range(5)] == [1.0, 2.0, 2.0, 4.0, 4.0]
    # a head that reads a memory bank's residual weighs as much as the map, half with one or two
    assert [default_gain(n, reads_bank=True) for n in range(5)] == [1.0, 0.5, 0.5, 1.0, 1.0]
    assert describe_default_gain() == ("4 with at least 3 masked anomalies, 2 with fewer; where the map has a memory "
                                       "bank 1 and 0.5; 1 with image labels only")  # fmt: skip


def test_small_defects_give_positives_and_empty_masks_are_refused():
    good, defects = _residuals(10, 0), _residuals(2, 1)
    labels = torch.zeros(2, 4, 4)
    labels[0, 2, 2], labels[1, 0, 1] = 0.2, 0.15  # a pit covers a fifth of one token at most
    defects[:, 5] += 6.0 * (labels > 0)
    head = fit_defect_head(good, good.norm(dim=1), defects, labels)
    assert int(head.weight.abs().argmax()) == 5
    with pytest.raises(ValueError, match="empty"):
        fit_defect_head(good, good.norm(dim=1), defects, torch.zeros(2, 4, 4))


def test_pseudo_labelled_defects_give_positives_only():
    good, defects = _residuals(10, 0), _residuals(2, 1)
    shifted = torch.zeros(2, 4, 4, dtype=torch.bool)
    shifted[:, 1, 1:3] = True  # two defect tokens per image ...
    defects[:, 2] += 5.0 * shifted
    labels = torch.zeros(2, 4, 4)
    labels[:, 1, 1] = 1.0  # ... of which the pseudo-labels found one
    head = fit_defect_head(good, good.norm(dim=1), defects, labels, known_negatives=torch.tensor([False, False]))
    logit = (defects * head.weight.view(1, -1, 1, 1)).sum(1) + head.bias
    good_logit = (good * head.weight.view(1, -1, 1, 1)).sum(1) + head.bias
    assert logit[:, 1, 2].min() > good_logit.max()  # the unlabelled defect token was not taught "good"


def test_with_score_keeps_the_weights_and_a_model_without_head_refuses_one():
    torch.manual_seed(0)
    model = ADTR(TINY).eval()
    f = torch.randn(2, model.channels, 4, 4)
    model.residual_scale.fill_(2.0)
    headed = model.with_score(ScoreConfig(defect_head=True, head_gain=1.0)).eval()
    # an all-zero head with the identity standardisation adds nothing
    assert torch.allclose(headed.score(f).anomaly_map, model.score(f).anomaly_map, atol=1e-6)
    # the gain is part of what a cached graph was built from, unless it means what runs before it did
    four = model.with_score(ScoreConfig(defect_head=True, head_gain=4.0))
    assert model_fingerprint(four) != model_fingerprint(headed)
    old = model_fingerprint(model.with_score(ScoreConfig(head_gain=4.0)))  # no head: the gain is unused
    assert old == model_fingerprint(model)
    with pytest.raises(ValueError, match="no defect head"):
        model.set_defect_head(fit_defect_head(_residuals(4, 0, model.channels), torch.ones(4, 4, 4),
                                              _residuals(1, 1, model.channels), torch.ones(1, 4, 4)))  # fmt: skip


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """16 good noise images, 4 defects (a bright square, masked) and 4 test defects."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    for i in range(16):
        write_png(root / "train" / "good" / f"{i:03d}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    for split in ("defects", "probe"):
        for i in range(4):
            image = rng.integers(100, 140, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            mask[16 + 4 * i : 40, 8 + 4 * i : 40] = 255
            image[mask > 0] = (200, 90, 90)
            write_png(root / split / "spot" / f"{i:03d}.png", image)
            write_png(root / split / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


# query_fallback off: two epochs never model these parts, and the head's tests are of a query model
TRAIN = TrainConfig(epochs=2, batch_size=4, calibration="held_out", val_fraction=0.25, query_fallback=None)


def test_fit_with_masks_trains_a_head_that_raises_defect_scores_and_round_trips(parts, tmp_path):
    good = parts / "train" / "good"
    plain = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train")
    det = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train",
                                                                              anomalies=parts / "defects")
    assert det.config.score.defect_head and not plain.config.score.defect_head
    # the masked defects stayed out of the loss: the same reconstructor as the normal-only fit
    for a, b in zip(plain.model_.reconstructor.state_dict().values(), det.model_.reconstructor.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    probe = sorted((parts / "probe" / "spot").iterdir())
    val = [good / f"{i:03d}.png" for i in range(16)]

    def margin(d: ADTRDetector) -> float:  # unseen defects' median score over good images' highest
        return np.median([p.anomaly_score for p in d.predict(probe)]) / max(p.anomaly_score for p in d.predict(val))

    # the head itself, not its standardisation, separates: the same model with a zeroed head does much worse
    assert margin(det) > 1.3 * margin(_zero_head(det)) and margin(det) > margin(plain)
    assert det.thresholds_.method != "f1"  # in-sample defect scores do not set the threshold
    det.save(tmp_path / "run")
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert loaded.config.score.defect_head
    assert [p.anomaly_score for p in loaded.predict(probe)] == [p.anomaly_score for p in det.predict(probe)]
    onnx = ADTRDetector.load(tmp_path / "run", progress=False, backend="onnx")
    got = [p.anomaly_score for p in onnx.predict(probe)]
    assert np.allclose(got, [p.anomaly_score for p in det.predict(probe)], rtol=1e-3, atol=1e-4)
    # the paper's use (L_px) trains no head and changes the reconstructor
    loss = ADTRDetector(TINY, train=dataclasses.replace(TRAIN, labelled_anomalies="loss"), progress=False,
                        backend="torch").fit(parts / "train", anomalies=parts / "defects")  # fmt: skip
    assert not loss.config.score.defect_head
    assert any(not torch.equal(a, b) for a, b in zip(plain.model_.reconstructor.state_dict().values(),
                                                     loss.model_.reconstructor.state_dict().values(), strict=True))


def _zero_head(det: ADTRDetector) -> ADTRDetector:
    zeroed = copy.deepcopy(det)
    zeroed.model_.head_weight.zero_()
    zeroed.model_.head_bias.zero_()
    return zeroed


def test_init_with_masks_only_keeps_the_reconstructor_and_update_adds_a_head(parts, tmp_path):
    base = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train")
    base.save(tmp_path / "base")
    det = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(
        parts / "train", anomalies=parts / "defects", init=tmp_path / "base"
    )
    assert det.config.score.defect_head and det.history_ == []
    for a, b in zip(base.model_.reconstructor.state_dict().values(), det.model_.reconstructor.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    # 4 masked defects: the head weighs MASK_GAIN times, kept in the run; a gain given by the caller
    # wins over the rule and the init's: the same head, its logit weighed 1x
    assert det.config.score.head_gain == MASK_GAIN and det.model_.score_cfg == det.config.score
    one = ADTRDetector(TINY, ScoreConfig(head_gain=1.0), train=TRAIN, progress=False, backend="torch").fit(
        parts / "train", anomalies=parts / "defects", init=tmp_path / "base"
    )
    assert one.config.score.head_gain == 1.0 and torch.equal(one.model_.head_weight, det.model_.head_weight)
    one.save(tmp_path / "one")
    # an update keeps a gain the caller gave; a fit from it with new defects takes the rule's, not the init's
    kept = ADTRDetector.load(tmp_path / "one", progress=False, backend="torch").update(anomalies=parts / "probe")
    assert kept.config.score.head_gain == 1.0
    # or the weight the update is given, here on the same head (good images only: the head is kept)
    reweighed = ADTRDetector.load(tmp_path / "one", progress=False, backend="torch").update(
        good=parts / "train", steps=1, head_gain=2.0)
    assert reweighed.config.score.head_gain == 2.0 == reweighed.model_.score_cfg.head_gain
    with pytest.raises(SettingsError, match="no defect head"):
        ADTRDetector.load(tmp_path / "base", progress=False, backend="torch").update(good=parts / "train",
                                                                                    head_gain=2.0)  # fmt: skip
    again = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(
        parts / "train", anomalies=parts / "probe", init=tmp_path / "one"
    )
    assert again.config.score.head_gain == MASK_GAIN
    f = det.model_.standardize(torch.randn(2, det.model_.channels, 4, 4))
    r = det.model_.residual(f)
    logit = (r * det.model_.head_weight).sum(1) + det.model_.head_bias
    for d, gain in ((det, det.config.score.head_gain), (one, 1.0)):
        want = combine(d.model_.residual_grid(r), logit, d.model_.head_norm, gain)
        assert torch.allclose(d.model_.score_maps(want).anomaly_map, d.model_.score(f).anomaly_map)
    # adtr update with masked defects alone: only the head is fitted, recorded as 0 steps
    new = ADTRDetector.load(tmp_path / "base", progress=False, backend="torch").update(anomalies=parts / "defects")
    assert new.config.score.defect_head and new.record_.provenance["update"]["steps"] == 0
    assert new.config.score.head_gain == MASK_GAIN and new.model_.score_cfg == new.config.score
    probe = sorted((parts / "probe" / "spot").iterdir())
    assert np.allclose([p.anomaly_score for p in new.predict(probe)], [p.anomaly_score for p in det.predict(probe)],
                       rtol=1e-4)  # fmt: skip
    # the run keeps the head's defects, so a later update fits the head on the old ones and the new
    kept = new.record_.replay.defects
    assert len(kept) == 4 and kept.pixel_level.all() and kept.features.dtype == torch.float16
    new.save(tmp_path / "v2")
    loaded = ADTRDetector.load(tmp_path / "v2", progress=False, backend="torch")
    assert loaded.config.score.head_gain == MASK_GAIN
    assert torch.equal(loaded.record_.replay.defects.features, kept.features)
    assert torch.equal(loaded.record_.replay.defects.token_labels, kept.token_labels.float())
    v3 = loaded.update(anomalies=parts / "probe")
    assert len(v3.record_.replay.defects) == 8 and v3.record_.provenance["replay"]["defects"] == 8
    assert not torch.equal(v3.model_.head_weight, loaded.model_.head_weight)


def test_image_labelled_defects_fit_a_head_from_the_residual_maps_top_tokens(parts, tmp_path):
    unmasked = tmp_path / "unmasked"
    for f in sorted((parts / "defects" / "spot").iterdir()):
        write_png(unmasked / "spot" / f.name, np.asarray(Image.open(f)))
    plain = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train")
    det = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train", anomalies=unmasked)
    assert det.config.score.defect_head and det.record_.provenance["data"]["n_pixel_labelled"] == 0
    assert det.config.score.head_gain == DEFAULT_GAIN == 1.0  # pseudo-labels only: the residual map's weight
    probe = sorted((parts / "probe" / "spot").iterdir())
    good = sorted((parts / "train" / "good").iterdir())

    def margin(d: ADTRDetector) -> float:
        return np.median([p.anomaly_score for p in d.predict(probe)]) / max(p.anomaly_score for p in d.predict(good))

    assert margin(det) > margin(plain)


def test_empty_masks_name_the_problem(parts, tmp_path):
    root = tmp_path / "empty"
    for i in range(2):
        write_png(root / "spot" / f"{i:03d}.png", np.full((64, 64, 3), 200, np.uint8))
        write_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="empty"):
        ADTRDetector(TINY, train=TRAIN, progress=False).fit(parts / "train", anomalies=root)


def test_mixed_empty_mask_names_the_file_and_pooled_residual_is_refused(parts, tmp_path):
    root = tmp_path / "mixed"
    for f in sorted((parts / "defects" / "spot").iterdir())[:2]:
        write_png(root / "spot" / f.name, np.asarray(Image.open(f)))
        write_png(root / "ground_truth" / "spot" / f"{f.stem}_mask.png",
                  np.asarray(Image.open(parts / "defects" / "ground_truth" / "spot" / f"{f.stem}_mask.png")))
    write_png(root / "spot" / "009.png", np.full((64, 64, 3), 200, np.uint8))
    write_png(root / "ground_truth" / "spot" / "009_mask.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match="009_mask.png.*no defect pixel"):
        ADTRDetector(TINY, train=TRAIN, progress=False).fit(parts / "train", anomalies=root)
    with pytest.raises(SettingsError, match="pooled_residual"):
        ADTRDetector(TINY, ScoreConfig(image_score="pooled_residual"), TRAIN, progress=False).fit(
            parts / "train", anomalies=parts / "defects")


def test_crossfit_with_init_and_defects_fits_heads_only(parts, tmp_path, monkeypatch, caplog):
    import adtr.fit

    base = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(parts / "train")
    base.save(tmp_path / "base")
    calls = []
    original = adtr.fit.fit_reconstructor
    monkeypatch.setattr(adtr.fit, "fit_reconstructor", lambda *a, **k: calls.append(1) or original(*a, **k))
    crossfit = dataclasses.replace(TRAIN, calibration="crossfit", calibration_folds=2)
    with caplog.at_level(logging.WARNING, logger="adtr"):
        det = ADTRDetector(TINY, train=crossfit, progress=False, backend="torch").fit(
            parts / "train", anomalies=parts / "defects", init=tmp_path / "base")
    assert calls == [] and det.thresholds_.source == "crossfit" and det.config.score.defect_head
    # the kept reconstructor trained on every image the folds score: the user is told the threshold is optimistic
    assert "threshold is likely too low" in caplog.text


def test_corrupt_kept_defects_are_refused(parts, tmp_path):
    pasting = dataclasses.replace(TRAIN, head_paste=2)  # a run that pastes keeps its backgrounds
    det = ADTRDetector(TINY, train=pasting, progress=False, backend="torch").fit(parts / "train",
                                                                                anomalies=parts / "defects")
    det.save(tmp_path / "run")
    path = tmp_path / "run" / REPLAY_FILE
    tensors = load_file(str(path))
    assert set(tensors) == {"good", "val", "defects", "defect_labels", "defect_masked", "backgrounds", "defect_images",
                            "defect_image_masks"}  # fmt: skip
    for bad in (tensors["backgrounds"].float(), tensors["backgrounds"][:, :-1]):  # another type, another size
        save_file({**tensors, "backgrounds": bad.contiguous()}, str(path))
        with pytest.raises(RunFolderError, match="tensor 'backgrounds'"):
            ADTRDetector.load(tmp_path / "run", progress=False)
    tensors["defect_labels"] = torch.full_like(tensors["defect_labels"], float("nan"))
    save_file(tensors, str(path))
    with pytest.raises(RunFolderError, match="invalid defect tensors"):
        ADTRDetector.load(tmp_path / "run", progress=False)
    del tensors["defects"]
    save_file(tensors, str(path))
    with pytest.raises(RunFolderError, match="invalid defect tensors"):
        ADTRDetector.load(tmp_path / "run", progress=False)


def test_runs_without_the_key_load_as_trained_with_the_loss():
    config = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]}, "score": {}, "train": {}})
    assert config.train.labelled_anomalies == "loss" and not config.score.defect_head
    # heads saved before the gain added their logit with weight 1; new runs leave it to the fit
    assert config.score.head_gain is None and ScoreConfig().head_gain is None
    old = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]},
                               "score": {"defect_head": True}, "train": {"labelled_anomalies": "head"}})  # fmt: skip
    assert old.score.head_gain == 1.0
    # and their map scored the image; new runs leave it to the image scorer joined with the head
    assert old.score.head_image_score == "map" and ScoreConfig().head_image_score == "scorer"
    with pytest.raises(ValueError, match="head gain"):
        ScoreConfig(head_gain=0.0)
    with pytest.raises(ValueError, match="head_image_score"):
        ScoreConfig(head_image_score="logit")
    # before head_image_gain, the image took the map's gain (1 when that was unset too)
    assert old.score.head_image_gain == 1.0 and ScoreConfig().head_image_gain == 1.0
    unset = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]},
                                 "score": {"defect_head": True, "head_gain": None}, "train": {}})  # fmt: skip
    assert unset.score.head_image_gain == 1.0
    four = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]},
                                "score": {"defect_head": True, "head_gain": 4.0}, "train": {}})  # fmt: skip
    assert four.score.head_image_gain == 4.0
    for bad in (-1.0, math.inf, math.nan, True, "1", None):
        with pytest.raises(ValueError, match="head image gain"):
            ScoreConfig(head_image_gain=bad)
    for bad in (0.0, True, "4"):
        with pytest.raises(ValueError, match="head gain"):
            ScoreConfig(head_gain=bad)


def test_with_an_image_scorer_the_head_joins_the_scorers_map_for_the_image_score(parts, tmp_path, caplog):
    scored = dataclasses.replace(TINY, image_scorer="mlp")
    train = dataclasses.replace(TRAIN, image_scorer_epochs=1)
    with caplog.at_level(logging.INFO, logger="adtr"):
        det = ADTRDetector(scored, train=train, progress=False, backend="torch").fit(parts / "train",
                                                                                    anomalies=parts / "defects")
    m = det.model_
    assert m.score_cfg.defect_head and m.score_cfg.head_image_score == "scorer" and m.uses_image_scorer
    assert "image scorer: " in caplog.text  # the scorer was trained in the head's fit
    f = m.standardize(torch.randn(3, m.channels, *m.cfg.grid_size, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        out = m.score(f)
        r = m.residual(f)
        logit = (r * m.head_weight).sum(1) + m.head_bias
        norm = torch.cat([m.scorer_head_norm, m.head_norm[2:]])
        want = m.score_maps(combine(m.scorer_grid(f), logit, norm, 1.0)).anomaly_score
        head_map = m.score_maps(combine(m.residual_grid(r), logit, m.head_norm, m.head_gain))
        at_map_gain = m.score_maps(combine(m.scorer_grid(f), logit, norm, m.head_gain)).anomaly_score
    # four masked defects: the map weighs the logit 4 times, the image score once (head_image_gain)
    assert m.head_gain == MASK_GAIN and m.score_cfg.head_image_gain == 1.0
    assert torch.allclose(out.anomaly_score, want) and torch.allclose(out.anomaly_map, head_map.anomaly_map)
    assert not torch.allclose(out.anomaly_score, at_map_gain)
    assert not torch.allclose(out.anomaly_score, head_map.anomaly_score)
    assert m.scorer_head_norm[1] > 0 and not torch.equal(m.scorer_head_norm, torch.tensor([0.0, 1.0]))
    # the same scores after a save and load, and from the exported graph
    probe = sorted((parts / "probe" / "spot").iterdir())
    det.save(tmp_path / "run")
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert "scorer_head_norm" in load_file(str(tmp_path / "run" / "model.safetensors"))
    want_scores = [p.anomaly_score for p in det.predict(probe)]
    assert [p.anomaly_score for p in loaded.predict(probe)] == want_scores
    onnx = ADTRDetector.load(tmp_path / "run", progress=False, backend="onnx")
    assert np.allclose([p.anomaly_score for p in onnx.predict(probe)], want_scores, rtol=1e-3, atol=1e-4)
    # a run saved before head_image_gain joined the logit at the map's gain, and loads so
    pre_gain = tmp_path / "pre_gain"
    pre_gain.mkdir()
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    del doc["score"]["head_image_gain"]
    (pre_gain / "config.json").write_text(json.dumps(doc))
    for file in ("model.safetensors", REPLAY_FILE):
        shutil.copy(tmp_path / "run" / file, pre_gain / file)
    pre = ADTRDetector.load(pre_gain, progress=False, backend="torch")
    assert pre.config.score.head_image_gain == MASK_GAIN
    with torch.no_grad():
        assert torch.allclose(pre.model_.score(f).anomaly_score, at_map_gain)
    # the image gain is part of what a graph is built from, unless it is the map's: such a run's
    # fingerprint is the one computed before the key existed, so its cached graph stays valid
    assert model_fingerprint(pre.model_) != model_fingerprint(m)
    score = dataclasses.asdict(pre.model_.score_cfg)
    del score["head_image_gain"], score["scorer_position_weight"], score["map_position_weight"]
    # off or without effect: left out as before those keys
    del score["nearest_map"], score["head_bank_residual"], score["nearest_search_dims"], score["nearest_bank_rows"]
    model_cfg = dataclasses.asdict(pre.model_.cfg)
    del model_cfg["feature_pool"]
    before = json.dumps({"model": model_cfg, "score": score}, sort_keys=True)
    assert model_fingerprint(pre.model_) == _state_hash(pre.model_.state_dict(), before.encode())
    # and a training state saved before the key resumes under today's image gain
    pre_state = tmp_path / "pre_state"
    (pre_state / STATE_DIR).mkdir(parents=True)
    (pre_state / STATE_DIR / STATE_JSON).write_text(json.dumps({"config": doc}))
    assert saved_config_matches(pre_state, det.config) and det.config.score.head_image_gain == 1.0
    # an update with good images only keeps the parent's image gain; a head fitted or reweighed
    # now (update with defects or a new map gain, an init with defects) takes today's
    assert pre.update(good=parts / "train", steps=1).config.score.head_image_gain == MASK_GAIN
    reweighed = pre.update(good=parts / "train", steps=1, head_gain=1.0)
    assert (reweighed.config.score.head_gain, reweighed.model_.score_cfg.head_image_gain) == (1.0, 1.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adtr"):
        refitted = pre.update(anomalies=parts / "probe")
    assert "weight in the image score: 1 (the parent's: 4" in caplog.text
    assert (refitted.config.score.head_gain, refitted.model_.score_cfg.head_image_gain) == (MASK_GAIN, 1.0)
    init = ADTRDetector(scored, train=train, progress=False, backend="torch").fit(
        parts / "train", anomalies=parts / "probe", init=pre_gain)
    assert init.config.score.head_image_gain == 1.0 == init.model_.score_cfg.head_image_gain
    # "map": the head-joined map scores the image, as runs saved before the setting did
    as_map = m.with_score(dataclasses.replace(m.score_cfg, head_image_score="map"))
    with torch.no_grad():
        assert not as_map.uses_image_scorer
        assert torch.allclose(as_map.score(f).anomaly_score, head_map.anomaly_score)
    with pytest.raises(ValueError, match="with_score"):  # the stored tensors follow the setting
        m.score_cfg = dataclasses.replace(m.score_cfg, head_image_score="map")
    # a run saved before the setting (no key, no scorer_head_norm) loads as "map" and scores as it did
    old = tmp_path / "old"
    old.mkdir()
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    del doc["score"]["head_image_score"]
    (old / "config.json").write_text(json.dumps(doc))
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    del weights["scorer_head_norm"]
    save_file(weights, str(old / "model.safetensors"))
    before = ADTRDetector.load(old, progress=False, backend="torch")
    assert before.config.score.head_image_score == "map" and not before.model_.uses_image_scorer
    with torch.no_grad():
        assert torch.allclose(before.model_.score(f).anomaly_score, head_map.anomaly_score)
    # and a training state saved before it resumes under today's default
    state = tmp_path / "state"
    (state / STATE_DIR).mkdir(parents=True)
    (state / STATE_DIR / STATE_JSON).write_text(json.dumps({"config": doc}))
    assert saved_config_matches(state, dataclasses.replace(det.config, score=dataclasses.replace(
        det.config.score, head_image_score="scorer")))  # fmt: skip
