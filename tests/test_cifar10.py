"""CIFAR-10: the official pickled batches (restricted unpickler), folders, the one-class split."""

import pickle
import tarfile

import numpy as np
import pytest

from adtr.data.cifar10 import CLASSES, load_cifar10, read_batch
from adtr.data.images import DataError
from adtr.data.splits import split_per_class
from adtr.oneclass import one_class_split, read_small_images


def _batch(n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    flat = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # the official row layout: RRR..GGG..BBB
    d = {b"batch_label": b"test", b"labels": labels.tolist(), b"data": flat, b"filenames": [b"x.png"] * n}
    return d, images, labels


@pytest.fixture
def official(tmp_path):
    """A miniature cifar-10-python.tar.gz written in the official format."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d, images, labels = _batch(4, i)
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
        split = "test" if name == "test_batch" else "train"
        expected[split][0].append(images)
        expected[split][1].append(labels)
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return tmp_path, tarball, {k: (np.concatenate(a), np.concatenate(b)) for k, (a, b) in expected.items()}


def test_reads_official_batches_exactly(official):
    root, tarball, expected = official
    for source in (root, root / "cifar-10-batches-py", tarball):
        for split in ("train", "test"):
            images, labels = load_cifar10(source, split)
            np.testing.assert_array_equal(images, expected[split][0])
            np.testing.assert_array_equal(labels, expected[split][1])
    assert load_cifar10(tarball, "train")[0].shape == (20, 32, 32, 3)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/adtr_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    payload = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    with pytest.raises(DataError, match="posix.system|os.system|not allowed"):
        read_batch(payload, "evil_batch")
    import os

    assert not os.path.exists("/tmp/adtr_pwned")
    with pytest.raises(DataError, match="refused"):
        read_batch(pickle.dumps(eval, protocol=2), "builtin")
    with pytest.raises(DataError):
        read_batch(b"garbage", "garbage")


def test_image_folder_form(tmp_path):
    from conftest import write_png

    for split in ("train", "test"):
        for i, name in enumerate(CLASSES):
            write_png(tmp_path / split / name / "0000.png", np.full((32, 32, 3), i, np.uint8))
    images, labels = load_cifar10(tmp_path, "test")
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))
    assert (images[3] == 3).all()


def test_one_class_split():
    train = np.array([0, 1, 2, 1, 1, 0])
    test = np.array([1, 0, 1, 2])
    idx, targets = one_class_split(train, test, normal_class=1)
    assert idx.tolist() == [1, 3, 4] and (train[idx] == 1).all()
    assert targets.tolist() == [0, 1, 0, 1]


def test_per_class_hold_out_takes_the_last_share_of_each_class():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 2])
    kept, held = split_per_class(labels, fraction=0.4)
    assert held.tolist() == [6, 7, 8, 9, 11] and kept.tolist() == [0, 1, 2, 3, 4, 5, 10]


def test_small_images_are_files_resized_as_the_model_input_is(tmp_path):
    from conftest import write_png

    from adtr.data.images import read_image
    from adtr.data.samples import Sample
    from adtr.data.transforms import resize_image

    rng = np.random.default_rng(0)
    paths = [write_png(tmp_path / f"{i}.png", rng.integers(0, 256, (50, 70, 3), np.uint8)) for i in range(3)]
    small = read_small_images([Sample(p, 1) for p in paths], (32, 32))
    assert small.shape == (3, 32, 32, 3) and small.dtype == np.uint8
    assert (small[1] == resize_image(read_image(paths[1]), (32, 32)).permute(1, 2, 0).numpy()).all()


@pytest.mark.slow
def test_tiny_one_class_run_beats_chance(bottle):
    """Few images, few epochs, from the JPEG copy: ADTR separates airplane from the others."""
    import torch

    from adtr.config import ModelConfig, ScoreConfig, TrainConfig
    from adtr.model import ADTR
    from adtr.oneclass import array_features, run_class

    root = bottle.parents[1] / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip("cifar10-jpeg not found")
    from adtr.data.images import read_image

    def take(split: str, per_class: int):
        images, labels = [], []
        for i, name in enumerate(CLASSES):
            for p in sorted((root / split / name).iterdir())[:per_class]:
                images.append(read_image(p))
                labels.append(i)
        return np.stack(images), np.array(labels)

    train_images, train_labels = take("train", 60)
    test_images, test_labels = take("test", 20)
    cfg = ModelConfig(image_size=(64, 64), strides=(2, 4, 8, 16, 32), hidden_dim=64, num_encoder_layers=1,
                      num_decoder_layers=1, num_heads=4, ffn_dim=128)  # fmt: skip
    extractor = ADTR(cfg)
    dev = torch.device("cpu")
    tr = array_features(extractor, train_images, dev, progress=False)
    te = array_features(extractor, test_images, dev, progress=False)
    result = run_class(0, tr, train_labels, [te], test_labels, cfg, ScoreConfig(image_score="mean", smoothing_sigma=0),
                       TrainConfig(epochs=5, batch_size=16, lr=1e-3), dev)  # fmt: skip
    assert result["n_train"] == 60
    assert result["auroc"] > 0.6, result
    assert result["auroc"] == result["auroc_plain"]  # one view: the mean over views is the plain score


def test_fashion_mnist_idx_reader_reads_a_written_file_exactly(tmp_path):
    """External anomalies for the protocol come from Debian's Fashion-MNIST idx files."""
    import gzip
    import struct
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from fashion_mnist import read_idx_images

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, 3, 28, 28) + images.tobytes())
    np.testing.assert_array_equal(read_idx_images(path), images)
    bad = tmp_path / "labels-idx1-ubyte"
    bad.write_bytes(struct.pack(">IIII", 2049, 3, 28, 28) + images.tobytes())
    with pytest.raises(ValueError, match="not an idx3 image file"):
        read_idx_images(bad)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(struct.pack(">IIII", 2051, 4, 28, 28) + images.tobytes())
    with pytest.raises(ValueError, match="the header says 4x28x28"):
        read_idx_images(short)


def test_test_views_are_the_image_its_mirror_and_shifts():
    from adtr.oneclass import scoring_views

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    assert [len(scoring_views(images, v)) for v in ("none", "flip", "flip-shift")] == [1, 2, 10]
    views = scoring_views(images, "flip-shift", shift=2)
    assert all(v.shape == images.shape and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[0], images)
    np.testing.assert_array_equal(views[1], images[:, :, ::-1])
    # views[2]: moved up by 2 rows, the bottom rows reflected in.
    np.testing.assert_array_equal(views[2][:, :6], images[:, 2:])
    np.testing.assert_array_equal(views[2][:, 6], images[:, 6])
    # views[5]: moved right by 2 columns.
    np.testing.assert_array_equal(views[5][:, :, 2:], images[:, :, :6])
    # views[6..9] are the mirror image's shifts.
    np.testing.assert_array_equal(views[6][:, :6], images[:, 2:, ::-1])
    with pytest.raises(ValueError, match="unknown test views"):
        scoring_views(images, "rotate")


@pytest.mark.slow
def test_protocol_runner_end_to_end_writes_views_and_baseline(tmp_path):
    """bench/cifar10.py on a miniature folder copy: one class, test views, k-NN side by side."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_png

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for name in CLASSES:
            for k in range(n):
                write_png(tmp_path / "data" / split / name / f"{k}.png", rng.integers(0, 256, (32, 32, 3), np.uint8))
    out = tmp_path / "out" / "cifar"
    bench = Path(__file__).resolve().parents[1] / "bench" / "cifar10.py"
    subprocess.run([sys.executable, str(bench), "--root", str(tmp_path / "data"), "--classes", "airplane",
                    "--epochs", "1", "--image-size", "32", "--hidden-dim", "16", "--layers", "1",
                    "--json", str(out.with_suffix(".json"))], check=True, capture_output=True)  # fmt: skip
    doc = json.loads(out.with_suffix(".json").read_text())
    (r,) = doc["results"]
    assert r["class_name"] == "airplane" and r["n_train"] == 4 and r["views"] == 10
    for key in ("auroc", "auroc_plain", "knn_auroc", "knn_auroc_views"):
        assert 0.0 <= r[key] <= 1.0
    assert doc["args"]["test_views"] == "flip-shift"
    assert "k-NN, views" in out.with_suffix(".md").read_text()
