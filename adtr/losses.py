"""Training losses (You et al., ICONIP 2022, section 3.3; SPEC section 2).

Normal-only: the mean squared error between f and f_hat.

With labelled anomalies, the FCDD objective (Liznerski et al., ICLR 2021) applied to feature
differences d = f - f_hat, with the pseudo-Huber difference per position

    phi(u) = sqrt((mean_i |d(i, u)|)^2 + 1) - 1

- pixel labels y(u) in [0, 1] on the token grid (K positions):
    L_px = 1/K sum_u (1 - y(u)) phi(u) - alpha * log(1 - exp(-1/K sum_u y(u) phi(u)))
- image labels y in {0, 1}, q = mean of the top-k values of phi:
    L_img = (1 - y) q - alpha * y * log(1 - exp(-q))

As in FCDD's code, samples without any anomalous position skip the log term. The log term
is computed as log(-expm1(-x)) with x clamped at 1e-6, so it stays finite (and its
gradient bounded) when the anomalous error is tiny, and tends to 0 when it is huge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ALPHA = 0.003
_MIN_ANOMALOUS_ERROR = 1e-6


def mse_loss(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    return torch.mean((f - f_hat) ** 2)


def reconstruction_loss(
    f: torch.Tensor,
    f_hat: torch.Tensor,
    kind: str = "mse",
    hard_quantile: float = 0.9,
    easy_weight: float = 0.1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normal-only loss of features f and reconstructions f_hat, both (B, C, h, w).

    "mse": mean squared error. "hard": per-position squared error e(u) (mean over channels);
    positions below the batch's hard_quantile of e count easy_weight times, so training
    concentrates on what is still badly reconstructed (Dinomaly, Guo et al., CVPR 2025,
    "loose loss"; EfficientAD's hard-feature loss keeps only the hard ones: easy_weight 0).
    gather (several processes, "hard" only): a 1-D tensor -> every process's values (adtr.
    distributed.gather_rows); the quantile and the weights' sum are then the global batch's,
    and the result is this process's part of the global loss (the parts sum to it).
    Raises ValueError for another kind.
    """
    if kind == "mse":
        return mse_loss(f, f_hat)
    if kind == "hard":
        e = ((f - f_hat) ** 2).mean(dim=1)  # (B, h, w)
        values = e.detach().flatten().float()
        threshold = torch.quantile(values if gather is None else gather(values), hard_quantile)
        weight = torch.where(e.detach() >= threshold, 1.0, easy_weight)
        total = weight.sum() if gather is None else gather(weight.sum().reshape(1)).sum()
        return (weight * e).sum() / total
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'mse' or 'hard'")


def pseudo_huber(f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
    """phi: (B, C, h, w) features and reconstructions -> (B, h, w)."""
    return torch.sqrt((f - f_hat).abs().mean(dim=1) ** 2 + 1) - 1


def _log_one_minus_exp_neg(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x >= 0, finite everywhere."""
    return torch.log(-torch.expm1(-x.clamp_min(_MIN_ANOMALOUS_ERROR)))


def pixel_loss(phi: torch.Tensor, y: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """L_px per sample: phi and token labels y, both (B, h, w) -> (B,)."""
    k = phi[0].numel()
    normal = ((1 - y) * phi).flatten(1).sum(1) / k
    anomalous = (y * phi).flatten(1).sum(1) / k
    has_anomaly = y.flatten(1).amax(1) > 0
    log_term = torch.where(has_anomaly, _log_one_minus_exp_neg(anomalous), torch.zeros_like(anomalous))
    return normal - alpha * log_term


def image_loss(phi: torch.Tensor, y: torch.Tensor, top_k: int, alpha: float = ALPHA) -> torch.Tensor:
    """L_img per sample: phi (B, h, w) and image labels y (B,) -> (B,)."""
    flat = phi.flatten(1)
    q = flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(1)
    y = y.to(phi.dtype)
    log_term = torch.where(y > 0, _log_one_minus_exp_neg(q), torch.zeros_like(q))
    return (1 - y) * q - alpha * y * log_term


def mixed_loss(
    f: torch.Tensor,
    f_hat: torch.Tensor,
    token_labels: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_level: torch.Tensor,
    top_k: int,
    alpha: float = ALPHA,
) -> torch.Tensor:
    """Mean over a batch mixing pixel-labelled samples (L_px) and image-labelled ones (L_img).

    f, f_hat: (B, C, h, w); token_labels: (B, h, w) in [0, 1]; image_labels: (B,) 0/1;
    pixel_level: (B,) bool, True where token_labels hold the sample's labels.
    """
    phi = pseudo_huber(f, f_hat)
    per_sample = torch.where(
        pixel_level, pixel_loss(phi, token_labels, alpha), image_loss(phi, image_labels, top_k, alpha)
    )
    return per_sample.mean()
