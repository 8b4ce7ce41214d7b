"""The default backend: ONNX Runtime where it agrees with PyTorch, cached per weights, PyTorch otherwise."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adtr import ADTRDetector
from adtr.backend import GRAPH_FILE
from adtr.checkpoint import CONFIG_FILE, WEIGHTS_FILE, model_fingerprint
from adtr.errors import RunFolderError, SettingsError
from adtr.export import FINGERPRINT_KEY, REFERENCE_KEY, RELATIVE_TOLERANCE, TOLERANCE, OnnxModel, check_images
from adtr.model import ADTR


def _old_run(run: Path, to: Path, graph: bool = False) -> Path:
    """A copy of a run folder as written before the cached graph existed: weights + config.json;
    with graph, the run's graph too (exports are slow: only the tests of exporting make one)."""
    to.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE) + ((GRAPH_FILE,) if graph else ()):
        (to / name).write_bytes((run / name).read_bytes())
    return to


def _scores(det: ADTRDetector, files) -> np.ndarray:
    return np.array([p.anomaly_score for p in det.predict(files)])


def test_check_images_are_fixed_and_in_range():
    x = check_images((64, 96))
    assert x.shape == (4, 3, 64, 96) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 255
    assert (x[0] == 128).all() and (x[3, :, 21:32, 32:48] == 250).all() and (x[3, :, :21] == 128).all()
    assert x[2].std() > 50  # the texture is not flat
    assert torch.equal(x, check_images((64, 96)))


def test_auto_picks_onnx_on_an_old_run_folder_and_scores_like_torch(tiny_run, tmp_path):
    det, run, files = tiny_run
    old = _old_run(run, tmp_path / "run")
    auto = ADTRDetector.load(old, progress=False)
    assert not (old / GRAPH_FILE).exists()  # loading alone writes nothing
    chosen = auto.selected_backend()
    assert chosen.name == "onnx" and isinstance(chosen.run, OnnxModel) and "agrees" in chosen.reason
    assert (old / GRAPH_FILE).is_file()  # written on first use, next to the weights
    ref = ADTRDetector.load(old, progress=False, backend="torch")
    a, b = _scores(auto, files), _scores(ref, files)
    assert np.abs(a - b).max() < TOLERANCE
    threshold = det.thresholds_.image
    decided = [p.is_anomalous for p in auto.predict(files)], [p.is_anomalous for p in ref.predict(files)]
    assert all(x == y or abs(s - threshold) < TOLERANCE for x, y, s in zip(*decided, b, strict=True))
    # a second load reuses the cached graph: same file, no export
    mtime = (old / GRAPH_FILE).stat().st_mtime_ns
    assert ADTRDetector.load(old, progress=False).selected_backend().name == "onnx"
    assert (old / GRAPH_FILE).stat().st_mtime_ns == mtime


def test_fit_and_save_write_the_checked_graph(tiny_run):
    det, run, _ = tiny_run
    engine = OnnxModel(run / GRAPH_FILE, det.config.model)
    assert engine.metadata[FINGERPRINT_KEY] == model_fingerprint(det.model_)
    assert engine.metadata["thresholds"] == det.thresholds_.to_dict()
    assert det.selected_backend().name == "onnx"


def test_changed_weights_invalidate_the_cached_graph(tiny_run, tmp_path):
    _, run, files = tiny_run
    old = _old_run(run, tmp_path / "run", graph=True)
    before = _scores(ADTRDetector.load(old, progress=False), files)
    first = OnnxModel(old / GRAPH_FILE, None).metadata[FINGERPRINT_KEY]
    state = load_file(str(old / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("proj_out.bias"))
    state[key] = state[key] + 0.5  # new weights, same shapes: the run still loads
    save_file(state, str(old / WEIGHTS_FILE))

    det = ADTRDetector.load(old, progress=False)
    assert det.selected_backend().name == "onnx"
    second = OnnxModel(old / GRAPH_FILE, None).metadata[FINGERPRINT_KEY]
    assert second != first and second == model_fingerprint(det.model_)
    after = _scores(det, files)
    torch_after = _scores(ADTRDetector.load(old, progress=False, backend="torch"), files)
    assert np.abs(after - torch_after).max() < TOLERANCE  # the new weights run, not the old graph
    assert np.abs(after - before).max() > 0.1  # scores moved (one can move little by chance)


def test_the_fingerprint_covers_weights_and_every_setting_inside_the_graph():
    from adtr.config import ModelConfig, ScoreConfig

    cfg = ModelConfig(image_size=(64, 64), hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=4,
                      ffn_dim=64)  # fmt: skip
    torch.manual_seed(0)
    model = ADTR(cfg)
    base = model_fingerprint(model)
    assert model_fingerprint(model) == base  # a pure function of the model
    model.score_cfg = ScoreConfig(smoothing_sigma=0.0)  # scoring is inside the graph too
    assert model_fingerprint(model) != base
    model.score_cfg = ScoreConfig()
    with torch.no_grad():
        model.feature_std.mul_(2)  # feature statistics: a buffer, not a parameter
    assert model_fingerprint(model) != base


def test_a_forced_backend_is_honoured(tiny_run, tmp_path, run_cli):
    _, run, files = tiny_run
    old = _old_run(run, tmp_path / "run")
    det = ADTRDetector.load(old, progress=False, backend="torch")
    chosen = det.selected_backend()
    assert chosen.name == "torch" and isinstance(chosen.run, ADTR) and not (old / GRAPH_FILE).exists()
    det.save(tmp_path / "saved")  # a torch detector writes no graph either
    assert not (tmp_path / "saved" / GRAPH_FILE).exists()
    old = _old_run(run, tmp_path / "run", graph=True)
    assert ADTRDetector.load(old, progress=False, backend="onnx").selected_backend().name == "onnx"
    with pytest.raises(SettingsError, match="unknown backend 'tpu'"):
        ADTRDetector(backend="tpu")
    for flag, name in (("--backend", "torch"), ("--engine", "torch"), ("--backend", "onnx")):
        out = tmp_path / f"out_{flag}_{name}"
        code, stdout, _ = run_cli("predict", old, *files[:2], "--out", out, flag, name, "--quiet", "--no-heatmaps")
        assert code == 0 and f"backend {name}" in stdout
        doc = json.loads((out / "scores.json").read_text())
        assert doc["backend"] == name and {r["backend"] for r in doc["predictions"]} == {name}
        assert (out / "scores.csv").read_text().splitlines()[1].split(",")[-1] == name


def test_cli_default_is_auto_and_says_so(tiny_run, tmp_path, run_cli, capsys):
    _, run, files = tiny_run
    code, stdout, _ = run_cli("predict", run, *files[:2], "--out", tmp_path / "p", "--quiet")
    assert code == 0 and "backend onnx" in stdout
    code, stdout, _ = run_cli("test", run, files[0].parent.parent, "--json", tmp_path / "m.json", "--quiet")
    assert code == 0 and "backend" in stdout and "onnx" in stdout
    assert json.loads((tmp_path / "m.json").read_text())["backend"] == "onnx"
    for verb in ("predict", "test", "serve"):  # --help explains auto (without argparse's line breaks)
        with pytest.raises(SystemExit):
            run_cli(verb, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: auto): auto runs ONNX Runtime" in text and "within 1e-4" in text, verb


def test_an_unwritable_run_folder_falls_back_to_torch(tiny_run, tmp_path, monkeypatch, caplog):
    _, run, files = tiny_run
    old = _old_run(run, tmp_path / "run")
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # noqa: A002  tempfile's own parameter name
        # what a read-only mount answers (the tests may run as root, for whom chmod is no obstacle)
        if dir is not None and Path(dir) == old:
            raise PermissionError(13, "Permission denied", str(old))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with caplog.at_level(logging.WARNING):
        det = ADTRDetector.load(old, progress=False)
        chosen = det.selected_backend()
    assert chosen.name == "torch" and "cannot write" in chosen.reason and "Permission denied" in chosen.reason
    notices = [r.getMessage() for r in caplog.records if r.name == "adtr.backend"]
    assert len(notices) == 1 and "\n" not in notices[0] and "scoring with PyTorch" in notices[0]
    ref = ADTRDetector.load(old, progress=False, backend="torch")
    assert np.array_equal(_scores(det, files), _scores(ref, files))  # it still works: PyTorch scores
    with pytest.raises(RunFolderError, match="cannot write the ONNX graph"):
        ADTRDetector.load(old, progress=False, backend="onnx").selected_backend()


def test_a_graph_that_disagrees_is_not_used_by_auto(tiny_run, tmp_path, caplog):
    import onnx

    _, run, _ = tiny_run
    old = _old_run(run, tmp_path / "run", graph=True)
    proto = onnx.load(str(old / GRAPH_FILE))
    for prop in proto.metadata_props:  # PyTorch's stored scores moved by 10x the tolerance
        if prop.key == REFERENCE_KEY:
            moved = [s + 10 * (TOLERANCE + RELATIVE_TOLERANCE * abs(s)) for s in json.loads(prop.value)]
            shift = max(m - s for m, s in zip(moved, json.loads(prop.value), strict=True))
            prop.value = json.dumps(moved)
    onnx.save(proto, str(old / GRAPH_FILE))
    with caplog.at_level(logging.WARNING):
        chosen = ADTRDetector.load(old, progress=False).selected_backend()
    assert chosen.name == "torch" and "disagrees" in chosen.reason and f"{shift:.1e}" in chosen.reason
    forced = ADTRDetector.load(old, progress=False, backend="onnx").selected_backend()
    assert forced.name == "onnx" and "disagrees" in forced.reason


def test_a_damaged_graph_is_rebuilt(tiny_run, tmp_path):
    _, run, _ = tiny_run
    old = _old_run(run, tmp_path / "run")
    (old / GRAPH_FILE).write_bytes(b"not an onnx file")
    assert ADTRDetector.load(old, progress=False).selected_backend().name == "onnx"
    assert (old / GRAPH_FILE).stat().st_size > 1000


def test_without_onnxruntime_auto_falls_back_and_onnx_is_refused(tiny_run, tmp_path, monkeypatch):
    _, run, _ = tiny_run
    old = _old_run(run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    chosen = ADTRDetector.load(old, progress=False).selected_backend()
    assert chosen.name == "torch" and "onnxruntime is not installed" in chosen.reason
    with pytest.raises(SettingsError, match="pip install onnxruntime"):
        ADTRDetector.load(old, progress=False, backend="onnx").selected_backend()


def test_a_detector_without_run_folder_builds_its_graph_in_memory(tiny_run):
    det, run, files = tiny_run
    fresh = ADTRDetector.load(run, progress=False)
    fresh.run_dir_ = None  # as after fit(), before save()
    chosen = fresh.selected_backend()
    assert chosen.name == "onnx"
    ref = ADTRDetector.load(run, progress=False, backend="torch")
    assert np.abs(_scores(fresh, files) - _scores(ref, files)).max() < TOLERANCE


def test_parity_tolerance_grows_with_the_score():
    """Float32 rounding grows with the score: a difference of 1.2e-4 on a score of 264 agrees
    (bottle's default run fell back to PyTorch on it), the same on a score of 0.5 does not."""
    from types import SimpleNamespace

    from adtr.export import check_parity

    class Engine:  # check_parity's view of an OnnxModel: metadata, cfg and a call
        def __init__(self, got: list[float], reference: list[float]):
            self.got, self.metadata = got, {REFERENCE_KEY: reference}
            self.cfg = SimpleNamespace(image_size=(32, 32))

        def __call__(self, images: torch.Tensor) -> SimpleNamespace:
            assert images.shape == (4, 3, 32, 32)
            return SimpleNamespace(anomaly_score=torch.tensor(self.got, dtype=torch.float64))

    big = check_parity(Engine([264.0, 3.0, 2.0, 1.0], [264.00012, 3.0, 2.0, 1.0]))
    assert big.agrees and big.max_difference == pytest.approx(1.2e-4)
    small = check_parity(Engine([0.5, 0.2, 0.1, 0.0], [0.50012, 0.2, 0.1, 0.0]))
    assert not small.agrees and small.max_difference == pytest.approx(1.2e-4)
    far = check_parity(Engine([264.0, 3.0, 2.0, 1.0], [264.01, 3.0, 2.0, 1.0]))  # above 1e-4 + 2.6e-3
    assert not far.agrees and far.max_difference == pytest.approx(0.01)
    broken = check_parity(Engine([float("nan"), 3.0, 2.0, 1.0], [264.0, 3.0, 2.0, 1.0]))
    assert not broken.agrees


def test_use_onnx_warns_for_a_graph_of_other_weights(tiny_run, tmp_path, caplog):
    """The check images' parity compares a graph with the scores it was exported with; only the
    fingerprint tells whether it was this run's model."""
    from adtr.export import export_onnx

    _, run, _ = tiny_run
    det = ADTRDetector.load(run, progress=False, backend="torch")
    export_onnx(det.model_, tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="adtr"):
        det.use_onnx(tmp_path / "m.onnx")
    assert "other weights" not in caplog.text and det.selected_backend().name == "onnx"
    other = ADTRDetector.load(run, progress=False, backend="torch")
    with torch.no_grad():
        next(other.model_.reconstructor.parameters()).add_(1.0)
    with caplog.at_level(logging.WARNING, logger="adtr"):
        other.use_onnx(tmp_path / "m.onnx")
    assert "built from other weights or settings" in caplog.text
    import onnx

    proto = onnx.load(str(tmp_path / "m.onnx"))  # a graph exported before fingerprints were stored
    kept = [p for p in proto.metadata_props if p.key != FINGERPRINT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adtr"):
        det.use_onnx(tmp_path / "old.onnx")
    assert "without a fingerprint" in caplog.text and "other weights" not in caplog.text
