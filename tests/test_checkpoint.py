"""Run folders: exact round trip, and clear refusals of incomplete or tampered folders."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adtr import ADTRDetector
from adtr.backend import GRAPH_FILE
from adtr.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from adtr.replay import REPLAY_FILE


def test_round_trip_gives_identical_scores_and_maps(tiny_run):
    det, run, files = tiny_run
    again = ADTRDetector.load(run, progress=False)
    a, b = det.predict(files), again.predict(files)
    assert [p.anomaly_score for p in a] == [p.anomaly_score for p in b]
    assert all(np.array_equal(p.anomaly_map, q.anomaly_map) for p, q in zip(a, b, strict=True))
    assert again.record_.score_stats == det.record_.score_stats


def test_run_folder_is_safetensors_plus_json(tiny_run):
    _, run, _ = tiny_run
    # the graph: backend.py; replay features: replay.py
    assert sorted(p.name for p in run.iterdir()) == [CONFIG_FILE, GRAPH_FILE, WEIGHTS_FILE, REPLAY_FILE]
    doc = json.loads((run / CONFIG_FILE).read_text())
    assert doc["model"]["image_size"] == [64, 64] and doc["schema_version"] == 1
    assert not any(k.startswith("backbone.") for k in load_file(str(run / WEIGHTS_FILE)))


def test_incomplete_run_folder(tiny_run, tmp_path):
    _, run, _ = tiny_run
    (tmp_path / CONFIG_FILE).write_bytes((run / CONFIG_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        ADTRDetector.load(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        ADTRDetector.load(tmp_path)
    with pytest.raises(CheckpointError, match="run folder not found"):
        ADTRDetector.load(tmp_path / "does-not-exist")


def test_other_schema_version(tiny_run, tmp_path):
    _, run, _ = tiny_run
    doc = json.loads((run / CONFIG_FILE).read_text())
    doc["schema_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    (tmp_path / WEIGHTS_FILE).write_bytes((run / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="schema version 99"):
        ADTRDetector.load(tmp_path)


def test_tampered_shapes_are_refused(tiny_run, tmp_path):
    _, run, _ = tiny_run
    (tmp_path / CONFIG_FILE).write_bytes((run / CONFIG_FILE).read_bytes())
    state = load_file(str(run / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("query_embed"))
    state[key] = torch.zeros(1, 3, 32)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="query_embed"):
        ADTRDetector.load(tmp_path)


def test_scorer_saved_on_the_finer_grid_is_refused_by_name(tiny_run, tmp_path):
    # runs with token_patch > 1 and an image scorer saved before the scorer ran on the token
    # grid: its weights are those of a CNN on the finer grid, which this version cannot score
    from adtr.checkpoint import trainable_state
    from adtr.config import RunConfig
    from adtr.model import ADTR

    _, run, _ = tiny_run
    doc = json.loads((run / CONFIG_FILE).read_text())
    doc["model"].update(token_patch=2, image_scorer="cnn")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(doc))
    config = RunConfig.from_dict(doc)
    state = trainable_state(ADTR(config.model, config.score))
    old = {k.replace("image_scorer.inner.", "image_scorer."): v.contiguous() for k, v in state.items()}
    save_file(old, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="scorer moved to the token grid; .* fit the run again"):
        ADTRDetector.load(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / WEIGHTS_FILE))
    assert ADTRDetector.load(tmp_path).model_.cfg.token_patch == 2  # today's layout loads


def test_garbage_weights_file(tiny_run, tmp_path):
    _, run, _ = tiny_run
    (tmp_path / CONFIG_FILE).write_bytes((run / CONFIG_FILE).read_bytes())
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable"):
        ADTRDetector.load(tmp_path)


def test_config_json_has_named_sections_and_no_file_lists(tiny_run):
    _, run, _ = tiny_run
    doc = json.loads((run / CONFIG_FILE).read_text())
    assert {"calibration", "provenance", "history", "model", "score", "train"} <= set(doc)
    assert set(doc["calibration"]) == {"thresholds", "score_stats"}
    data = doc["provenance"]["data"]
    assert data["train"]["n"] + data["val"]["n"] == 8 and len(data["train"]["sha256"]) == 64
    assert "train_files" not in data


def test_run_folder_of_the_flat_layout_still_loads(tiny_run, tmp_path):
    """config.json as written before the named sections: thresholds, score_stats, ... at the top."""
    det, run, files = tiny_run
    doc = json.loads((run / CONFIG_FILE).read_text())
    calibration, provenance = doc.pop("calibration"), doc.pop("provenance")
    provenance["data"] = {"train_files": ["a.png"], "val_files": [], "anomaly_files": [], "n_pixel_labelled": 0,
                          "synthetic": [], "init": None}  # fmt: skip
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**doc, **calibration, **provenance}))
    (tmp_path / WEIGHTS_FILE).write_bytes((run / WEIGHTS_FILE).read_bytes())
    (tmp_path / GRAPH_FILE).write_bytes((run / GRAPH_FILE).read_bytes())  # same weights: reused, not re-exported
    old = ADTRDetector.load(tmp_path, progress=False)
    assert old.thresholds_ == det.thresholds_ and old.record_.score_stats == det.record_.score_stats
    assert old.history_ == json.loads(json.dumps(det.history_))
    assert old.record_.provenance["data"]["train_files"] == ["a.png"]
    assert old.predict(files[:1])[0].anomaly_score == det.predict(files[:1])[0].anomaly_score
    del calibration["thresholds"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**doc, "calibration": calibration, "provenance": provenance}))
    with pytest.raises(CheckpointError, match="missing or invalid thresholds"):
        ADTRDetector.load(tmp_path)
