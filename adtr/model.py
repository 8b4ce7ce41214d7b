"""The ADTR module: image -> frozen features -> reconstruction -> anomaly map and score.

You et al., "ADTR: Anomaly Detection Transformer with Feature Reconstruction", ICONIP 2022.
The backbone's stage outputs are resized to the token grid (the largest stride used) and
concatenated: f, (B, C, h, w). A reconstructor maps f to f_hat of the same shape; the
anomaly map is ||f - f_hat||_2 over channels, upsampled to the input size and smoothed.
Higher scores mean more anomalous, everywhere in this package.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adtr.backbones import build_backbone
from adtr.config import ALIGN_MODES, ModelConfig, ScoreConfig
from adtr.defect_head import DefectHead
from adtr.defect_head import combine as combine_defect_head
from adtr.feature_gaussian import DIMS as GAUSSIAN_DIMS
from adtr.feature_gaussian import fit_feature_gaussian, gaussian_distance, merge_feature_gaussian
from adtr.memory_bank import (
    MIN_STRIDE,
    fit_memory_bank,
    join_memory_bank,
    nearest_distance,
    nearest_residual,
    patch_features,
    search_basis,
)
from adtr.transformer import ReconstructionTransformer

log = logging.getLogger(__name__)


class AnomalyOutput(NamedTuple):
    anomaly_map: torch.Tensor  # (B, H, W) at the model's input size
    anomaly_score: torch.Tensor  # (B,)


def align_features(maps: list[torch.Tensor], grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize each stage output to the token grid and concatenate: (B, sum C_s, h, w).

    Maps finer than the grid are reduced by `mode`: "bilinear" (as SPEC section 1 reads; it
    samples a 128x128 stride-2 map at 16x16 points, i.e. aliases it), "area" (the mean over
    each token's cell: what a token covers) or "max" (the maximum over the cell: a response
    smaller than the cell is not averaged away). Coarser maps are upsampled bilinearly.
    ValueError for another mode.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown feature alignment {mode!r}; choose one of {ALIGN_MODES}")

    def resize(m: torch.Tensor) -> torch.Tensor:
        if m.shape[-2:] == grid:
            return m
        if mode != "bilinear" and m.shape[-2] >= grid[0] and m.shape[-1] >= grid[1]:
            # Input sizes are multiples of 32, so each cell is a whole k x k block: a plain
            # pool, which (unlike adaptive pooling) the ONNX exporter supports.
            k = (int(m.shape[-2]) // grid[0], int(m.shape[-1]) // grid[1])
            return F.avg_pool2d(m, k, stride=k) if mode == "area" else F.max_pool2d(m, k, stride=k)
        return F.interpolate(m, size=grid, mode="bilinear", align_corners=False)

    return torch.cat([resize(m) for m in maps], dim=1)


class TransformerReconstructor(nn.Module):
    """1x1 conv C -> D, reconstruction transformer over the h*w tokens, 1x1 conv D -> C.

    With cfg.token_patch = p > 1, each token is a p x p block of the feature grid (pixel
    unshuffle: C p^2 channels on an (h/p, w/p) token grid), and the output is unfolded back."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        self.patch = p = cfg.token_patch
        h, w = cfg.grid_size[0] // p, cfg.grid_size[1] // p
        channels *= p * p
        self.proj_in = nn.Conv2d(channels, cfg.hidden_dim, 1)
        self.transformer = ReconstructionTransformer(
            h * w,
            cfg.hidden_dim,
            cfg.num_heads,
            cfg.ffn_dim,
            cfg.num_encoder_layers,
            cfg.num_decoder_layers,
            cfg.dropout,
            cfg.use_query,
            cfg.attention_dropout,
            grid=(h, w),
            neighbor_mask=cfg.neighbor_mask,
            layer_query=cfg.layer_query,
        )
        self.proj_out = nn.Conv2d(cfg.hidden_dim, channels, 1)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = self.patch
        # With p > 1: proj_in after a pixel unshuffle is a p x p convolution of stride p, and
        # proj_out followed by a pixel shuffle a transposed one, with the same weights reshaped;
        # run so they skip the shuffles' copies (slow layout copies in ONNX Runtime).
        x = self.proj_in(f) if p == 1 else F.conv2d(f, self._in_kernel(), self.proj_in.bias, stride=p)
        b, _, h, w = x.shape
        tokens = self.feature_dropout(x.flatten(2).transpose(1, 2))  # (B, h*w, D)
        tokens = self.transformer(tokens).transpose(1, 2).reshape(b, -1, h, w)
        if p == 1:
            return self.proj_out(tokens)
        out = F.conv_transpose2d(tokens, self._out_kernel(), stride=p)
        # the bias of channel c p^2 + i p + j lands at offset (i, j) of every p x p block of c
        return out + self.proj_out.bias.view(1, -1, p, p).repeat(1, 1, h, w)

    def _in_kernel(self) -> torch.Tensor:
        """proj_in's weight (D, C p^2, 1, 1) as a (D, C, p, p) kernel: pixel_unshuffle puts input
        channel c's offset (i, j) at channel c p^2 + i p + j."""
        d, cp2 = self.proj_in.weight.shape[:2]
        return self.proj_in.weight.view(d, cp2 // self.patch**2, self.patch, self.patch)

    def _out_kernel(self) -> torch.Tensor:
        """proj_out's weight (C p^2, D, 1, 1) as a transposed-convolution kernel (D, C, p, p)."""
        cp2, d = self.proj_out.weight.shape[:2]
        return self.proj_out.weight.view(cp2 // self.patch**2, self.patch, self.patch, d).permute(3, 0, 1, 2)


class MLPReconstructor(nn.Module):
    """Per-position bottleneck MLP on the feature grid, same width budget: a baseline for the query ablation."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.net = nn.Sequential(
            nn.Conv2d(channels, d, 1), nn.ReLU(), nn.Conv2d(d, d // 4, 1), nn.ReLU(),
            nn.Conv2d(d // 4, d, 1), nn.ReLU(), nn.Conv2d(d, channels, 1),
        )  # fmt: skip
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)  # training only, as the transformer's

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(self.feature_dropout(f))


class CNNReconstructor(nn.Module):
    """Convolutional autoencoder on the feature grid (downsample x2 and back): a baseline."""

    def __init__(self, channels: int, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.net = nn.Sequential(
            nn.Conv2d(channels, d, 1), nn.ReLU(),
            nn.Conv2d(d, d, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(d, d // 4, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(d // 4, d, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(d, channels, 1),
        )  # fmt: skip
        # A denoising autoencoder when > 0: it learns to restore dropped feature entries from
        # their neighbours rather than to copy its input (Dinomaly's noisy bottleneck).
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        # an odd grid comes back one row / column larger from the stride-2 round trip
        return self.net(self.feature_dropout(f))[..., : f.shape[2], : f.shape[3]]


class TokenGridReconstructor(nn.Module):
    """A reconstructor run on the token grid of a finer feature grid (ModelConfig.token_patch
    p > 1): it reconstructs the features averaged over each p x p block, and each position keeps
    its deviation from its block's average; so the residual f - f_hat at every position is its
    block's residual on the token grid, (B, C, h, w) in and out. The image scorer runs so
    (ADTR.__init__): a finer map does not need a finer image score, at a p^2-th of the cost."""

    def __init__(self, inner: nn.Module, patch: int):
        super().__init__()
        self.inner = inner
        self.patch = patch

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(f, self.patch)
        residual = pooled - self.inner(pooled)
        # nearest upsampling: each position gets its block's residual (ONNX Resize, not a slow Tile)
        return f - F.interpolate(residual, scale_factor=self.patch, mode="nearest")


RECONSTRUCTORS = {
    "transformer": TransformerReconstructor,
    "mlp": MLPReconstructor,
    "cnn": CNNReconstructor,
}


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class ADTR(nn.Module):
    """Frozen backbone + feature standardisation + reconstructor + scoring."""

    def __init__(self, cfg: ModelConfig, score: ScoreConfig | None = None):
        super().__init__()
        if cfg.reconstructor not in RECONSTRUCTORS:
            raise ValueError(f"unknown reconstructor {cfg.reconstructor!r}; choose from {sorted(RECONSTRUCTORS)}")
        if cfg.image_size is None:
            raise ValueError("ModelConfig.image_size is None: set it, or let ADTRDetector.fit choose it from the data")
        self.cfg = cfg
        self._score_cfg = score or ScoreConfig()
        self.backbone = build_backbone(cfg.backbone, cfg.image_size, cfg.strides)
        self.channels = sum(level.channels for level in self.backbone.levels)
        self.reconstructor = RECONSTRUCTORS[cfg.reconstructor](self.channels, cfg)
        # The image scorer (ModelConfig.image_scorer), stored only in runs that have one. Built
        # after the reconstructor, on a forked random state: the reconstructor's initial weights
        # and its training's dropout draws are those of a model without it (the same map).
        self.image_scorer = None
        if cfg.image_scorer is not None:
            scorer_cfg = dataclasses.replace(cfg, feature_dropout=cfg.image_scorer_dropout)
            with torch.random.fork_rng(devices=[]):
                self.image_scorer = RECONSTRUCTORS[cfg.image_scorer](self.channels, scorer_cfg)
            if cfg.token_patch > 1:
                self.image_scorer = TokenGridReconstructor(self.image_scorer, cfg.token_patch)
        scorer = cfg.image_scorer is not None
        # Per-channel statistics of the training features (identity until fitted).
        self.register_buffer("feature_mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, self.channels, 1, 1))
        # Per-channel RMS of the training residual (set_residual_scale); stored only when the
        # score uses it, so runs from before residual_norm load unchanged.
        norm = self.score_cfg.residual_norm
        self.register_buffer("residual_scale", torch.ones(1, self.channels, 1, 1), persistent=norm != "none")
        # Per-position mean and std of the training grid error ("channel_position"; identity else).
        grid = cfg.grid_size
        self.register_buffer("position_mean", torch.zeros(1, *grid), persistent=norm == "channel_position")
        self.register_buffer("position_std", torch.ones(1, *grid), persistent=norm == "channel_position")
        # The image scorer's own residual statistics, as the three above.
        self.register_buffer("scorer_residual_scale", torch.ones(1, self.channels, 1, 1), persistent=scorer)
        self.register_buffer("scorer_position_mean", torch.zeros(1, *grid), persistent=scorer)
        self.register_buffer("scorer_position_std", torch.ones(1, *grid), persistent=scorer)
        # The defect head (defect_head.py), fitted with labelled anomalies' masks; stored only
        # in runs that have one (score.defect_head), so runs without load unchanged.
        head = self.score_cfg.defect_head
        # the bank's channels (below) follow where the head reads the bank's residual too
        levels = self.backbone.levels
        fine = sum(level.channels for level in levels if level.stride < MIN_STRIDE)
        self.nearest_first = fine if fine < self.channels else 0
        inputs = self.channels + (self.channels - self.nearest_first if self.head_reads_bank else 0)
        self.register_buffer("head_weight", torch.zeros(1, inputs, 1, 1), persistent=head)
        self.register_buffer("head_bias", torch.zeros(1), persistent=head)
        self.register_buffer("head_norm", torch.tensor([0.0, 1.0, 0.0, 1.0]), persistent=head)
        # mean and std of the image scorer's grid error on the good training tokens: the scale on
        # which the head's logit joins it for the image score (ScoreConfig.head_image_score)
        self.register_buffer("scorer_head_norm", torch.tensor([0.0, 1.0]), persistent=head and self.uses_image_scorer)
        # A Gaussian per position of the features (feature_gaussian.py), which then scores the
        # image in the scorer's place; stored only in runs that use it (score.feature_gaussian).
        gauss = self.score_cfg.feature_gaussian is True
        # without a scorer, or with an image score not from a map, it would never score anything
        if gauss and (cfg.image_scorer is None or self.score_cfg.image_score not in MAP_SCORES):
            raise ValueError("feature_gaussian replaces the image scorer's grid: it needs an image scorer and an "
                             "image score from a map (not pooled_residual)")  # fmt: skip
        d, positions = (min(GAUSSIAN_DIMS, self.channels), grid[0] * grid[1]) if gauss else (0, 0)
        self.register_buffer("gaussian_channels", torch.zeros(d, dtype=torch.long), persistent=gauss)
        self.register_buffer("gaussian_mean", torch.zeros(positions, d), persistent=gauss)
        self.register_buffer("gaussian_precision", torch.zeros(positions, d, d), persistent=gauss)
        self.register_buffer("gaussian_count", torch.zeros(1 if gauss else 0, dtype=torch.long), persistent=gauss)
        # A memory bank of good features (memory_bank.py), whose nearest distance, standardised by
        # nearest_norm (mean, std on held-out good images), joins the map; stored only in runs that
        # use it (score.nearest_map).
        near = self.score_cfg.nearest_map is True
        # the bank's rows are patch features of the stages at MIN_STRIDE and coarser (all stages
        # where there are none), whose channels come last in the aligned features (nearest_first)
        rows = self.score_cfg.nearest_bank_rows if near else 0  # BANK_SIZE, more after an update's join
        self.register_buffer("nearest_bank", torch.zeros(rows, self.channels - self.nearest_first),
                             persistent=near)  # fmt: skip
        self.register_buffer("nearest_norm", torch.tensor([0.0, 1.0]), persistent=near)
        # the subspace the nearest row is searched in (score.nearest_search_dims; none: exact)
        c_bank, dims = self.channels - self.nearest_first, self.score_cfg.nearest_search_dims
        dims = dims if near and 0 < dims < c_bank else 0
        self.register_buffer("nearest_basis", torch.zeros(c_bank, dims), persistent=dims > 0)
        # The map's bilinear upsampling and Gaussian smoothing as two matrices (upsample_map),
        # rebuilt whenever score_cfg is set (its smoothing sigma).
        self._set_upsampling()

    @property
    def score_cfg(self) -> ScoreConfig:
        """The score settings; setting them also rebuilds the map's upsampling (its smoothing)."""
        return self._score_cfg

    @score_cfg.setter
    def score_cfg(self, score: ScoreConfig) -> None:
        old = getattr(self, "_score_cfg", None)
        fixed = ("defect_head", "head_image_score", "feature_gaussian", "nearest_map", "head_bank_residual",
                 "nearest_search_dims", "nearest_bank_rows")
        if old is not None and any(getattr(old, k) != getattr(score, k) for k in fixed):
            # they decide which buffers the model stores, fixed when it is built
            raise ValueError("a defect head, its image score or input, the feature Gaussian or the memory bank "
                             "changes the model's tensors: use with_score")
        self._score_cfg = score
        self._set_upsampling()

    def _set_upsampling(self) -> None:
        sigma = self._score_cfg.smoothing_sigma
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else None
        (gh, gw), (ih, iw) = self.cfg.grid_size, self.cfg.image_size
        for name, n_in, n_out in (("upsample_rows", gh, ih), ("upsample_cols", gw, iw)):
            matrix = upsample_matrix(n_in, n_out, kernel).to(self.feature_mean.device)
            self.register_buffer(name, matrix, persistent=False)

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Raw aligned backbone features of 0..255 RGB images (B, 3, H, W): (B, C, h, w),
        each position averaged over its cfg.feature_pool neighbourhood when that is > 1."""
        f = align_features(self.backbone(images), self.cfg.grid_size, self.cfg.align)
        k = self.cfg.feature_pool
        if k > 1:  # the border averages only the positions it has (no zero padding counted)
            f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
        return f

    def standardize(self, f: torch.Tensor) -> torch.Tensor:
        if not self.cfg.normalize_features:
            return f
        return (f - self.feature_mean) / self.feature_std

    def unstandardize(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) back to raw ones: the inverse of standardize."""
        if not self.cfg.normalize_features:
            return f
        return f * self.feature_std + self.feature_mean

    def set_feature_stats(self, raw_features: torch.Tensor) -> None:
        """Fit the standardisation on training features (N, C, h, w)."""
        mean = raw_features.mean(dim=(0, 2, 3), keepdim=True)
        std = raw_features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    @torch.no_grad()
    def set_residual_scale(
        self, features: torch.Tensor, batch_size: int = 16, held: torch.Tensor | None = None
    ) -> None:
        """Set residual_scale (1, C, 1, 1) to the per-channel RMS of f - f_hat over standardised
        training features (N, C, h, w), in the model's current mode (call it in eval mode); with
        "channel_position", also the per-position statistics of the scaled grid error
        (shrunk_position_stats, weighted score.map_position_weight; None: map_position_weight_for
        the scorer's weight, recorded in score_cfg). The same for the image scorer's residual
        (scorer_* buffers), where the model has one, with score.scorer_position_weight; while that
        is None it is chosen here (choose_position_weight) on `held`, standardised held-out good
        features (M, C, h, w), and recorded in score_cfg (0.5 without two or more held-out images).

        Dividing by it before the norm weighs every channel by how well good parts are
        reconstructed in it: a whitening of the residual (diagonal), the same idea as
        normalising each stage's error by its training error (Dinomaly, CVPR 2025, sec. 3)."""
        pairs = [(self.reconstructor, ("residual_scale", "position_mean", "position_std"), False)]
        if self.image_scorer is not None:
            pairs.append((self.image_scorer, ("scorer_residual_scale", "scorer_position_mean", "scorer_position_std"),
                          True))  # fmt: skip
        for rec, (scale, pos_mean, pos_std), is_scorer in reversed(pairs):  # the scorer first: the map's follows
            scale, pos_mean, pos_std = (self.get_buffer(n) for n in (scale, pos_mean, pos_std))
            total = torch.zeros(self.channels, dtype=torch.float64, device=scale.device)
            for f in self._batches(features, batch_size):
                total += (f - rec(f)).double().pow(2).sum(dim=(0, 2, 3))
            count = len(features) * features.shape[2] * features.shape[3]
            scale.copy_((total / max(1, count)).sqrt().clamp_min(1e-6).float().view(1, -1, 1, 1))
            if self.score_cfg.residual_norm != "channel_position":
                continue
            grids = self._scaled_grid_errors(rec, scale, features, batch_size)
            if is_scorer:
                w = self.score_cfg.scorer_position_weight
                if w is None:
                    held_grids = self._scaled_grid_errors(rec, scale, held, batch_size) if held is not None else None
                    w = choose_position_weight(grids, held_grids) if held is not None and len(held) > 1 else 0.5
                    self.score_cfg = dataclasses.replace(self.score_cfg, scorer_position_weight=w)
            else:
                w = self.score_cfg.map_position_weight
                if w is None:
                    scorer_w = self.score_cfg.scorer_position_weight if self.uses_image_scorer else None
                    w = map_position_weight_for(scorer_w)
                    self.score_cfg = dataclasses.replace(self.score_cfg, map_position_weight=w)
            mean, var = shrunk_position_stats(grids, w)
            pos_mean.copy_(mean.unsqueeze(0))
            pos_std.copy_(var.sqrt().clamp_min(1e-6).unsqueeze(0))

    def _scaled_grid_errors(
        self, rec: nn.Module, scale: torch.Tensor, features: torch.Tensor, batch_size: int = 16
    ) -> torch.Tensor:
        """The norm per position (N, h, w) of a reconstructor's residual on standardised features
        (N, C, h, w), divided by `scale`: the grid error before per-position standardisation."""
        return torch.cat([torch.linalg.vector_norm((f - rec(f)) / scale, dim=1)
                          for f in self._batches(features, batch_size)])  # fmt: skip

    def _batches(self, features: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        device = self.residual_scale.device
        for i in range(0, len(features), batch_size):
            yield features[i : i + batch_size].to(device)

    def residual_batches(
        self, features: torch.Tensor, batch_size: int = 16, scaled: bool = True
    ) -> Iterator[torch.Tensor]:
        """Standardised features (N, C, h, w), on any device -> the residual f - f_hat of each
        batch (b, C, h, w) on the model's device, divided by residual_scale when `scaled`; in
        the model's current mode (call it in eval mode, under no_grad for scoring)."""
        for f in self._batches(features, batch_size):
            yield self.residual(f) if scaled else f - self.reconstructor(f)

    def residual(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> scaled residual (f - f_hat) / residual_scale."""
        return (f - self.reconstructor(f)) / self.residual_scale

    def residual_grid(
        self, residual: torch.Tensor, features: torch.Tensor | None = None, bank_residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled residual (B, C, h, w) -> the map on the token grid before the defect head (B, h, w).

        With score.nearest_map, the standardised features (B, C, h, w) the residual came from
        are needed too: their nearest_grid joins the map (ValueError without them); or their
        bank_residual (B, C_bank, h, w), whose norm is that distance, where it is at hand."""
        grid = self._grid_error(residual, self.position_mean, self.position_std)
        if self.score_cfg.nearest_map:
            if bank_residual is not None:
                grid = grid + self._standardised_distance(torch.linalg.vector_norm(bank_residual, dim=1))
            elif features is None:
                raise ValueError("this model's map adds the nearest good feature's distance: pass the features")
            else:
                grid = grid + self.nearest_grid(features)
        return grid

    def nearest_grid(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> the distance of each position's patch feature
        (memory_bank.patch_features) to the nearest memory bank row (memory_bank.py), standardised
        by nearest_norm and clipped at 0 as the reconstruction error is (B, h, w)."""
        return self._standardised_distance(nearest_distance(self.patch_features(features), self.nearest_bank,
                                                            self._basis(self.nearest_bank)))

    def _standardised_distance(self, d: torch.Tensor) -> torch.Tensor:
        return ((d - self.nearest_norm[0]) / self.nearest_norm[1]).clamp_min(0)

    def bank_residual(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> each position's patch feature minus its nearest
        memory bank row (B, C_bank, h, w) (memory_bank.nearest_residual): what the head reads
        beside the reconstruction residual where head_reads_bank."""
        return nearest_residual(self.patch_features(features), self.nearest_bank, self._basis(self.nearest_bank))

    def _basis(self, bank: torch.Tensor) -> torch.Tensor | None:
        """The search basis of a bank (K, C_bank): the model's own (nearest_basis) for its bank, one
        computed for another (a bank of part of the images), or None where the search is exact."""
        if not self.nearest_basis.shape[1]:
            return None
        return self.nearest_basis if bank is self.nearest_bank else search_basis(bank, self.nearest_basis.shape[1])

    @property
    def head_reads_bank(self) -> bool:
        """Whether the defect head's input (B, D, h, w) is the scaled residual and the bank's residual
        side by side, D = C + C_bank (ScoreConfig.head_bank_residual, with a defect head and a memory
        bank), or the residual alone, D = C."""
        return self.score_cfg.head_reads_bank

    def _grid_error(self, residual: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Scaled residual (B, C, h, w) -> its norm per position (B, h, w), standardised by the
        per-position training statistics (1, h, w) with "channel_position"."""
        grid = torch.linalg.vector_norm(residual, dim=1)
        if self.score_cfg.residual_norm == "channel_position":
            grid = ((grid - mean) / std).clamp_min(0)
        return grid

    def score(self, f: torch.Tensor) -> AnomalyOutput:
        """Standardised features (B, C, h, w) -> map at input size and image score."""
        residual = self.residual(f)  # (B, C, h, w)
        bank = self.bank_residual(f) if self.head_reads_bank else None  # once, for the map and the head
        grid = self.residual_grid(residual, f, bank)
        logit = None
        if self.score_cfg.defect_head:
            head_input = residual if bank is None else torch.cat([residual, bank], 1)
            logit = (head_input * self.head_weight).sum(1) + self.head_bias
            grid = combine_defect_head(grid, logit, self.head_norm, self.head_gain)
        if not self.uses_image_scorer:
            return self.score_maps(grid, residual)
        m = self.upsample(grid)
        image_grid = self.scorer_grid(f)
        if logit is not None:  # the labelled defects' evidence joins the scorer's, at its own weight
            norm = torch.cat([self.scorer_head_norm, self.head_norm[2:]])
            image_grid = combine_defect_head(image_grid, logit, norm, self.score_cfg.head_image_gain)
        score = map_image_score(self.upsample(image_grid), self.score_cfg, self.cfg.image_size)
        return AnomalyOutput(m[:, 0], score)

    @property
    def uses_image_scorer(self) -> bool:
        """Whether the image score comes from the image scorer: the model has one, an image score
        computed from a map (MAP_SCORES), and no defect head unless score.head_image_score is
        "scorer" (the head's logit then joins the scorer's map for the image score)."""
        return (self.image_scorer is not None and self.score_cfg.image_score in MAP_SCORES
                and (not self.score_cfg.defect_head or self.score_cfg.head_image_score == "scorer"))  # fmt: skip

    def scorer_grid(self, f: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> the image scorer's grid error (B, h, w), scaled
        and standardised as residual_grid does the reconstructor's; with score.feature_gaussian,
        the features' Mahalanobis distance per position instead (feature_gaussian.py). ValueError
        without a scorer."""
        if self.image_scorer is None:
            raise ValueError("this model has no image scorer (ModelConfig.image_scorer)")
        if self.score_cfg.feature_gaussian:
            return gaussian_distance(f, self.gaussian_channels, self.gaussian_mean, self.gaussian_precision)
        residual = (f - self.image_scorer(f)) / self.scorer_residual_scale
        return self._grid_error(residual, self.scorer_position_mean, self.scorer_position_std)

    @property
    def head_gain(self) -> float:
        """The defect head's weight in the map (ScoreConfig.head_gain); ValueError while unset."""
        if self.score_cfg.head_gain is None:
            raise ValueError("the defect head's gain is unset: the fit sets it (ScoreConfig.head_gain)")
        return self.score_cfg.head_gain

    @torch.no_grad()
    def set_defect_head(self, head: DefectHead, scorer_norm: torch.Tensor | None = None) -> None:
        """Store a fitted defect head (defect_head.py); score.defect_head must be set.

        scorer_norm: (2,) mean and std of the image scorer's grid error on the good training
        tokens, needed when the scorer scores the image (uses_image_scorer); ValueError without."""
        if not self.score_cfg.defect_head:
            raise ValueError("this model's score settings have no defect head (ScoreConfig.defect_head)")
        if self.uses_image_scorer and scorer_norm is None:
            raise ValueError("the image scorer scores this model's images: the head needs the scorer's grid statistics")
        self.head_weight.copy_(head.weight.view(1, -1, 1, 1))
        self.head_bias.fill_(head.bias)
        self.head_norm.copy_(head.norm)
        if scorer_norm is not None:
            self.scorer_head_norm.copy_(scorer_norm)

    def set_feature_gaussian(self, features: torch.Tensor) -> None:
        """Fit the Gaussian per position (feature_gaussian.py) on standardised good features
        (N, C, h, w); ValueError unless score.feature_gaussian is set, or for fewer than 2 images."""
        if not self.score_cfg.feature_gaussian:
            raise ValueError("this model's score settings have no feature Gaussian (ScoreConfig.feature_gaussian)")
        channels, mean, precision = fit_feature_gaussian(features)
        device = self.gaussian_mean.device
        self.gaussian_channels.copy_(channels.to(device))
        self.gaussian_mean.copy_(mean.to(device))
        self.gaussian_precision.copy_(precision.to(device))
        self.gaussian_count.fill_(len(features))

    def join_feature_gaussian(self, features: torch.Tensor) -> None:
        """Join more standardised good features (M, C, h, w) to the fitted Gaussian per position
        (feature_gaussian.merge_feature_gaussian): as if it had been fitted on both; ValueError
        unless the model has a fitted one."""
        if not self.score_cfg.feature_gaussian or int(self.gaussian_count.item()) < 2:
            raise ValueError("this model has no fitted feature Gaussian to join images to")
        count = int(self.gaussian_count.item())
        mean, precision = merge_feature_gaussian(count, self.gaussian_channels, self.gaussian_mean,
                                                 self.gaussian_precision, features)  # fmt: skip
        self.gaussian_mean.copy_(mean)
        self.gaussian_precision.copy_(precision)
        self.gaussian_count.fill_(count + len(features))

    def patch_features(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C, h, w) -> the memory bank's patch features (B, C', h, w)."""
        return patch_features(features, self.nearest_first)

    @torch.no_grad()
    def crossed_bank_residual(self, features: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Standardised good features (N, C, h, w), N >= 2 -> their bank residuals (N, C_bank, h, w)
        against a bank of the other half of them (memory_bank.fit_memory_bank): each half as unseen
        good images show it, where the model's bank keeps so many of their positions that most of
        their residuals there are 0 (fit.fit_head).
        ValueError unless score.nearest_map is set, or for fewer than 2 images."""
        if not self.score_cfg.nearest_map:
            raise ValueError("this model's score settings have no memory bank (ScoreConfig.nearest_map)")
        n = len(features)
        if n < 2:
            raise ValueError("a bank of the other half needs at least 2 images")
        half, parts = n // 2, []
        for rows, other in ((slice(0, half), slice(half, n)), (slice(half, n), slice(0, half))):
            bank = fit_memory_bank(self.patch_features(features[other].to(self.nearest_bank.device)))
            basis = self._basis(bank)
            parts += [nearest_residual(self.patch_features(f), bank, basis).cpu()
                      for f in self._batches(features[rows], batch_size)]  # fmt: skip
        return torch.cat(parts)

    @torch.no_grad()
    def set_memory_bank(self, features: torch.Tensor, held: torch.Tensor | None = None) -> None:
        """Fit the memory bank (memory_bank.py) on standardised good training features (N, C, h, w)
        and its standardisation (nearest_norm: mean, std) on the nearest distances of standardised
        held-out good features (M, C, h, w). Without two of them, on the distances of the training
        features' second half to a bank of their first (a training image is near its own bank
        rows: its distances say nothing of unseen good parts); with one training image, (0, 1).
        ValueError unless score.nearest_map is set."""
        if not self.score_cfg.nearest_map:
            raise ValueError("this model's score settings have no memory bank (ScoreConfig.nearest_map)")
        device = self.nearest_bank.device
        self._set_bank(fit_memory_bank(self.patch_features(features)).to(device))  # BANK_SIZE rows
        if held is not None and len(held) > 1:
            self._set_nearest_norm(held, self.nearest_bank)
        elif len(features) > 1:
            half = len(features) // 2
            self._set_nearest_norm(features[half:], fit_memory_bank(self.patch_features(features[:half])).to(device))
        else:
            self.nearest_norm.copy_(torch.tensor([0.0, 1.0]))

    @torch.no_grad()
    def join_memory_bank(self, features: torch.Tensor, reference: torch.Tensor) -> None:
        """Join more standardised good features (M, C, h, w) to the fitted memory bank
        (memory_bank.join_memory_bank: the bank grows, up to MAX_ROWS rows, until the new positions
        are covered as closely as the reference features (R, C, h, w), the good images the bank was
        fitted on, are); its standardisation is kept, and score_cfg.nearest_bank_rows records the new
        size. ValueError unless the model has a memory bank."""
        if not self.score_cfg.nearest_map:
            raise ValueError("this model has no memory bank to join images to (ScoreConfig.nearest_map)")
        before = len(self.nearest_bank)
        self._set_bank(join_memory_bank(self.nearest_bank, self.patch_features(features),
                                        self.patch_features(reference)))  # fmt: skip
        log.info("memory bank: %d -> %d rows with %d new good images", before, len(self.nearest_bank), len(features))

    def _set_bank(self, bank: torch.Tensor) -> None:
        """The memory bank (K, C) set, of any number of rows (recorded in score_cfg.nearest_bank_rows,
        so that a saved run builds its buffer), and its search basis with it."""
        self.nearest_bank = bank.to(self.nearest_bank)
        self._score_cfg = dataclasses.replace(self._score_cfg, nearest_bank_rows=len(bank))  # no buffer to rebuild
        self._set_search_basis()

    def _set_search_basis(self) -> None:
        if self.nearest_basis.shape[1]:
            self.nearest_basis.copy_(search_basis(self.nearest_bank, self.nearest_basis.shape[1]))

    def _set_nearest_norm(self, features: torch.Tensor, bank: torch.Tensor, batch_size: int = 16) -> None:
        basis = self._basis(bank)
        d = torch.cat([nearest_distance(self.patch_features(f), bank, basis).cpu()
                       for f in self._batches(features, batch_size)]).double()  # fmt: skip
        self.nearest_norm.copy_(torch.stack([d.mean(), d.std().clamp_min(1e-6)]).float())

    def with_score(self, score: ScoreConfig) -> ADTR:
        """A copy with other score settings and the same weights and statistics (e.g. to add
        a defect head to a model that had none)."""
        other = ADTR(self.cfg, score).to(self.feature_mean.device)
        # tensors whose shape follows the score settings (a Gaussian, a memory bank, the head's
        # input) are left to the new model where their shape changed: fitted afterwards
        own = other.state_dict()
        other.load_state_dict({k: v for k, v in self.state_dict().items()
                               if not (k.startswith(("gaussian_", "nearest_", "head_")) and k in own
                                       and own[k].shape != v.shape)}, strict=False)  # fmt: skip
        # buffers a persistent-state copy misses: the ones this model does not store, but not
        # the upsampling, which follows the new score settings
        for name, buf in self.named_buffers():
            if name.startswith(("gaussian_", "nearest_", "head_")) and other.get_buffer(name).shape != buf.shape:
                continue  # a Gaussian, memory bank or head input added (fitted afterwards) or dropped (not needed)
            if not name.startswith("upsample_"):
                other.get_buffer(name).copy_(buf)
        same_bank = other.nearest_bank.shape == self.nearest_bank.shape
        if same_bank and other.nearest_basis.shape != self.nearest_basis.shape:
            other._set_search_basis()  # the same bank, searched in another subspace
        return other.train(self.training)

    def score_maps(self, grid_map: torch.Tensor, residual: torch.Tensor | None = None) -> AnomalyOutput:
        """Grid error (B, h, w) -> map at input size (B, H, W) and image score (B,).

        The "pooled_residual" score needs the feature residual f - f_hat (B, C, h, w).
        """
        m = self.upsample(grid_map)
        if self.score_cfg.image_score == "pooled_residual":
            if residual is None:
                raise ValueError("the pooled_residual image score needs the feature residual")
            # Norm of the image-averaged residual: token errors that share a direction (a whole
            # object reconstructed as another class) add up, uncorrelated local errors cancel.
            # Scores semantic anomalies better than any statistic of the map (docs/design.md).
            score = torch.linalg.vector_norm(residual.mean(dim=(2, 3)), dim=1)
        else:
            score = map_image_score(m, self.score_cfg, self.cfg.image_size)
        return AnomalyOutput(m[:, 0], score)

    def upsample(self, grid_map: torch.Tensor) -> torch.Tensor:
        """Grid error (B, h, w) -> the smoothed map at input size (B, 1, H, W) (upsample_map)."""
        return apply_upsample(grid_map, self.upsample_rows, self.upsample_cols)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """0..255 RGB images (B, 3, H, W) at the configured size -> map and score."""
        return self.score(self.standardize(self.extract(images)))


MAP_SCORES = ("top_mean", "max_pool", "mean")  # image scores computed from the map alone

POSITION_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the candidates of choose_position_weight


def shrunk_position_stats(grids: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid errors of good images (N, h, w) -> the mean and variance (h, w) each position is
    standardised with: its own weighted `weight`, the whole grid's 1 - weight (a shrinkage
    towards the grid; 1: PaDiM-like per-position statistics, 0: one for the grid). With a
    single image the variance is 1."""
    mean = weight * grids.mean(0) + (1 - weight) * grids.mean()
    if len(grids) < 2:
        return mean, torch.ones_like(mean)
    return mean, weight * grids.var(0) + (1 - weight) * grids.var()


MAP_POSITION_WEIGHT = 0.5  # the map's per-position weight at most: half per-position, half the grid's


def map_position_weight_for(scorer_weight: float | None) -> float:
    """The map's per-position weight given the image scorer's chosen one (None: no scorer).

    The map keeps half per-position, half whole-grid statistics (MAP_POSITION_WEIGHT), so that
    unaligned parts get less of the per-position estimate's noise, and takes less where the
    scorer's held-out likelihood (choose_position_weight) chose less: min(0.5, scorer_weight).
    The map's own likelihood cannot choose it (it takes 1 everywhere: the many background
    positions outweigh the few defective ones); the scorer, which does not copy its input, says
    whether the parts are aligned. On metal_plate (plates anywhere; the scorer chose 0) the map
    at 0 scores AUPRO 0.9156 against 0.9076 at 0.5; the aligned sets choose 0.75-1 and keep 0.5.
    docs/design.md, "The map's per-position weight"."""
    return MAP_POSITION_WEIGHT if scorer_weight is None else min(MAP_POSITION_WEIGHT, scorer_weight)


def choose_position_weight(train: torch.Tensor, held: torch.Tensor) -> float:
    """The weight of POSITION_WEIGHTS whose statistics of the training grid errors (N, h, w)
    predict the held-out good images' grid errors (M, h, w) best: the least mean Gaussian
    negative log-likelihood over their positions (the smaller weight on a tie). Aligned parts
    (the same thing at each position on every image) choose per-position statistics; parts
    that lie anywhere, the grid's. docs/design.md, "The image scorer's statistics per position"."""
    train, held = train.double(), held.double()

    def nll(w: float) -> float:
        mean, var = shrunk_position_stats(train, w)
        var = var.clamp_min(1e-12)
        return float((0.5 * var.log() + 0.5 * (held - mean) ** 2 / var).mean())

    scores = [nll(w) for w in POSITION_WEIGHTS]
    return POSITION_WEIGHTS[scores.index(min(scores))]


def map_image_score(m: torch.Tensor, score: ScoreConfig, size: tuple[int, int]) -> torch.Tensor:
    """Image score (B,) of maps (B, 1, H, W) for the scores in MAP_SCORES.

    size: (H, W) as Python ints, so that an exported graph holds top_mean's k as a constant.
    Also scores the part of a letterboxed map that covers the image (predict.py). ValueError
    for another image score (pooled_residual needs the feature residual).
    """
    if score.image_score == "mean":
        return m.mean(dim=(1, 2, 3))
    if score.image_score == "top_mean":
        k = max(1, round(score.top_fraction * size[0] * size[1]))
        return m.flatten(1).topk(k, dim=1).values.mean(1)
    if score.image_score == "max_pool":
        k = min(score.pool_size, *size)
        return F.avg_pool2d(m, k, stride=1).amax(dim=(1, 2, 3)) if k > 1 else m.amax(dim=(1, 2, 3))
    if score.image_score == "pooled_residual":
        raise ValueError("the pooled_residual image score needs the feature residual, not only the map")
    raise ValueError(f"unknown image score {score.image_score!r}")


def upsample_map(grid_map: torch.Tensor, size: tuple[int, int], kernel: torch.Tensor | None) -> torch.Tensor:
    """Grid map (B, h, w) -> (B, 1, H, W): bilinear to `size`, then blurred with the 1-D
    Gaussian `kernel` (gaussian_kernel1d, reflect padding) unless it is None. SPEC section 1,
    "Scores". Both steps are separable linear maps, so the whole is rows @ map @ cols^T with
    the matrices of upsample_matrix: the same map as interpolating and convolving the image
    (up to float rounding), at a fraction of the cost of a one-channel 2-D convolution."""
    h, w = grid_map.shape[-2:]
    rows = upsample_matrix(h, size[0], kernel).to(grid_map)
    cols = upsample_matrix(w, size[1], kernel).to(grid_map)
    return apply_upsample(grid_map, rows, cols)


def apply_upsample(grid_map: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Grid map (B, h, w), matrices (H, h) and (W, w) of upsample_matrix -> (B, 1, H, W)."""
    return (rows @ grid_map @ cols.T)[:, None]


def upsample_matrix(n_in: int, n_out: int, kernel: torch.Tensor | None) -> torch.Tensor:
    """The linear map (n_out, n_in) of 1-D linear interpolation from n_in to n_out samples
    (align_corners=False, as F.interpolate's bilinear along one axis), followed by the
    reflect-padded convolution with `kernel` (1-D, odd length) unless it is None.
    ValueError when the kernel's radius is not below n_out (reflect padding needs it)."""
    up = F.interpolate(torch.eye(n_in).unsqueeze(1), size=n_out, mode="linear", align_corners=False)
    if kernel is not None:
        r = kernel.numel() // 2
        if r >= n_out:
            raise ValueError(f"smoothing kernel radius {r} must be below the map size {n_out}")
        up = F.conv1d(F.pad(up, (r, r), mode="reflect"), kernel.float().to(up.device).view(1, 1, -1))
    return up[:, 0].T.contiguous()  # row i of the identity is basis signal i: column i of the map
