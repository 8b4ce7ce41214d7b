"""Updating a deployed run (`adtr update`): new defects, new good images or external images
are learnt in minutes, without the original training data, and an update that forgets is refused.

The update is the fit sequence (fit.fit_on_features) started from the parent's weights, its
feature statistics kept, for a small number of steps (DEFAULT_STEPS) on
  good:      the parent's replay sample (replay.py) + the training part of the new good images.
             New good images alone train the reconstructor only where it cannot rebuild them
             (reconstruction_check: their loss above RETRAIN_RATIO x the parent's held-out
             loss); the image scorer, trained long by design, learns them in any case;
  anomalies: the new labelled defects and external images. Under the run's
             labelled_anomalies == "head" (runs fitted since the defect head) the defects fit
             the defect head on the replay features (defect_head.py) and, when nothing else is
             added, the reconstructor is kept as it is (recorded as 0 steps: seconds, not
             minutes); the head is fitted on the parent's kept defects (replay.py) + the new.
             Under "loss" they enter L_px (a mask) or L_img, as the parent's fit did;
  held out:  the parent's validation features + the held-out part of the new good images
             (TrainConfig.val_fraction, seeded): the validation loss and the new thresholds
             (calibration.py; without held-out images, from the training features, which
             states no false-alarm rate).
Synthetic anomalies are not made again: they need the original image files. The run's input
profile (drift.py) is the parent's widened by the new good images.

Forgetting guard: on the parent's validation good images, the share flagged at the new run's
image threshold (the decision it will make on the line) must not exceed the parent's recorded
false-alarm rate by more than MAX_FORGETTING (1 point); else ForgettingError, or a warning with
allow_forgetting. The rate at the parent's threshold is recorded beside it. Nothing is written
here: the caller saves the result to a new folder; the parent's folder is only read.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adtr import __version__
from adtr.calibration import calibrate, feature_scores, score_stats
from adtr.checkpoint import WEIGHTS_FILE, RunRecord, file_list_summary, file_sha256
from adtr.config import ScoreConfig
from adtr.data.folder import anomaly_samples, good_images, image_folder
from adtr.data.mvtec import is_mvtec, train_samples
from adtr.data.samples import Sample
from adtr.data.splits import split_validation
from adtr.defect_head import default_gain
from adtr.drift import ImageInfo, InputProfile
from adtr.engine import extract_features, validation_loss
from adtr.errors import ForgettingError, RunFolderError, SettingsError
from adtr.fit import fit_on_features, head_samples, threshold_anomaly_scores, with_defect_head
from adtr.model import ADTR
from adtr.replay import REPLAY_FILE, make_replay

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50  # optimisation steps of an update (a fit has 200): about a minute on 2 cores
MAX_FORGETTING = 0.01  # allowed rise of the old good images' false-alarm rate
# New good images whose reconstruction loss under the parent is at most this many times the
# parent's own held-out images' leave the reconstructor as it is: training it further taught it to
# rebuild bsdata's pits (a new lighting at 1.02x: -2.3 AUPRO points on the parent's parts), while
# metal_plate's new lightings at 1.60x and 2.11x gained 0.4 and 0.65 on the new parts by training;
# 1.25 lies between, about their geometric mean (docs/design.md, "An update trains the
# reconstructor only for new good images it cannot rebuild").
RETRAIN_RATIO = 1.25
RETRAIN = ("auto", "always", "never")

Folder = str | Path | Sequence[Sample] | None


def forgetting_check(
    parent_rate: float, scores: np.ndarray, threshold: float, tolerance: float = MAX_FORGETTING
) -> dict[str, Any]:
    """The guard on the parent's validation good images' scores (N,) under the updated model.

    Returns {"n", "threshold", "false_alarm_rate" (share of scores >= threshold),
    "parent_false_alarm_rate", "tolerance", "passed"}; the rate and passed are None without images.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rate = float(np.mean(scores >= threshold)) if scores.size else None
    passed = None if rate is None else bool(rate <= parent_rate + tolerance + 1e-12)
    return {"n": int(scores.size), "threshold": float(threshold), "false_alarm_rate": rate,
            "parent_false_alarm_rate": float(parent_rate), "tolerance": tolerance, "passed": passed}  # fmt: skip


def head_gain_on_update(score: ScoreConfig, kept_masked: int, new_masked: int) -> ScoreConfig:
    """The head's weight in the map (score.head_gain) after an update that fits the head again
    on the parent's kept defects (kept_masked with masks) and new ones (new_masked with masks).

    A weight the rule gave the parent (defect_head.default_gain of its kept masked defects)
    follows the rule for all of them: a head fitted on one masked defect (half weight) takes the
    full weight once three are known, as a fresh fit would. Any other weight (given with
    --head-gain, or a rule of an earlier version) is kept, as updates keep their parent's
    settings, and the log says what a fresh fit with these defects would weigh. The run does not
    record where its weight came from: a weight given equal to the rule's is taken as the rule's,
    and where the replay bound (replay.py) dropped some of the parent's defects, the count is of
    those kept."""
    total = kept_masked + new_masked
    before, now = default_gain(kept_masked, score.head_reads_bank), default_gain(total, score.head_reads_bank)
    if score.head_gain == now:
        return score
    if score.head_gain == before:
        log.info("the defect head's weight in the map: %g -> %g, the weight of a head fitted on %d masked defects "
                 "(docs/design.md, \"The head's weight with one or two defects\")", before, now, total)  # fmt: skip
        return dataclasses.replace(score, head_gain=now)
    log.info("the defect head keeps the parent's weight %g in the map; a fresh fit with these %d masked defects "
             "weighs it %g (--head-gain %g; docs/design.md, \"The head's weight\")", score.head_gain, total, now,
             now)  # fmt: skip
    return score


def update_run(
    parent: ADTR,
    record: RunRecord,
    parent_dir: str | Path,
    device: torch.device,
    *,
    anomalies: Folder = None,
    good: Folder = None,
    external: Folder = None,
    steps: int = DEFAULT_STEPS,
    allow_forgetting: bool = False,
    head_gain: float | None = None,
    retrain: str = "auto",
    progress: bool = True,
) -> tuple[ADTR, RunRecord]:
    """The parent run (model, record, its folder) continued with new data: (model, record).

    anomalies: labelled defects, as `adtr fit --anomalies` reads them (test layout with optional
        ground_truth/ masks, or a plain folder: image labels), or samples.
    good: new good images: an MVTec category or folder with good/ (its good training images),
        a plain folder of images, or samples. external: unrelated images (image-level anomalies).
    The parent model is not changed (a copy is trained). The new record names the parent
    (folder and weights hash) and what was added (counts, hashes of paths and contents).
    head_gain: the defect head's weight in the map (ScoreConfig.head_gain) instead of the
    parent's (without it, a head fitted again keeps the parent's, or follows the rule where the
    rule gave it: head_gain_on_update); SettingsError when the new run has no head. A head
    fitted (anomalies) or reweighed (head_gain) now takes today's weight in the image score
    (ScoreConfig.head_image_gain); otherwise the parent's is kept.
    retrain: whether new good images train the reconstructor (the map's network) for `steps`:
    "auto" where reconstruction_check finds their loss above RETRAIN_RATIO x the parent's, or
    "always", or "never"; external images and anomalies in the losses always train it. The image
    scorer, where it scores the image (not where a Gaussian per position does), learns new good
    images in any case. The check's figures are recorded (provenance.update.reconstruction_check,
    the decision's reason in provenance.update.reconstructor_reason).
    Raises RunFolderError for a parent without replay features (saved before they existed),
    SettingsError for nothing to add, a bad step count or retrain value (or "never" with
    external images or anomalies in the losses), DataError for unreadable data,
    ForgettingError when the guard fails and allow_forgetting is False.
    """
    parent_dir = Path(parent_dir)
    if record.replay is None:
        raise RunFolderError(
            f"{parent_dir / REPLAY_FILE}: missing: {parent_dir} was saved before adtr kept the good features an "
            "update needs; fit it again (adtr fit) with this version to make it updatable"
        )
    if anomalies is None and good is None and external is None:
        raise SettingsError("nothing to add: give new anomalies, good images or external images (--head-gain "
                            "reweighs the head of an update that adds some)")  # fmt: skip
    if retrain not in RETRAIN:
        raise SettingsError(f"retrain must be one of {', '.join(RETRAIN)}, got {retrain!r}")
    labelled = _samples(anomalies, anomaly_samples)
    new_good = _samples(good, _good_samples)
    new_external = _samples(external, lambda p: image_folder(p, label=1))
    # what trains the reconstructor besides new good images it cannot rebuild: external images and
    # anomalies that enter its losses (new defects for the defect head alone leave it as it is)
    in_losses = bool(new_external) or len(head_samples(record.config, labelled)) < len(labelled)
    if retrain == "never" and in_losses:
        raise SettingsError("--retrain never: the update's external images or anomalies (under --labelled-anomalies "
                            "loss) train the reconstructor through its losses; leave them out or use --retrain "
                            "auto")  # fmt: skip
    if retrain != "auto" and not new_good:
        log.warning("--retrain %s decides only what new good images (--good) do; there are none", retrain)
    try:
        # `steps` as given, at any input size (step_pixels off): an update's budget is its own
        train = dataclasses.replace(record.config.train, steps=steps, epochs=None, step_pixels=None)
    except ValueError as e:  # TrainConfig's own checks
        raise SettingsError(str(e)) from None
    config = dataclasses.replace(record.config, train=train)
    replay = record.replay
    t0 = time.perf_counter()
    model = copy.deepcopy(parent)  # fit_on_features trains its init in place
    infos: dict[int, ImageInfo] = {}
    new_raw = (extract_features(model, new_good, device, progress=progress, on_info=infos.__setitem__) if new_good
               else replay.good[:0].float())  # fmt: skip
    new_train, new_val = split_validation(len(new_good), train.val_fraction, train.seed)
    feature_seconds = time.perf_counter() - t0
    features = torch.cat([replay.good.float(), new_raw[new_train], replay.val.float(), new_raw[new_val]])
    n_train = len(replay.good) + len(new_train)
    config, model = with_defect_head(config, labelled, model)
    score = config.score
    if head_gain is not None:
        if not score.defect_head:
            raise SettingsError("--head-gain: this run has no defect head and the update fits none (it needs "
                                "labelled anomalies)")  # fmt: skip
        try:
            score = dataclasses.replace(score, head_gain=head_gain)
        except ValueError as e:  # ScoreConfig's own checks
            raise SettingsError(str(e)) from None
    if score.defect_head and (head_samples(config, labelled) or head_gain is not None):
        # a head fitted or reweighed now scores the image as a fresh fit's does (a parent saved
        # before ScoreConfig.head_image_gain weighed it as in the map)
        image_gain = ScoreConfig().head_image_gain
        if score.head_image_gain != image_gain:  # a run saved before the key: its image scores change meaning
            log.info("the defect head's weight in the image score: %g (the parent's: %g, saved before the setting); "
                     "the thresholds are recalibrated", image_gain, score.head_image_gain)  # fmt: skip
        score = dataclasses.replace(score, head_image_gain=image_gain)
    if score.defect_head and head_samples(config, labelled) and not score.head_bank_residual:
        # a head fitted anew reads what a fresh fit's does (a parent saved before the key read the
        # reconstruction residual alone; with a memory bank it now reads the bank's residual too)
        score = dataclasses.replace(score, head_bank_residual=ScoreConfig().head_bank_residual)
    if record.config.score.defect_head and head_samples(config, labelled) and head_gain is None:
        kept = 0 if replay.defects is None else int(replay.defects.pixel_level.sum())
        score = head_gain_on_update(score, kept, sum(s.mask_path is not None for s in labelled))
    if score != config.score:
        config = dataclasses.replace(config, score=score)
        model = model.with_score(score)
    check = None
    if new_good:
        # every new image (the parent saw none) against the parent's held-out images, or its
        # training sample where it held none out (a lower loss: the ratio errs towards training)
        parent_source = "held_out" if len(replay.val) else "training"
        check = reconstruction_check(model, (replay.val if len(replay.val) else replay.good).float(), new_raw, device)
        check.update(parent_source=parent_source, retrain=retrain)
    trains, reason = _reconstructor_decision(in_losses, check, retrain)
    log.info("the reconstructor %s: %s", f"trains {steps} steps" if trains else "is kept as it is", reason)
    # the image scorer learns new good images in any case (trained long by design), unless a
    # Gaussian per position scores the images (ScoreConfig.feature_gaussian): then the scorer
    # scores nothing and an update leaves it
    scorer_trains = (trains or bool(new_good)) and not model.score_cfg.feature_gaussian
    fitted = fit_on_features(config, features, device, val_idx=range(n_train, len(features)),
                             anomalies=labelled or None, external=new_external or None, init=model,
                             progress=progress, train_reconstructor=trains, train_image_scorer=scorer_trains,
                             prior_defects=replay.defect_pool(model),
                             backgrounds=replay.background_images(), prior_pixels=replay.defect_pixels,
                             good_joins=new_raw[new_train])  # fmt: skip
    config = dataclasses.replace(config, score=fitted.model.score_cfg)  # with the head's gain, if chosen
    source = "held_out" if len(fitted.val) else "training"
    scores, maxima = feature_scores(fitted.model, fitted.val if len(fitted.val) else fitted.train, device)
    anomalous = threshold_anomaly_scores(fitted, device)
    thresholds = calibrate(scores, maxima, anomalous, train.false_alarm_rate, source)
    old_val = fitted.val[: len(replay.val)]  # the parent's validation images come first
    old_scores = feature_scores(fitted.model, old_val, device)[0]
    guard = forgetting_check(record.thresholds.false_alarm_rate, old_scores, thresholds.image)
    guard["false_alarm_rate_at_parent_threshold"] = forgetting_check(
        record.thresholds.false_alarm_rate, old_scores, record.thresholds.image
    )["false_alarm_rate"]
    _apply_guard(guard, parent_dir, allow_forgetting)
    provenance = {
        "adtr_version": __version__,
        "data": record.provenance.get("data", {}),  # the original fit's data, carried along the lineage
        "update": {
            "parent": {"path": str(parent_dir.resolve()), "weights_sha256": file_sha256(parent_dir / WEIGHTS_FILE)},
            "added": {
                "anomalies": {**file_list_summary([s.path for s in labelled], contents=True),
                              "n_pixel_labelled": sum(s.mask_path is not None for s in labelled)},
                "anomaly_files": [str(s.path) for s in labelled + new_external],
                "good_train": file_list_summary([new_good[i].path for i in new_train], contents=True),
                "good_val": file_list_summary([new_good[i].path for i in new_val], contents=True),
                "external": file_list_summary([s.path for s in new_external], contents=True),
            },
            "steps": steps if trains else 0,  # 0: the reconstructor was kept as it is
            "reconstructor_reason": reason,  # why it trained or was kept, in words
            "image_scorer_trained": scorer_trains and fitted.model.uses_image_scorer,
            "reconstruction_check": check,  # None without new good images
            "head_pasted": fitted.head_pasted,  # pasted copies of the head's defects, old and new (defect_paste.py)
            "forgetting_guard": guard,
        },
        "fit_seconds": time.perf_counter() - t0,
        "feature_seconds": feature_seconds,  # the new good images' (the anomalies' are in fit_seconds)
    }  # fmt: skip
    new_replay = make_replay(fitted.model, fitted.train, fitted.val, train.seed, fitted.head_defects,
                             fitted.backgrounds, fitted.head_pixels)  # fmt: skip
    provenance["replay"] = new_replay.summary()
    inputs = record.inputs
    if inputs is not None and infos:  # a parent without a profile (saved before it) keeps none
        inputs = inputs.widened(InputProfile.from_infos(infos.values()))
    return fitted.model, RunRecord(config, thresholds, score_stats(scores), provenance, fitted.history, new_replay,
                                   inputs)  # fmt: skip


def reconstruction_check(
    model: ADTR, parent_features: torch.Tensor, new_features: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    """Whether the parent's reconstructor rebuilds new good images as well as its own.

    parent_features, new_features: raw backbone features (N, C, h, w) of the parent's held-out
    good images (or its training sample) and of the new ones, standardised here with the
    parent's statistics. Returns {"parent_loss", "new_loss" (validation MSE,
    engine.validation_loss), "ratio" (new / parent), "threshold" (RETRAIN_RATIO),
    "above_threshold", "n_parent", "n_new" (images)}.
    """
    parent_loss = validation_loss(model, model.standardize(parent_features.to(device)), device)
    new_loss = validation_loss(model, model.standardize(new_features.to(device)), device)
    ratio = new_loss / max(parent_loss, 1e-12)
    return {"parent_loss": parent_loss, "new_loss": new_loss, "ratio": ratio, "threshold": RETRAIN_RATIO,
            "above_threshold": bool(ratio > RETRAIN_RATIO), "n_parent": len(parent_features),
            "n_new": len(new_features)}


def _reconstructor_decision(in_losses: bool, check: dict[str, Any] | None, retrain: str) -> tuple[bool, str]:
    """Whether an update trains the reconstructor, and why, in words."""
    if in_losses:
        return True, "external images or anomalies enter its losses"
    if check is None:
        return False, "new defects alone fit only the defect head"
    if retrain != "auto":
        return retrain == "always", f"--retrain {retrain}"
    images = "held-out images" if check["parent_source"] == "held_out" else "training images (none held out)"
    above = check["above_threshold"]
    return above, (f"the new good images' reconstruction loss is {check['ratio']:.2f}x that of the parent's {images}, "
                   f"{'above' if above else 'within'} {check['threshold']:g}x"
                   + ("" if above else ": it rebuilds them (--retrain always trains it)"))


def _apply_guard(guard: dict[str, Any], parent_dir: Path, allow_forgetting: bool) -> None:
    """Raise ForgettingError for a failed guard, or warn with allow_forgetting; warn when it cannot run."""
    if guard["passed"] is None:
        log.warning("%s has no held-out validation images (fewer than 5 good ones, or thresholds from cross-fitted "
                    "scores): the forgetting guard cannot run", parent_dir)  # fmt: skip
        return
    if guard["passed"]:
        return
    message = (
        f"the update would forget: {guard['false_alarm_rate']:.1%} of the {guard['n']} validation good images of "
        f"{parent_dir} are flagged at the new threshold, against {guard['parent_false_alarm_rate']:.1%} for the "
        f"parent (at most +{guard['tolerance']:.0%} allowed)"
    )
    if not allow_forgetting:
        raise ForgettingError(message + "; nothing written. Add new good images (--good), take fewer --steps, "
                              "or pass --allow-forgetting to keep it anyway")  # fmt: skip
    log.warning("%s; kept anyway (allow_forgetting)", message)


def _samples(source: Folder, read) -> list[Sample]:
    """Samples of a folder (read by `read`) or given as samples; [] for None."""
    if source is None:
        return []
    return read(Path(source)) if isinstance(source, (str, Path)) else list(source)


def _good_samples(root: Path) -> list[Sample]:
    """New good images: an MVTec category's or a folder's good/ training images, else every image of
    a plain folder (not recursive, so that defect sub-folders are never read as good)."""
    return train_samples(root) if is_mvtec(root) or (root / "good").is_dir() else good_images(root)
