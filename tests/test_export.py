"""ONNX export: onnxruntime scores like PyTorch, with a dynamic batch."""

import json

import numpy as np
import pytest
import torch

from adtr import ADTRDetector
from adtr.checkpoint import model_fingerprint
from adtr.data import mvtec
from adtr.export import FINGERPRINT_KEY, REFERENCE_KEY, OnnxModel, check_images, check_parity, export_onnx


def test_export_parity_dynamic_batch(tiny_run, tmp_path):
    det, _, files = tiny_run
    out = tmp_path / "m.onnx"
    diff = export_onnx(det.model_, out, metadata={"k": 1})
    assert diff < 1e-4
    engine = OnnxModel(out, det.config.model)
    for b in (1, 3):
        x = torch.rand(b, 3, 64, 64) * 255
        with torch.no_grad():
            ref = det.model_(x)
        got = engine(x)
        assert got.anomaly_score.shape == (b,) and got.anomaly_map.shape == (b, 64, 64)
        assert (got.anomaly_score - ref.anomaly_score).abs().max() < 1e-4
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta.keys() == {"k", FINGERPRINT_KEY, REFERENCE_KEY} and meta["k"] == 1
    assert meta[FINGERPRINT_KEY] == model_fingerprint(det.model_)
    with torch.no_grad():
        expected = det.model_(check_images((64, 64))).anomaly_score.tolist()
    assert meta[REFERENCE_KEY] == expected  # PyTorch's scores, stored for check_parity
    assert check_parity(engine, det.thresholds_).agrees


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_images(bottle, tmp_path):
    from adtr.config import ModelConfig, TrainConfig

    cfg = ModelConfig(hidden_dim=64, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, ffn_dim=128)
    det = ADTRDetector(cfg, train=TrainConfig(epochs=1), progress=False).fit(mvtec.train_samples(bottle)[:16])
    files = [s.path for s in mvtec.test_samples(bottle)][::10]
    ref = det.predict(files)
    export_onnx(det.model_, tmp_path / "m.onnx")
    got = det.use_onnx(tmp_path / "m.onnx").predict(files)
    a = np.array([p.anomaly_score for p in ref])
    b = np.array([p.anomaly_score for p in got])
    assert np.abs(a - b).max() < 1e-4
    assert [p.is_anomalous for p in ref] == [p.is_anomalous for p in got]


def test_cli_export_and_onnx_predict(tiny_run, tmp_path, run_cli):
    _, run, files = tiny_run
    onnx_path = tmp_path / "model.onnx"
    code, out, _ = run_cli("export", run, "--out", onnx_path)
    assert code == 0
    assert "max image-score difference" in out and out.strip().endswith("agrees") and onnx_path.is_file()
    outs = {}
    for backend in ("torch", "onnx"):
        d = tmp_path / backend
        extra = ["--onnx", onnx_path] if backend == "onnx" else []
        flags = ["--backend", backend, *extra, "--quiet", "--no-heatmaps"]
        code, _, _ = run_cli("predict", run, *files, "--out", d, *flags)
        assert code == 0
        outs[backend] = json.loads((d / "scores.json").read_text())["predictions"]
    threshold = tiny_run[0].thresholds_.image
    for a, b in zip(outs["torch"], outs["onnx"], strict=True):
        assert abs(a["anomaly_score"] - b["anomaly_score"]) < 1e-4
        # one rule for both backends; the threshold lies just above the held-out image's score (one of
        # these files), not on it, so float differences between the backends cannot split a decision
        for row in (a, b):
            assert row["is_anomalous"] == (row["anomaly_score"] >= threshold)
        assert a["is_anomalous"] == b["is_anomalous"]
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["decision"].startswith("anomalous when anomaly_score >= thresholds.image")
    assert meta["thresholds"]["image"] == threshold


@pytest.mark.parametrize("align", ["area", "bilinear", "max"])
def test_export_every_feature_alignment(align, tmp_path):
    """Every feature alignment (the cpu preset's area, bilinear, max) must export with parity
    (an untrained model is enough: parity is about the graph, not the weights)."""
    from adtr.config import ModelConfig
    from adtr.model import ADTR

    cfg = ModelConfig(image_size=(64, 96), align=align, hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                      num_heads=4, ffn_dim=64)  # fmt: skip
    diff = export_onnx(ADTR(cfg).eval(), tmp_path / "m.onnx")
    assert diff < 1e-4


@pytest.mark.parametrize("norm", ["none", "channel", "channel_position"])
def test_export_every_residual_norm(norm, tmp_path):
    """The residual scale and the per-position statistics are part of the graph."""
    from adtr.config import ModelConfig, ScoreConfig
    from adtr.model import ADTR

    cfg = ModelConfig(image_size=(64, 96), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4,
                      ffn_dim=64)  # fmt: skip
    model = ADTR(cfg, ScoreConfig(residual_norm=norm)).eval()
    images = torch.rand(4, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    model.set_residual_scale(model.standardize(model.extract(images)))
    if norm == "channel_position":
        assert float(model.position_std.std()) > 0  # statistics really set, not the identity
    assert export_onnx(model, tmp_path / "m.onnx") < 1e-4


def test_export_token_patch(tmp_path):
    """Tokens holding 2x2 blocks of the feature grid (pixel unshuffle / shuffle) export too."""
    from adtr.config import ModelConfig
    from adtr.model import ADTR

    cfg = ModelConfig(image_size=(64, 96), align="area", hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                      num_heads=4, ffn_dim=64, token_patch=2)  # fmt: skip
    assert export_onnx(ADTR(cfg).eval(), tmp_path / "m.onnx") < 1e-4


def test_export_feature_pool(tmp_path):
    """PatchCore's local averaging of the features (ModelConfig.feature_pool) is inside the graph too."""
    from adtr.config import ModelConfig
    from adtr.model import ADTR

    cfg = ModelConfig(image_size=(64, 96), align="area", hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                      num_heads=4, ffn_dim=64, token_patch=2, feature_pool=3)  # fmt: skip
    assert export_onnx(ADTR(cfg).eval(), tmp_path / "m.onnx") < 1e-4


def test_export_layer_query(tmp_path):
    """UniAD's layer-wise query (a query per decoder layer) exports too."""
    from adtr.config import ModelConfig
    from adtr.model import ADTR

    cfg = ModelConfig(image_size=(64, 96), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=4,
                      ffn_dim=64, layer_query=True)  # fmt: skip
    assert export_onnx(ADTR(cfg).eval(), tmp_path / "m.onnx") < 1e-4
