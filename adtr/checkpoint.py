"""Run folders: safetensors weights plus a JSON description; never pickle.

    RUN/config.json        settings (RunConfig), backbone weights' hash, score statistics,
                           training history; written last, so it marks a complete run
    RUN/model.safetensors  reconstructor weights and feature statistics (the frozen backbone
                           comes from its PyPI package and is checked by hash)

Loading rebuilds the model from the config and refuses weights whose names or shapes do not
match it, a config from another schema version, or a different backbone file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adtr.config import SCHEMA_VERSION, RunConfig
from adtr.fileio import atomic_write, atomic_write_json
from adtr.model import ADTR

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "adtr-run"


class CheckpointError(ValueError):
    """A run folder that cannot be loaded; the message names the file and the problem."""


def trainable_state(model: ADTR) -> dict[str, torch.Tensor]:
    """Everything a run must store: all tensors except the frozen backbone's."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def backbone_fingerprint(model: ADTR) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.backbone.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_run(run_dir: Path | str, model: ADTR, config: RunConfig, extra: dict[str, Any]) -> None:
    """Write weights, then config.json, each atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    atomic_write(run_dir / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    doc = {
        "format": FORMAT,
        **config.to_dict(),
        "backbone_sha256": backbone_fingerprint(model),
        **extra,
    }
    atomic_write_json(run_dir / CONFIG_FILE, doc)


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {run_dir} is not a complete run folder")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an adtr run config")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema version {doc.get('schema_version')!r}, this adtr reads version {SCHEMA_VERSION}"
        )
    return doc


def load_run(run_dir: Path | str, device: torch.device | str = "cpu") -> tuple[ADTR, RunConfig, dict[str, Any]]:
    """Rebuild the model of a run folder; returns (model in eval mode, config, config.json)."""
    run_dir = Path(run_dir)
    doc = read_run_config(run_dir)
    try:
        config = RunConfig.from_dict(doc)
        model = ADTR(config.model, config.score)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: invalid settings ({e})") from None
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; {run_dir} is not a complete run folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    expected = trainable_state(model)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: tensors do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            raise CheckpointError(
                f"{weights}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, "
                f"the config implies {tuple(v.shape)} {v.dtype}"
            )
    model.load_state_dict(state, strict=False)
    if doc.get("backbone_sha256") != backbone_fingerprint(model):
        raise CheckpointError(
            f"{run_dir / CONFIG_FILE}: the installed {config.model.backbone} weights differ from the "
            "ones this run was trained with"
        )
    return model.to(device).eval(), config, doc
