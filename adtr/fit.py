"""The fit sequence, written once: seed -> ADTR -> feature statistics -> standardise ->
anomaly pools -> shuffling generator -> fit_reconstructor (You et al., ICONIP 2022, section 3).

`fit_run` (ADTRDetector.fit, `adtr fit`: folders -> samples -> validation split -> fit ->
calibration on held-out or cross-fitted scores (calibration.py; the fold models are fitted
here) -> the run's record), the one-class protocol (`oneclass.fit_class`, features of
in-memory images) and multi-process training (adtr/distributed.py: each rank runs this same
sequence on its block of the images) all call `fit_on_features`, so a setting means the same
thing on every path and a seed gives the same weights on each.

The frozen backbone is part of the model, so image files are turned into features here, by
the model being fitted; precomputed raw features (N, C, h, w) pass through unchanged. Feature
extraction draws no random numbers, so where the features come from does not change the
random streams: torch's global generator (weight initialisation, then dropout) is seeded once,
before the model is built, and shuffling has its own `torch.Generator` with the same seed. A fit
that falls back to the no-query reconstructor (TrainConfig.query_fallback) seeds both again
before building it, so it equals a direct no-query fit.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adtr import __version__, distributed
from adtr.anomalies import AnomalyGenerator, get_generator
from adtr.calibration import MIN_HELD_OUT, calibrate, feature_scores, score_stats
from adtr.checkpoint import (
    RunRecord,
    file_list_summary,
    load_run,
    load_train_state,
    save_train_state,
    saved_config_matches,
)
from adtr.config import RunConfig, TrainConfig
from adtr.data.folder import anomaly_samples, image_folder
from adtr.data.images import image_size
from adtr.data.mvtec import train_samples
from adtr.data.samples import Sample
from adtr.data.splits import split_validation
from adtr.data.transforms import input_size_for
from adtr.defect_head import PSEUDO_SHARE, DefectHead, default_gain, fit_defect_head, head_norm
from adtr.defect_paste import MAX_PASTED, copies_for, defect_pixels, load_backgrounds, paste_copies, paste_defects
from adtr.drift import ImageInfo, InputProfile
from adtr.engine import (
    AnomalyPool,
    TrainingData,
    anomaly_pool,
    extract_features,
    fit_image_scorer,
    fit_reconstructor,
    make_optimizer,
    planned_epochs,
    synthetic_pools,
    token_labels,
)
from adtr.errors import DataError, SettingsError
from adtr.model import ADTR
from adtr.replay import load_replay, make_replay

log = logging.getLogger(__name__)

Images = Sequence[Sample] | torch.Tensor  # image files, or their raw backbone features (N, C, h, w)


@dataclass
class FitResult:
    """A fitted model and what calibration needs from the fit."""

    model: ADTR  # in eval mode
    history: list[dict]  # one record per epoch (engine.fit_reconstructor)
    train: torch.Tensor  # (N_train, C, h, w) standardised features of the training images
    val: torch.Tensor  # (N_val, C, h, w) standardised features of the held-out good images (may be empty)
    anomalies: AnomalyPool | None  # standardised real and external anomalies (pool.kinds says which)
    feature_seconds: float  # spent extracting features (0 for precomputed ones)
    raw: torch.Tensor  # (N, C, h, w) raw features of all good images, in their order (cross-fitting reuses them)
    infos: list[ImageInfo]  # size and colour mode of each good image file, in order ([] for features)
    head_defects: AnomalyPool | None = None  # standardised defects the defect head was fitted on
    # uint8 images (K, H, W, 3) and masks (K, H, W) of head_defects, in a run that pastes them
    head_pixels: tuple[torch.Tensor, torch.Tensor] | None = None
    backgrounds: torch.Tensor | None = None  # (B, H, W, 3) uint8 good images defects are pasted onto
    head_pasted: int = 0  # pasted copies of defects the head was also fitted on (defect_paste.py)


def fit_run(
    config: RunConfig,
    data: str | Path | Sequence[Sample],
    device: torch.device,
    *,
    anomalies: str | Path | Sequence[Sample] | None = None,
    synthetic: Sequence[str] = (),
    external: str | Path | None = None,
    init: str | Path | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[ADTR, RunRecord]:
    """A run from folders or samples: (fitted model, its record: settings, calibration,
    provenance, history). The arguments are ADTRDetector.fit's; the record's config has the
    input size filled in (from the training images' aspect ratio when unset) and, with init,
    that run's model and score settings (but a head fitted now takes config's head gains: the
    map's, or the default rule when it is None, and the image's); record.replay keeps good features for later updates
    (replay.py), record.inputs profiles the good images (drift.InputProfile). DataError /
    SettingsError / RunFolderError for bad input.
    """
    samples = train_samples(Path(data)) if isinstance(data, (str, Path)) else list(data)
    if any(s.label != 0 for s in samples):
        raise DataError("the training data must be good images only (label 0); pass anomalies separately")
    labelled = anomaly_samples(Path(anomalies)) if isinstance(anomalies, (str, Path)) else list(anomalies or [])
    external_samples = image_folder(Path(external), label=1) if external is not None else []
    try:
        generators = [get_generator(name) for name in synthetic]
    except ValueError as e:
        raise SettingsError(str(e)) from None
    if config.score.head_gain is not None and not head_samples(config, labelled):
        log.warning("the head gain (--head-gain) is ignored: no defect head is fitted now (it needs labelled "
                    "anomalies and --labelled-anomalies head)")  # fmt: skip
    base, prior, prior_pixels = None, None, None
    if init is not None:
        base, base_config, _ = load_run(init, device)
        score = base_config.score
        if head_samples(config, labelled):  # a head fitted now takes the caller's gains (None: the fit's rule)
            score = dataclasses.replace(score, head_gain=config.score.head_gain,
                                        head_image_gain=config.score.head_image_gain,
                                        head_bank_residual=config.score.head_bank_residual)  # fmt: skip
        config = dataclasses.replace(config, model=base_config.model, score=score)
        replay = load_replay(init, (base.channels, *base_config.model.grid_size), base_config.model.image_size)
        prior = replay.defect_pool(base) if replay is not None else None  # an init's head keeps its defects
        prior_pixels = replay.defect_pixels if replay is not None else None
    config, base = with_defect_head(config, labelled, base)
    if config.model.image_size is None:
        size = input_size_for([image_size(s.path) for s in samples])
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, image_size=size))
        log.info("input size %dx%d (height x width), from the training images' aspect ratio", *size)
    t0 = time.perf_counter()
    train_idx, val_idx = split_validation(len(samples), config.train.val_fraction, config.train.seed)
    source = calibration_source(config.train.calibration, len(samples), len(val_idx))
    if source == "crossfit":  # every image trains the final model; the folds' models score them
        train_idx, val_idx = list(range(len(samples))), []
    chooses = config.model.image_scorer is not None and config.score.residual_norm == "channel_position"
    if chooses and len(val_idx) < 2 and config.score.scorer_position_weight is None:  # too few held out to choose
        config = dataclasses.replace(config, score=dataclasses.replace(config.score, scorer_position_weight=0.5))
    fold_init = copy.deepcopy(base) if base is not None and source == "crossfit" else None  # before fitting base
    # with --init and masked defects for the head alone, the init's reconstructor is kept as it is
    keep = base is not None and head_only(config, labelled, external_samples, generators)
    fitted = fit_on_features(config, samples, device, val_idx=val_idx, anomalies=labelled, external=external_samples,
                             generators=generators, init=base, state_dir=state_dir, resume=resume,
                             progress=progress, train_reconstructor=not keep, prior_defects=prior,
                             prior_pixels=prior_pixels, probe_fallback=source == "crossfit")  # fmt: skip
    # the fitted model's settings: the head's gain, if chosen; no query, if the fit fell back
    config = dataclasses.replace(config, model=fitted.model.cfg, score=fitted.model.score_cfg)
    if source == "crossfit" and keep:
        log.warning("the init run's reconstructor%s trained on every good image and is kept, so the cross-fitted "
                    "calibration refits only the defect head and scores images those networks trained on: the "
                    "threshold is likely too low (more false alarms on new good parts). Hold out good images "
                    "instead (more good images, or --calibration held_out) or fit without --init",
                    " and image scorer" if fitted.model.uses_image_scorer else "")  # fmt: skip
    if source == "crossfit":
        scores, maxima = crossfit_scores(config, samples, fitted.raw, device, anomalies=labelled,
                                         external=external_samples, generators=generators, init=fold_init,
                                         progress=progress, train_reconstructor=not keep,
                                         prior_defects=prior, prior_pixels=prior_pixels)  # fmt: skip
    else:
        scores, maxima = feature_scores(fitted.model, fitted.val if source == "held_out" else fitted.train, device)
    anomalous = threshold_anomaly_scores(fitted, device)
    thresholds = calibrate(scores, maxima, anomalous, config.train.false_alarm_rate, source)
    log.info("%s", thresholds.describe())
    provenance = {
        "adtr_version": __version__,
        "data": {
            "train": file_list_summary([samples[i].path for i in train_idx]),
            "val": file_list_summary([samples[i].path for i in val_idx]),
            "anomaly_files": [str(s.path) for s in labelled + external_samples],
            "n_external": len(external_samples),
            "n_pixel_labelled": sum(s.mask_path is not None for s in labelled),
            "synthetic": list(synthetic),
            "init": str(init) if init is not None else None,
        },
        # cross-fitting folds behind the thresholds (their source: calibration.thresholds.source)
        "calibration_folds": min(config.train.calibration_folds, len(samples)) if source == "crossfit" else None,
        "fit_seconds": time.perf_counter() - t0,
        "feature_seconds": fitted.feature_seconds,
        "processes": distributed.world_size(),
        "query_fallback": ({"query_val_loss": fitted.history[-1]["query_val_loss"],
                            "threshold": config.train.query_fallback}
                           if fitted.history and "query_val_loss" in fitted.history[-1] else None),
    }
    provenance["data"]["head_pasted"] = fitted.head_pasted
    replay = make_replay(fitted.model, fitted.train, fitted.val, config.train.seed, fitted.head_defects,
                         fitted.backgrounds, fitted.head_pixels)  # fmt: skip
    provenance["replay"] = replay.summary()
    return fitted.model, RunRecord(config, thresholds, score_stats(scores), provenance, fitted.history, replay,
                                   InputProfile.from_infos(fitted.infos))  # fmt: skip


def head_samples(config: RunConfig, anomalies: Images | None) -> list[Sample]:
    """The labelled anomalies that fit the defect head: all real ones given as samples, under
    labelled_anomalies == "head" (raw features always go to the loss, L_img)."""
    if config.train.labelled_anomalies != "head" or anomalies is None or isinstance(anomalies, torch.Tensor):
        return []
    return list(anomalies)


def with_defect_head(
    config: RunConfig, anomalies: Images | None, model: ADTR | None = None
) -> tuple[RunConfig, ADTR | None]:
    """(config, model) with score.defect_head set when labelled anomalies will fit a head; the
    model (an init or parent, may be None) is copied with the new score settings."""
    samples = head_samples(config, anomalies)
    if not samples:
        return config, model
    if config.score.image_score == "pooled_residual":
        raise SettingsError("the pooled_residual image score ignores the map, so a defect head would change no "
                            "decision: choose another image score, or --labelled-anomalies loss")  # fmt: skip
    config = dataclasses.replace(config, score=dataclasses.replace(config.score, defect_head=True))
    if model is not None and model.score_cfg != config.score:
        model = model.with_score(config.score)
    return config, model


def head_only(config: RunConfig, anomalies: Images | None, external: Images | None,
              generators: Sequence[AnomalyGenerator] = ()) -> bool:  # fmt: skip
    """True when every anomaly given fits the defect head: the reconstruction loss gains nothing
    from them."""
    n_anomalies = 0 if anomalies is None else len(anomalies)
    n_head = len(head_samples(config, anomalies))
    return n_head > 0 and n_head == n_anomalies and not generators and (external is None or len(external) == 0)


def threshold_anomaly_scores(fitted: FitResult, device: torch.device) -> np.ndarray | None:
    """Scores of the real labelled anomalies for the F1-optimal threshold, or None (thresholds
    from good images alone). None when the defect head was fitted on them: their in-sample
    scores sit far above unseen defects', and the F1 threshold would land on the weakest of them
    (missing unseen defects that score many times the good parts)."""
    if fitted.anomalies is None or fitted.head_defects is not None:
        return None
    real = fitted.anomalies.of_kind("real").features
    return feature_scores(fitted.model, real, device)[0] if len(real) else None


def calibration_source(mode: str, n_good: int, n_held_out: int) -> str:
    """Where thresholds come from (calibration.py): "held_out", "crossfit" or "training".

    mode is TrainConfig.calibration: "auto" cross-fits when fewer than MIN_HELD_OUT images are
    held out; a single image can only be scored by the model trained on it ("training").
    """
    if mode == "held_out" or (mode == "auto" and n_held_out >= MIN_HELD_OUT):
        return "held_out" if n_held_out else "training"
    return "crossfit" if n_good >= 2 else "training"


def crossfit_scores(
    config: RunConfig,
    good: Sequence[Sample],
    raw: torch.Tensor,
    device: torch.device,
    *,
    anomalies: Sequence[Sample] = (),
    external: Sequence[Sample] = (),
    generators: Sequence[AnomalyGenerator] = (),
    init: ADTR | None = None,
    progress: bool = True,
    train_reconstructor: bool = True,
    prior_defects: AnomalyPool | None = None,
    prior_pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and map maxima (N,) of every good image, each from a model fitted without it.

    K = min(config.train.calibration_folds, N) seeded folds (leave-one-out when K = N); each
    fold's model is fitted with the same settings, anomalies and init as the final one, on
    the raw features raw (N, C, h, w) of the good images (or on the files, which synthetic
    anomalies need): K more fits with the same step budget, on (K - 1) / K of the images each.
    init is copied per fold; train_reconstructor and prior_defects as fit_on_features's (with
    init and a head alone to fit, each fold fits only its head, as the final model did). Every
    rank of a process group runs the same folds.
    """
    n = len(good)
    k = min(config.train.calibration_folds, n)
    # the folds keep the final model's reconstructor: none decides a query fallback of its own
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, query_fallback=None))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.train.seed)).tolist()
    scores, maxima = np.empty(n), np.empty(n)
    for j in range(k):
        held = sorted(perm[j::k])
        log.info("calibration: cross-fitting fold %d of %d (%d of %d good images held out)", j + 1, k, len(held), n)
        backgrounds = None  # pasted defects (defect_paste.py) land on the fold's own training images
        pastes = paste_copies(config.train.head_paste, config.score.map_position_weight) > 0  # as the final model
        if pastes and head_samples(config, anomalies) and not generators:
            kept = set(held)
            backgrounds = load_backgrounds([good[i] for i in range(n) if i not in kept], config.model.image_size,
                                           config.train.seed)  # fmt: skip
        fold = fit_on_features(config, good if generators else raw, device, val_idx=held, anomalies=anomalies,
                               external=external, generators=generators,
                               init=copy.deepcopy(init) if init is not None else None, progress=progress,
                               train_reconstructor=train_reconstructor, prior_defects=prior_defects,
                               prior_pixels=prior_pixels,
                               backgrounds=backgrounds)  # fmt: skip
        scores[held], maxima[held] = feature_scores(fold.model, fold.val, device)
    return scores, maxima


def build_model(config: RunConfig, device: torch.device) -> ADTR:
    """A fresh ADTR for the settings; settings it cannot be built from raise SettingsError."""
    try:
        model = ADTR(config.model, config.score)
    except ValueError as e:  # e.g. an image size the backbone cannot take, an unknown backbone
        raise SettingsError(str(e)) from None
    return model.to(device)


def fit_on_features(
    config: RunConfig,
    good: Images,
    device: torch.device,
    *,
    val_idx: Sequence[int] = (),
    anomalies: Images | None = None,
    external: Images | None = None,
    generators: Sequence[AnomalyGenerator] = (),
    init: ADTR | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    train_reconstructor: bool = True,
    prior_defects: AnomalyPool | None = None,
    backgrounds: torch.Tensor | None = None,
    prior_pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
    good_joins: torch.Tensor | None = None,
    probe_fallback: bool = False,
    train_image_scorer: bool | None = None,
) -> FitResult:
    """Fit ADTR's reconstructor on good images, optionally with anomalies.

    good: good images (samples) or their raw features (N, C, h, w); positions in val_idx are
        held out (validation loss, thresholds), the others train.
    anomalies: labelled real anomalies (samples: a mask gives pixel labels, L_px, else L_img;
        under labelled_anomalies == "head" they fit the defect head instead) or raw features
        (image-level, L_img). A model whose score settings have a defect head, given no
        anomalies for it, keeps its head's weights; the head's standardisation is refreshed.
    external: unrelated images used as image-level anomalies.
    generators: synthetic anomaly generators applied to the training images (samples only);
        config.train.synthetic_copies versions of each.
    init: a fitted model to continue from (its feature statistics are kept); else a fresh one
        is built from config under config.train.seed.
    state_dir: save a resumable training state there after every epoch; resume: continue from
        it (the result equals an uninterrupted fit with the same seed).
    train_reconstructor: False keeps init's reconstructor as it is (only the statistics and
        the defect head are fitted). train_image_scorer: whether the image scorer (where it scores
        the image) is trained; None: as train_reconstructor (an update trains it alone,
        update.py).
    A fresh learnable-query model whose validation loss ends above config.train.query_fallback
    is replaced by a no-query fit (no_query_config; seeded as a direct one): the result's
    model.cfg says which, and its history records carry the query's "query_val_loss". Without
    val_idx (cross-fitted calibration) and with probe_fallback, a query model fitted on the good
    training images less a third of them (probe_split) gives that loss on the third first
    (_probe_query_loss), and the fit itself is the no-query one where it is above.
    prior_defects: standardised defects the defect head was fitted on before (an update's
        replay.ReplayData.defect_pool): fitted again together with the new ones.
    backgrounds: uint8 (B, H, W, 3) good images at the input size to paste the head's masked
        defects onto (config.train.head_paste; defect_paste.py), the result's backgrounds;
        default: defect_paste.load_backgrounds of the training images (image samples; with
        features, none: no pasting). prior_pixels: the prior defects' uint8 images and masks
        (defect_paste.defect_pixels's layout, aligned with prior_defects; replay.ReplayData's),
        so that they are pasted again with the new ones (None: the prior ones are not pasted).
    good_joins: an update's new good training images' raw features (M, C, h, w), joined to
        init's fitted Gaussian per position (ScoreConfig.feature_gaussian) and memory bank
        (ScoreConfig.nearest_map) instead of a refit on `good` (a bounded replay sample there;
        the joins are also the last M training rows of `good`, as update.py orders them, and the
        rows before them set the bank's density to keep); None (a fit): both are fitted on the
        training features where they are used, and kept as they are when train_reconstructor is
        False.
    Run by every rank of a process group (adtr/distributed.py), each extracts the features of
    its block of the images and trains on its rows of each batch; rank 0 alone saves state_dir.
    Raises SettingsError for settings the model cannot be built from, synthetic anomalies
    without image files, or fewer training images than processes; DataError for unreadable files.
    """
    if generators and isinstance(good, torch.Tensor):
        raise SettingsError("synthetic anomalies are made from images: pass image samples, not features")
    if resume and state_dir is None:
        raise SettingsError("resume needs the state_dir of the interrupted fit")
    config, init = with_defect_head(config, anomalies, init)
    cfg = config.train
    held = set(val_idx)
    train_idx = [i for i in range(len(good)) if i not in held]
    val_idx = sorted(held)
    if distributed.world_size() > len(train_idx):  # each rank needs images of its own
        raise SettingsError(f"{len(train_idx)} training images for {distributed.world_size()} processes: use fewer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # weight init and dropout; shuffling has its own generator
        model = init if init is not None else build_model(config, device)
        t0 = time.perf_counter()
        mine = distributed.block(len(good))  # this rank's images (all of them in one process)
        raw, infos = _raw_features(model, good[mine.start : mine.stop], device, progress)
        if init is None:
            distributed.set_feature_stats(model, raw[[i - mine.start for i in train_idx if i in mine]])
        features = distributed.gather_rows(model.standardize(raw.to(device)).cpu())
        rows = distributed.gather_rows(torch.tensor(infos, dtype=torch.int64).reshape(-1, 3))  # every rank's files
        infos = [ImageInfo(h, w, bool(grey)) for h, w, grey in rows.tolist()]
        all_raw = distributed.gather_rows(raw)
        synthetic = None
        if generators:
            train_samples = [good[i] for i in train_idx]
            part = distributed.block(len(train_samples))
            synthetic = synthetic_pools(model, train_samples[part.start : part.stop], generators, cfg.synthetic_copies,
                                        cfg.seed, device, progress=progress, first=part.start)  # fmt: skip
            synthetic = [distributed.gather_pool(pool) for pool in synthetic]
        for_head = head_samples(config, anomalies)
        if for_head:
            anomalies = None
        pool = _anomaly_pool(model, anomalies, external, device, progress)
        head_pool = anomaly_pool(model, for_head, device, progress=progress) if for_head else None
        if head_pool is not None:
            check_masks(for_head, head_pool)
        feature_seconds = time.perf_counter() - t0 if not isinstance(good, torch.Tensor) else 0.0
        train_features = features[train_idx]  # one copy for every step below
        data = TrainingData(train_features, synthetic, pool)
        generator = torch.Generator().manual_seed(cfg.seed)
        fallback = no_query_config(config) if train_reconstructor and init is None else None
        query_val_loss = None  # set when the fit fell back to the no-query reconstructor
        if fallback is not None and not val_idx:
            held = probe_split(len(train_idx), cfg.seed) if probe_fallback else None
            if held is None:
                log.info("no held-out good images: the learnable query is kept without checking its validation "
                         "loss (the query fallback needs them, or 6 good images to check on a third)")  # fmt: skip
            else:  # cross-fitted calibration: a query fit on two thirds decides on the other third
                loss = _probe_query_loss(model, train_features, held, cfg, device, progress)
                if distributed.agree(loss > cfg.query_fallback):
                    query_val_loss = loss
                    log.warning("validation loss %.4f of the learnable-query model, fitted on two thirds of the good "
                                "images and checked on the others, is above %g: it cannot model these good images; "
                                "fitting the reconstructor without the query (docs/design.md, 'The query fallback'; "
                                "--query-fallback off keeps the query)", loss, cfg.query_fallback)  # fmt: skip
                    config, model = fallback, _rebuilt(model, fallback, device)
            fallback = None  # decided
        if resume and fallback is not None and distributed.agree(saved_config_matches(state_dir, fallback)):
            config, model, fallback = fallback, _rebuilt(model, fallback, device), None  # a fallback fit's state
        optimizer = make_optimizer(model, cfg, device)
        start_epoch, history = 0, []
        if resume:
            with distributed.train_state_from_main(state_dir) as folder:  # rank 0's state on every rank
                start_epoch, history = load_train_state(folder, model, optimizer, generator, config)
            epochs = planned_epochs(len(train_idx), cfg, model.cfg.image_size)
            log.info("resuming after epoch %d of %d", start_epoch, epochs)
            query_val_loss = history[-1].get("query_val_loss") if history else None

        def on_epoch_end(epoch: int, opt: torch.optim.Optimizer, record: dict) -> None:
            if query_val_loss is not None:  # in every record, so that a resumed fallback fit still knows it
                record["query_val_loss"] = query_val_loss
            history.append(record)
            if state_dir is not None and distributed.is_main():
                save_train_state(state_dir, model, opt, generator, epoch + 1, history, config)

        if train_reconstructor:
            val = features[val_idx] if val_idx else None
            fit_reconstructor(model, data, val, cfg, device, generator, progress=progress, start_epoch=start_epoch,
                              optimizer=optimizer, on_epoch_end=on_epoch_end,
                              parallel=distributed.data_parallel(cfg.seed, device))  # fmt: skip
            if fallback is not None and distributed.agree(history[-1]["val_loss"] > cfg.query_fallback):
                query_val_loss = history[-1]["val_loss"]
                log.warning("validation loss %.4f of the learnable-query model is above %g: it cannot model these "
                            "good images; fitting the reconstructor without the query instead (docs/design.md, "
                            "'The query fallback'; --query-fallback off keeps the query)",
                            query_val_loss, cfg.query_fallback)  # fmt: skip
                config, history = fallback, []
                model = _rebuilt(model, fallback, device)  # reseeded: the weights of a direct no-query fit
                generator = torch.Generator().manual_seed(cfg.seed)
                optimizer = make_optimizer(model, cfg, device)
                fit_reconstructor(model, data, val, cfg, device, generator, progress=progress, optimizer=optimizer,
                                  on_epoch_end=on_epoch_end, parallel=distributed.data_parallel(cfg.seed, device))
        if (train_reconstructor if train_image_scorer is None else train_image_scorer) and model.uses_image_scorer:
            # after the reconstructor's last saved epoch: a resume trains it again
            scorer = fit_image_scorer(model, data, features[val_idx] if val_idx else None, cfg, device,
                                      progress=progress, parallel=distributed.data_parallel(cfg.seed, device))
            log.info("image scorer: %d epochs, validation loss %s", len(scorer), scorer[-1].get("val_loss"))
    model.eval()
    if config.score.residual_norm != "none":
        # the held-out good images choose the image scorer's per-position weight (while unset)
        model.set_residual_scale(train_features, held=features[val_idx] if val_idx else None)
    # an update (good_joins given) joins its new good images to the parent's Gaussian: its
    # replay features are a bounded sample (at most 64 images) of the good images that one saw
    model = with_feature_gaussian(model, train_features, refit=train_reconstructor and good_joins is None)
    if good_joins is not None and model.score_cfg.feature_gaussian and len(good_joins):
        model.join_feature_gaussian(model.standardize(good_joins.to(device)))
    # the same for the memory bank (its standardisation stays the parent's)
    model = with_nearest_map(model, train_features, features[val_idx] if val_idx else None,
                             refit=train_reconstructor and good_joins is None)  # fmt: skip
    if good_joins is not None and model.score_cfg.nearest_map and len(good_joins):
        # the training features before the joins (an update's replay sample) set the density to keep
        before = train_features[: len(train_features) - len(good_joins)]
        model.join_memory_bank(model.standardize(good_joins.to(device)), before.to(device))
    # defects pasted onto good images for the head (defect_paste.py): parts that lie anywhere only, by default
    copies = paste_copies(config.train.head_paste, model.score_cfg.map_position_weight)
    if cfg.labelled_anomalies != "head":  # no head is fitted from labelled anomalies: nothing to paste
        if cfg.head_paste and anomalies is not None and len(anomalies):  # asked for (auto says nothing)
            log.warning("--head-paste %d is ignored: with --labelled-anomalies %s no defect head is fitted",
                        cfg.head_paste, cfg.labelled_anomalies)  # fmt: skip
        copies = 0
    if head_pool is not None and cfg.head_paste is None:
        log.info("defects pasted for the head: %d copies each (auto: the map's per-position weight is %s; parts "
                 "that lie anywhere, below 0.5, paste)", copies, model.score_cfg.map_position_weight)  # fmt: skip
    given = backgrounds  # an update's (its parent's) are kept as they are
    if copies and backgrounds is None and not isinstance(good, torch.Tensor):  # kept in the run for updates
        backgrounds = load_backgrounds([good[i] for i in train_idx], model.cfg.image_size, cfg.seed)
    if head_pool is not None:
        pool = head_pool if pool is None else AnomalyPool.cat([pool, head_pool])
    head_defects = AnomalyPool.cat([p for p in (prior_defects, head_pool) if p is not None]) if (
        prior_defects is not None or head_pool is not None) else None  # fmt: skip
    head_pixels, pasted = None, None
    if copies and head_defects is not None and model.score_cfg.defect_head:
        size = model.cfg.image_size
        # prior defects kept without their pixels (a parent that did not paste) are not pasted
        old = prior_pixels if prior_pixels is not None or prior_defects is None else (
            torch.zeros((len(prior_defects), *size, 3), dtype=torch.uint8),
            torch.zeros((len(prior_defects), *size), dtype=torch.uint8))  # fmt: skip
        parts = [p for p in (old, defect_pixels(for_head, size) if head_pool is not None else None) if p is not None]
        head_pixels = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        masked = int((head_pixels[1].flatten(1).amax(1) > 0).sum())
        if not masked:
            log.info("no defect with a mask: nothing to paste (image labels give the head pseudo-labels, not places)")
        elif backgrounds is None or not len(backgrounds):
            log.info("no good images to paste the defects onto (features without their images, or a run saved "
                     "before it kept them): the defect head is fitted on the defects alone")  # fmt: skip
        else:
            if copies_for(copies, masked) < copies:
                log.info("%d masked defects: %d copies of each pasted, not %d (at most %d in all)", masked,
                         copies_for(copies, masked), copies, MAX_PASTED)  # fmt: skip
            pasted = _pasted_pool(model, head_pixels, backgrounds, copies, cfg.seed, device)
    if model.score_cfg.defect_head:
        # the head's logit joins the image grid on the scale of the good training images' grid,
        # the Gaussian's too (biased low there; the held-out images' scale weighed the head more
        # and cost bsdata's masked head 0.27 image AUROC point: docs/design.md, "A Gaussian per
        # position scores aligned parts' images")
        fit_head(model, train_features, head_defects, pasted=pasted)
    return FitResult(model, history, train_features, features[val_idx], pool, feature_seconds, all_raw, infos,
                     head_defects=head_defects if model.score_cfg.defect_head else None, head_pixels=head_pixels,
                     backgrounds=backgrounds if copies or given is not None else None,
                     head_pasted=len(pasted) if pasted is not None else 0)  # fmt: skip


def with_feature_gaussian(model: ADTR, good: torch.Tensor, refit: bool = True) -> ADTR:
    """The model with its image score's source settled (ScoreConfig.feature_gaussian; None: a
    Gaussian per position where the image scorer's chosen per-position weight is 1) and the
    Gaussian fitted on the standardised good training features (N, C, h, w) where it is used
    (with refit False, only when the setting was unset: an already fitted one is kept); a copy
    when the setting was unset."""
    score = model.score_cfg
    use = score.feature_gaussian
    if use is None:
        refit = True
        use = bool(model.uses_image_scorer and score.residual_norm == "channel_position"
                   and score.scorer_position_weight == 1.0)  # fmt: skip
        model = model.with_score(dataclasses.replace(score, feature_gaussian=use))
        if use:
            log.info("image score: a Gaussian per position of the features (the held-out good images chose the "
                     "image scorer's per-position statistics: aligned parts)")  # fmt: skip
    if use and refit:
        model.set_feature_gaussian(good)
    return model


def with_nearest_map(model: ADTR, good: torch.Tensor, held: torch.Tensor | None, refit: bool = True) -> ADTR:
    """The model with its map's memory bank settled (ScoreConfig.nearest_map; None: a bank where
    the reconstructor is the transformer without the query, which copies its input) and the bank
    fitted on the standardised good training features (N, C, h, w), standardised on the held-out
    good ones (M, C, h, w; None: none held out), where it is used (with refit False, only when
    the setting was unset: an already fitted one is kept); a copy when the setting was unset."""
    score = model.score_cfg
    use = score.nearest_map
    if use is None:
        refit = True
        use = model.cfg.reconstructor == "transformer" and not model.cfg.use_query
        model = model.with_score(dataclasses.replace(score, nearest_map=use))
        if use:
            log.info("map: the distance to the nearest good feature joins the reconstruction error (the "
                     "reconstructor has no query: it copies its input)")  # fmt: skip
    if use and refit:
        model.set_memory_bank(good, held)
    return model


@torch.no_grad()
def _pasted_pool(model: ADTR, pixels: tuple[torch.Tensor, torch.Tensor], backgrounds: torch.Tensor, copies: int,
                 seed: int, device: torch.device, batch_size: int = 8) -> AnomalyPool | None:  # fmt: skip
    """Standardised features and token labels of pastes of each masked defect onto the backgrounds
    (defect_paste.py), or None when no mask marks a pixel. pixels: uint8 images (K, H, W, 3) and
    masks (K, H, W) as defect_paste.defect_pixels gives them (an all-zero mask: not pasted).
    `copies` each, fewer when the defects are many (defect_paste.copies_for); the i-th defect's
    copies are drawn with seed (seed, i), so a defect kept by a run is pasted again where it was.
    Made one defect at a time: the copies' pixels of one defect at most are in memory beside
    their features."""
    model.eval()
    images, masks = pixels
    copies = copies_for(copies, int((masks.flatten(1).amax(1) > 0).sum()))
    feats, labels = [], []
    for i in range(len(images)):
        if not masks[i].any():
            continue
        composites, pasted_masks = paste_defects(images[i : i + 1].permute(0, 3, 1, 2).float(),
                                                 masks[i : i + 1].float(), backgrounds, copies, (seed, i))  # fmt: skip
        for b in composites.split(batch_size):
            feats.append(model.standardize(model.extract(b.to(device))).cpu())
        labels.append(token_labels(pasted_masks, model.cfg.grid_size))
    if not feats:
        return None
    n = sum(len(f) for f in feats)
    return AnomalyPool(torch.cat(feats), torch.cat(labels), torch.ones(n, dtype=torch.bool), ("synthetic",) * n)


def probe_split(n: int, seed: int) -> list[int] | None:
    """The good training images (indices of n) whose validation loss decides the query fallback
    when none are held out: the first cross-fitting fold's of 3 (crossfit_scores's permutation),
    a third of them; None for fewer than 6 images (fewer than 2 to check, or 4 to train on)."""
    if n < 6:
        return None
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[0::3])


def _probe_query_loss(
    model: ADTR, features: torch.Tensor, held: Sequence[int], cfg: TrainConfig, device: torch.device, progress: bool
) -> float:
    """The last validation loss on features[held] (standardised good features (N, C, h, w)) of a
    copy of the fresh learnable-query `model` trained on the other rows, with cfg's budget, on the
    good images alone (the fit's synthetic or labelled anomalies, if any, are left out of this
    check). The caller's random state is left as it was, so that the fit after it is the fit
    without it."""
    kept = set(held)
    train = features[[i for i in range(len(features)) if i not in kept]]
    probe = copy.deepcopy(model)
    records: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        fit_reconstructor(probe, TrainingData(train, None, None), features[list(held)], cfg, device,
                          torch.Generator().manual_seed(cfg.seed), progress=progress,
                          optimizer=make_optimizer(probe, cfg, device), on_epoch_end=lambda e, o, r: records.append(r),
                          parallel=distributed.data_parallel(cfg.seed, device))  # fmt: skip
    return float(records[-1]["val_loss"])


def no_query_config(config: RunConfig) -> RunConfig | None:
    """The settings a fit falls back to when the learnable query cannot model the good images
    (TrainConfig.query_fallback): the same without the query; None where the fallback is off or
    does not apply (another reconstructor, no query, a query variant the user chose:
    layer_query, neighbor_mask, which need the query; or unstandardised features, whose loss
    is not a share of their variance)."""
    m = config.model
    # the threshold reads the loss as a share of standardised features' variance
    if config.train.query_fallback is None or m.reconstructor != "transformer" or not m.use_query:
        return None
    if m.layer_query or m.neighbor_mask or not m.normalize_features:
        return None
    return dataclasses.replace(config, model=dataclasses.replace(m, use_query=False))


def _rebuilt(model: ADTR, config: RunConfig, device: torch.device) -> ADTR:
    """A fresh model for config, seeded as a direct fit is, with model's feature statistics."""
    torch.manual_seed(config.train.seed)
    new = build_model(config, device)
    new.feature_mean.copy_(model.feature_mean)
    new.feature_std.copy_(model.feature_std)
    return new


def check_masks(samples: Sequence[Sample], pool: AnomalyPool) -> None:
    """DataError naming the first defect whose mask marks no pixel: the head would learn its
    defect tokens as good ones."""
    for s, labels, masked in zip(samples, pool.token_labels, pool.pixel_level, strict=True):
        if masked and not labels.any():
            raise DataError(f"{s.mask_path}: the mask of {s.path} marks no defect pixel; fix or remove it (an image "
                            "without a mask is used with its image label)")  # fmt: skip


@torch.no_grad()
def fit_head(
    model: ADTR, good: torch.Tensor, defects: AnomalyPool | None, batch_size: int = 32,
    pasted: AnomalyPool | None = None,
) -> None:
    """Fit the model's defect head (defect_head.py) on standardised good training features
    (N, C, h, w) and labelled defects: a mask gives a defect's token labels; an image label,
    the tokens of its residual map within PSEUDO_SHARE of the map's maximum (positives only).
    Without defects, keep the head's weights and refresh only its standardisation (the
    reconstructor changed, e.g. in an update with good images only). An unset gain
    (score.head_gain None) is set by defect_head.default_gain. When the image scorer scores the
    image (model.uses_image_scorer), its grid error's mean and std on the good images are
    stored too (the scale on which the head's logit joins it). pasted: masked defects pasted
    onto good images (defect_paste.py), fitted beside the defects (not counted for the gain).
    The head reads the scaled residual, and the bank's residual beside it where the model has a
    memory bank (ADTR.head_reads_bank); the good images' bank residual is taken against the bank,
    which holds their own positions (against a bank of the other half of them, as unseen good
    parts would show it, metal_plate's masked head lost 0.35 AUPRO point: docs/design.md, "The
    defect head reads the bank's residual"), unless the bank keeps at least half of their
    positions (at most twice its rows), each of which has a residual of 0 there: then the
    other half's bank gives them instead."""
    device = model.head_weight.device
    c, reads_bank = model.channels, model.head_reads_bank

    def residuals(f: torch.Tensor, bank: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input (B, D, h, w), in batches; bank: the bank residuals (B, C_bank, h, w) to
        put beside the scaled residual (None: against the model's bank)."""
        out = []
        for i in range(0, len(f), batch_size):
            b = f[i : i + batch_size].to(device)
            r = model.residual(b)
            if reads_bank:
                r = torch.cat([r, model.bank_residual(b) if bank is None else bank[i : i + batch_size].to(device)], 1)
            out.append(r.cpu())
        return torch.cat(out)

    def grids(inputs: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # the map's grid (B, h, w), in batches
        out = []
        for i in range(0, len(f), batch_size):
            x = inputs[i : i + batch_size].to(device)  # the scaled residual first, then the bank's
            out.append(model.residual_grid(x[:, :c], f[i : i + batch_size].to(device), x[:, c:] if reads_bank else None)
                       .cpu())  # fmt: skip
        return torch.cat(out)

    # where the bank keeps at least half of the good training positions, at least half of them are
    # bank rows, whose residual there is exactly 0
    positions = len(good) * good.shape[2] * good.shape[3]
    crossed = reads_bank and 1 < len(good) and positions <= 2 * len(model.nearest_bank)
    good_residual = residuals(good, model.crossed_bank_residual(good, batch_size) if crossed else None)
    good_map = grids(good_residual, good)
    if defects is None:
        head = DefectHead(model.head_weight.flatten().cpu(), float(model.head_bias), model.head_norm.cpu())
        head.norm = head_norm(good_residual, good_map, head.weight, head.bias)
    else:
        both = defects if pasted is None else AnomalyPool.cat([defects, pasted])
        defect_residual = residuals(both.features)
        labels = both.token_labels.clone()
        image_level = ~both.pixel_level
        if image_level.any():
            grid = grids(defect_residual[image_level], both.features[image_level])
            top = grid.flatten(1).amax(1).view(-1, 1, 1)
            labels[image_level] = ((grid >= PSEUDO_SHARE * top) & (grid > 0)).float()  # an all-zero map: none
        try:
            head = fit_defect_head(good_residual, good_map, defect_residual, labels, both.pixel_level)
        except ValueError as e:  # no labelled token at all
            raise DataError(str(e)) from None
    if model.score_cfg.head_gain is None:  # set now; an update moves it only as the rule does (update.py)
        gain = default_gain(0 if defects is None else int(defects.pixel_level.sum()), reads_bank)
        model.score_cfg = dataclasses.replace(model.score_cfg, head_gain=gain)
    scorer_norm = None
    if model.uses_image_scorer:  # the scale on which the logit joins the scorer's map for the image score
        scorer_map = torch.cat([model.scorer_grid(good[i : i + batch_size].to(device)).cpu()
                                for i in range(0, len(good), batch_size)]).double()  # fmt: skip
        scorer_norm = torch.stack([scorer_map.mean(), scorer_map.std().clamp_min(1e-6)]).float()
    model.set_defect_head(head, scorer_norm)


def _raw_features(
    model: ADTR, images: Images, device: torch.device, progress: bool
) -> tuple[torch.Tensor, list[ImageInfo]]:
    """Raw aligned features (N, C, h, w) on the CPU and each file's ImageInfo (drift.py):
    extracted from files, or features passed through (no infos)."""
    if isinstance(images, torch.Tensor):
        return images, []
    infos: dict[int, ImageInfo] = {}
    raw = extract_features(model, images, device, progress=progress, on_info=infos.__setitem__)
    return raw, [infos[i] for i in range(len(images))]


def _anomaly_pool(
    model: ADTR, real: Images | None, external: Images | None, device: torch.device, progress: bool
) -> AnomalyPool | None:
    """Standardised real anomalies, then external images, each sample marked with its kind.

    Files of both sources are read in one pass (batches cross from one to the other), features
    are standardised as they come.
    """
    pools: list[AnomalyPool] = []
    files: list[Sample] = []
    kinds: list[str] = []

    def flush() -> None:
        if files:
            pools.append(anomaly_pool(model, files, device, progress=progress, kinds=kinds))

    for source, kind in ((real, "real"), (external, "external")):
        if source is None or len(source) == 0:
            continue
        if isinstance(source, torch.Tensor):
            flush()
            files, kinds = [], []
            f = model.standardize(source.to(device)).cpu()
            n, _, h, w = f.shape
            pools.append(AnomalyPool(f, torch.zeros(n, h, w), torch.zeros(n, dtype=torch.bool), (kind,) * n))
        else:
            files, kinds = files + list(source), kinds + [kind] * len(source)
    flush()
    if not pools:
        return None
    return pools[0] if len(pools) == 1 else AnomalyPool.cat(pools)
