"""Settings of a run, as plain dataclasses that round-trip through JSON.

`ModelConfig` fixes the network (and so the checkpoint's tensor shapes), `ScoreConfig` how a
reconstruction error becomes a map and an image score, `TrainConfig` the optimisation.
Two model presets exist: `paper` is SPEC section 1 verbatim; `cpu` is the default, lighter
so that it converges within minutes on two CPU cores (docs/design.md says why).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
CALIBRATIONS = ("auto", "held_out", "crossfit")
LOSSES = ("hard", "mse")  # normal-only reconstruction losses (losses.reconstruction_loss)
# The feature reconstructors (model.RECONSTRUCTORS): ADTR's transformer, and two baselines.
RECONSTRUCTOR_KINDS = ("transformer", "mlp", "cnn")
IMAGE_SCORERS = (None, "cnn", "mlp")  # ModelConfig.image_scorer
ALIGN_MODES = ("bilinear", "area", "max")  # ModelConfig.align (model.align_features)
HEAD_IMAGE_SCORES = ("scorer", "map")  # ScoreConfig.head_image_score
# What real labelled anomalies train: a defect head on the frozen residual, or the
# reconstructor through SPEC section 2's L_px / L_img (the paper); docs/design.md, issue 15.
LABELLED_ANOMALY_USES = ("head", "loss")
# A conformal threshold for rate r needs about 1/r good images; below this no set is large enough.
MIN_FALSE_ALARM_RATE = 1e-6


@dataclass
class ModelConfig:
    backbone: str = "lite0"
    # (height, width) fed to the backbone; None: chosen from the training images at fit time
    # (their aspect ratio, short side 256, at most 1.875x 256x256 pixels: data.transforms.input_size_for)
    image_size: tuple[int, int] | None = None
    # backbone stages used; the token grid is the largest's (the feature grid token_patch times finer)
    strides: tuple[int, ...] = (2, 4, 8, 16)
    # How finer stages reach the token grid (model.align_features): "bilinear" here, so that runs
    # saved before this field existed load as they were; the "cpu" preset uses "area"; "max" keeps
    # responses smaller than a cell (screened and rejected: docs/design.md, "Max-pooled alignment").
    align: str = "bilinear"
    reconstructor: str = "transformer"  # "transformer", "mlp" or "cnn" (ablation baselines)
    hidden_dim: int = 256
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1  # on residual branches and feed-forward layers
    # Dropout on the input tokens before the encoder (the MLP's and CNN's input features), in
    # training only: a "noisy bottleneck" (Dinomaly, Guo et al., CVPR 2025, section 3.2) that
    # keeps the model from copying its input.
    feature_dropout: float = 0.0
    attention_dropout: float = 0.0
    # > 0: attention never reaches the n x n window of tokens around a token's own position
    # (UniAD's neighbor masked attention), so the input there cannot be copied; 0 = off. Needs
    # the learnable query (use_query); about 2x slower on CPUs (no fused attention kernel).
    neighbor_mask: int = 0
    use_query: bool = True  # False: the decoder reads the encoder output (paper's ablation)
    # True: every decoder layer starts from its own learnable query and reaches the previous
    # layer's output only through attention (UniAD's layer-wise query); needs use_query.
    layer_query: bool = False
    # Each transformer token holds a token_patch x token_patch block of the feature grid
    # (space-to-depth), so the feature grid, the residual and the map are token_patch times
    # finer than the token grid (max stride / token_patch); 1 = the paper. 2 costs about 12% of
    # the ONNX graph's speed (larger token projections, the residual on 4x the positions).
    # The MLP and CNN reconstructors have no tokens: they run on the finer feature grid itself.
    # The "cpu" preset uses 2 (docs/design.md, "A finer map with the image scorer").
    token_patch: int = 1
    normalize_features: bool = True  # per-channel standardisation with training statistics
    # Each feature-grid position averaged with its feature_pool x feature_pool neighbourhood
    # after alignment (PatchCore's local aggregation, Roth et al., CVPR 2022, section 3.1:
    # features robust to small shifts); 1 = off, as the paper and runs saved before.
    feature_pool: int = 1
    # A second reconstructor that scores the image ("cnn" or "mlp"; None: the map scores it):
    # trained TrainConfig.image_scorer_epochs times longer on the same features, with its input
    # dropped at image_scorer_dropout. A long fit gives the best image scores and the worst maps
    # (it learns to rebuild small defects), so the map stays the reconstructor's
    # (docs/design.md, "The image scorer"). The "cpu" preset sets "cnn"; runs saved before: None.
    # With token_patch > 1 it runs on the token grid (model.TokenGridReconstructor).
    image_scorer: str | None = None
    image_scorer_dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.align not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {self.align!r}")
        if self.image_scorer not in IMAGE_SCORERS:
            raise ValueError(f"image_scorer must be one of {IMAGE_SCORERS}, got {self.image_scorer!r}")
        if self.feature_pool < 1 or self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool must be an odd number >= 1, got {self.feature_pool}")
        if not 0 <= self.image_scorer_dropout < 1:
            raise ValueError(f"image scorer dropout must be in [0, 1), got {self.image_scorer_dropout}")

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.image_size is None:
            raise ValueError("the input size is not set yet (it is chosen from the data at fit time)")
        s = max(self.strides)
        p = s // self.feature_stride  # token_patch, validated by feature_stride
        # whole tokens of p x p positions, whatever the input size
        return self.image_size[0] // s * p, self.image_size[1] // s * p

    @property
    def feature_stride(self) -> int:
        """Input pixels per position of the feature grid (and of the residual)."""
        if self.token_patch < 1 or max(self.strides) % self.token_patch:
            raise ValueError(f"token_patch must be >= 1 and divide the largest stride {max(self.strides)}, "
                             f"got {self.token_patch}")  # fmt: skip
        return max(self.strides) // self.token_patch


RESIDUAL_NORMS = ("none", "channel", "channel_position")


@dataclass
class ScoreConfig:
    # Gaussian sigma in input pixels; 0 turns smoothing off. 2, not SPEC's "about 4": screened on
    # the development sets (docs/design.md, "The map's smoothing"); runs saved before keep theirs.
    smoothing_sigma: float = 2.0
    # "max_pool": max of the average-pooled map; "mean": its mean; "top_mean": mean of its top
    # top_fraction values; "pooled_residual": norm of
    # the image-averaged feature residual (for semantic anomalies, e.g. CIFAR-10 one-class)
    image_score: str = "top_mean"
    pool_size: int = 16  # average-pool window in input pixels (about one token)
    top_fraction: float = 0.01  # "top_mean": the mean of this share of the map's highest values
    # "channel": each channel's residual is divided by its RMS on the training images before
    # the norm, so that channels the model cannot predict on good parts (texture) do not drown
    # the others; "channel_position": that map then standardised per token position with the
    # training maps' mean and variance, each averaged half and half with the whole grid's
    # (docs/design.md, "Scores"); "none": the plain residual (runs before this key).
    residual_norm: str = "channel_position"
    # True in runs fitted with real anomalies under TrainConfig.labelled_anomalies == "head": the
    # map adds a discriminative head's standardised logit (defect_head.py). Set by the fit.
    defect_head: bool = False
    # The head's standardised logit weighs this many times the standardised residual map in the
    # map; None: set when the head is fitted, 4 with at least 3 masked defects, 1 where the head
    # reads a memory bank's residual, half of that with one or two masked defects, 1 with image
    # labels only (defect_head.default_gain; docs/design.md, "The head's weight"; runs saved before
    # this key: 1).
    head_gain: float | None = None
    # What scores the image of a run with a defect head and an image scorer: "scorer", the image
    # scorer's map joined with the head's logit (at head_image_gain) as the map joins them; "map", the
    # head-joined map itself (runs saved before this key). docs/design.md, "The image score of a
    # run with a defect head".
    head_image_score: str = "scorer"
    # With "scorer", the head's standardised logit weighs this many times the scorer's map in
    # the image score, whatever its weight in the map (head_gain): a head at 4 silences the map's
    # false alarms but lets one misread good image outrank defects (bsdata, 5 masked defects per
    # type: image AUROC 0.9396 at 4, 0.9455 at 1, 0.9442 without the head). docs/design.md, "The
    # head's weight in the image score". Runs saved before this key: head_gain.
    head_image_gain: float = 1.0
    # With "channel_position", the weight of the per-position training statistics in the image
    # scorer's standardisation (1 - w: the whole grid's; the map's is 0.5). None: chosen by the
    # fit on the held-out good images (model.choose_position_weight: aligned parts take their
    # per-position statistics, parts that lie anywhere the grid's) and recorded in the run;
    # docs/design.md, "The image scorer's statistics per position". Runs saved before: 0.5.
    scorer_position_weight: float | None = None
    # With "channel_position", the same weight for the map's statistics. None: chosen by the fit
    # as min(0.5, the image scorer's chosen weight) (model.map_position_weight_for): parts whose
    # held-out images say per-position statistics do not predict them (a plate anywhere) get
    # none in the map either; others keep half and half. Recorded in the run; runs saved before,
    # and models without an image scorer: 0.5. docs/design.md, "The map's per-position weight".
    map_position_weight: float | None = None
    # The image score from a Gaussian per position of the features (PaDiM; feature_gaussian.py)
    # instead of the image scorer's residual, which is still trained (its held-out likelihood
    # makes the choice). None: chosen by the fit, True where the scorer's per-position weight is
    # 1 (each position's statistics predict unseen good parts: aligned parts). Needs an image
    # scorer. Recorded in the run; runs saved before: False. docs/design.md, "A Gaussian per
    # position scores aligned parts' images".
    feature_gaussian: bool | None = None
    # The map adds the distance of each position's feature to the nearest good feature of a
    # memory bank (PatchCore; memory_bank.py), standardised on the held-out good images, to the
    # reconstruction error: a reconstructor that copies its input (the transformer without the
    # query, as the query fallback fits) leaves no residual where it copies a defect. None:
    # chosen by the fit, True for the no-query transformer. Recorded in the run; runs saved
    # before: False. docs/design.md, "The nearest good feature joins the map of a copying model".
    nearest_map: bool | None = None
    # With a memory bank and a defect head, the head reads the bank's residual (each position's
    # patch feature minus its nearest bank row) beside the reconstruction residual: a copying
    # model's residual barely shows what the bank's shows (metal_plate, 5 masked defects per type:
    # AUPRO +0.8 point on the mean of three draws). Runs with a head saved before: False (their head
    # reads the reconstruction residual alone). docs/design.md, "The defect head reads the bank's
    # residual".
    head_bank_residual: bool = True
    # With a memory bank, each position's nearest row is searched among the bank rows' first this
    # many principal components (memory_bank.search_basis), and its distance and residual are then
    # the exact ones to the row found; 0, or at least the bank's channels: an exact search. The
    # search is one matrix product of (positions x rows); 32 of Lite0's 152 channels make it a
    # fifth (metal_plate's graph: the bank's 5.3 ms per image -> 2.6 with the index search in
    # blocks; its k-shot figures within 0.1 point). Runs saved before the key: 0. docs/design.md,
    # "The bank searched in a subspace".
    nearest_search_dims: int = 32
    # The memory bank's rows: memory_bank.BANK_SIZE where a fit chose them; an update's join adds
    # rows for new good images (up to memory_bank.MAX_ROWS) instead of replacing the parent's.
    # Recorded so that a saved run builds its bank's buffer; runs saved before the key: BANK_SIZE.
    # docs/design.md, "An update's memory bank grows".
    nearest_bank_rows: int = 4096

    @property
    def head_reads_bank(self) -> bool:
        """Whether a defect head reads the memory bank's residual beside the scaled residual: a
        head (defect_head), a bank (nearest_map True) and head_bank_residual."""
        return bool(self.defect_head and self.nearest_map is True and self.head_bank_residual)

    def __post_init__(self) -> None:
        if self.residual_norm not in RESIDUAL_NORMS:
            raise ValueError(f"residual_norm must be one of {RESIDUAL_NORMS}, got {self.residual_norm!r}")
        for name in ("scorer_position_weight", "map_position_weight"):
            w = getattr(self, name)
            if w is not None and not (_is_number(w) and 0 <= w <= 1):
                raise ValueError(f"{name.replace('_', ' ')} must be in [0, 1], got {w!r}")
        for name in ("feature_gaussian", "nearest_map"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), bool)):
                raise ValueError(f"{name} must be true, false or null (chosen by the fit), got {getattr(self, name)!r}")
        if not isinstance(self.head_bank_residual, bool):
            raise ValueError(f"head_bank_residual must be true or false, got {self.head_bank_residual!r}")
        if not (_is_int(self.nearest_search_dims) and self.nearest_search_dims >= 0):
            raise ValueError(f"nearest_search_dims must be a whole number >= 0 (0: exact), "
                             f"got {self.nearest_search_dims!r}")
        if not (_is_int(self.nearest_bank_rows) and self.nearest_bank_rows >= 1):
            raise ValueError(f"nearest_bank_rows must be a whole number >= 1, got {self.nearest_bank_rows!r}")
        if not 0 <= self.smoothing_sigma < math.inf:
            raise ValueError(f"smoothing sigma must be a finite number >= 0, got {self.smoothing_sigma}")
        if self.head_gain is not None and not (_is_number(self.head_gain) and 0 < self.head_gain < math.inf):
            raise ValueError(f"head gain must be a finite number > 0, got {self.head_gain!r}")
        if not (_is_number(self.head_image_gain) and 0 <= self.head_image_gain < math.inf):
            raise ValueError(f"head image gain must be a finite number >= 0, got {self.head_image_gain!r}")
        if self.head_image_score not in HEAD_IMAGE_SCORES:
            raise ValueError(f"head_image_score must be one of {HEAD_IMAGE_SCORES}, got {self.head_image_score!r}")


def _is_number(v: object) -> bool:
    """An int or float, not a bool (a JSON true would otherwise pass as 1)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    # The budget: `steps` optimisation steps, rounded up to whole epochs, so that a small and
    # a large category both get a converged fit in about the same time; `epochs` overrides.
    steps: int = 200
    epochs: int | None = None
    # The input size, in pixels, the reconstructor's `steps` are counted at: a larger input
    # (more tokens per image) trains steps x step_pixels / its pixels, rounded up (steps_for),
    # so that each fit updates on about as many tokens and takes about as long as at 256x256;
    # a smaller input keeps `steps`. The image scorer keeps its budget (image_scorer_epochs).
    # None: off. Runs saved before: None. docs/design.md, "The step budget of large inputs".
    step_pixels: int | None = 256 * 256
    batch_size: int = 16
    lr: float = 1e-3  # screened on the development sets (docs/design.md, "Quality beyond bottle")
    weight_decay: float = 1e-4
    # "cosine": linear warm-up over warmup_fraction of the steps, then cosine decay to 0;
    # "step": warm-up over warmup_epochs, lr x0.1 after lr_drop_at of the epochs (the paper's).
    schedule: str = "cosine"
    warmup_fraction: float = 0.05
    lr_drop_at: float = 0.8
    grad_clip: float = 1.0
    warmup_epochs: int = 2
    # Normal-only loss (losses.reconstruction_loss): "hard": the error of positions below the
    # batch's hard_quantile counts easy_weight times (Dinomaly's loose loss), or "mse".
    # "auto": bf16 autocast for the reconstructor where the device computes bf16 natively
    # (CPUs with AVX-512 BF16 / AMX, recent GPUs), else fp32; "fp32" or "bf16" force one.
    precision: str = "auto"
    loss: str = "hard"  # screened on the development sets (docs/design.md, fourth round)
    hard_quantile: float = 0.9
    easy_weight: float = 0.1
    # "head": real labelled anomalies stay out of the reconstruction loss and fit a defect head
    # on the residual (defect_head.py; masks give its token labels, image labels the residual
    # map's top tokens); "loss": they enter L_px / L_img (SPEC section 2, the paper).
    labelled_anomalies: str = "head"
    # Copies of each masked defect pasted onto good training images at random places
    # (defect_paste.py) to fit the defect head with, beside the defects themselves. None: 10
    # where the parts lie anywhere (the map's per-position weight below 0.5, as metal_plate's),
    # none where they are aligned (bottle, bsdata), as measured (docs/design.md, "Defects pasted
    # onto good images"). 0: off. Runs saved before: 0.
    head_paste: int | None = None
    # After a fit of the learnable-query transformer, its validation loss (MSE of the held-out
    # good images' standardised features: about the share of their variance it leaves
    # unexplained) above this makes the fit start again without the query (use_query False):
    # the query could not model the category's normal variation (unaligned, fine-textured
    # parts), and its residual is then mostly noise. None: off. Needs held-out good images.
    # Chosen on the development sets: half the variance, about midway between the losses where
    # the query is kept (0.37-0.38) and where it fails (0.65) (docs/design.md, "The query
    # fallback"; 0.4 until the shorter budget of large inputs raised bsdata's loss to 0.374).
    query_fallback: float | None = 0.5
    # The image scorer (ModelConfig.image_scorer) trains this many times the reconstructor's
    # epochs: 5 is about 1000 steps beside the default 200, where the CNN's image AUROC was
    # screened (docs/design.md, "The image scorer"); its step costs about 1/15 of the transformer's.
    image_scorer_epochs: int = 5

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (
                self.step_pixels is None or (_is_int(self.step_pixels) and self.step_pixels >= 1),
                f"step pixels must be a whole number >= 1 or None (off), got {self.step_pixels!r}",
            ),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < math.inf, f"learning rate must be a finite number > 0, got {self.lr}"),
            (0 <= self.val_fraction < 1, f"validation fraction must be in [0, 1), got {self.val_fraction}"),
            (
                MIN_FALSE_ALARM_RATE <= self.false_alarm_rate < 1,
                f"false-alarm rate must be in [{MIN_FALSE_ALARM_RATE:g}, 1), got {self.false_alarm_rate}",
            ),
            (self.calibration in CALIBRATIONS, f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (
                self.labelled_anomalies in LABELLED_ANOMALY_USES,
                f"labelled_anomalies must be one of {LABELLED_ANOMALY_USES}, got {self.labelled_anomalies!r}",
            ),
            (self.calibration_folds >= 2, f"calibration folds must be >= 2, got {self.calibration_folds}"),
            (self.image_scorer_epochs >= 1, f"image scorer epochs must be >= 1, got {self.image_scorer_epochs}"),
            (
                self.head_paste is None or (_is_int(self.head_paste) and self.head_paste >= 0),
                f"head paste must be a whole number >= 0 or None (auto), got {self.head_paste!r}",
            ),
            (
                self.query_fallback is None or 0 < self.query_fallback < math.inf,
                f"query fallback must be a finite number > 0 or None (off), got {self.query_fallback}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    val_fraction: float = 0.1  # good training images held out for monitoring and thresholds
    false_alarm_rate: float = 0.01  # accepted share of good images flagged (thresholds.py)
    # Where threshold scores come from (calibration.py): "held_out"; "crossfit": every good image
    # scored by one of calibration_folds models fitted without it; "auto": cross-fitted when fewer
    # than calibration.MIN_HELD_OUT good images would be held out, else held out.
    calibration: str = "auto"
    calibration_folds: int = 3
    seed: int = 0
    # Anomaly-available training (losses.py): used only when anomalies are given.
    synthetic_prob: float = 0.5  # chance that a good image is replaced by a synthetic anomaly
    synthetic_copies: int = 2  # synthetic versions precomputed per good image
    anomaly_ratio: float = 0.25  # labelled anomalies appended per batch, relative to batch size
    top_k: int = 20  # L_img: mean of the k largest phi values
    alpha: float = 0.003  # weight of the log term of L_px / L_img


MODEL_PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "cpu": ModelConfig(
        align="area",
        image_scorer="cnn",
        token_patch=2,
        hidden_dim=256,
        num_encoder_layers=2,
        num_decoder_layers=2,
        num_heads=8,
        ffn_dim=512,
    ),
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"config schema version {version!r} is not supported (expected {SCHEMA_VERSION})")
        model = _build(ModelConfig, data.get("model", {}))
        model.image_size = tuple(model.image_size) if model.image_size is not None else None
        model.strides = tuple(model.strides)
        score = data.get("score", {})
        # heads saved before the gain: weight 1; before head_image_score: the map scored the image;
        # before head_image_gain: the logit joined the scorer's map at the map's gain
        # before head_bank_residual: a stored head read the scaled residual alone (a run without a
        # head stores nothing the key shapes: a head fitted on it later, by --init or an update,
        # takes today's default)
        old_head = {}
        if score.get("defect_head"):
            gain = score.get("head_gain", 1.0)
            old_head = {"head_gain": 1.0, "head_image_score": "map", "head_image_gain": 1.0 if gain is None else gain,
                        "head_bank_residual": False}  # fmt: skip
        return cls(
            model=model,
            # Runs saved before any of these keys: the plain residual, smoothing sigma 4, the
            # scorer's and the map's statistics half per-position, no Gaussian per position, no
            # memory bank, an exact search of it, a bank of 4096 rows.
            score=_build(ScoreConfig, {"residual_norm": "none", "smoothing_sigma": 4.0, "scorer_position_weight": 0.5,
                                       "map_position_weight": 0.5, "feature_gaussian": False, "nearest_map": False,
                                       "nearest_search_dims": 0, "nearest_bank_rows": 4096, **old_head,
                                       **score}),  # fmt: skip
            # Runs saved before the step budget trained with the warm-up + x0.1 schedule.
            # Runs saved before the hard-position loss existed trained with the MSE.
            # Runs saved before the defect head trained the reconstructor with L_px on masked anomalies.
            # Runs saved before the query fallback never fell back.
            # Runs saved before step_pixels trained `steps` at any input size.
            # Runs saved before head_paste fitted the head on the defects alone.
            train=_build(TrainConfig, {"schedule": "step", "loss": "mse", "labelled_anomalies": "loss",
                                       "query_fallback": None, "step_pixels": None, "head_paste": 0,
                                       **data.get("train", {})}),  # fmt: skip
        )


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A copy of config with fields set by name, e.g. {"steps": 300, "hidden_dim": 128}.

    Each name belongs to exactly one of ModelConfig, ScoreConfig, TrainConfig. Raises
    ValueError for a name that is none of their fields.
    """
    parts = {"model": config.model, "score": config.score, "train": config.train}
    changes: dict[str, dict[str, Any]] = {k: {} for k in parts}
    for key, value in overrides.items():
        owner = [k for k, part in parts.items() if key in {f.name for f in dataclasses.fields(part)}]
        if not owner:
            raise ValueError(
                f"unknown setting {key!r}; settings are the fields of ModelConfig, ScoreConfig, TrainConfig"
            )
        if key in ("image_size", "strides") and value is not None:
            value = tuple(value)
        changes[owner[0]][key] = value
    return RunConfig(**{k: dataclasses.replace(part, **changes[k]) for k, part in parts.items()})


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate a config dataclass, refusing unknown keys so a typo never goes unnoticed."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**values)


def parse_image_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x512' -> (256, 512) as (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image size {text!r} is not N or HxW") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"image size {text!r} is not N or HxW")


def steps_for(cfg: TrainConfig, image_size: tuple[int, int] | None = None) -> int:
    """The reconstructor's step budget at an input of image_size (H, W) pixels: cfg.steps, times
    cfg.step_pixels / (H * W) rounded up where the input is larger (its grid has that many times
    the tokens of an image, so each step trains on as many more; docs/design.md, "The step budget
    of large inputs"). cfg.steps without an image size or with step_pixels None."""
    pixels = image_size[0] * image_size[1] if image_size is not None else 0
    if cfg.step_pixels is None or pixels <= cfg.step_pixels:
        return cfg.steps
    return max(1, -(-cfg.steps * cfg.step_pixels // pixels))  # rounded up, in whole numbers
