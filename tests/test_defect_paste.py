"""Masked defects pasted onto good images for the defect head (adtr/defect_paste.py), and the
fit and update paths that use them."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, write_png
from safetensors.torch import load_file, save_file
from test_defect_head import TRAIN, parts  # noqa: F401  (the fixture)

from adtr import ADTRDetector
from adtr import fit as fit_module
from adtr.checkpoint import CONFIG_FILE
from adtr.config import RunConfig, ScoreConfig, TrainConfig
from adtr.data.folder import anomaly_samples
from adtr.data.images import read_image
from adtr.data.mvtec import train_samples
from adtr.data.splits import split_validation
from adtr.data.transforms import resize_image
from adtr.defect_head import FEW_MASKED_SHARE, default_gain
from adtr.defect_paste import (
    AUTO_COPIES,
    BACKGROUNDS,
    MAX_PASTED,
    copies_for,
    defect_pixels,
    load_backgrounds,
    paste_copies,
    paste_defects,
)
from adtr.errors import RunFolderError
from adtr.replay import REPLAY_FILE


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 12x16 defect image whose every pixel differs (a ramp), its mask a 2x3 box at rows
    5-6, columns 9-11, and three constant backgrounds."""
    ramp = 100.0 + torch.arange(12 * 16, dtype=torch.float32).view(1, 12, 16) / 4
    image = torch.cat([ramp, ramp + 1, ramp + 2])[None]
    mask = torch.zeros(1, 12, 16)
    mask[0, 5:7, 9:12] = 1.0
    backgrounds = torch.stack([torch.full((12, 16, 3), v, dtype=torch.uint8) for v in (10, 20, 30)])
    return image, mask, backgrounds


def test_each_copy_moves_the_whole_defect_onto_a_background():
    image, mask, backgrounds = _scene()
    out, masks = paste_defects(image, mask, backgrounds, copies=12, seed=3)
    assert out.shape == (12, 3, 12, 16) and masks.shape == (12, 12, 16)
    places = set()
    for composite, m in zip(out, masks, strict=True):
        assert float(m.sum()) == 6.0  # the whole box, never cut at an edge
        ys, xs = torch.nonzero(m, as_tuple=True)
        y, x = int(ys.min()), int(xs.min())
        assert int(ys.max()) == y + 1 and int(xs.max()) == x + 2
        places.add((y, x))
        # the defect's own pixels, in their order, where the mask landed
        assert torch.equal(composite[:, y : y + 2, x : x + 3], image[0, :, 5:7, 9:12])
        outside = composite[:, m == 0]
        assert float(outside.min()) == float(outside.max()) and float(outside[0, 0]) in (10.0, 20.0, 30.0)
    assert len(places) > 3 and len({float(c[0, 0, 0]) for c in out}) > 1  # places and backgrounds vary
    again, _ = paste_defects(image, mask, backgrounds, copies=12, seed=3)
    other, _ = paste_defects(image, mask, backgrounds, copies=12, seed=4)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # many defects get fewer copies each, all of them together at most MAX_PASTED
    assert copies_for(10, 5) == 10 and copies_for(10, 100) == MAX_PASTED // 100 and copies_for(10, 10_000) == 1


def test_a_soft_mask_blends_and_empty_masks_or_missing_backgrounds_are_handled():
    image, mask, backgrounds = _scene()
    mask[0, 5, 9] = 0.25  # a pixel the defect covers a quarter of
    out, masks = paste_defects(image, mask, backgrounds[:1], copies=1, seed=0)
    ys, xs = torch.nonzero(masks[0] == 0.25, as_tuple=True)
    assert float(out[0, 0, ys[0], xs[0]]) == 10 * 0.75 + float(image[0, 0, 5, 9]) * 0.25
    empty, no_masks = paste_defects(image, torch.zeros(1, 12, 16), backgrounds, copies=5, seed=0)
    assert empty.shape == (0, 3, 12, 16) and no_masks.shape == (0, 12, 16)
    with pytest.raises(ValueError, match="no good images"):
        paste_defects(image, mask, backgrounds[:0], copies=1, seed=0)
    with pytest.raises(ValueError, match="do not match"):
        paste_defects(image, mask[:, :8], backgrounds, copies=1, seed=0)


def test_defect_pixels_and_backgrounds_are_read_at_the_input_size(parts, tmp_path):  # noqa: F811
    samples = anomaly_samples(parts / "defects")
    unmasked = dataclasses.replace(samples[0], mask_path=None)
    images, masks = defect_pixels([unmasked, *samples], (32, 48))
    assert images.shape == (5, 32, 48, 3) and masks.shape == (5, 32, 48)  # one row per sample, as replay.py keeps
    assert images.dtype == masks.dtype == torch.uint8
    assert not images[0].any() and not masks[0].any()  # without a mask: nothing to paste, the image not read
    assert torch.equal(images[1], resize_image(read_image(samples[0].path), (32, 48)).round().to(torch.uint8)
                       .permute(1, 2, 0))  # fmt: skip
    masks = masks[1:]
    # the first defect's mask covers rows 16-39 and columns 8-39 of 64x64: half of each side here
    assert torch.equal(masks[0] > 0, torch.zeros(32, 48, dtype=torch.bool).index_fill(0, torch.arange(8, 20), True)
                       & torch.zeros(32, 48, dtype=torch.bool).index_fill(1, torch.arange(6, 30), True))  # fmt: skip
    assert set(masks.unique().tolist()) == {0, 1}  # hard edges
    # a pit smaller than half an input pixel keeps the pixel it touches
    pit = np.zeros((64, 64), np.uint8)
    pit[33, 17] = 255
    write_png(tmp_path / "pit_mask.png", pit)
    _, small = defect_pixels([dataclasses.replace(samples[0], mask_path=tmp_path / "pit_mask.png")], (16, 16))
    assert small.sum() == 1 and small[0, 8, 4] == 1
    for i in range(BACKGROUNDS + 4):
        write_png(tmp_path / "good" / f"{i:03d}.png", np.full((20, 30, 3), i, np.uint8))
    goods = [dataclasses.replace(samples[0], path=p, mask_path=None, label=0)
             for p in sorted((tmp_path / "good").iterdir())]  # fmt: skip
    kept = load_backgrounds(goods, (10, 15), seed=0)
    assert kept.shape == (BACKGROUNDS, 10, 15, 3) and kept.dtype == torch.uint8
    values = [int(b[0, 0, 0]) for b in kept]
    assert values == sorted(values) and len(set(values)) == BACKGROUNDS  # a sample, in order, no repeats
    assert not torch.equal(kept, load_backgrounds(goods, (10, 15), seed=1))


def test_the_fit_pastes_each_masked_defect_and_an_update_pastes_onto_the_kept_backgrounds(parts, tmp_path):  # noqa: F811
    fits = {n: ADTRDetector(TINY, train=dataclasses.replace(TRAIN, head_paste=n), progress=False,
                            backend="torch").fit(parts / "train", anomalies=parts / "defects")
            for n in (0, 3)}  # fmt: skip
    assert fits[0].record_.provenance["data"]["head_pasted"] == 0
    assert fits[3].record_.provenance["data"]["head_pasted"] == 4 * 3  # 4 masked defects, 3 copies each
    w0, w3 = fits[0].model_.head_weight, fits[3].model_.head_weight
    apart = float((w0 - w3).abs().max())
    assert apart > 1e-3
    # the pasted copies fit the head only: the run keeps the 4 real defects
    assert len(fits[3].record_.replay.defects) == 4
    # an update pastes its new defects onto the parent's backgrounds, as a fit with them does
    base = ADTRDetector(TINY, train=dataclasses.replace(TRAIN, head_paste=3), progress=False, backend="torch")
    base.fit(parts / "train").save(tmp_path / "base")
    new = ADTRDetector.load(tmp_path / "base", progress=False, backend="torch").update(anomalies=parts / "defects")
    assert new.record_.provenance["update"]["head_pasted"] == 12
    # (the replay's float16 features move the head by about 1e-5 of its weights)
    assert float((new.model_.head_weight - w3).abs().max()) < apart / 100
    assert torch.equal(new.record_.replay.backgrounds, fits[3].record_.replay.backgrounds)
    # the backgrounds: the parent's training images (not its held-out ones) as the model sees them, in order
    parent = ADTRDetector.load(tmp_path / "base", progress=False, backend="torch")
    h, w = parent.model_.cfg.image_size
    samples = train_samples(parts / "train")
    training = [samples[i] for i in split_validation(len(samples), TRAIN.val_fraction, TRAIN.seed)[0]]
    kept = parent.record_.replay.backgrounds
    assert kept.dtype == torch.uint8 and kept.shape == (min(BACKGROUNDS, len(training)), h, w, 3)
    assert torch.equal(kept, load_backgrounds(training, (h, w), TRAIN.seed))
    first = resize_image(read_image(training[0].path), (h, w)).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(kept[0], first)
    recorded = parent.record_.provenance["replay"]
    assert recorded["backgrounds"] == len(kept) and recorded["background_bytes"] == len(kept) * h * w * 3
    # a parent saved before the backgrounds: its update fits the head on the defects alone
    path = tmp_path / "base" / REPLAY_FILE
    tensors = load_file(str(path))
    del tensors["backgrounds"]
    save_file(tensors, str(path))
    old = ADTRDetector.load(tmp_path / "base", progress=False, backend="torch").update(anomalies=parts / "defects")
    assert old.record_.provenance["update"]["head_pasted"] == 0
    assert float((old.model_.head_weight - w0).abs().max()) < apart / 100


def test_cross_fitted_folds_paste_onto_their_own_training_images(parts, monkeypatch):  # noqa: F811
    calls = []
    real = fit_module._pasted_pool

    def spy(model, samples, backgrounds, *args, **kwargs):
        calls.append(backgrounds)
        return real(model, samples, backgrounds, *args, **kwargs)

    monkeypatch.setattr(fit_module, "_pasted_pool", spy)
    train = dataclasses.replace(TRAIN, head_paste=2, calibration="crossfit", calibration_folds=2)
    det = ADTRDetector(TINY, train=train, progress=False, backend="torch").fit(parts / "train",
                                                                              anomalies=parts / "defects")  # fmt: skip
    assert det.thresholds_.source == "crossfit" and len(calls) == 3  # the final fit and 2 folds
    final, folds = calls[0], calls[1:]
    assert len(final) == BACKGROUNDS and all(len(f) == 8 for f in folds)  # 16 images, 8 trained in each fold
    # each fold's backgrounds are the images its model trained on: the two folds share none
    flat = [{bytes(b.numpy()) for b in f} for f in folds]
    assert not flat[0] & flat[1] and flat[0] | flat[1] == {bytes(b.numpy()) for b in final}


def test_the_default_pastes_only_where_the_parts_lie_anywhere(parts):  # noqa: F811
    assert [paste_copies(None, w) for w in (0.0, 0.25, 0.5, 1.0, None)] == [AUTO_COPIES, AUTO_COPIES, 0, 0, 0]
    assert paste_copies(3, 0.5) == 3 and paste_copies(0, 0.0) == 0  # a number is used as it is
    for weight, pasted in ((0.0, 4 * AUTO_COPIES), (0.5, 0)):  # the map's per-position weight, as a fit sets it
        det = ADTRDetector(TINY, ScoreConfig(map_position_weight=weight), train=TRAIN, progress=False,
                           backend="torch").fit(parts / "train", anomalies=parts / "defects")  # fmt: skip
        assert det.config.train.head_paste is None and det.record_.provenance["data"]["head_pasted"] == pasted
        assert (det.record_.replay.backgrounds is None) == (pasted == 0)


@pytest.mark.parametrize("chosen", [0.0, 1.0])
def test_auto_follows_the_weight_the_image_scorer_chooses_on_held_out_images(parts, monkeypatch, chosen):  # noqa: F811
    from adtr import model as model_module

    monkeypatch.setattr(model_module, "choose_position_weight", lambda train, held: chosen)
    scored = dataclasses.replace(TINY, image_scorer="cnn")
    det = ADTRDetector(scored, train=TRAIN, progress=False, backend="torch")
    det.fit(parts / "train", anomalies=parts / "defects")
    score = det.config.score
    assert det.model_.uses_image_scorer and score.scorer_position_weight == chosen
    assert score.map_position_weight == min(0.5, chosen)
    assert det.record_.provenance["data"]["head_pasted"] == (4 * AUTO_COPIES if chosen < 0.5 else 0)


def test_an_update_pastes_the_parents_defects_again_with_the_new_ones(parts, tmp_path):  # noqa: F811
    files = sorted((parts / "defects" / "spot").iterdir())
    for name, chosen in (("first", files[:2]), ("second", files[2:])):
        for f in chosen:
            shutil.copy(f, _mkdir(tmp_path / name / "spot") / f.name)
            mask = parts / "defects" / "ground_truth" / "spot" / f"{f.stem}_mask.png"
            shutil.copy(mask, _mkdir(tmp_path / name / "ground_truth" / "spot") / mask.name)
    train = dataclasses.replace(TRAIN, head_paste=3)
    both = ADTRDetector(TINY, train=train, progress=False, backend="torch")
    both.fit(parts / "train", anomalies=parts / "defects")
    parent = ADTRDetector(TINY, train=train, progress=False, backend="torch")
    parent.fit(parts / "train", anomalies=tmp_path / "first")
    assert parent.record_.provenance["data"]["head_pasted"] == 2 * 3
    parent.save(tmp_path / "parent")
    loaded = ADTRDetector.load(tmp_path / "parent", progress=False, backend="torch")
    images, masks = loaded.record_.replay.defect_pixels
    assert images.shape[0] == masks.shape[0] == 2 and images.dtype == torch.uint8 and masks.any()
    child = loaded.update(anomalies=tmp_path / "second")
    # the parent's 2 defects pasted again where they were, the 2 new ones beside: the head of a fit with all 4
    assert child.record_.provenance["update"]["head_pasted"] == 4 * 3
    # the head's weight counts masked defects, not their pasted copies: 2 give half weight; the
    # update's 2 more (4 in all, the parent's kept ones counted) give the full weight, as the fit with all 4
    rb = parent.model_.head_reads_bank
    assert parent.config.score.head_gain == default_gain(2, rb) == FEW_MASKED_SHARE * default_gain(3, rb)
    assert child.config.score.head_gain == both.config.score.head_gain == default_gain(4, rb)
    w_both, w_parent = both.model_.head_weight, parent.model_.head_weight
    assert float((child.model_.head_weight - w_both).abs().max()) < float((w_parent - w_both).abs().max()) / 100
    assert torch.equal(child.record_.replay.defect_pixels[1], both.record_.replay.defect_pixels[1])
    # corrupt pixels are refused, naming the file and the tensors
    path = tmp_path / "parent" / REPLAY_FILE
    tensors = load_file(str(path))
    save_file({**tensors, "defect_image_masks": tensors["defect_image_masks"][:1].contiguous()}, str(path))
    with pytest.raises(RunFolderError, match="invalid defect pixels"):
        ADTRDetector.load(tmp_path / "parent", progress=False)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_pasting_that_cannot_happen_is_said(parts, tmp_path, caplog):  # noqa: F811
    for f in sorted((parts / "defects" / "spot").iterdir()):
        shutil.copy(f, _mkdir(tmp_path / "unmasked" / "spot") / f.name)
    cases = (({"head_paste": 2, "labelled_anomalies": "loss"}, parts / "defects", "--head-paste 2 is ignored"),
             ({"head_paste": 2}, tmp_path / "unmasked", "no defect with a mask: nothing to paste"))  # fmt: skip
    for settings, anomalies, said in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="adtr"):
            det = ADTRDetector(TINY, train=dataclasses.replace(TRAIN, **settings), progress=False, backend="torch")
            det.fit(parts / "train", anomalies=anomalies)
        assert said in caplog.text and det.record_.provenance["data"]["head_pasted"] == 0


def test_head_paste_setting():
    assert TrainConfig().head_paste is None
    old = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]}, "score": {}, "train": {}})
    assert old.train.head_paste == 0  # runs saved before fitted the head on the defects alone
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="head paste"):
            TrainConfig(head_paste=bad)


def test_cli_head_paste_option(parts, tmp_path, run_cli, capsys):  # noqa: F811
    from adtr import cli

    parse = cli.build_parser().parse_args
    assert parse(["fit", "D", "--out", "R"]).head_paste is None
    assert parse(["fit", "D", "--out", "R", "--head-paste", "auto"]).head_paste is None
    assert parse(["fit", "D", "--out", "R", "--head-paste", "off"]).head_paste == 0
    assert parse(["fit", "D", "--out", "R", "--head-paste", "3"]).head_paste == 3
    for bad in ("-1", "1.5", "many"):
        with pytest.raises(SystemExit):
            parse(["fit", "D", "--out", "R", "--head-paste", bad])
        assert "'auto', 'off' or a whole number >= 0" in capsys.readouterr().err
    code, _, err = run_cli("fit", parts / "train", "--out", tmp_path / "run", "--image-size", "32", "--epochs", "1",
                           "--anomalies", parts / "defects", "--head-paste", "2", "--quiet")  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert doc["train"]["head_paste"] == 2 and doc["provenance"]["data"]["head_pasted"] == 4 * 2
