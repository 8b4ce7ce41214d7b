"""`adtr update` (adtr/update.py) and the replay features it needs (adtr/replay.py): a run is
continued without its training images, records its parent, leaves it untouched, and an update
that flags more of the parent's validation good images is refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, write_png
from safetensors.torch import save_file

from adtr import ADTRDetector
from adtr.checkpoint import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from adtr.config import ScoreConfig, TrainConfig
from adtr.data.mvtec import train_samples
from adtr.data.splits import split_validation
from adtr.engine import extract_features
from adtr.errors import ForgettingError, RunFolderError, SettingsError
from adtr.replay import REPLAY_FILE, capacity, subsample
from adtr.update import forgetting_check

# 20 good images: 15 train, 5 held out; a high learning rate, so that the tiny model's short update shows
# query_fallback off: two epochs never model noise, and these are updates of a query model's run
TRAIN = TrainConfig(epochs=2, batch_size=4, val_fraction=0.25, lr=3e-3, query_fallback=None)


def _blob(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(100, 140, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 24:40] = 255
    image[mask > 0] = 250
    return image, mask


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """A good part after a product change: vertical stripes instead of plain noise."""
    image = 120 + 40 * np.sin(np.arange(64) / 2.0)[None, :, None] + rng.integers(0, 10, (64, 64, 3))
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run folder): a tiny run fitted on 20 noise images, with new defects (3 with
    masks), 10 new good images (striped) and 4 more striped ones to probe with beside them."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(20):
        write_png(root / "good" / f"{i:03d}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    for i in range(3):
        image, mask = _blob(rng)
        write_png(root / "new_defects" / "blob" / f"{i:03d}.png", image)
        write_png(root / "new_defects" / "ground_truth" / "blob" / f"{i:03d}_mask.png", mask)
    for i in range(10):
        write_png(root / "new_good" / f"{i:03d}.png", _stripes(rng))
    for i in range(4):
        write_png(root / "probe" / f"{i:03d}.png", _stripes(rng))
    run = tmp_path_factory.mktemp("runs") / "parent"
    ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(root).save(run)
    return root, run


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def _median_score(det: ADTRDetector, files: list[Path]) -> float:
    return float(np.median([p.anomaly_score for p in det.predict(files)]))


def _val_files(root: Path) -> list[Path]:
    samples = train_samples(root)
    _, val = split_validation(len(samples), TRAIN.val_fraction, TRAIN.seed)
    return [samples[i].path for i in val]


def test_fit_keeps_replay_features_within_the_bound(parent):
    root, run = parent
    det = ADTRDetector.load(run, progress=False, backend="torch")
    replay = det.record_.replay
    assert replay.good.shape == (15, 192, 4, 4) and replay.val.shape == (5, 192, 4, 4)
    assert replay.good.dtype == torch.float16
    recorded = json.loads((run / CONFIG_FILE).read_text())["provenance"]["replay"]
    assert recorded["good"] == 15 and recorded["val"] == 5 and recorded["bytes"] == 20 * 192 * 16 * 2
    # a run whose setting pastes no defects for its head keeps no backgrounds (auto here: no image
    # scorer, so the map's per-position weight is 0.5, read as aligned parts)
    assert recorded["backgrounds"] == 0 == recorded["background_bytes"] and replay.backgrounds is None
    # the stored validation features are the raw backbone features of the held-out files
    fresh = extract_features(det.model_, [s for s in train_samples(root) if s.path in set(_val_files(root))],
                             torch.device("cpu"), progress=False)  # fmt: skip
    assert torch.allclose(replay.val.float(), fresh, rtol=2e-3, atol=1e-3)
    # the bound: 64 images a set, fewer when 2 sets would pass 50 MB (192 x 64 x 64 values: 1.5 MiB an image)
    assert capacity((192, 16, 16)) == 64 and capacity((192, 64, 64)) == 50_000_000 // (2 * 192 * 64 * 64 * 2)
    rows = torch.arange(100)
    assert subsample(rows, 200, 0) is rows
    kept = subsample(rows, 10, 0)
    assert len(kept) == 10 and torch.equal(kept, kept.sort().values) and torch.equal(kept, subsample(rows, 10, 0))


def test_update_learns_new_data_records_its_parent_and_leaves_it_untouched(parent, tmp_path):
    root, run = parent
    before = _hashes(run)
    old = ADTRDetector.load(run, progress=False, backend="torch")
    probe = sorted((root / "probe").iterdir())
    old_scores = [p.anomaly_score for p in old.predict(probe)]
    new = old.update(anomalies=root / "new_defects", good=root / "new_good", steps=40)
    new.save(tmp_path / "v2")
    assert _hashes(run) == before  # the parent folder is only read
    assert [p.anomaly_score for p in old.predict(probe)] == old_scores  # nor is the loaded parent changed

    again = ADTRDetector.load(tmp_path / "v2", progress=False, backend="torch")
    update = again.record_.provenance["update"]
    assert update["parent"] == {"path": str(run.resolve()), "weights_sha256": before[WEIGHTS_FILE]}
    added = update["added"]
    assert added["anomalies"]["n"] == 3 and added["anomalies"]["n_pixel_labelled"] == 3
    assert added["good_train"]["n"] == 8 and added["good_val"]["n"] == 2 and added["external"]["n"] == 0
    assert len(added["anomalies"]["content_sha256"]) == 64 and update["steps"] == 40
    # the update's steps as given, at any input size: none scaled away by the parent's step_pixels
    assert old.config.train.step_pixels == 65536 and again.config.train.step_pixels is None
    # thresholds from the parent's 5 validation images + the 2 new held-out ones; replay grows
    # (the defects fitted the defect head: their in-sample scores do not set the threshold)
    assert again.thresholds_.n_good == 7 and again.thresholds_.method == "good_quantile"
    assert again.record_.replay.good.shape[0] == 15 + 8 and again.record_.replay.val.shape[0] == 7
    assert update["forgetting_guard"]["passed"] and update["forgetting_guard"]["n"] == 5
    # it learnt the product change: unseen striped parts now score lower against the old good parts
    val = _val_files(root)
    ratio_old = np.median(old_scores) / _median_score(old, val)
    ratio_new = _median_score(again, probe) / _median_score(again, val)
    assert ratio_new < 0.9 * ratio_old


def test_forgetting_guard_refuses_or_warns(parent, tmp_path, run_cli, caplog):
    """Defects that are in fact the parent's validation good images (a labelling mistake), in a
    run whose defects go to the losses (--labelled-anomalies loss): the new F1 threshold must
    flag them, so most of the old good images would be false alarms. (With the defect head the
    threshold comes from good images alone and cannot move this way.)"""
    root, parent_run = parent
    run = tmp_path / "loss_run"
    shutil.copytree(parent_run, run)
    doc = json.loads((run / CONFIG_FILE).read_text())
    doc["train"]["labelled_anomalies"] = "loss"
    (run / CONFIG_FILE).write_text(json.dumps(doc))
    for path in _val_files(root):
        dest = tmp_path / "mislabelled" / "defect" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    code, out, err = run_cli("update", run, "--out", tmp_path / "v2", "--anomalies", tmp_path / "mislabelled",
                             "--steps", 4, "--quiet")  # fmt: skip
    assert code == 2 and "the update would forget" in err and "nothing written" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "v2").exists()
    loaded = ADTRDetector.load(run, progress=False, backend="torch")
    with pytest.raises(ForgettingError, match=r"parent \(at most \+1% allowed\)"):
        loaded.update(anomalies=tmp_path / "mislabelled", steps=4)

    with caplog.at_level(logging.WARNING, logger="adtr.update"):
        new = loaded.update(anomalies=tmp_path / "mislabelled", steps=4, allow_forgetting=True)
    assert any("would forget" in r.message and "kept anyway" in r.message for r in caplog.records)
    guard = new.record_.provenance["update"]["forgetting_guard"]
    assert guard["passed"] is False and guard["false_alarm_rate"] > guard["parent_false_alarm_rate"] + 0.01
    code, out, _ = run_cli("update", run, "--out", tmp_path / "v3", "--anomalies", tmp_path / "mislabelled",
                           "--steps", 4, "--allow-forgetting", "--quiet")  # fmt: skip
    assert code == 0 and "run saved to" in out and (tmp_path / "v3" / REPLAY_FILE).is_file()


def test_an_update_moves_a_weight_the_rule_gave_and_keeps_any_other(caplog):
    from adtr.defect_head import DEFAULT_GAIN, FEW_MASKED_SHARE, MASK_GAIN
    from adtr.update import head_gain_on_update

    head = ScoreConfig(defect_head=True, head_gain=FEW_MASKED_SHARE * MASK_GAIN)
    bank = dataclasses.replace(head, nearest_map=True, head_bank_residual=True, head_gain=FEW_MASKED_SHARE)
    with caplog.at_level(logging.INFO, logger="adtr.update"):
        # one masked defect, half weight by the rule; two more make three: the full weight
        assert head_gain_on_update(head, 1, 2).head_gain == MASK_GAIN
        assert "2 -> 4, the weight of a head fitted on 3 masked defects" in caplog.text
        assert head_gain_on_update(bank, 1, 2).head_gain == DEFAULT_GAIN
        assert head_gain_on_update(head, 1, 1) == head  # still two: as it was
        # image labels only (no mask) gave 1; a first masked defect gives half of 4, as a fresh fit
        assert head_gain_on_update(dataclasses.replace(head, head_gain=1.0), 0, 1).head_gain == 2.0
        # a weight the rule did not give (--head-gain, an earlier version's rule) is kept, and said
        caplog.clear()
        given = dataclasses.replace(bank, head_gain=4.0)
        assert head_gain_on_update(given, 5, 2) == given
        said = "keeps the parent's weight 4 in the map; a fresh fit with these 7 masked defects weighs it 1"
        assert said in caplog.text


def test_forgetting_check_against_the_parents_rate():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    same = forgetting_check(0.1, scores, threshold=10.0)  # one of ten at or above: as the parent
    assert same["false_alarm_rate"] == 0.1 and same["passed"] and same["n"] == 10
    worse = forgetting_check(0.1, scores, threshold=9.0)  # two of ten: +10 points
    assert worse["false_alarm_rate"] == 0.2 and worse["passed"] is False
    assert forgetting_check(0.19, scores, threshold=9.0)["passed"]  # within the 1-point tolerance
    empty = forgetting_check(0.1, np.array([]), threshold=1.0)
    assert empty["passed"] is None and empty["false_alarm_rate"] is None and empty["n"] == 0


def test_run_without_replay_features_is_refused_but_still_loads(parent, tmp_path, run_cli):
    root, run = parent
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # a run folder as adtr wrote it before replay.safetensors
        shutil.copy(run / name, tmp_path / name)
    old = ADTRDetector.load(tmp_path, progress=False, backend="torch")
    assert old.record_.replay is None and old.predict([_val_files(root)[0]])[0].anomaly_score > 0
    with pytest.raises(RunFolderError, match="replay.safetensors: missing: .* fit it again"):
        old.update(anomalies=root / "new_defects")
    code, _, err = run_cli("update", tmp_path, "--out", tmp_path / "v2", "--good", root / "new_good")
    assert code == 2 and "replay.safetensors: missing" in err and not (tmp_path / "v2").exists()


def test_bad_update_requests_are_refused(parent, tmp_path, run_cli):
    root, run = parent
    code, _, err = run_cli("update", run, "--out", run, "--anomalies", root / "new_defects")
    assert code == 2 and "never changed" in err
    code, _, err = run_cli("update", run, "--out", tmp_path / "v2")
    assert code == 2 and "nothing to add" in err and not (tmp_path / "v2").exists()
    with pytest.raises(SystemExit) as stop:  # argparse refuses it: one line, exit status 2
        run_cli("update", run, "--out", tmp_path / "v2", "--good", root / "new_good", "--steps", 0)
    assert stop.value.code == 2 and not (tmp_path / "v2").exists()
    code, _, err = run_cli("update", run, "--out", tmp_path / "v2", "--external", root / "new_good", "--retrain",
                           "never")  # fmt: skip
    assert code == 2 and "retrain never" in err and not (tmp_path / "v2").exists()
    # the CLI says whether the reconstructor trained, and why (stripes: far above the parent's loss)
    code, out, _ = run_cli("update", run, "--out", tmp_path / "v3", "--good", root / "new_good", "--steps", 2)
    assert code == 0 and "the reconstructor trained 2 steps: the new good images' reconstruction loss is" in out
    code, out, _ = run_cli("update", run, "--out", tmp_path / "v4", "--good", root / "new_good", "--retrain",
                           "never")  # fmt: skip
    assert code == 0 and "the reconstructor kept as it is: --retrain never" in out
    fitted = ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(root)
    with pytest.raises(SettingsError, match="save\\(\\) this detector or load\\(\\) it first"):
        fitted.update(good=root / "new_good")


def test_replay_file_of_another_shape_is_refused(parent, tmp_path):
    _, run = parent
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(run / name, tmp_path / name)
    save_file({"good": torch.zeros(2, 192, 8, 8, dtype=torch.float16), "val": torch.zeros(1, 192, 8, 8,
              dtype=torch.float16)}, str(tmp_path / REPLAY_FILE))  # fmt: skip
    with pytest.raises(RunFolderError, match=r"replay.safetensors: tensor 'good' is \(2, 192, 8, 8\)"):
        ADTRDetector.load(tmp_path)


def test_a_run_without_validation_images_updates_with_a_warning(parent, tmp_path, caplog):
    root, _ = parent
    few = train_samples(root)[:4]  # fewer than 5 good images: none held out
    ADTRDetector(TINY, train=TRAIN, progress=False, backend="torch").fit(few).save(tmp_path / "few")
    det = ADTRDetector.load(tmp_path / "few", progress=False, backend="torch")
    assert det.record_.replay.val.shape == (0, 192, 4, 4) and det.record_.replay.good.shape[0] == 4
    with caplog.at_level(logging.WARNING, logger="adtr.update"):
        new = det.update(anomalies=root / "new_defects", steps=2)
    assert any("the forgetting guard cannot run" in r.message for r in caplog.records)
    guard = new.record_.provenance["update"]["forgetting_guard"]
    assert guard["n"] == 0 and guard["passed"] is None and guard["false_alarm_rate"] is None


def test_the_maps_position_weight_is_saved_and_kept_by_load_update_and_init(parent, tmp_path):
    """A map weight under 0.5 (it follows a scorer weight of 0) is written to config.json and kept
    by a load, an update and a fit from the run (--init), with the statistics it made; a run saved
    before the key (config.json without it) reads 0.5, and its update keeps 0.5."""
    import dataclasses

    from adtr.config import ScoreConfig

    root, _ = parent
    model = dataclasses.replace(TINY, image_scorer="cnn")
    train = dataclasses.replace(TRAIN, epochs=1, image_scorer_epochs=1)
    det = ADTRDetector(model, ScoreConfig(scorer_position_weight=0.0), train=train, progress=False,
                       backend="torch").fit(root)  # fmt: skip
    assert det.config.score.map_position_weight == 0.0
    det.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["score"]["map_position_weight"] == 0.0
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert loaded.config.score.map_position_weight == 0.0 == loaded.model_.score_cfg.map_position_weight
    assert torch.equal(loaded.model_.position_mean, det.model_.position_mean)
    updated = loaded.update(good=root / "new_good", steps=2)
    assert updated.config.score.map_position_weight == 0.0 == updated.model_.score_cfg.map_position_weight
    init = ADTRDetector(model, train=train, progress=False, backend="torch").fit(root, init=tmp_path / "run")
    assert init.config.score.map_position_weight == 0.0
    # a run saved before the key: its map keeps half and half, also through an update
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    doc = json.loads((old / CONFIG_FILE).read_text())
    del doc["score"]["map_position_weight"]
    (old / CONFIG_FILE).write_text(json.dumps(doc))
    before = ADTRDetector.load(old, progress=False, backend="torch")
    assert before.config.score.map_position_weight == 0.5
    assert before.update(good=root / "new_good", steps=2).config.score.map_position_weight == 0.5


def test_the_chosen_scorer_position_weight_is_saved_and_kept_by_an_update(parent, tmp_path):
    """A fit with an image scorer and held-out images chooses the scorer's per-position weight,
    writes it to config.json and loads it back; an update keeps it; a cross-fitted fit (no
    held-out images to choose on) records 0.5."""
    import dataclasses

    from adtr.model import POSITION_WEIGHTS

    root, _ = parent
    model = dataclasses.replace(TINY, image_scorer="cnn")
    train = dataclasses.replace(TRAIN, epochs=1, image_scorer_epochs=1)
    det = ADTRDetector(model, train=train, progress=False, backend="torch").fit(root)
    chosen = det.config.score.scorer_position_weight
    assert chosen in POSITION_WEIGHTS and chosen == det.model_.score_cfg.scorer_position_weight
    det.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["score"]["scorer_position_weight"] == chosen
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert loaded.config.score.scorer_position_weight == chosen
    assert loaded.update(good=root / "new_good", steps=2).config.score.scorer_position_weight == chosen
    crossfit = dataclasses.replace(train, calibration="crossfit")
    folded = ADTRDetector(model, train=crossfit, progress=False, backend="torch").fit(root)
    assert folded.config.score.scorer_position_weight == 0.5


def test_reconstruction_check_on_constructed_features(parent):
    """The parent's own held-out features against themselves: ratio 1, no retraining; the same
    features shifted far from the training statistics: a loss many times higher, retraining."""
    from adtr.update import RETRAIN_RATIO, reconstruction_check

    _, run = parent
    det = ADTRDetector.load(run, progress=False, backend="torch")
    val = det.record_.replay.val.float()
    same = reconstruction_check(det.model_, val, val.clone(), torch.device("cpu"))
    assert same["ratio"] == pytest.approx(1.0) and not same["above_threshold"] and same["threshold"] == RETRAIN_RATIO
    assert same["n_parent"] == same["n_new"] == len(val)
    assert same["parent_loss"] == pytest.approx(same["new_loss"]) and same["parent_loss"] > 0
    std = det.model_.feature_std.to(val.dtype)
    shifted = reconstruction_check(det.model_, val, val + 5 * std, torch.device("cpu"))
    assert shifted["ratio"] > 3 * RETRAIN_RATIO and shifted["above_threshold"]
    assert shifted["parent_loss"] == pytest.approx(same["parent_loss"])


def _weights(det: ADTRDetector, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in det.model_.state_dict().items() if k.startswith(prefix)}


def test_new_good_images_like_the_old_keep_the_reconstructor(parent, tmp_path):
    """Good images from the parent's own distribution are rebuilt as well as its held-out ones:
    the update keeps the reconstructor's weights (0 steps, the check recorded) but trains the
    image scorer; retrain="always" trains the reconstructor; a product change (stripes) trains it
    under auto; "never" with external images and an unknown value are refused."""
    root, _ = parent
    rng = np.random.default_rng(7)
    for i in range(10):  # more of the parent's noise parts
        write_png(tmp_path / "more" / f"{i:03d}.png", rng.integers(100, 140, (64, 64, 3), dtype=np.uint8))
    model = dataclasses.replace(TINY, image_scorer="cnn")
    train = dataclasses.replace(TRAIN, epochs=1, image_scorer_epochs=1)
    det = ADTRDetector(model, train=train, progress=False, backend="torch").fit(root)
    det.save(tmp_path / "run")
    loaded = ADTRDetector.load(tmp_path / "run", progress=False, backend="torch")
    assert loaded.model_.uses_image_scorer
    rec, scorer = _weights(loaded, "reconstructor."), _weights(loaded, "image_scorer.")
    kept = loaded.update(good=tmp_path / "more", steps=3)
    check = kept.record_.provenance["update"]["reconstruction_check"]
    assert not check["above_threshold"] and check["ratio"] < 1.2 and check["retrain"] == "auto"
    assert check["parent_source"] == "held_out" and check["n_parent"] == 5 and check["n_new"] == 10  # every new image
    assert "within 1.25x: it rebuilds them" in kept.record_.provenance["update"]["reconstructor_reason"]
    assert kept.record_.provenance["update"]["steps"] == 0 and kept.record_.provenance["update"]["image_scorer_trained"]
    assert all(torch.equal(v, kept.model_.state_dict()[k]) for k, v in rec.items())
    assert any(not torch.equal(v, kept.model_.state_dict()[k]) for k, v in scorer.items())
    assert kept.thresholds_.n_good == 5 + 2  # the new held-out images join the calibration all the same

    always = loaded.update(good=tmp_path / "more", steps=3, retrain="always")
    assert always.record_.provenance["update"]["steps"] == 3
    assert any(not torch.equal(v, always.model_.state_dict()[k]) for k, v in rec.items())
    changed = loaded.update(good=root / "new_good", steps=3)  # stripes: a product change
    assert changed.record_.provenance["update"]["reconstruction_check"]["above_threshold"]
    assert any(not torch.equal(v, changed.model_.state_dict()[k]) for k, v in rec.items())
    never = loaded.update(good=root / "new_good", steps=3, retrain="never")  # kept all the same
    assert never.record_.provenance["update"]["steps"] == 0
    assert never.record_.provenance["update"]["reconstructor_reason"] == "--retrain never"
    assert all(torch.equal(v, never.model_.state_dict()[k]) for k, v in rec.items())
    # external images, and anomalies in the losses, train it whatever the new good images say
    external = loaded.update(good=tmp_path / "more", external=root / "new_good", steps=3)
    assert external.record_.provenance["update"]["steps"] == 3
    assert external.record_.provenance["update"]["reconstructor_reason"].startswith("external images or anomalies")
    assert any(not torch.equal(v, external.model_.state_dict()[k]) for k, v in rec.items())
    in_loss = tmp_path / "loss_run"
    shutil.copytree(tmp_path / "run", in_loss)
    doc = json.loads((in_loss / CONFIG_FILE).read_text())
    doc["train"]["labelled_anomalies"] = "loss"
    (in_loss / CONFIG_FILE).write_text(json.dumps(doc))
    lossy = ADTRDetector.load(in_loss, progress=False, backend="torch").update(
        anomalies=root / "new_defects", good=tmp_path / "more", steps=3)  # fmt: skip
    assert lossy.record_.provenance["update"]["steps"] == 3
    assert any(not torch.equal(v, lossy.model_.state_dict()[k]) for k, v in rec.items())
    with pytest.raises(SettingsError, match="--retrain never: the update's external images"):
        loaded.update(external=root / "new_good", retrain="never")
    with pytest.raises(SettingsError, match="retrain must be one of"):
        loaded.update(good=tmp_path / "more", retrain="sometimes")
    assert all(torch.equal(v, loaded.model_.state_dict()[k]) for k, v in rec.items())  # the parent untouched
    # a run whose images a Gaussian per position scores: its image scorer scores nothing, and stays
    gauss = ADTRDetector(model, ScoreConfig(feature_gaussian=True), train=train, progress=False,
                         backend="torch").fit(root)  # fmt: skip
    gauss.save(tmp_path / "gauss")
    gauss = ADTRDetector.load(tmp_path / "gauss", progress=False, backend="torch")
    scorer = _weights(gauss, "image_scorer.")
    assert scorer and gauss.config.score.feature_gaussian
    joined = gauss.update(good=tmp_path / "more", steps=3)
    assert not joined.record_.provenance["update"]["image_scorer_trained"]
    assert all(torch.equal(v, joined.model_.state_dict()[k]) for k, v in scorer.items())
