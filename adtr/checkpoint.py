"""Run folders: safetensors weights plus a JSON description; never pickle.

    RUN/config.json        the run's record (RunRecord) in named sections: settings
                           (schema_version, model, score, train) and the backbone weights'
                           hash, calibration (thresholds, score statistics), inputs (the
                           training images' size and aspect-ratio ranges and colour mode:
                           drift.InputProfile; absent in older runs), provenance (adtr
                           version, data counts and hashes, timings), history (one entry
                           per epoch); written last, so it marks a complete run
    RUN/model.safetensors  reconstructor weights and feature statistics (the frozen backbone
                           comes from its PyPI package and is checked by hash)
    RUN/replay.safetensors good features kept for `adtr update` (replay.py); absent in run
                           folders saved before it existed, which load as before

Loading rebuilds the model from the config and refuses weights whose names or shapes do not
match it, a config from another schema version, or a different backbone file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adtr.config import SCHEMA_VERSION, RunConfig, steps_for
from adtr.drift import InputProfile
from adtr.errors import RunFolderError
from adtr.fileio import atomic_write, atomic_write_json
from adtr.model import ADTR
from adtr.replay import ReplayData, load_replay, save_replay
from adtr.thresholds import Thresholds

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "adtr-run"


CheckpointError = RunFolderError  # the name before adtr/errors.py


def trainable_state(model: ADTR) -> dict[str, torch.Tensor]:
    """Everything a run must store: all tensors except the frozen backbone's."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def _state_hash(state: dict[str, torch.Tensor], extra: bytes = b"") -> str:
    """sha256 of a state dict's names and tensor bytes (sorted by name), then `extra`."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(extra)
    return h.hexdigest()


def backbone_fingerprint(model: ADTR) -> str:
    return _state_hash(model.backbone.state_dict())


def model_fingerprint(model: ADTR) -> str:
    """sha256 of everything an exported graph is built from: every tensor of the model (frozen
    backbone, reconstructor, feature statistics) and its model and score settings. A graph
    stored with another fingerprint was built from other weights or settings (backend.py)."""
    score = asdict(model.score_cfg)
    head, gain, image_gain = score["defect_head"], score["head_gain"], score["head_image_gain"]
    if not head or score["head_image_score"] == "map" or image_gain == gain:
        del score["head_image_gain"]  # as before the key (the image took the map's gain): cached graphs stay valid
    if not head or gain == 1.0:  # likewise
        del score["head_gain"]
    if not head or score["head_image_score"] == "map":  # likewise
        del score["head_image_score"]
    del score["scorer_position_weight"], score["map_position_weight"]  # they shape stored statistics (hashed)
    for key in ("feature_gaussian", "nearest_map"):
        if not score[key]:  # as before the key: cached graphs stay valid
            del score[key]
    if not (head and score.get("nearest_map") and score["head_bank_residual"]):  # likewise, where it changes nothing
        del score["head_bank_residual"]
    if not model.nearest_basis.shape[1]:  # likewise: an exact search (no bank, 0, or dims >= its channels)
        del score["nearest_search_dims"]
    del score["nearest_bank_rows"]  # as before the key: the hashed weights hold the bank's rows
    model_cfg = asdict(model.cfg)
    if model_cfg["feature_pool"] == 1:  # likewise
        del model_cfg["feature_pool"]
    settings = json.dumps({"model": model_cfg, "score": score}, sort_keys=True)
    return _state_hash(model.state_dict(), settings.encode())


@dataclass
class RunRecord:
    """A fitted run's description besides its weights: what config.json holds, by section,
    and the replay features kept for updates (their own file)."""

    config: RunConfig  # settings
    thresholds: Thresholds  # calibration: decisions
    score_stats: dict[str, Any]  # calibration: held-out good scores (calibration.score_stats)
    provenance: dict[str, Any] = field(default_factory=dict)  # adtr_version, data, fit/feature seconds
    history: list[dict] = field(default_factory=list)  # one record per epoch
    replay: ReplayData | None = None  # RUN/replay.safetensors; None for runs saved before it
    inputs: InputProfile | None = None  # the training images (drift.py); None for runs saved before it

    def to_doc(self) -> dict[str, Any]:
        """The sections as config.json lays them out (settings at the top level)."""
        doc = {
            **self.config.to_dict(),
            "calibration": {"thresholds": self.thresholds.to_dict(), "score_stats": self.score_stats},
            "provenance": self.provenance,
            "history": self.history,
        }
        if self.inputs is not None:
            doc["inputs"] = self.inputs.to_dict()
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any], config: RunConfig) -> RunRecord:
        """Read a config.json of this layout or of the flat one written before it (thresholds,
        score_stats, adtr_version, data, ... at the top level). KeyError / TypeError / ValueError
        when the thresholds or the input profile are missing or malformed."""
        if "calibration" in doc:
            calibration, provenance = doc["calibration"], doc.get("provenance", {})
        else:
            calibration = doc
            provenance = {k: doc[k] for k in ("adtr_version", "data", "fit_seconds", "feature_seconds") if k in doc}
        inputs = InputProfile.from_dict(doc["inputs"]) if doc.get("inputs") is not None else None
        return cls(config, Thresholds.from_dict(calibration["thresholds"]), calibration.get("score_stats", {"n": 0}),
                   provenance, doc.get("history", []), inputs=inputs)  # fmt: skip


def file_list_summary(paths: list[Path | str], contents: bool = False) -> dict[str, Any]:
    """{"n": count, "sha256": hash of the paths in order}: names a run's data without listing it.

    With contents, also "content_sha256": the hash of the files' own hashes in order, which
    changes when a file at the same path does."""
    summary = {"n": len(paths), "sha256": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()}
    if contents:
        summary["content_sha256"] = hashlib.sha256("\n".join(file_sha256(p) for p in paths).encode()).hexdigest()
    return summary


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_run(run_dir: Path | str, model: ADTR, record: RunRecord) -> None:
    """Write weights, replay features, then config.json, each atomically; then drop run_dir's
    resumable training state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    atomic_write(run_dir / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    save_replay(run_dir, record.replay)  # none: a stale file of a replaced run must not stay
    doc = {"format": FORMAT, "backbone_sha256": backbone_fingerprint(model), **record.to_doc()}
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
    """Rebuild the model of a run folder; returns (model in eval mode, config, config.json).

    RunFolderError for a missing, incomplete, tampered or foreign folder; `load_record` adds
    the record's sections."""
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
    if any(k.startswith("image_scorer.net.") for k in unexpected) and config.model.token_patch > 1:
        raise RunFolderError(
            f"{weights}: its image scorer ran on the finer feature grid (token_patch "
            f"{config.model.token_patch}), as saved before the scorer moved to the token grid; this "
            "version cannot score it: fit the run again"
        )
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


def load_record(run_dir: Path | str, device: torch.device | str = "cpu") -> tuple[ADTR, RunRecord]:
    """The model and record of a run folder (either config.json layout), with its replay
    features where it has them; RunFolderError when it cannot be loaded or its thresholds are
    missing."""
    model, config, doc = load_run(run_dir, device)
    try:
        record = RunRecord.from_doc(doc, config)
    except (KeyError, TypeError, ValueError) as e:
        raise RunFolderError(f"{Path(run_dir) / CONFIG_FILE}: missing or invalid thresholds or inputs ({e})") from None
    record.replay = load_replay(run_dir, (model.channels, *config.model.grid_size), config.model.image_size)
    return model, record


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
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"{run_dir}: {folder} is a file, not a folder; --out names the run folder to create")
    if (run_dir / CONFIG_FILE).exists() and not force:
        raise RunFolderError(f"{run_dir}: already holds a run; choose another --out or pass --force")
    if has_train_state(run_dir) and not (resume or force):
        raise RunFolderError(f"{run_dir}: holds an interrupted fit; pass --resume to continue it or --force")
    if resume and not has_train_state(run_dir):
        raise RunFolderError(f"{run_dir}: no interrupted fit to resume")


def _training_settings(config: Any) -> Any:
    """A saved or current config as JSON, with keys added since filled in (RunConfig.from_dict), so
    that a state saved by an earlier version resumes; without the defect head's gain, which is set
    after training and does not change it, what scores a head run's image and at what weight, the map's smoothing,
    the image scorer's per-position weight, and the query fallback's threshold; step_pixels as the
    reconstructor's steps it gives (config.steps_for)."""
    try:
        run = RunConfig.from_dict(config)
        doc = json.loads(json.dumps(run.to_dict()))  # as JSON: tuples are lists there
    except (TypeError, ValueError, AttributeError):
        return config
    doc["score"].pop("head_gain", None)
    # the image score's source only as the tensors it makes a training state hold: a Gaussian set
    # on (True) or not (unset, off, or a state saved before the key)
    doc["score"]["feature_gaussian"] = doc["score"].get("feature_gaussian") is True
    doc["score"]["nearest_map"] = doc["score"].get("nearest_map") is True  # likewise the memory bank
    # nor the defect head's input, a head fitted after training (load_train_state skips its
    # weights where their shape changed with it)
    doc["score"].pop("head_bank_residual", None)
    # nor the bank's search subspace, set with the bank after training (load_train_state likewise)
    doc["score"].pop("nearest_search_dims", None)
    # nor the bank's rows, set with the bank after training (an init's may have grown in an update)
    doc["score"].pop("nearest_bank_rows", None)
    # nor what scores a head run's image: a score setting (a state saved before it reads "map")
    doc["score"].pop("head_image_score", None)
    doc["score"].pop("head_image_gain", None)
    # nor the map's smoothing, applied after the model (a state saved when its default was 4
    # resumes under today's default; the finished run takes the smoothing resumed with)
    doc["score"].pop("smoothing_sigma", None)
    # nor the scorer's and the map's per-position weights, used on the statistics set after training
    doc["score"].pop("scorer_position_weight", None)
    doc["score"].pop("map_position_weight", None)
    # nor the query fallback's threshold: a state saved before it existed (read as off) resumes
    # under the default; a state saved after the fallback is told apart by its use_query
    doc["train"].pop("query_fallback", None)
    # step_pixels as the reconstructor's budget it plans: a state saved before the key (read as
    # off) resumes where the input is no larger than step_pixels, and the plan is the same
    doc["train"]["reconstructor_steps"] = (steps_for(run.train, run.model.image_size)
                                           if run.train.epochs is None else None)  # epochs override both  # fmt: skip
    doc["train"].pop("step_pixels", None)
    # nor the defects pasted for the head, which is fitted after training (a state saved before
    # the key reads 0 and resumes under today's default)
    doc["train"].pop("head_paste", None)
    return doc


def saved_config_matches(run_dir: Path | str, config: RunConfig) -> bool:
    """Whether run_dir's saved training state was started with config's settings (the ones
    load_train_state compares); False when there is no readable state."""
    try:
        doc = json.loads((Path(run_dir) / STATE_DIR / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and _training_settings(doc.get("config")) == _training_settings(config.to_dict())


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
    saved, now = _training_settings(doc.get("config")), _training_settings(config.to_dict())
    if saved != now:
        differ = sorted(f"{key} (saved {saved[part][key]!r}, now {now[part].get(key)!r})"
                        for part in ("model", "score", "train") if isinstance(saved, dict) and part in saved
                        for key in saved[part] if saved[part][key] != now.get(part, {}).get(key))  # fmt: skip
        hint = ""
        if any(d.startswith("reconstructor_steps") for d in differ):  # a plan, not an option: name the options
            hint = (" (reconstructor_steps: the transformer's steps that --steps and --step-pixels plan at the input "
                    "size; a state saved before --step-pixels existed resumes with --step-pixels off)")
        listed = ": " + ", ".join(differ) if differ else ""
        raise RunFolderError(f"{json_path}: the run was started with other settings{listed}{hint}; "
                             "resume with the same ones")  # fmt: skip
    epoch = int(doc["epoch"])
    if saved_epoch != str(epoch):
        raise RunFolderError(f"{state_dir}: weights and {STATE_JSON} are from different epochs")
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = trainable_state(model)
    # the head's weights are fitted after training: saved before its input could read the memory
    # bank (ScoreConfig.head_bank_residual) they have fewer channels, and the fit sets them anew;
    # likewise the bank's search basis (ScoreConfig.nearest_search_dims), absent from states saved
    # before it or with another number of dimensions
    after = {"head_weight", "nearest_basis"}
    refit = after & {k for k in set(expected) | set(model_state)
                     if k not in model_state or k not in expected or model_state[k].shape != expected[k].shape}
    if set(model_state) - refit != set(expected) - refit or any(model_state[k].shape != v.shape
                                                                for k, v in expected.items() if k not in refit):
        raise RunFolderError(f"{weights_path}: tensors do not match the model")
    model.load_state_dict({k: v for k, v in model_state.items() if k not in refit}, strict=False)
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
