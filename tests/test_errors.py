"""User errors are one line and exit status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import json
import logging
import shutil

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


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "D", "--out", "R", "--threads", "-2"], "argument --threads: '-2' is not a whole number >= 1"),
        (["fit", "D", "--out", "R", "--steps", "0"], "argument --steps: '0' is not a whole number >= 1"),
        (["fit", "D", "--out", "R", "--epochs", "1.5"], "argument --epochs: '1.5' is not a whole number >= 1"),
        (["fit", "D", "--out", "R", "--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
        (["fit", "D", "--out", "R", "--lr", "inf"], "argument --lr: 'inf' is not a finite number > 0"),
        (["fit", "D", "--out", "R", "--lr", "nan"], "argument --lr: 'nan' is not a finite number > 0"),
        (["fit", "D", "--out", "R", "--seed", "-1"], "argument --seed: '-1' is not a whole number from 0"),
        (["fit", "D", "--out", "R", "--val-fraction", "1"], "argument --val-fraction: '1' is not a fraction in [0, 1)"),
        (["fit", "D", "--out", "R", "--false-alarm-rate", "0"], "'0' is not a rate in [1e-06, 1)"),
        (["fit", "D", "--out", "R", "--false-alarm-rate", "1e-320"], "'1e-320' is not a rate in [1e-06, 1)"),
        (["predict", "R", "x.png", "--out", "O", "--max-pixels", "2.5"], "--max-pixels: '2.5' is not a positive"),
        (["fit", "D", "--out", "R", "--smoothing-sigma", "-1"], "'-1' is not a finite number >= 0"),
        (["predict", "R", "x.png", "--out", "O", "--max-pixels", "inf"], "--max-pixels: 'inf' is not a positive"),
        (["predict", "R", "x.png", "--out", "O", "--max-pixels", "nan"], "--max-pixels: 'nan' is not a positive"),
        (["predict", "R", "x.png", "--out", "O", "--batch-size", "-1"], "argument --batch-size: '-1' is not a whole"),
        (["test", "R", "D", "--batch-size", "0"], "argument --batch-size: '0' is not a whole number >= 1"),
        (["serve", "R", "--port", "99999"], "argument --port: '99999' is not a port number from 1 to 65535"),
        (["serve", "R", "--port", "0"], "argument --port: '0' is not a port number from 1 to 65535"),
        (["serve", "R", "--max-upload-mb", "0"], "argument --max-upload-mb: '0' is not a finite number > 0"),
        (["serve", "R", "--max-upload-mb", "inf"], "argument --max-upload-mb: 'inf' is not a finite number > 0"),
        (["export", "R", "--threads", "0"], "argument --threads: '0' is not a whole number >= 1"),
        (["fit", "D", "--out", "R", "--query-fallback", "no"], "--query-fallback: 'no' is not 'off' or a finite"),
        (["fit", "D", "--out", "R", "--reconstructor", "vit"], "--reconstructor: invalid choice: 'vit'"),
        (["fit", "D", "--out", "R", "--image-scorer", "vit"], "--image-scorer: invalid choice: 'vit'"),
        (["fit", "D", "--out", "R", "--token-patch", "3"], "--token-patch: invalid choice: 3 (choose from 1, 2, 4)"),
        (["fit", "D", "--out", "R", "--query-fallback", "0"], "--query-fallback: '0' is not 'off' or a finite"),
    ],
)
def test_bad_numbers_are_one_argparse_error(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    lines = capsys.readouterr().err.strip().splitlines()  # argparse's usage, then one error line
    assert stop.value.code == 2 and lines[-1].startswith(f"adtr {args[0]}: error: ") and message in lines[-1], lines
    assert not any("Traceback" in line or "error" in line for line in lines[:-1])


def test_output_paths_of_the_wrong_kind_are_settings_errors(tiny_run, tmp_path, run_cli, tiny_folder):
    _, run, files = tiny_run
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    cases = [
        (["fit", tiny_folder, "--out", a_file], f"{a_file}: {a_file} is a file, not a folder"),
        (["fit", tiny_folder, "--out", a_file / "run"], f"{a_file} is a file, not a folder"),
        (["predict", run, files[0], "--out", a_file], f"--out {a_file}: exists and is a file; give a folder"),
        (["test", run, tiny_folder, "--json", tmp_path], f"--json {tmp_path}: exists and is a folder; give a file"),
        (["test", run, tiny_folder, "--report", a_file], f"--report {a_file}: exists and is a file; give a folder"),
        (["export", run, "--out", tmp_path], f"--out {tmp_path}: exists and is a folder; give a file"),
        (["export", run, "--out", a_file / "m.onnx"], f"--out {a_file / 'm.onnx'}: {a_file} is a file, not a folder"),
    ]
    for args, message in cases:
        code, _, err = run_cli(*args, "--quiet")
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert a_file.read_text() == "x"


def test_unwritable_output_places_are_refused_before_any_work(tiny_run, tmp_path, run_cli, tiny_folder):
    _, run, files = tiny_run
    cases = [  # /proc takes no new files (ENOENT), /sys refuses them (EACCES), even for root
        (["fit", tiny_folder, "--out", "/proc/adtr_run"], "--out /proc/adtr_run: cannot write in /proc"),
        (["fit", tiny_folder, "--out", "/sys/adtr/run"], "--out /sys/adtr/run: cannot write in /sys"),
        (["predict", run, files[0], "--out", "/proc/adtr_out"], "--out /proc/adtr_out: cannot write in /proc"),
        (["test", run, tiny_folder, "--json", "/proc/m.json"], "--json /proc/m.json: cannot write in /proc"),
        (["test", run, tiny_folder, "--report", "/sys/adtr"], "--report /sys/adtr: cannot write in /sys"),
        (["export", run, "--out", "/proc/m.onnx"], "--out /proc/m.onnx: cannot write in /proc"),
    ]
    for args, message in cases:
        code, out, err = run_cli(*args, "--quiet")
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
        assert out == ""  # refused before any work: no metrics, no progress


def test_letterbox_is_refused_before_any_output(tiny_run, tmp_path, run_cli):
    """A run whose image score needs the whole input (pooled_residual) cannot be letterboxed:
    predict refuses before creating --out, the service refuses to start."""
    from adtr.checkpoint import CONFIG_FILE
    from adtr.serve import create_app

    _, run, files = tiny_run
    pooled = tmp_path / "pooled"
    shutil.copytree(run, pooled)
    doc = json.loads((pooled / CONFIG_FILE).read_text())
    doc["score"]["image_score"] = "pooled_residual"
    (pooled / CONFIG_FILE).write_text(json.dumps(doc))
    out = tmp_path / "out"
    code, _, err = run_cli("predict", pooled, files[0], "--out", out, "--letterbox", "--backend", "torch", "--quiet")
    assert code == 2 and "letterbox needs an image score computed from the map" in err and not out.exists()
    with pytest.raises(SettingsError, match="letterbox needs an image score computed from the map"):
        create_app(pooled, engine="torch", letterbox=True)
    assert create_app(pooled, engine="torch") is not None  # without letterbox the run serves


def test_query_fallback_option_reads_off_and_numbers():
    from adtr.config import TrainConfig

    parse = cli.build_parser().parse_args
    assert parse(["fit", "D", "--out", "R", "--query-fallback", "OFF"]).query_fallback is None
    assert parse(["fit", "D", "--out", "R", "--query-fallback", "0.25"]).query_fallback == 0.25
    assert parse(["fit", "D", "--out", "R"]).query_fallback == TrainConfig().query_fallback


def test_step_pixels_option_reads_off_and_whole_numbers(capsys):
    from adtr.config import TrainConfig

    parse = cli.build_parser().parse_args
    assert parse(["fit", "D", "--out", "R", "--step-pixels", "off"]).step_pixels is None
    assert parse(["fit", "D", "--out", "R", "--step-pixels", "100000"]).step_pixels == 100000
    assert parse(["fit", "D", "--out", "R"]).step_pixels == TrainConfig().step_pixels == 65536
    for bad in ("0", "1.5", "many"):
        with pytest.raises(SystemExit):
            parse(["fit", "D", "--out", "R", "--step-pixels", bad])
        assert "'off' or a whole number >= 1" in capsys.readouterr().err


def test_fit_with_init_warns_that_model_and_score_options_are_ignored(caplog):
    parser = cli.build_parser()
    plain = parser.parse_args(["fit", "data", "--out", "run", "--init", "base"])
    given = parser.parse_args(["fit", "data", "--out", "run", "--init", "base", "--image-scorer", "off",
                               "--smoothing-sigma", "0", "--token-patch", "1"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="adtr"):
        cli._warn_ignored_with_init(plain)  # the parser's defaults: nothing to warn about
        assert caplog.text == ""
        cli._warn_ignored_with_init(given)
    assert "--image-scorer, --token-patch, --smoothing-sigma ignored: with --init" in caplog.text
