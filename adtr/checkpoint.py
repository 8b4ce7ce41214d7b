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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adtr.config import SCHEMA_VERSION, RunConfig
from adtr.errors import RunFolderError
from adtr.fileio import atomic_write, atomic_write_json
from adtr.model import ADTR

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "adtr-run"


CheckpointError = RunFolderError  # the name before adtr/errors.py


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
    """Write weights, then config.json, each atomically; then drop run_dir's resumable training state."""
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
    clear_train_state(run_dir)  # the finished run supersedes any resumable state in its folder


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise RunFolderError(f"{path}: missing; {run_dir} is not a complete run folder")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RunFolderError(f"{path}: not an adtr run config")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise RunFolderError(
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
        raise RunFolderError(f"{run_dir / CONFIG_FILE}: invalid settings ({e})") from None
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise RunFolderError(f"{weights}: missing; {run_dir} is not a complete run folder")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunFolderError(f"{weights}: unreadable safetensors file ({e})") from None
    expected = trainable_state(model)
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise RunFolderError(
            f"{weights}: tensors do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape or state[k].dtype != v.dtype:
            raise RunFolderError(
                f"{weights}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, "
                f"the config implies {tuple(v.shape)} {v.dtype}"
            )
    model.load_state_dict(state, strict=False)
    if doc.get("backbone_sha256") != backbone_fingerprint(model):
        raise RunFolderError(
            f"{run_dir / CONFIG_FILE}: the installed {config.model.backbone} weights differ from the "
            "ones this run was trained with"
        )
    return model.to(device).eval(), config, doc


# -- resumable training state -------------------------------------------------------------
STATE_DIR = "checkpoint"
STATE_WEIGHTS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def save_train_state(
    run_dir: Path | str,
    model: ADTR,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    history: list[dict],
    config: RunConfig,
) -> None:
    """After `epoch` epochs: weights, optimizer moments and RNG states, to continue exactly.

    Both files are written atomically, weights first; each names the epoch, and loading
    refuses a pair that disagrees, so a kill between the two writes costs one epoch at most.
    """
    state_dir = Path(run_dir) / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    opt = optimizer.state_dict()
    for i, per_param in opt["state"].items():
        for k, v in per_param.items():
            tensors[f"optimizer.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.shuffle"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": FORMAT, "epoch": str(epoch)}
    atomic_write(state_dir / STATE_WEIGHTS, lambda p: save_file(tensors, str(p), metadata=meta))
    doc = {"format": FORMAT, "epoch": epoch, "history": history, "param_groups": opt["param_groups"],
           "config": config.to_dict()}  # fmt: skip
    atomic_write_json(state_dir / STATE_JSON, doc)


def has_train_state(run_dir: Path | str) -> bool:
    return (Path(run_dir) / STATE_DIR / STATE_JSON).is_file()


def check_fit_target(run_dir: Path | str, resume: bool = False, force: bool = False) -> None:
    """The policy for the folder a fit writes to; raises RunFolderError when the fit must not start.

    A finished run is replaced only with force; an interrupted fit is continued with resume
    or replaced with force; resume needs an interrupted fit to continue.
    """
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists() and not force:
        raise RunFolderError(f"{run_dir}: already holds a run; choose another --out or pass --force")
    if has_train_state(run_dir) and not (resume or force):
        raise RunFolderError(f"{run_dir}: holds an interrupted fit; pass --resume to continue it or --force")
    if resume and not has_train_state(run_dir):
        raise RunFolderError(f"{run_dir}: no interrupted fit to resume")


def load_train_state(
    run_dir: Path | str,
    model: ADTR,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: RunConfig,
) -> tuple[int, list[dict]]:
    """Restore what save_train_state wrote; returns (epochs done, history so far)."""
    state_dir = Path(run_dir) / STATE_DIR
    json_path, weights_path = state_dir / STATE_JSON, state_dir / STATE_WEIGHTS
    if not json_path.is_file() or not weights_path.is_file():
        raise RunFolderError(f"{state_dir}: no saved training state to resume from")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_path))
        with safe_open(str(weights_path), "pt") as f:
            saved_epoch = (f.metadata() or {}).get("epoch")
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
        raise RunFolderError(f"{state_dir}: unreadable training state ({e})") from None
    if doc.get("config") != json.loads(json.dumps(config.to_dict())):  # as JSON: tuples are lists there
        raise RunFolderError(f"{json_path}: the run was started with other settings; resume with the same ones")
    epoch = int(doc["epoch"])
    if saved_epoch != str(epoch):
        raise RunFolderError(f"{state_dir}: weights and {STATE_JSON} are from different epochs")
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = trainable_state(model)
    if set(model_state) != set(expected) or any(model_state[k].shape != v.shape for k, v in expected.items()):
        raise RunFolderError(f"{weights_path}: tensors do not match the model")
    model.load_state_dict(model_state, strict=False)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": per_param, "param_groups": doc["param_groups"]})
    generator.set_state(tensors["rng.shuffle"])
    torch.set_rng_state(tensors["rng.torch"])
    return epoch, doc["history"]


def clear_train_state(run_dir: Path | str) -> None:
    """Remove the resumable state once the finished run is saved."""
    state_dir = Path(run_dir) / STATE_DIR
    for name in (STATE_JSON, STATE_WEIGHTS):
        (state_dir / name).unlink(missing_ok=True)
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
