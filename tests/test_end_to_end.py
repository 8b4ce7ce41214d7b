"""Real runs on small slices of MVTec bottle: training lowers the loss and beats chance,
and the installed CLI's verbs work together."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from adtr import ADTRDetector
from adtr.config import ModelConfig, TrainConfig
from adtr.data import mvtec
from adtr.data.samples import Sample

FAST = ModelConfig(
    image_size=(256, 256),
    hidden_dim=128,
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_heads=4,
    ffn_dim=256,
)


def _slice(bottle: Path) -> tuple[list[Sample], list[Sample]]:
    train = mvtec.train_samples(bottle)[:48]
    test = mvtec.test_samples(bottle)
    good = [s for s in test if s.label == 0][:10]
    bad = [s for s in test if s.defect == "broken_large"][:10]
    return train, good + bad


@pytest.mark.slow
def test_fit_lowers_loss_and_beats_chance(bottle):
    train, test = _slice(bottle)
    det = ADTRDetector(FAST, train=TrainConfig(epochs=6, batch_size=8, lr=1e-3, seed=1), progress=False)
    det.fit(train)
    losses = [h["loss"] for h in det.history_]
    assert losses[-1] < 0.7 * losses[0], losses
    assert det.history_[-1]["val_loss"] < det.history_[0]["val_loss"]
    metrics = det.test(test)
    assert metrics["n_images"] == 20
    assert metrics["image_auroc"] > 0.9, metrics
    assert metrics["pixel_auroc"] > 0.9, metrics
    assert metrics["aupro"] > 0.5, metrics  # a map of noise scores about 0.15 (FPR <= 0.3, normalised)


@pytest.mark.slow
def test_same_seed_gives_same_scores(bottle):
    train, test = _slice(bottle)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=3)
    a = ADTRDetector(FAST, train=cfg, progress=False).fit(train[:16]).test(test[:4])
    b = ADTRDetector(FAST, train=cfg, progress=False).fit(train[:16]).test(test[:4])
    assert [s["score"] for s in a["scores"]] == [s["score"] for s in b["scores"]]


def test_console_script_is_installed():
    exe = shutil.which("adtr") or str(Path(sys.executable).parent / "adtr")
    assert Path(exe).exists(), "the console script 'adtr' is not installed"
    assert "from adtr.cli import main" in Path(exe).read_text()


@pytest.mark.slow
def test_cli_fit_test_predict(bottle, tmp_path, run_cli, caplog):
    data = tmp_path / "bottle_slice"
    for s in mvtec.train_samples(bottle)[:24]:
        (data / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, data / "good" / s.path.name)
    test_root = tmp_path / "bottle_test"
    for s in mvtec.test_samples(bottle):
        if s.defect in ("good", "broken_large") and int(s.path.stem) < 4:
            (test_root / s.defect).mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, test_root / s.defect / s.path.name)
            if s.mask_path:
                (test_root / "ground_truth" / s.defect).mkdir(parents=True, exist_ok=True)
                shutil.copy(s.mask_path, test_root / "ground_truth" / s.defect / s.mask_path.name)
    run = tmp_path / "run"
    code, _, _ = run_cli("fit", data, "--out", run, "--epochs", "2", "--image-size", "128", "--quiet")
    assert code == 0
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    code, _, err = run_cli("fit", data, "--out", run, "--quiet")
    assert code == 2 and "already holds a run" in err

    out_json = tmp_path / "metrics.json"
    code, out, _ = run_cli("test", run, test_root, "--json", out_json, "--quiet")
    assert code == 0
    assert "image AUROC" in out
    metrics = json.loads(out_json.read_text())
    for key in ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "n_images", "images_per_second"]:
        assert key in metrics
    assert metrics["n_images"] == 8

    pred_dir = tmp_path / "pred"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, _, _ = run_cli("predict", run, test_root / "good", test_root / "broken_large", bad, "--out", pred_dir,
                         "--quiet")  # fmt: skip
    assert code == 1  # one bad file: reported, the rest still scored
    assert "broken.png" in caplog.text
    doc = json.loads((pred_dir / "scores.json").read_text())
    assert len(doc["predictions"]) == 8 and len(doc["failed"]) == 1
    heatmaps = sorted((pred_dir / "heatmaps").iterdir())
    assert len(heatmaps) == 8 and len({p.name for p in heatmaps}) == 8
    from PIL import Image

    assert Image.open(heatmaps[0]).size == (900, 900)
    assert (pred_dir / "scores.csv").read_text().count("\n") == 9


def _help(verb: str) -> str:
    import io
    from contextlib import redirect_stdout

    from adtr.cli import build_parser

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as e:
        build_parser().parse_args([verb, "--help"])
    assert e.value.code == 0
    return buf.getvalue()


def test_cli_help_explains_every_option():
    for verb in ["fit", "test", "predict", "export", "serve"]:
        assert "usage: adtr " + verb in _help(verb)
    text = _help("fit")
    for opt in ["--backbone", "--image-size", "--epochs", "--seed", "--out", "--preset"]:
        assert opt in text
    assert "--resume" in _help("predict") and "--device" not in _help("export")


def test_readme_commands_exist():
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "README.md").read_text()
    first = [line for line in text.splitlines() if line.startswith("bash scripts/")][:2]
    assert first == ["bash scripts/setup.sh && bash scripts/bottle.sh", "bash scripts/test.sh"]
    for script in ["setup.sh", "bottle.sh", "test.sh"]:
        assert (repo / "scripts" / script).is_file()
    assert "scripts/test.sh" in (repo / ".ci" / "run").read_text()


@pytest.mark.slow
def test_anomaly_available_fit_from_init(bottle, tmp_path):
    from adtr.data.splits import kshot_split

    train, _ = _slice(bottle)
    anomalies, remaining = kshot_split(mvtec.test_samples(bottle), 1, seed=0)
    # query_fallback off: the init's own model settings (FAST) are what this test follows
    base = ADTRDetector(FAST, train=TrainConfig(epochs=3, batch_size=8, lr=1e-3, query_fallback=None), progress=False)
    base.fit(train[:32])
    base.save(tmp_path / "base")
    det = ADTRDetector(train=TrainConfig(epochs=2, batch_size=8, lr=1e-3, synthetic_copies=1), progress=False)
    det.fit(train[:32], anomalies=anomalies, synthetic=["confetti", "cutpaste"], init=tmp_path / "base")
    assert det.config.model == FAST  # model settings come from the init run
    assert det.record_.provenance["data"]["n_pixel_labelled"] == 3
    assert all(np.isfinite(h["loss"]) for h in det.history_)
    test = [s for s in remaining if s.defect in ("good", "broken_large")]
    assert {str(s.path) for s in test}.isdisjoint(det.record_.provenance["data"]["anomaly_files"])
    assert det.test(test)["image_auroc"] > 0.9
