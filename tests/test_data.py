"""Image decoding, masks and the MVTec / plain-folder layouts."""

import numpy as np
import pytest
from conftest import write_png
from PIL import Image

from adtr.data import mvtec
from adtr.data.folder import has_masks, labelled_folder
from adtr.data.images import DataError, read_image, read_mask
from adtr.data.transforms import resize_image, resize_map


def test_modes_convert_to_rgb_uint8(tmp_path):
    gray = write_png(tmp_path / "g.png", np.full((5, 7), 200, np.uint8))
    a = read_image(gray)
    assert a.shape == (5, 7, 3) and a.dtype == np.uint8 and (a == 200).all()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    rgba[0, 0, 3] = 0  # fully transparent pixel -> black
    a = read_image(write_png(tmp_path / "a.png", rgba))
    assert a[1, 1].tolist() == [255, 0, 0] and a[0, 0].tolist() == [0, 0, 0]
    p = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).convert("P")
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (4, 4, 3)


def test_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    a = read_image(tmp_path / "d.png")
    assert a[0, 0, 0] == 0 and a[0, 1, 0] == 255 and a[1, 0, 0] == 128


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png.*0 bytes"):
        read_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.png.*not an image"):
        read_image(text)
    good = write_png(tmp_path / "ok.png", np.zeros((64, 64, 3), np.uint8) + 7)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="cut.png"):
        read_image(cut)


def test_mask_of_wrong_size_is_an_error(tmp_path):
    m = write_png(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="mask is 4x4 but its image is 5x4"):
        read_mask(m, (4, 5))
    assert read_mask(m, (4, 4)).dtype == bool


def test_plain_folder_layout(tiny_folder):
    train = mvtec.train_samples(tiny_folder)
    assert len(train) == 6 and all(s.label == 0 for s in train)
    test = mvtec.test_samples(tiny_folder)
    assert sorted(s.label for s in test) == [0] * 6 + [1] * 2
    assert has_masks(test)
    assert all(s.mask_path.name.endswith("_mask.png") for s in test if s.label)


def test_missing_mask_is_named(tiny_folder):
    (tiny_folder / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="001.png: no mask"):
        labelled_folder(tiny_folder)


def test_folder_without_masks_gives_image_labels_only(tiny_folder):
    import shutil

    shutil.rmtree(tiny_folder / "ground_truth")
    test = labelled_folder(tiny_folder)
    assert not has_masks(test) and sum(s.label for s in test) == 2


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        mvtec.train_samples(tmp_path / "nope")
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="without train/good"):
        mvtec.train_samples(tmp_path / "cat")
    (tmp_path / "cat" / "train" / "good").mkdir()
    (tmp_path / "cat" / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        mvtec.train_samples(tmp_path / "cat")


def test_mvtec_bottle_layout(bottle):
    train = mvtec.train_samples(bottle)
    test = mvtec.test_samples(bottle)
    assert len(train) == 209
    assert len(test) == 83 and sum(s.label for s in test) == 63
    assert {s.defect for s in test} == {"good", "broken_large", "broken_small", "contamination"}
    assert has_masks(test)


def test_resize_helpers():
    img = np.zeros((10, 20, 3), np.uint8)
    t = resize_image(img, (32, 64))
    assert t.shape == (3, 32, 64) and t.dtype.is_floating_point
    m = resize_map(np.ones((8, 8), np.float32), (17, 33))
    assert m.shape == (17, 33) and np.allclose(m, 1)


def test_kshot_split_never_leaks_training_anomalies(bottle):
    from adtr.data.splits import kshot_split

    test = mvtec.test_samples(bottle)
    remaining5 = None
    for k in (1, 3, 5):
        train, remaining = kshot_split(test, k, seed=0, pool_size=5)
        assert len(train) == 3 * k and all(s.label == 1 for s in train)
        assert {s.path for s in train}.isdisjoint({s.path for s in remaining})
        assert len(remaining) == len(test) - 15  # the whole pool of 5 per defect is held out
        assert [s.defect for s in train].count("contamination") == k
        remaining5 = remaining5 or [s.path for s in remaining]
        assert [s.path for s in remaining] == remaining5  # same test images for every k
    assert kshot_split(test, 3, seed=0)[0] == kshot_split(test, 3, seed=0)[0]
    assert kshot_split(test, 3, seed=0)[0] != kshot_split(test, 3, seed=1)[0]


def test_validation_split_is_seeded_and_disjoint():
    from adtr.data.splits import split_validation

    tr, va = split_validation(100, 0.1, seed=0)
    assert len(va) == 10 and not set(tr) & set(va) and len(tr) + len(va) == 100
    assert split_validation(100, 0.1, 0) == (tr, va) and split_validation(100, 0.1, 1) != (tr, va)
    assert split_validation(4, 0.5, 0) == ([0, 1, 2, 3], [])
