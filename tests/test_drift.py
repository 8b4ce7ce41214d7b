"""Inputs that differ from training (issue 14, kind 4): the run records its training images;
predict / test / serve / the Python API warn per image and put the warning in their outputs;
letterbox keeps the aspect ratio and never scores the padding."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import TINY, write_png
from PIL import Image

from adtr import ADTRDetector
from adtr.config import ScoreConfig, TrainConfig
from adtr.data.images import decode_for_model, read_image
from adtr.data.transforms import crop_to_box, letterbox_box, pad_to_box, resize_image
from adtr.drift import GREY_SPREAD, ImageInfo, InputProfile, image_info
from adtr.errors import SettingsError
from adtr.model import AnomalyOutput
from adtr.predict import Scoring, iter_predictions, predict_array
from adtr.thresholds import Thresholds


def _info(width: int, height: int, grey: bool = False) -> ImageInfo:
    return ImageInfo(height, width, grey)


def test_profile_of_the_training_images():
    profile = InputProfile.from_infos([_info(900, 900), _info(1000, 800), _info(640, 480)])
    assert profile.n == 3 and profile.height == (480, 900) and profile.width == (640, 1000)
    assert profile.aspect == (1.0, 640 / 480) and profile.colour == "colour"
    assert InputProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert InputProfile.from_infos([_info(10, 10, True)] * 2).colour == "grey"
    assert InputProfile.from_infos([_info(10, 10, True), _info(10, 10)]).colour == "mixed"
    with pytest.raises(ValueError, match="at least one image"):
        InputProfile.from_infos([])


def test_aspect_ratio_departs_beyond_five_percent():
    square = InputProfile.from_infos([_info(900, 900)])
    assert square.departures(_info(940, 900)) == []  # 1.044: within 5%
    assert square.departures(_info(900, 940)) == []  # 0.957
    (warning,) = square.departures(_info(960, 900))  # 1.067
    assert warning.startswith("aspect ratio 1.07 (960x900) differs from the training images' 1.00: the image is")
    assert "stretched" in square.departures(_info(900, 600))[0]
    assert "letterboxed" in square.departures(_info(900, 600), letterbox=True)[0]
    ranged = InputProfile.from_infos([_info(900, 900), _info(1200, 800)])
    assert ranged.departures(_info(1300, 1000)) == []  # 1.3, inside 1.0 to 1.5
    assert "training images' 1.00 to 1.50" in ranged.departures(_info(1600, 1000))[0]


def test_size_departs_beyond_twenty_percent():
    square = InputProfile.from_infos([_info(900, 900)])
    assert square.departures(_info(760, 760)) == square.departures(_info(1070, 1070)) == []  # within 20%
    (warning,) = square.departures(_info(600, 600))  # a centre crop: same aspect, another scale
    assert warning.startswith("size 600x600 is smaller than the training images' 900x900: a crop or another zoom")
    assert square.departures(_info(1100, 1100))[0].startswith("size 1100x1100 is larger")
    ranged = InputProfile.from_infos([_info(600, 400), _info(1200, 800)])
    assert ranged.departures(_info(900, 600)) == []  # inside the range
    assert "training images' 600x400 to 1200x800" in ranged.departures(_info(300, 200))[0]


def test_colour_mode_departs_both_ways():
    grey, colour = InputProfile.from_infos([_info(8, 8, True)]), InputProfile.from_infos([_info(8, 8)])
    mixed = InputProfile.from_infos([_info(8, 8, True), _info(8, 8)])
    assert grey.departures(_info(8, 8)) == ["colour image, but the model was trained on grey images only: colour "
                                            "can score as a defect"]  # fmt: skip
    assert colour.departures(_info(8, 8, True))[0].startswith("grey image, but the model was trained on colour")
    assert grey.departures(_info(8, 8, True)) == colour.departures(_info(8, 8)) == []
    assert mixed.departures(_info(8, 8)) == mixed.departures(_info(8, 8, True)) == []


def test_grey_is_measured_on_the_model_input(tmp_path, bottle):
    colour = read_image(bottle / "train" / "good" / "000.png")
    grey = np.asarray(Image.fromarray(colour).convert("L").convert("RGB"))
    assert not image_info(resize_image(colour, (64, 64)), colour.shape[:2]).grey  # bottle spreads about 9
    assert image_info(resize_image(grey, (64, 64)), grey.shape[:2]) == ImageInfo(900, 900, True)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=90)  # grey saved as a colour JPEG
    jpeg = read_image(tmp_path / "grey.jpg")
    assert image_info(resize_image(jpeg, (64, 64)), (900, 900)).grey
    tinted = np.clip(grey.astype(int) + [0, 0, 2 * GREY_SPREAD + 1], 0, 255).astype(np.uint8)  # a blue cast
    assert not image_info(resize_image(tinted, (64, 64)), (900, 900)).grey


def test_letterbox_box_and_padding():
    assert letterbox_box((600, 900), (256, 256)) == (42, 0, 171, 256)  # 900x600: scaled by 256 / 900
    assert letterbox_box((900, 900), (256, 256)) == (0, 0, 256, 256)
    assert letterbox_box((100, 400), (160, 384)) == (32, 0, 96, 384)
    content = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3).repeat(3, 1, 1)  # (3, 2, 3)
    padded = pad_to_box(content, (6, 3), (2, 0, 2, 3))
    assert padded.shape == (3, 6, 3)
    assert (padded[:, :2] == content[:, :1]).all() and (padded[:, 4:] == content[:, 1:]).all()  # edges repeated
    assert (crop_to_box(padded[0].numpy(), (2, 0, 2, 3)) == content[0].numpy()).all()


def test_letterboxed_file_decodes_as_its_array(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 70, 3), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", image)
    tensor, original = decode_for_model(path, (64, 64), letterbox=True)
    assert original == (30, 70) and tensor.shape == (3, 64, 64)
    assert (tensor == resize_image(image, (64, 64), letterbox=True)).all()


class BorderBackend:
    """A fake backend: map 1 inside the letterbox box of a 32x64 image at 64x64, 100 outside."""

    box = letterbox_box((32, 64), (64, 64))

    def __call__(self, images: torch.Tensor) -> AnomalyOutput:
        m = torch.full((len(images), 64, 64), 100.0)
        top, left, h, w = self.box
        m[:, top : top + h, left : left + w] = 1.0
        return AnomalyOutput(m, m.flatten(1).amax(1))


def test_letterbox_never_scores_the_padding():
    thresholds = Thresholds(image=5.0, pixel=5.0, low=0.0, method="good_quantile", n_good=10, false_alarm_rate=0.0)
    image = np.full((32, 64, 3), 128, np.uint8)
    cpu = torch.device("cpu")
    pred = predict_array(BorderBackend(), image, (64, 64), cpu, thresholds, "x", score=ScoreConfig(), letterbox=True)
    assert pred.anomaly_map.shape == (32, 64)  # the input's size, aligned to its pixels
    assert pred.anomaly_map.max() == pytest.approx(1.0) and pred.anomaly_score == pytest.approx(1.0)
    assert not pred.is_anomalous
    stretched = predict_array(BorderBackend(), image, (64, 64), cpu, thresholds, "x")
    assert stretched.anomaly_map.max() == pytest.approx(100.0) and stretched.is_anomalous  # the same rows, now image
    with pytest.raises(SettingsError, match="letterbox needs an image score computed from the map"):
        Scoring((64, 64), thresholds, ScoreConfig(image_score="pooled_residual"), letterbox=True)
    with pytest.raises(SettingsError, match="fit with --image-scorer off to letterbox"):
        Scoring((64, 64), thresholds, ScoreConfig(), letterbox=True, image_scorer=True)
    Scoring((64, 64), thresholds, ScoreConfig(), letterbox=False, image_scorer=True)  # stretched: scored as fitted


def test_letterboxed_files_score_as_their_arrays(tiny_run, tmp_path):
    det = tiny_run[0]
    image = np.random.default_rng(3).integers(90, 150, (40, 64, 3), dtype=np.uint8)
    path = write_png(tmp_path / "wide.png", image)
    (from_file,) = iter_predictions(det.model_, [path], det.config.model.image_size, det.device, det.thresholds_,
                                    progress=False, **det._scoring(True))  # fmt: skip
    from_array = det.predict_image(image, letterbox=True)
    assert from_file.anomaly_map.shape == from_array.anomaly_map.shape == (40, 64)
    assert from_file.anomaly_score == pytest.approx(from_array.anomaly_score, abs=1e-5)
    assert from_file.input_warnings == from_array.input_warnings and "letterboxed" in from_file.input_warnings[0]


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory):
    """A tiny run fitted on grey 64x64 images, saved: (detector, run folder)."""
    root = tmp_path_factory.mktemp("grey")
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(root / "good" / f"{i}.png", rng.integers(100, 140, (64, 64), dtype=np.uint8))
    train = TrainConfig(epochs=1, batch_size=4, calibration="held_out", query_fallback=None)  # a query model's run
    det = ADTRDetector(TINY, train=train, progress=False)
    det.fit(root)
    run = tmp_path_factory.mktemp("grey_run")
    det.save(run)
    return det, run


def test_every_entry_point_warns_and_records(grey_run, tmp_path, run_cli, caplog):
    from adtr.serve import score_upload

    det, run = grey_run
    assert det.inputs_ == InputProfile(6, (64, 64), (64, 64), (1.0, 1.0), "grey")
    rng = np.random.default_rng(1)
    colour = write_png(tmp_path / "in" / "colour.png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    wide = write_png(tmp_path / "in" / "wide.png", rng.integers(100, 140, (40, 80), dtype=np.uint8))
    grey = write_png(tmp_path / "in" / "grey.png", rng.integers(100, 140, (64, 64), dtype=np.uint8))
    # predict (CLI): a warning per image in the log, the JSON files and the CSV
    code, out, err = run_cli("predict", run, tmp_path / "in", "--out", tmp_path / "out", "--no-heatmaps", "--quiet")
    assert code == 0, err
    assert "2 unlike the training images" in out
    assert f"{colour}: colour image, but the model was trained on grey images only" in caplog.text
    rows = {r["path"]: r for r in json.loads((tmp_path / "out" / "scores.json").read_text())["predictions"]}
    assert rows[str(grey)]["input_warnings"] == []
    assert rows[str(colour)]["input_warnings"][0].startswith("colour image")
    assert rows[str(wide)]["input_warnings"][0].startswith("aspect ratio 2.00 (80x40)")
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        cells = {r["path"]: r["input_warnings"] for r in csv.DictReader(f)}
    assert cells[str(grey)] == "" and cells[str(colour)] == rows[str(colour)]["input_warnings"][0]
    # the Python API and the service
    assert det.predict([colour])[0].input_warnings == rows[str(colour)]["input_warnings"]
    answer = score_upload(det, "colour.png", colour.read_bytes(), max_pixels=10**6)
    assert answer["input_warnings"] == rows[str(colour)]["input_warnings"]
    # test: per image in the result and its score rows
    data = tmp_path / "labelled"
    write_png(data / "good" / "0.png", np.full((64, 64), 120, np.uint8))
    write_png(data / "good" / "1.png", np.full((64, 64, 3), (120, 60, 30), np.uint8))
    write_png(data / "crack" / "0.png", np.full((64, 64), 250, np.uint8))
    result = det.test(data)
    assert list(result["input_warnings"]) == [str(data / "good" / "1.png")]
    row = next(r for r in result["scores"] if r["path"].endswith("1.png"))
    assert row["input_warnings"][0].startswith("colour image")
    assert all("input_warnings" not in r for r in result["scores"] if not r["path"].endswith("1.png"))


def test_letterbox_cli_and_service_options(grey_run, tmp_path, run_cli):
    from adtr.serve import create_app

    det, run = grey_run
    wide = write_png(tmp_path / "wide.png", np.full((40, 80), 120, np.uint8))
    code, out, err = run_cli("predict", run, wide, "--out", tmp_path / "out", "--letterbox", "--quiet")
    assert code == 0, err
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())["predictions"]
    assert "letterboxed" in row["input_warnings"][0]
    assert row["anomaly_score"] == pytest.approx(det.predict([wide], letterbox=True)[0].anomaly_score, abs=1e-5)
    assert Image.open(row["heatmap"]).size == (80, 40)
    app = create_app(run, letterbox=True)
    health = next(r for r in app.routes if getattr(r, "path", "") == "/health").endpoint()
    assert health["letterbox"] is True and health["training_inputs"]["colour"] == "grey"
