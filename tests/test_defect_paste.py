"""Masked defects pasted onto good images for the defect head (adtr/defect_paste.py), and the
fit and update paths that use them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY, write_png
from safetensors.torch import load_file, save_file
from test_defect_head import TRAIN, parts  # noqa: F401  (the fixture)

from adtr import ADTRDetector
from adtr.config import RunConfig, TrainConfig
from adtr.data.folder import anomaly_samples
from adtr.defect_paste import BACKGROUNDS, defect_pixels, load_backgrounds, paste_defects
from adtr.replay import REPLAY_FILE


def _scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 12x16 defect (value 200) whose mask is a 2x3 box, and three constant backgrounds."""
    image = torch.full((1, 3, 12, 16), 200.0)
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
        assert int(ys.max() - ys.min()) == 1 and int(xs.max() - xs.min()) == 2
        places.add((int(ys.min()), int(xs.min())))
        assert torch.all(composite[:, m > 0] == 200.0)  # the defect's pixels inside the mask
        outside = composite[:, m == 0]
        assert float(outside.min()) == float(outside.max()) and float(outside[0, 0]) in (10.0, 20.0, 30.0)
    assert len(places) > 3 and len({float(c[0, 0, 0]) for c in out}) > 1  # places and backgrounds vary
    again, _ = paste_defects(image, mask, backgrounds, copies=12, seed=3)
    other, _ = paste_defects(image, mask, backgrounds, copies=12, seed=4)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_a_soft_mask_blends_and_empty_masks_or_missing_backgrounds_are_handled():
    image, mask, backgrounds = _scene()
    mask[0, 5, 9] = 0.25  # a pixel the defect covers a quarter of
    out, masks = paste_defects(image, mask, backgrounds[:1], copies=1, seed=0)
    ys, xs = torch.nonzero(masks[0] == 0.25, as_tuple=True)
    assert float(out[0, 0, ys[0], xs[0]]) == 10 * 0.75 + 200 * 0.25
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
    assert images.shape == (4, 3, 32, 48) and masks.shape == (4, 32, 48)  # the unmasked sample is left out
    # the first defect's mask covers rows 16-39 and columns 8-39 of 64x64: half of each side here
    assert torch.equal(masks[0] > 0, torch.zeros(32, 48, dtype=torch.bool).index_fill(0, torch.arange(8, 20), True)
                       & torch.zeros(32, 48, dtype=torch.bool).index_fill(1, torch.arange(6, 30), True))  # fmt: skip
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
    # a parent saved before the backgrounds: its update fits the head on the defects alone
    path = tmp_path / "base" / REPLAY_FILE
    tensors = load_file(str(path))
    del tensors["backgrounds"]
    save_file(tensors, str(path))
    old = ADTRDetector.load(tmp_path / "base", progress=False, backend="torch").update(anomalies=parts / "defects")
    assert old.record_.provenance["update"]["head_pasted"] == 0
    assert float((old.model_.head_weight - w0).abs().max()) < apart / 100


def test_head_paste_setting():
    assert TrainConfig().head_paste == 10
    old = RunConfig.from_dict({"schema_version": 1, "model": {"image_size": [64, 64]}, "score": {}, "train": {}})
    assert old.train.head_paste == 0  # runs saved before fitted the head on the defects alone
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="head paste"):
            TrainConfig(head_paste=bad)
