"""Settings of a run, as plain dataclasses that round-trip through JSON.

`ModelConfig` fixes the network (and so the checkpoint's tensor shapes), `ScoreConfig` how a
reconstruction error becomes a map and an image score, `TrainConfig` the optimisation.
Two model presets exist: `paper` is SPEC section 1 verbatim; `cpu` is the default, lighter
so that it converges within minutes on two CPU cores (docs/design.md says why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class ModelConfig:
    backbone: str = "lite0"
    image_size: tuple[int, int] = (256, 256)  # (height, width) fed to the backbone
    strides: tuple[int, ...] = (2, 4, 8, 16)  # backbone stages used; the token grid is the largest
    reconstructor: str = "transformer"  # "transformer", "mlp" or "cnn" (ablation baselines)
    hidden_dim: int = 256
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    use_query: bool = True  # False: the decoder reads the encoder output (paper's ablation)
    normalize_features: bool = True  # per-channel standardisation with training statistics

    @property
    def grid_size(self) -> tuple[int, int]:
        s = max(self.strides)
        return self.image_size[0] // s, self.image_size[1] // s


@dataclass
class ScoreConfig:
    smoothing_sigma: float = 4.0  # Gaussian sigma in input pixels; 0 turns smoothing off
    # "max_pool": max of the average-pooled map; "mean": its mean; "pooled_residual": norm of
    # the image-averaged feature residual (for semantic anomalies, e.g. CIFAR-10 one-class)
    image_score: str = "max_pool"
    pool_size: int = 16  # average-pool window in input pixels (about one token)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 1e-4
    lr_drop_at: float = 0.8  # fraction of epochs after which lr is multiplied by 0.1
    grad_clip: float = 1.0
    warmup_epochs: int = 2
    val_fraction: float = 0.1  # good training images held out for monitoring and thresholds
    false_alarm_rate: float = 0.01  # accepted share of good images flagged (thresholds.py)
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
        model.image_size = tuple(model.image_size)
        model.strides = tuple(model.strides)
        return cls(
            model=model,
            score=_build(ScoreConfig, data.get("score", {})),
            train=_build(TrainConfig, data.get("train", {})),
        )


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
