"""Calibration with too little data (issue 14, kind 1): the rules, stated on constructed scores
and tiny fits.

- a threshold never flags the images it was calibrated on, even scored again with float noise;
- the stored rate is the conformal bound the threshold implies, 1 / (n + 1) for n scores when n
  is too small for the requested rate, with a warning that gives the count;
- fewer than MIN_HELD_OUT held-out images: every good image is cross-fitted (scored by a model
  fitted without it); a single image can only be its own calibration, and the fit says so;
- runs saved before this load and decide as they did (score >= threshold).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, write_png

from adtr import ADTRDetector
from adtr.calibration import MIN_HELD_OUT, calibrate, needed_images
from adtr.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from adtr.config import TrainConfig
from adtr.data.splits import split_validation
from adtr.fit import calibration_source
from adtr.thresholds import ABOVE, Thresholds, conformal_rank, f1_optimal, from_good_scores


@pytest.mark.parametrize("n", [1, 2, 5, 8, 20, 98, 99, 500])
def test_threshold_never_flags_its_calibration_images(n):
    rng = np.random.default_rng(n)
    scores, maxima = rng.gamma(4.0, 2.0, n), rng.gamma(4.0, 3.0, n)
    t = from_good_scores(scores, maxima, far=0.01)
    k = conformal_rank(n, 0.01)
    flagged = [t.is_anomalous(s) for s in scores]
    assert sum(flagged) == n - k == round(t.false_alarm_rate * n)
    kept = np.sort(scores)[:k]
    # scored again through another backend or batch size: scores agree to ~1e-6 relative
    assert not any(t.is_anomalous(s * (1 + 1e-6)) for s in kept)
    assert t.image == pytest.approx(kept[-1] * (1 + ABOVE))
    assert not t.defect_mask(np.sort(maxima)[:k]).any()


def test_implied_rate_is_the_conformal_bound():
    scores = np.arange(1.0, 21.0)  # 20 scores: too few for 1%
    t = from_good_scores(scores, scores, far=0.01, source="crossfit")
    assert t.implied_false_alarm_rate == pytest.approx(1 / 21) and t.false_alarm_rate == 0.0
    assert t.requested_false_alarm_rate == 0.01 and t.source == "crossfit" and t.n_good == 20
    big = np.arange(1.0, 1001.0)  # 1000 scores: k = ceil(1001 * 0.99) = 991
    t = from_good_scores(big, big, far=0.01)
    assert t.image == pytest.approx(991 * (1 + ABOVE)) and t.false_alarm_rate == pytest.approx(9 / 1000)
    assert t.implied_false_alarm_rate == pytest.approx(10 / 1001) and 10 / 1001 <= 0.01
    assert from_good_scores(scores, scores, far=0.05).implied_false_alarm_rate == pytest.approx(1 / 21)
    assert from_good_scores(scores[:1], scores[:1], source="training").implied_false_alarm_rate is None
    assert needed_images(0.01) == 99 and needed_images(0.05) == 19


def test_f1_threshold_states_its_implied_rate():
    t = f1_optimal(np.array([1.0, 2.0, 3.0]), np.array([2.5, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert t.method == "f1" and t.image == 2.5
    assert t.false_alarm_rate == pytest.approx(1 / 3) and t.implied_false_alarm_rate == pytest.approx(2 / 4)


def test_f1_warning_counts_the_flagged_good_images(caplog):
    # the F1 threshold 2.5 lies below one of three good scores: not "above the highest"
    calibrate(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), np.array([2.5, 6.0]), 0.01, "held_out")
    assert "flags 1 of 3 calibration good images" in caplog.text and "2/4 = 0.5" in caplog.text
    assert "above the highest" not in caplog.text


def test_warning_gives_the_count_when_too_few(caplog):
    few = np.linspace(5.0, 9.0, 20)
    calibrate(few, few, None, 0.01, "crossfit")
    assert "only 20 calibration scores" in caplog.text and "1/21 = 0.0476" in caplog.text
    assert "requested 0.01, which needs 99 good images" in caplog.text
    caplog.clear()
    enough = np.linspace(5.0, 9.0, 99)
    assert calibrate(enough, enough, None, 0.01, "held_out").implied_false_alarm_rate == pytest.approx(0.01)
    assert caplog.text == ""
    t = calibrate(few[:1], few[:1], None, 0.01, "training")
    assert "1 good image and none held out" in caplog.text and "no false-alarm rate can be stated" in caplog.text
    assert "no false-alarm rate can be stated" in t.describe()


@pytest.mark.parametrize(
    "mode, n_good, n_held_out, source",
    [
        ("auto", 1, 0, "training"),
        ("auto", 3, 0, "crossfit"),
        ("auto", 20, 2, "crossfit"),
        ("auto", 44, MIN_HELD_OUT - 1, "crossfit"),
        ("auto", 54, MIN_HELD_OUT, "held_out"),
        ("held_out", 3, 0, "training"),
        ("held_out", 20, 2, "held_out"),
        ("crossfit", 200, 20, "crossfit"),
    ],
)
def test_calibration_source(mode, n_good, n_held_out, source):
    assert calibration_source(mode, n_good, n_held_out) == source


def _good_folder(root, n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(root / "good" / f"{i}.png", rng.integers(90, 150, (64, 64, 3), dtype=np.uint8))
    return root


def test_tiny_set_is_cross_fitted_and_its_rate_stated(tmp_path, run_cli, caplog):
    data = _good_folder(tmp_path / "data", 3)
    code, out, err = run_cli("fit", data, "--out", tmp_path / "run", "--image-size", "32", "--epochs", "1")
    assert code == 0, err
    assert "loss=" in err and "nan" not in out + err  # the progress bar too (not --quiet)
    assert "no held-out images" in out
    assert "from 3 cross-fitted good images" in out and "at most 0.25 (requested 0.01)" in out
    assert "only 3 calibration scores" in caplog.text and "1/4 = 0.25" in caplog.text
    doc = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    thresholds = doc["calibration"]["thresholds"]
    assert thresholds["source"] == "crossfit" and thresholds["n_good"] == 3
    assert thresholds["implied_false_alarm_rate"] == pytest.approx(0.25)
    assert doc["provenance"]["calibration_folds"] == 3
    assert doc["provenance"]["data"]["train"]["n"] == 3 and doc["calibration"]["score_stats"]["n"] == 3
    assert all("val_loss" not in h for h in doc["history"])
    # adtr test repeats what the decisions rest on, on the console and in its JSON
    code, out, err = run_cli("test", tmp_path / "run", data, "--json", tmp_path / "m.json", "--quiet")
    assert code == 0, err
    assert "from 3 cross-fitted good images" in out and "at most 0.25 (requested 0.01)" in out
    calibration = json.loads((tmp_path / "m.json").read_text())["calibration"]
    assert calibration["source"] == "crossfit" and calibration["implied_false_alarm_rate"] == pytest.approx(0.25)


def test_held_out_images_are_not_flagged_when_predicted(tmp_path):
    data = _good_folder(tmp_path / "data", 10, seed=1)
    train = TrainConfig(epochs=1, batch_size=4, val_fraction=0.5, calibration="held_out", query_fallback=None)
    det = ADTRDetector(TINY, train=train, progress=False).fit(data)
    files = sorted((data / "good").iterdir())
    held = [files[i] for i in split_validation(10, 0.5, train.seed)[1]]
    preds = det.predict(held, batch_size=1)  # another batch size than calibration's
    assert det.thresholds_.source == "held_out" and det.thresholds_.n_good == 5
    assert not any(p.is_anomalous for p in preds)
    assert max(p.anomaly_score for p in preds) == pytest.approx(det.thresholds_.image / (1 + ABOVE), rel=1e-5)


def test_run_saved_before_keeps_its_decisions(tiny_run, tmp_path):
    """A config.json without the new threshold fields and input profile: same scores, same
    decisions (score >= threshold), no input checks."""
    det, run, files = tiny_run
    doc = json.loads((run / CONFIG_FILE).read_text())
    old = {k: doc["calibration"]["thresholds"][k] for k in ("image", "pixel", "low", "method", "n_good",
                                                            "false_alarm_rate")}  # fmt: skip
    doc["calibration"]["thresholds"] = old
    del doc["inputs"], doc["provenance"]["calibration_folds"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    (tmp_path / WEIGHTS_FILE).write_bytes((run / WEIGHTS_FILE).read_bytes())
    loaded = ADTRDetector.load(tmp_path, progress=False)
    assert loaded.inputs_ is None and loaded.thresholds_.implied_false_alarm_rate is None
    assert loaded.thresholds_ == Thresholds(**old)
    grey = np.full((64, 32), 120, np.uint8)  # another aspect ratio and colour mode: no profile, no warning
    p = loaded.predict_image(grey)
    assert p.input_warnings == [] and p.anomaly_score == det.predict_image(grey).anomaly_score
    assert p.is_anomalous == (p.anomaly_score >= old["image"])
    assert loaded.thresholds_.is_anomalous(old["image"])  # the rule was and stays >=
    assert "of them at or above it" in loaded.thresholds_.describe()


@pytest.mark.slow  # a CLI fit with ONNX export; the fast lane keeps the option's parsing (test_errors)
def test_fit_reconstructor_option_saves_and_reloads_the_cnn(tmp_path, run_cli):
    from adtr.model import CNNReconstructor, TokenGridReconstructor

    data = _good_folder(tmp_path / "data", 6, seed=2)
    # 3 training images, one step an epoch; 4 steps counted at 512 pixels -> 2 at 32x32 (1024)
    code, out, err = run_cli("fit", data, "--out", tmp_path / "run", "--image-size", "32", "--steps", "4",
                             "--step-pixels", "512", "--reconstructor", "cnn", "--calibration", "held_out",
                             "--val-fraction", "0.5", "--quiet")  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert doc["model"]["reconstructor"] == "cnn"
    assert doc["train"]["step_pixels"] == 512 and len(doc["history"]) == 2
    # its validation loss is far above the query fallback's threshold, yet only the
    # transformer's learnable query ever falls back
    assert doc["history"][-1]["val_loss"] > TrainConfig().query_fallback
    assert doc["provenance"]["query_fallback"] is None and "fitted without the learnable query" not in out
    assert (tmp_path / "run" / "model.onnx").is_file() and "backend for predict / test / serve: onnx" in out
    det = ADTRDetector.load(tmp_path / "run")
    assert isinstance(det.model_.reconstructor, CNNReconstructor)
    # the preset's token_patch 2: the scorer is a CNN on the token grid
    assert doc["model"]["image_scorer"] == "cnn" and doc["model"]["token_patch"] == 2
    assert isinstance(det.model_.image_scorer, TokenGridReconstructor)
    assert isinstance(det.model_.image_scorer.inner, CNNReconstructor)
    code, out, err = run_cli("fit", data, "--out", tmp_path / "off", "--image-size", "32", "--epochs", "1",
                             "--image-scorer", "off", "--token-patch", "1", "--calibration", "held_out",
                             "--val-fraction", "0.5", "--quiet")  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "off" / CONFIG_FILE).read_text())
    assert doc["model"]["image_scorer"] is None and doc["model"]["token_patch"] == 1
    off = ADTRDetector.load(tmp_path / "off")
    assert off.model_.image_scorer is None and off.model_.cfg.grid_size == (2, 2)
