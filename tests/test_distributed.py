"""Several processes (adtr/distributed.py, adtr/sharding.py): splits, exact statistics, merged
outputs; with 2 gloo processes, a fit equal to one process's and a sharded predict equal to
one process's outputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file

from adtr import distributed
from adtr.checkpoint import trainable_state
from adtr.errors import SettingsError
from adtr.outputs import SCORES_JSON, SCORES_JSONL, collect_images, output_names, predict_to_folder
from adtr.sharding import PARTS, collect, part_dir


def test_blocks_cover_the_items_in_order_and_differ_by_at_most_one():
    for world in (1, 2, 3, 4):
        for n in range(12):
            blocks = [distributed.block(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert distributed.block(5) == range(5)  # one process: everything


def test_feature_statistics_from_block_sums_equal_those_of_all_features():
    g = torch.Generator().manual_seed(0)
    raw = 50 + 3 * torch.randn(11, 4, 3, 5, generator=g)  # a large mean: the sums must not cancel badly
    raw[:, 1] *= 0.01
    blocks = [raw[:2], raw[2:9], raw[9:]]  # uneven, as ranks' training images are
    mean, std = distributed.stats_from_sums(sum(distributed.channel_sums(b) for b in blocks))
    x = raw.double()
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(std, x.std(dim=(0, 2, 3)), rtol=1e-9, atol=0)
    # what an average of per-block means would give instead: wrong by far more than that
    averaged = torch.stack([b.double().mean(dim=(0, 2, 3)) for b in blocks]).mean(0)
    assert (averaged - mean).abs().max() > 1e-2


def test_rows_of_a_global_batch_carry_their_share_of_its_mean():
    ranks = []
    for r in range(2):
        dp = distributed.DataParallel(0, torch.device("cpu"))
        dp.rank, dp.world = r, 2
        ranks.append(dp)
    for n in (1, 2, 3, 7):
        parts = [dp.rows(n) for dp in ranks]
        assert sum(share for _, share in parts) == pytest.approx(1.0)
        covered = [i for rows, share in parts if share > 0 for i in range(n)[rows]]
        assert covered == list(range(n))
    assert ranks[0].rows(1) == (slice(0, 1), 0.0)  # no row of its own: a stand-in with weight 0
    assert ranks[1].rows(1) == (slice(0, 1), 1.0)
    assert ranks[0].scale(torch.tensor(2.0), 0.25).item() == 1.0  # DDP divides by the world size


def test_single_process_helpers_change_nothing(tmp_path):
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(x) is x and not distributed.active() and distributed.is_main()
    assert distributed.data_parallel(0, torch.device("cpu")) is None
    with distributed.files_from_main(tmp_path, ["a"]) as folder:
        assert folder == tmp_path


def test_backend_follows_the_device_unless_named(monkeypatch):
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")
    assert distributed.backend_for(torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv(distributed.BACKEND_ENV, "nccl")
    with pytest.raises(SettingsError, match="CUDA"):
        distributed.backend_for(torch.device("cpu"))
    monkeypatch.setenv(distributed.BACKEND_ENV, "mpi")
    with pytest.raises(SettingsError, match="ADTR_DIST_BACKEND=mpi"):
        distributed.backend_for(torch.device("cpu"))


def test_nproc_is_taken_out_of_what_each_process_runs():
    argv = ["fit", "data", "--nproc", "2", "--out", "r", "--nproc=3", "--seed", "1"]
    assert distributed.without_nproc(argv) == ["fit", "data", "--out", "r", "--seed", "1"]


def test_cli_under_torchrun_is_for_fit_and_predict(tiny_run, run_cli, monkeypatch, tmp_path):
    _, run, files = tiny_run
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli("test", run, files[0].parent.parent)
    assert code == 2 and "adtr test runs in one process" in err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as stop:  # argparse refuses it: one line, exit status 2
        run_cli("fit", files[0].parent.parent, "--out", tmp_path / "r", "--nproc", "0")
    assert stop.value.code == 2 and not (tmp_path / "r").exists()


def _write_part(folder: Path, rows: list[dict], failed: list[dict] | None = None, cut_short: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"path": "x' if cut_short else "")
    (folder / SCORES_JSONL).write_text(text)
    if failed is not None:
        (folder / SCORES_JSON).write_text(json.dumps({"run": None, "predictions": rows, "failed": failed}))


def test_parts_of_any_number_of_ranks_merge_in_file_order(tmp_path):
    files = [Path(f"img/{c}.png") for c in "abcdef"]

    def row(name: str) -> dict:
        return {"path": f"img/{name}.png", "anomaly_score": ord(name) / 100}

    _write_part(tmp_path, [row("e")])  # finished before, merged already
    _write_part(part_dir(tmp_path, 0), [row("c"), row("a"), row("e")], failed=[{"path": "img/b.png", "error": "x"}])
    _write_part(part_dir(tmp_path, 3), [row("b"), {"path": "elsewhere.png"}], cut_short=True)  # a run of 4 ranks
    _write_part(part_dir(tmp_path, 1), [], failed=[{"path": "img/f.png", "error": "unreadable"}])
    rows, failed = collect(tmp_path, files, heatmaps=False)
    assert [r["path"] for r in rows] == ["img/a.png", "img/b.png", "img/c.png", "img/e.png"]
    assert rows[0] == row("a")
    assert failed == [{"path": "img/f.png", "error": "unreadable"}]  # b failed once, then was scored


# -- two gloo processes -----------------------------------------------------------------
def _env() -> dict[str, str]:
    """The children import this checkout's adtr, one thread each (2 processes on 2 cores)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "ADTR_MALLOC": "default"}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mse", "hard"])  # hard: one quantile and one weight sum over both ranks
def test_two_processes_fit_what_one_process_fits_and_resume(bottle, tmp_path, loss):

    from distributed_worker import config_for

    from adtr.fit import fit_run

    config = config_for(loss)

    data = tmp_path / "data" / "train" / "good"
    data.mkdir(parents=True)
    for name in sorted(p.name for p in (bottle / "train" / "good").iterdir())[:8]:
        shutil.copy(bottle / "train" / "good" / name, data / name)
    data = data.parent.parent
    worker = Path(__file__).with_name("distributed_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           str(data), str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "ADTR_TEST_LOSS": loss}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    model, record = fit_run(config, data, torch.device("cpu"), progress=False)
    one, two = trainable_state(model), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    # Measured: at most 1e-5 apart (the cross-attention key bias, which gets no gradient, so Adam
    # scales summation noise); weighting each rank's loss equally instead of by its rows: 3e-3.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-4, msg=k)
    doc = json.loads((tmp_path / "two" / "config.json").read_text())
    assert doc["provenance"]["processes"] == 2
    for a, b in zip(record.history, doc["history"], strict=True):  # measured 5e-8 apart; equal weights: 4e-4
        assert a.keys() == b.keys() and "loss" in a  # 8 images: none held out, so no validation loss
        for key in {"loss", "val_loss", "lr"} & a.keys():
            assert b[key] == pytest.approx(a[key], rel=1e-5), key

    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(resumed[k], two[k]) for k in two), "the resumed 2-process fit differs"
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    writes = {json.loads((tmp_path / f"rank-{r}.json").read_text())["state_writes"] for r in (0, 1)}
    assert writes == {0, 3}  # rank 0 alone wrote the state: 2 epochs, then the last one


def test_one_process_resume_keeps_an_interrupted_sharded_runs_rows(tiny_run, tmp_path, run_cli):
    """`adtr predict --resume` in one process after a killed sharded run: the finished rows of
    OUT/parts count as done (not scored again) and OUT/parts is removed."""
    det, run, files = tiny_run
    out = tmp_path / "out"
    images = collect_images([files[0].parent])
    names = dict(zip(map(str, images), output_names(images), strict=True))
    predict_to_folder(det, images[3:5], out, names=names, scores_dir=part_dir(out, 1))  # rank 1 of a killed run
    code, stdout, err = run_cli("predict", run, files[0].parent, "--out", out, "--resume", "--backend", "torch",
                                "--quiet")  # fmt: skip
    assert code == 0, err
    assert "2 already done" in stdout and not (out / PARTS).exists()
    rows = _csv(out)
    # one process appends as images finish: the resumed rows first, then the rest in file order
    expected = [str(p) for p in images[3:5] + images[:3] + images[5:]]
    assert [r["path"] for r in rows] == expected and len(rows) == len(files)
    doc = json.loads((out / SCORES_JSON).read_text())
    assert [r["path"] for r in doc["predictions"]] == expected and doc["backend"] == "torch"


def _csv(out: Path) -> list[dict]:
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_predict_sharded_over_two_processes_writes_the_one_process_outputs(tiny_run, tmp_path, run_cli):
    det, run, files = tiny_run
    folder = tmp_path / "images"
    for i, f in enumerate(files):  # two sub-folders: heatmap names come from the whole list
        sub = folder / ("b" if i % 3 == 0 else "a")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f.name)
    (folder / "a" / "broken.png").write_bytes(b"not an image")
    # One thread, as each rank has: thread counts change float32 sums (2 threads: scores 1-2 ulp off).
    code, _, _ = run_cli("predict", run, folder, "--out", tmp_path / "one", "--quiet", "--threads", "1")
    assert code == 1  # the broken file

    # An earlier sharded run (4 ranks) was killed: rank 2 had finished two images, mid-row on a third.
    out = tmp_path / "two"
    images = collect_images([folder])
    names = dict(zip(map(str, images), output_names(images), strict=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the normalised score magnifies ulp differences
    try:
        predict_to_folder(det, images[:2], out, names=names, scores_dir=part_dir(out, 2))
    finally:
        torch.set_num_threads(threads)
    with open(part_dir(out, 2) / SCORES_JSONL, "a") as f:
        f.write('{"path": "cut sh')
    cmd = [sys.executable, "-m", "adtr", "predict", str(run), str(folder), "--out", str(out), "--nproc", "2",
           "--resume", "--quiet"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "2 already done" in p.stdout and "1 failed" in p.stdout

    assert not (out / PARTS).exists()
    one, two = _csv(tmp_path / "one"), _csv(out)
    assert [r["path"] for r in two] == [r["path"] for r in one] and len(one) == len(files)
    for a, b in zip(one, two, strict=True):
        # measured equal bit for bit; the issue asks for 1e-6
        assert float(b["anomaly_score"]) == pytest.approx(float(a["anomaly_score"]), rel=1e-6)
        # (score - low) / (image - low): 1e-6 of the score becomes 1e-6 x score / span here
        # (one calibration image: low and the threshold lie 2e-3 apart), on the two rows the
        # killed run's torch backend wrote beside the ranks' ONNX Runtime ones
        tol = 1e-6 * max(1.0, abs(float(a["anomaly_score"]))) / (det.thresholds_.image - det.thresholds_.low)
        assert float(b["normalized_score"]) == pytest.approx(float(a["normalized_score"]), abs=tol)
        assert (a["is_anomalous"], a["defect_boxes"]) == (b["is_anomalous"], b["defect_boxes"])
        assert Path(a["heatmap"]).name == Path(b["heatmap"]).name
    jsonl = [json.loads(line) for line in (out / SCORES_JSONL).read_text().splitlines()]
    assert [r["path"] for r in jsonl] == [r["path"] for r in two]
    one_doc, two_doc = (json.loads((d / SCORES_JSON).read_text()) for d in (tmp_path / "one", out))
    assert one_doc.keys() == two_doc.keys() and one_doc["backend"] == two_doc["backend"] != ""
    assert "backend onnx" in p.stdout or "backend torch" in p.stdout  # the sharded summary names it
    doc_one, doc_two = (json.loads((d / SCORES_JSON).read_text()) for d in (tmp_path / "one", out))
    assert doc_two["failed"] == doc_one["failed"] and len(doc_two["failed"]) == 1
    assert len(doc_two["predictions"]) == len(files)
    maps_one = sorted((tmp_path / "one" / "heatmaps").iterdir())
    assert [m.name for m in maps_one] == sorted(m.name for m in (out / "heatmaps").iterdir())
    for m in maps_one:
        a, b = np.asarray(Image.open(m)), np.asarray(Image.open(out / "heatmaps" / m.name))
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
