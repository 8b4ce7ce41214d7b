"""Crash safety: a fit killed mid-run resumes to exactly the uninterrupted result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from adtr.checkpoint import STATE_DIR, STATE_JSON
from adtr.data import mvtec

FIT = ["--epochs", "12", "--image-size", "128", "--seed", "5", "--quiet", "--threads", "1"]


def _fit(data, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adtr.cli", "fit", str(data), "--out", str(out), *FIT, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_during_fit_then_resume_matches_uninterrupted(bottle, tmp_path):
    data = tmp_path / "data" / "good"
    data.mkdir(parents=True)
    for s in mvtec.train_samples(bottle)[:40]:
        shutil.copy(s.path, data / s.path.name)
    data = data.parent

    reference = tmp_path / "reference"
    p = _fit(data, reference)
    assert p.wait(timeout=600) == 0, p.stderr.read()

    run = tmp_path / "killed"
    p = _fit(data, run)
    state = run / STATE_DIR / STATE_JSON
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if state.is_file() and json.loads(state.read_text())["epoch"] >= 3:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait(timeout=60) == -signal.SIGKILL, "the fit finished before it could be killed"
    killed_at = json.loads(state.read_text())["epoch"]
    assert 3 <= killed_at < 12
    assert not (run / "config.json").exists()  # no half-made run folder

    again = subprocess.run([sys.executable, "-m", "adtr.cli", "fit", str(data), "--out", str(run), *FIT],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to silently restart

    p = _fit(data, run, "--resume")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert not (run / STATE_DIR).exists()
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    ha = json.loads((reference / "config.json").read_text())["history"]
    hb = json.loads((run / "config.json").read_text())["history"]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_resume_refuses_other_settings(tiny_run, tmp_path):
    import torch

    from adtr.checkpoint import CheckpointError, load_train_state, save_train_state
    from adtr.config import RunConfig

    det = tiny_run[0]
    opt = torch.optim.AdamW(det.model_.reconstructor.parameters())
    gen = torch.Generator().manual_seed(0)
    save_train_state(tmp_path, det.model_, opt, gen, 1, [{"loss": 1.0}], det.config)
    epoch, history = load_train_state(tmp_path, det.model_, opt, gen, det.config)
    assert epoch == 1 and history == [{"loss": 1.0}]
    # a state saved before a settings key existed (here the head's gain) resumes
    state = tmp_path / STATE_DIR / STATE_JSON
    doc = json.loads(state.read_text())
    del doc["config"]["score"]["head_gain"]
    doc["config"]["score"]["smoothing_sigma"] = 4.0  # the default when it was saved
    del doc["config"]["train"]["query_fallback"]
    del doc["config"]["train"]["step_pixels"]  # read as off: at this 64x64 input the same plan
    del doc["config"]["train"]["head_paste"]  # read as 0: the head is fitted after training
    state.write_text(json.dumps(doc))
    assert load_train_state(tmp_path, det.model_, opt, gen, det.config)[0] == 1
    # ... where the input is larger than step_pixels the plan differs: refused, naming the options
    doc["config"]["train"]["epochs"] = None  # the budget in steps (epochs override both)
    state.write_text(json.dumps(doc))
    fewer = RunConfig.from_dict(det.config.to_dict())
    fewer.train.epochs, fewer.train.step_pixels = None, 1024  # 64x64 is 4096 pixels: a quarter of the steps
    steps = det.config.train.steps
    with pytest.raises(CheckpointError, match=rf"reconstructor_steps \(saved {steps}, now {-(-steps // 4)}\)"
                                              r".*resumes with --step-pixels off"):  # fmt: skip
        load_train_state(tmp_path, det.model_, opt, gen, fewer)
    fewer.train.step_pixels = None  # --step-pixels off: the old plan
    assert load_train_state(tmp_path, det.model_, opt, gen, fewer)[0] == 1
    doc["config"]["train"]["epochs"] = det.config.train.epochs
    state.write_text(json.dumps(doc))
    other = RunConfig.from_dict(det.config.to_dict())
    other.train.seed += 1
    seed = det.config.train.seed
    with pytest.raises(CheckpointError, match=rf"other settings: seed \(saved {seed}, now {seed + 1}\)"):
        load_train_state(tmp_path, det.model_, opt, gen, other)
    # a kill between the two atomic writes leaves files from different epochs: refused
    save_train_state(tmp_path / "b", det.model_, opt, gen, 2, [], det.config)
    shutil.copy(tmp_path / "b" / STATE_DIR / STATE_JSON, tmp_path / STATE_DIR / STATE_JSON)
    with pytest.raises(CheckpointError, match="different epochs"):
        load_train_state(tmp_path, det.model_, opt, gen, det.config)
