"""Streaming predict: each file decoded once, results on disk as each image finishes, resume."""

from __future__ import annotations

import csv
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr import ADTRDetector
from adtr.data.prefetch import map_ahead
from adtr.data.samples import Sample
from adtr.engine import predict_samples
from adtr.outputs import collect_images, output_names, predict_to_folder


@pytest.fixture
def opened(monkeypatch) -> Counter:
    """Counts PIL.Image.open calls per file name."""
    counts: Counter = Counter()
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        if isinstance(fp, (str, Path)):
            counts[Path(fp).name] += 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return counts


def _csv_rows(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_iter_predict_matches_batched_inference(tiny_run):
    _, run, files = tiny_run
    det = ADTRDetector.load(run, progress=False, backend="torch")  # bit-equal to the batched PyTorch path
    ref = predict_samples(det.model_, [Sample(f, 0) for f in files], det.device, 3, progress=False)
    preds = list(det.iter_predict(files, batch_size=3))
    assert [p.path for p in preds] == [str(f) for f in files]
    assert np.array_equal(np.array([p.anomaly_score for p in preds]), ref.scores)
    assert all(p.anomaly_map.shape == (64, 64) and p.image is None for p in preds)
    assert [p.anomaly_score for p in det.predict(files, batch_size=5)] == [p.anomaly_score for p in preds]


def test_each_file_is_opened_once(tiny_run, tmp_path, opened):
    det, _, files = tiny_run
    summary = predict_to_folder(det, files, tmp_path / "out", batch_size=3)
    assert len(summary.rows) == len(files)
    assert opened == Counter({f.name: 1 for f in files})
    assert len(list((tmp_path / "out" / "heatmaps").glob("*.png"))) == len(files)


def test_interrupted_predict_keeps_finished_results_and_resumes(tiny_run, tmp_path, opened):
    det, run, files = tiny_run
    out, k = tmp_path / "out", 3

    def stop_after_k(row: dict) -> None:
        if len(_csv_rows(out)) == k:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(det, files, out, batch_size=2, on_result=stop_after_k)
    rows = _csv_rows(out)
    assert [r["path"] for r in rows] == [str(f) for f in files[:k]]
    assert len((out / "scores.jsonl").read_text().splitlines()) == k
    # every finished row's heatmap is written; the writer thread may have finished a few more
    # (at most a batch), which the resumed run writes again
    written = {p.name for p in (out / "heatmaps").iterdir()}
    assert {f"{f.stem}.png" for f in files[:k]} <= written <= {f"{f.stem}.png" for f in files[: k + 2]}
    for r in rows:
        assert Path(r["heatmap"]).is_file()
    # a row cut short by the kill is dropped and its image scored again
    with open(out / "scores.jsonl", "a") as f:
        f.write('{"path": "' + str(files[k]) + '", "anomaly_sc')

    opened.clear()
    summary = predict_to_folder(det, files, out, batch_size=2, resume=True)
    assert summary.skipped == k
    assert sorted(opened) == sorted(f.name for f in files[k:])  # finished images are not read again
    assert [r["path"] for r in _csv_rows(out)] == [str(f) for f in files]
    jsonl = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["path"] for r in jsonl] == [str(f) for f in files]
    doc = json.loads((out / "scores.json").read_text())
    assert [r["path"] for r in doc["predictions"]] == [str(f) for f in files] and doc["failed"] == []
    assert len(list((out / "heatmaps").iterdir())) == len(files)


def test_without_resume_earlier_scores_are_replaced(tiny_run, tmp_path):
    det, _, files = tiny_run
    predict_to_folder(det, files[:2], tmp_path, heatmaps=False)
    summary = predict_to_folder(det, files[2:4], tmp_path, heatmaps=False)
    assert summary.skipped == 0
    assert [r["path"] for r in _csv_rows(tmp_path)] == [str(f) for f in files[2:4]]
    assert "heatmap" not in _csv_rows(tmp_path)[0]
    summary = predict_to_folder(det, files[3:5], tmp_path, heatmaps=False, resume=True)
    assert summary.skipped == 1  # files[3] is done; files[2] was not asked for: its row goes
    assert [r["path"] for r in _csv_rows(tmp_path)] == [str(f) for f in files[3:5]]


def test_cli_predict_resume_and_failures(tiny_run, tmp_path, run_cli, caplog):
    _, run, files = tiny_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    code, stdout, _ = run_cli("predict", run, *files, bad, "--out", out, "--quiet")
    assert code == 1 and "broken.png: not an image file" in caplog.text  # reported, the rest scored
    assert f"scored {len(files)} images" in stdout and "1 failed" in stdout
    doc = json.loads((out / "scores.json").read_text())
    assert len(doc["predictions"]) == len(files) and doc["failed"][0]["path"] == str(bad)
    code, stdout, _ = run_cli("predict", run, *files, "--out", out, "--resume", "--quiet")
    assert code == 0 and f"{len(files)} already done" in stdout


def test_cli_onnx_with_torch_backend_is_refused(tiny_run, tmp_path, run_cli):
    _, run, files = tiny_run
    code, _, err = run_cli("predict", run, files[0], "--out", tmp_path, "--backend", "torch", "--onnx", "m.onnx")
    assert code == 2 and "--onnx" in err
    code, _, err = run_cli("predict", run, files[0], "--out", tmp_path, "--onnx", tmp_path / "none.onnx", "--quiet")
    assert code == 2 and "none.onnx: ONNX model not found" in err


def test_folders_follow_the_data_layout_rules(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    for rel in ["a/1.png", "a/b/2.png", "ground_truth/x/1_mask.png", ".hidden.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("x")
    files = collect_images([tmp_path])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/1.png", "a/b/2.png"]
    assert output_names(files) == ["1", "b__2"]


def test_heatmap_names_stay_unique_and_files_are_scored_once(tmp_path):
    from adtr.outputs import collect_images, output_names

    a = tmp_path / "imgs" / "a"
    a.mkdir(parents=True)
    for name in ("x.png", "x.jpg", "y.png"):
        (a / name).write_bytes(b"not decoded here")
    files = collect_images([a, a / "x.png"])
    assert sorted(f.name for f in files) == ["x.jpg", "x.png", "y.png"]  # x.png named twice, kept once
    names = output_names(files)
    assert len(set(names)) == 3 and "y" in names


def test_map_ahead_keeps_order_and_works_one_chunk_ahead():
    started: list[int] = []
    second_chunk = threading.Event()

    def square(x: int) -> int:
        started.append(x)  # list.append is atomic under the GIL
        if x == 3:
            second_chunk.set()
        return x * x

    chunks = map_ahead(square, list(range(7)), chunk_size=3)
    chunk, results = next(chunks)
    assert list(chunk) == [0, 1, 2] and results == [0, 1, 4]
    assert second_chunk.wait(10)  # while the caller holds chunk 0, chunk 1 is computed ...
    assert max(started) <= 5  # ... and nothing beyond it: memory stays bounded
    assert [(list(c), r) for c, r in chunks] == [([3, 4, 5], [9, 16, 25]), ([6], [36])]


def test_map_ahead_raises_in_order_and_stops_early():
    def fail_on_4(x: int) -> int:
        if x == 4:
            raise ValueError("item 4")
        return x

    chunks = map_ahead(fail_on_4, list(range(9)), chunk_size=2)
    assert next(chunks)[1] == [0, 1] and next(chunks)[1] == [2, 3]
    with pytest.raises(ValueError, match="item 4"):
        next(chunks)
    early = map_ahead(fail_on_4, list(range(100)), chunk_size=2)
    assert next(early)[1] == [0, 1]
    early.close()  # the caller stops: no hang, chunks not started are cancelled
    with pytest.raises(ValueError, match="chunk_size"):
        next(map_ahead(fail_on_4, [1], chunk_size=0))


def test_next_batch_is_decoded_while_this_one_is_scored(tiny_run, monkeypatch):
    import adtr.predict as predict

    _, run, files = tiny_run
    det = ADTRDetector.load(run, progress=False, backend="torch")
    second_batch = threading.Event()
    real_decode = predict.decode_for_model

    def decode(path, *args, **kwargs):
        if Path(path) in files[2:4]:
            second_batch.set()
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(predict, "decode_for_model", decode)
    overlapped = []

    def backend(images):  # the model: on its first batch, waits for the second batch's decoding to start
        overlapped.append(second_batch.wait(10))
        return det.model_(images)

    preds = list(predict.iter_predictions(backend, files[:6], (64, 64), det.device, det.thresholds_, batch_size=2,
                                          progress=False))  # fmt: skip
    assert overlapped == [True, True, True]
    assert [p.path for p in preds] == [str(f) for f in files[:6]]
    ref = det.predict(files[:6], batch_size=2)
    assert [p.anomaly_score for p in preds] == [p.anomaly_score for p in ref]


def test_a_failed_heatmap_write_stops_predict_before_its_row(tiny_run, tmp_path, monkeypatch):
    """Heatmaps are written in a thread: its error surfaces in predict, and no row claims an
    image whose heatmap was not written."""
    from adtr import outputs

    det, _, files = tiny_run
    write = outputs._write_heatmap

    def full_disk(target, *args):
        if target.stem == files[1].stem:
            raise OSError(28, "No space left on device")
        write(target, *args)

    monkeypatch.setattr(outputs, "_write_heatmap", full_disk)
    with pytest.raises(OSError, match="No space left"):
        predict_to_folder(det, files, tmp_path / "out", batch_size=2)
    assert [r["path"] for r in _csv_rows(tmp_path / "out")] == [str(files[0])]
