"""User errors are one line and exit status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import numpy as np
import pytest

from adtr import cli
from adtr.checkpoint import CheckpointError
from adtr.data import folder
from adtr.data.images import DataError as DataErrorFromImages
from adtr.engine import Predictions
from adtr.errors import ADTRError, DataError, RunFolderError, SettingsError


def test_hierarchy_and_old_names():
    for cls in (DataError, RunFolderError, SettingsError):
        assert issubclass(cls, ADTRError) and issubclass(cls, ValueError)
    assert DataErrorFromImages is DataError
    assert CheckpointError is RunFolderError


def test_data_error_is_one_line_and_status_2(run_cli, tmp_path):
    code, _, err = run_cli("fit", tmp_path / "missing", "--out", tmp_path / "r", "--quiet")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'missing'}: data folder not found"
    assert not (tmp_path / "r").exists()


def test_image_size_250_reaches_the_size_check(run_cli, tiny_folder, tmp_path):
    code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / "r", "--image-size", "250", "--quiet")
    assert code == 2 and "multiples of 32" in err, err
    assert err.count("\n") == 1
    code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / "r", "--image-size", "big", "--quiet")
    assert code == 2 and "--image-size: image size 'big' is not N or HxW" in err


def test_unknown_device_is_a_settings_error(run_cli, tiny_run, tmp_path):
    _, run, files = tiny_run
    code, _, err = run_cli("predict", run, files[0], "--out", tmp_path, "--device", "toaster", "--quiet")
    assert code == 2 and err.startswith("error: --device toaster:")


def test_unknown_synthetic_generator_is_a_settings_error(run_cli, tiny_folder, tmp_path):
    code, _, err = run_cli("fit", tiny_folder, "--out", tmp_path / "r", "--synthetic", "glitter", "--quiet")
    assert code == 2 and "unknown synthetic anomaly 'glitter'" in err


def test_other_exceptions_are_bugs_with_a_traceback(run_cli, monkeypatch, tmp_path):
    def broken(args):
        raise ValueError("an internal mistake")

    monkeypatch.setitem(cli.COMMANDS, "test", broken)
    with pytest.raises(ValueError, match="an internal mistake"):
        run_cli("test", tmp_path, tmp_path)


def _fake_predictions(samples, maps):
    return Predictions(
        np.array([float(m.max()) for m in maps]), maps, [(64, 64)] * len(samples), list(range(len(samples))), 0.1
    )


def test_non_finite_maps_fail_loudly(tiny_run, tiny_folder, monkeypatch):
    det = tiny_run[0]
    samples = folder.labelled_folder(tiny_folder)
    maps = [np.zeros((64, 64), np.float32) for _ in samples]
    maps[-1][3, 3] = np.nan
    monkeypatch.setattr("adtr.detector.predict_samples", lambda *a, **k: _fake_predictions(samples, maps))
    with pytest.raises(FloatingPointError, match=f"{samples[-1].path.name}.*NaN or infinite"):
        det.test(samples)


def test_impossible_pixel_metrics_are_named_in_the_result(tiny_run, tiny_folder, monkeypatch, caplog):
    det = tiny_run[0]
    samples = folder.labelled_folder(tiny_folder)
    for s in samples:  # every mask empty: no anomalous pixel to rank
        if s.mask_path is not None:
            s.mask_path.write_bytes(_png_zeros())
    maps = [np.random.default_rng(i).random((64, 64)).astype(np.float32) for i in range(len(samples))]
    monkeypatch.setattr("adtr.detector.predict_samples", lambda *a, **k: _fake_predictions(samples, maps))
    result = det.test(samples)
    assert "pixel_auroc" not in result and "aupro" not in result
    assert "no anomalous pixels" in result["pixel_metrics_skipped"]
    assert "pixel AUROC not computed" in caplog.text and "AUPRO not computed" in caplog.text
    assert "image_auroc" in result


def _png_zeros() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_fit_target_policy(tmp_path):
    from adtr.checkpoint import CONFIG_FILE, STATE_DIR, STATE_JSON, check_fit_target

    check_fit_target(tmp_path / "new")  # a fresh folder: fine
    with pytest.raises(RunFolderError, match="no interrupted fit to resume"):
        check_fit_target(tmp_path, resume=True)
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / STATE_JSON).write_text("{}")
    with pytest.raises(RunFolderError, match="holds an interrupted fit"):
        check_fit_target(tmp_path)
    check_fit_target(tmp_path, resume=True)
    check_fit_target(tmp_path, force=True)
    (tmp_path / CONFIG_FILE).write_text("{}")
    with pytest.raises(RunFolderError, match="already holds a run"):
        check_fit_target(tmp_path, resume=True)
    check_fit_target(tmp_path, force=True)


def test_save_clears_the_resumable_state(tiny_run, tmp_path):
    from adtr.checkpoint import STATE_DIR, STATE_JSON, has_train_state

    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / STATE_JSON).write_text("{}")
    tiny_run[0].save(tmp_path)
    assert not has_train_state(tmp_path) and not (tmp_path / STATE_DIR).exists()


def test_every_option_is_honoured_or_refused(run_cli, tiny_run, tmp_path):
    _, run, files = tiny_run
    with pytest.raises(SystemExit) as e:  # export traces on the CPU: no --device option
        run_cli("export", run, "--device", "cuda")
    assert e.value.code == 2
    code, _, err = run_cli("predict", run, files[0], "--out", tmp_path, "--backend", "onnx", "--device", "cuda")
    assert code == 2 and "the ONNX backend runs on the CPU only" in err
    code, _, err = run_cli("serve", run, "--engine", "onnx", "--device", "cuda")  # the old flag name
    assert code == 2 and "the ONNX backend runs on the CPU only" in err
