"""Inputs from the field (issue 14): camera arrays, mask folders, one-sided test sets, huge images.

Each test states the rule; the tiny model is fitted on 10 real bottle images (64x64, 1 epoch).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, write_png
from PIL import Image

from adtr import ADTRDetector
from adtr.config import TrainConfig
from adtr.data.images import DataError, read_image, to_rgb_uint8


@pytest.fixture(scope="module")
def bottle_run(bottle, tmp_path_factory):
    """(detector, bottle good test image 000 as an RGB uint8 array (900, 900, 3), tmp folder)."""
    root = tmp_path_factory.mktemp("bottle10")
    for f in sorted((bottle / "train" / "good").glob("*.png"))[:10]:
        (root / "good").mkdir(exist_ok=True)
        shutil.copy(f, root / "good" / f.name)
    det = ADTRDetector(TINY, train=TrainConfig(epochs=1, batch_size=8), progress=False).fit(root)
    image = np.asarray(Image.open(bottle / "test" / "good" / "000.png").convert("RGB"))
    return det, image, tmp_path_factory.mktemp("field")


# -- kind 2: arrays from camera SDKs and OpenCV score as their files do ---------------------


def _file_score(det, path: Path) -> float:
    return det.predict([path])[0].anomaly_score


def test_array_formats_score_as_their_files(bottle_run):
    det, rgb, tmp = bottle_run
    rgb = np.ascontiguousarray(rgb[250:650, 250:650])  # the bottle's centre: the rule, in less time
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    cases = {  # name: (file content, array as a camera / OpenCV hands it over, predict_image options)
        "rgb uint8": (rgb, rgb, {}),
        "grey 2-D": (grey, grey, {}),
        "grey HxWx1": (grey, grey[:, :, None], {}),
        "grey (1, H, W)": (grey, grey[None], {}),
        "channel-first (3, H, W)": (rgb, np.moveaxis(rgb, 2, 0), {}),
        "float32 0..1": (rgb, rgb.astype(np.float32) / 255, {"value_range": 1.0}),
        "float32 0..255": (rgb, rgb.astype(np.float32), {"value_range": 255.0}),
        "bgr (OpenCV)": (rgb, rgb[:, :, ::-1], {"channel_order": "bgr"}),
    }
    for name, (content, array, options) in cases.items():
        path = write_png(tmp / f"{name.replace(' ', '_')}.png", content)
        expected = pytest.approx(_file_score(det, path), abs=1e-5)
        assert det.predict_image(array, **options).anomaly_score == expected, name
    # 16-bit grey: the file and the array hold the same uint16 values
    sixteen = grey.astype(np.uint16) * 257
    path = tmp / "sixteen.png"
    Image.fromarray(sixteen).save(path)
    assert det.predict_image(sixteen).anomaly_score == pytest.approx(_file_score(det, path), abs=1e-5)
    # RGBA with a varying alpha: composited on black, the same for the file and the array
    rgba = np.dstack([rgb, (np.arange(rgb.shape[1]) % 256).astype(np.uint8)[None].repeat(rgb.shape[0], 0)])
    path = write_png(tmp / "rgba.png", rgba)
    assert det.predict_image(rgba).anomaly_score == pytest.approx(_file_score(det, path), abs=1e-5)
    assert (to_rgb_uint8(rgba[:, :, [2, 1, 0, 3]], channel_order="bgr") == read_image(path)).all()


def test_bad_arrays_name_the_accepted_shapes_and_dtypes(bottle_run):
    det, rgb, _ = bottle_run
    bad = {
        "two channels": rgb[:, :, :2],
        "4-D batch": rgb[None],
        "int32": rgb.astype(np.int32),
        "bool": rgb > 0,
    }
    for name, array in bad.items():
        with pytest.raises(ValueError, match="accepted: .*dtype uint8"):
            det.predict_image(array, name=name)
    with pytest.raises(DataError, match="float32 array without value_range.*1.0 or 255.0"):
        det.predict_image(rgb.astype(np.float32))
    with pytest.raises(DataError, match="channel_order 'rgba'"):
        det.predict_image(rgb, channel_order="rgba")
    with pytest.raises(DataError, match="NaN"):
        det.predict_image(np.full((8, 8), np.nan, np.float32), value_range=1.0)


def test_upload_scores_as_its_file(bottle_run, bottle):
    from adtr.serve import score_upload

    det, rgb, tmp = bottle_run
    path = bottle / "test" / "good" / "000.png"
    answer = score_upload(det, "000.png", path.read_bytes(), max_pixels=10**8)
    assert answer["anomaly_score"] == pytest.approx(_file_score(det, path), abs=1e-5)
    assert answer["anomaly_score"] == pytest.approx(det.predict_image(rgb).anomaly_score, abs=1e-5)
    assert (answer["width"], answer["height"]) == (900, 900)


# -- kind 3: mask folders of other tools are never defect types, and are named -------------


def _labelled(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_png(root / "good" / f"{i:03d}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        write_png(root / "crack" / f"{i:03d}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255
        write_png(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


@pytest.mark.parametrize("layout", ["mask", "masks/crack", "labels"])
def test_mask_folders_are_never_defect_types(tmp_path, caplog, layout):
    from adtr.data.folder import has_masks, labelled_folder

    root = _labelled(tmp_path / "data")
    (root / "ground_truth").rename(tmp_path / "moved")
    (root / layout).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "moved" / "crack").rename(root / layout)
    samples = labelled_folder(root)
    assert len(samples) == 6 and {s.defect for s in samples} == {"good", "crack"}
    assert not has_masks(samples)
    top = root / layout.split("/")[0]
    assert f"{top}: holds masks, not test images: skipped" in caplog.text
    assert "pixel metrics are skipped" in caplog.text and "ground_truth/<defect>/<name>_mask.png" in caplog.text


def test_mask_folder_beside_ground_truth_is_skipped_quietly_for_pixels(tmp_path, caplog):
    from adtr.data.folder import has_masks, labelled_folder

    root = _labelled(tmp_path / "data")
    write_png(root / "mask" / "000_mask.png", np.zeros((16, 16), np.uint8))
    samples = labelled_folder(root)
    assert has_masks(samples) and len(samples) == 6
    assert "skipped (masks are read from" in caplog.text


def test_near_miss_mask_names_get_a_hint(tmp_path):
    from adtr.data.folder import labelled_folder

    root = _labelled(tmp_path / "data")
    gt = root / "ground_truth" / "crack"
    (gt / "001_mask.png").rename(gt / "001.png")
    with pytest.raises(DataError, match=r"001.png: no mask .*found 001.png; expected 001_mask.png"):
        labelled_folder(root)
    (gt / "001.png").rename(gt / "001_mask.bmp")  # another image extension is a mask too
    assert {s.mask_path.name for s in labelled_folder(root) if s.label} == {"000_mask.png", "001_mask.bmp",
                                                                          "002_mask.png"}  # fmt: skip


def test_test_without_masks_says_pixel_metrics_are_skipped(tiny_run, tmp_path, caplog):
    det = tiny_run[0]
    root = _labelled(tmp_path / "data")
    (root / "ground_truth").rename(root / "mask")
    result = det.test(root)
    assert result["n_images"] == 6 and "pixel_auroc" not in result
    assert "no masks found" in result["skipped_metrics"]["pixel_auroc"]
    assert "pixel AUROC not computed: no masks found" in caplog.text


# -- kind 5: one-sided test sets and empty masks: each skipped metric is named, with why ----


@pytest.fixture(scope="module")
def bottle_run_dir(bottle_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("bottle_run")
    bottle_run[0].save(run)
    return run


@pytest.mark.parametrize("side", ["good", "broken_large"])
def test_one_sided_test_set_names_each_skipped_metric(bottle, bottle_run_dir, tmp_path, run_cli, caplog, side):
    import json

    data = tmp_path / "one_sided"
    (data / side).mkdir(parents=True)
    for f in sorted((bottle / "test" / side).glob("*.png"))[:2]:
        shutil.copy(f, data / side / f.name)
    code, out, err = run_cli("test", bottle_run_dir, data, "--json", tmp_path / "m.json", "--quiet")
    assert code == 0, err
    err = caplog.text  # the CLI's log lines (stderr in a real run)
    doc = json.loads((tmp_path / "m.json").read_text())
    skipped = doc["skipped_metrics"]
    n_good, n_bad = (2, 0) if side == "good" else (0, 2)
    why = f"it needs both good and anomalous images; the test data has {n_good} good and {n_bad} anomalous"
    assert skipped["image_auroc"] == why and skipped["image_f1_max"] == why
    assert f"image AUROC not computed: {why}" in err and f"image F1-max not computed: {why}" in err
    missing = "detection_rate_at_threshold" if side == "good" else "false_alarm_rate_at_threshold"
    assert missing in skipped and missing not in doc
    assert "pixel_auroc" in skipped and "aupro" in skipped and "pixel AUROC not computed" in err


def test_empty_masks_are_named_and_counted(bottle, bottle_run, tmp_path, caplog):
    det = bottle_run[0]
    data = tmp_path / "labelled"
    names = sorted(p.name for p in (bottle / "test" / "broken_large").glob("*.png"))[:3]
    (data / "good").mkdir(parents=True)
    shutil.copy(bottle / "test" / "good" / "000.png", data / "good" / "000.png")
    (data / "broken_large").mkdir()
    (data / "ground_truth" / "broken_large").mkdir(parents=True)
    for n in names:
        shutil.copy(bottle / "test" / "broken_large" / n, data / "broken_large" / n)
        mask = bottle / "ground_truth" / "broken_large" / n.replace(".png", "_mask.png")
        shutil.copy(mask, data / "ground_truth" / "broken_large" / mask.name)
    empty = data / "ground_truth" / "broken_large" / names[0].replace(".png", "_mask.png")
    Image.new("L", Image.open(empty).size).save(empty)
    result = det.test(data)
    assert "pixel_auroc" in result
    assert result["empty_masks"] == [str(data / "broken_large" / names[0])]
    assert result["pixel_metrics_note"].startswith("1 of 3 anomalous images have empty masks")
    assert f"{data / 'broken_large' / names[0]}: anomalous image with an empty (all black) mask" in caplog.text


# -- kind 6: one pixel limit, from the header, named in the message; bounded decoding ------


def test_pixel_limit_is_ours_and_checked_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    import adtr.data.images as images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit far below ours
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "5000")
    ok = write_png(tmp_path / "ok.png", np.zeros((60, 60), np.uint8))  # 3600 px: over Pillow's 2x, under ours
    assert read_image(ok).shape == (60, 60, 3)
    big = write_png(tmp_path / "big.png", np.zeros((80, 80), np.uint8))

    def no_decoding(self):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    message = "big.png: image of 80x80 = 6400 pixels .* exceeds the limit of 5000 pixels .*ADTR_MAX_PIXELS"
    with pytest.raises(images.ImageTooLarge, match=message):
        read_image(big)
    with pytest.raises(images.ImageTooLarge, match="exceeds the limit of 100 pixels"):
        read_image(big, data=big.read_bytes(), max_pixels=100)
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(DataError, match="ADTR_MAX_PIXELS='lots'"):
        read_image(ok)


def test_cli_and_service_pixel_limits(tiny_run, tmp_path, run_cli, monkeypatch, caplog):
    from adtr.data.images import PIXEL_LIMIT_ENV
    from adtr.serve import SERVICE_MAX_PIXELS, score_upload, service_pixel_limit

    det, run, files = tiny_run
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "1")  # the CLI sets it: monkeypatch restores the value from before
    code, out, err = run_cli("predict", run, files[0], "--out", tmp_path / "p", "--quiet", "--max-pixels", "1000")
    assert code == 1 and "64x64 = 4096 pixels (0.0 MP) exceeds the limit of 1000 pixels" in caplog.text
    monkeypatch.delenv(PIXEL_LIMIT_ENV, raising=False)
    assert service_pixel_limit() == SERVICE_MAX_PIXELS < 100_000_000
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "2000")
    assert service_pixel_limit() == 2000 and service_pixel_limit(3000) == 3000
    from adtr.data.images import ImageTooLarge

    with pytest.raises(ImageTooLarge, match="exceeds the limit of 2000 pixels"):
        score_upload(det, "x.png", files[0].read_bytes(), service_pixel_limit())


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_decode_for_model_equals_read_then_resize(tmp_path, mode):
    from adtr.data.images import decode_for_model
    from adtr.data.transforms import resize_image

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 255, (37, 53, 4), dtype=np.uint8)
    im = Image.fromarray(rgba)
    if mode == "I;16":
        im = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    else:
        im = im.convert(mode)
    im.save(tmp_path / "x.png")
    tensor, original = decode_for_model(tmp_path / "x.png", (32, 64))
    assert original == (37, 53) and tensor.shape == (3, 32, 64)
    assert (tensor == resize_image(read_image(tmp_path / "x.png"), (32, 64))).all()


def test_predict_keeps_no_full_size_image_unless_asked(tiny_run):
    det, _, files = tiny_run
    preds = list(det.iter_predict(files[:2]))
    assert all(p.image is None and p.anomaly_map.shape == (64, 64) for p in preds)
    kept = list(det.iter_predict(files[:2], keep_images=True))
    assert [p.anomaly_score for p in kept] == [p.anomaly_score for p in preds]
    assert kept[0].image.shape == (64, 64, 3)
