"""A discriminative defect head on the frozen residual, trained with labelled anomalies' masks.

ADTR's own use of labelled anomalies (SPEC section 2, L_px) fine-tunes the reconstructor to
reconstruct defect tokens badly. On MPDD metal_plate that lowered every metric (docs/design.md,
"k-shot on a hard set"). What pays instead: keep the normal-only reconstructor and fit a
logistic regression per token on its scaled residual r = (f - f_hat) / residual_scale, good
tokens (training images, and the unmasked tokens of the defect images) against the tokens a
mask covers by more than half. The map then adds the head's standardised logit to the
standardised residual map, so a defect type the head never saw still shows through the
residual (tested by leaving one bottle defect type out, docs/design.md). A head fitted on
several masked defects weighs MASK_GAIN times the residual map: it has also learnt which
residuals of good parts are not defects, and the larger weight lets it silence them (bsdata's
pits), at a small cost on defect types it never saw; one that reads a memory bank's residual
(below) weighs as much as the residual map, whose map the bank already brought to PatchCore's
level (docs/design.md, "The head's weight on a map with a memory bank"). A head fitted on one or
two masked defects weighs half as much (docs/design.md, "The head's weight with one or two
defects"), one on pseudo-labels only as much as the residual map ("The head's weight").

Where the map has a memory bank (ScoreConfig.nearest_map), the head reads the bank's residual
(each position's patch feature minus its nearest bank row) beside r: a copying reconstructor's
residual barely shows the defects it copies (ScoreConfig.head_bank_residual, ADTR.head_reads_bank;
docs/design.md, "The defect head reads the bank's residual"). The functions here take any such
input (N, D, h, w) as "residual".

The head is linear, so the model applies it as a 1x1 projection of its input: it costs one dot
product per token and exports to ONNX with the rest of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A defect image's tokens covered by at least this share of its best-covered token's mask
# share are its positives (share >= 0.5 for large defects; the tokens of a small pit, which
# covers only part of any token, too); partly covered tokens below it are left out.
POSITIVE_SHARE = 0.5
# A defect with an image label only: its tokens whose residual map value is at least this share
# of the image's maximum are taken as positives (pseudo-labels; the others are not negatives).
PSEUDO_SHARE = 0.5
WEIGHT_DECAY = 1e-3  # L2 on the standardised weights; 1e-3..1e-1 measured alike (docs/design.md)
MAX_ITER = 300
# The logit's weight against the residual map (ScoreConfig.head_gain) for a head fitted with at
# least MIN_MASKED masked defects: MASK_GAIN, chosen on metal_plate, bsdata (k = 1, 3, 5, 3 draws
# each) and bottle's defect types left out of the head (docs/design.md, "The head's weight"). A
# head that reads a memory bank's residual weighs DEFAULT_GAIN: on metal_plate, 4 buried a map
# already at PatchCore's level (3 masked defects: AUPRO 0.9351 at 4, 0.9510 at 1, 0.9426 without a
# head; docs/design.md, "The head's weight on a map with a memory bank"). With fewer masked defects
# the head weighs FEW_MASKED_SHARE of that: one defect can teach a head that misses the next
# (bsdata's draw 0: pixel AUROC 0.73 alone), yet on bsdata's map it still gains most at 2 to 4,
# while on metal_plate's, with a bank, it loses least at 0.5 (docs/design.md, "The head's weight
# with one or two defects"). Pseudo-labels only (image labels): DEFAULT_GAIN.
MASK_GAIN = 4.0
MIN_MASKED = 3
DEFAULT_GAIN = 1.0
FEW_MASKED_SHARE = 0.5


@dataclass
class DefectHead:
    """logit = <weight, r> + bias per token, and the standardisation of the two maps it joins."""

    weight: torch.Tensor  # (C,) on the scaled residual's channels
    bias: float
    norm: torch.Tensor  # (4,): mean and std of the residual map, mean and std of the logit (good tokens)


def tokens(residual: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N * h * w, C), one row per token."""
    return residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1])


def fit_defect_head(
    good_residual: torch.Tensor,
    good_map: torch.Tensor,
    defect_residual: torch.Tensor,
    defect_labels: torch.Tensor,
    known_negatives: torch.Tensor | None = None,
    weight_decay: float = WEIGHT_DECAY,
) -> DefectHead:
    """Fit the head by class-balanced logistic regression (L-BFGS, L2 on standardised inputs).

    good_residual: (N, C, h, w) scaled residuals of the good training images; good_map: (N, h, w)
    their residual maps (the model's grid before the head), for its standardisation.
    defect_residual: (M, C, h, w) of the labelled defects; defect_labels: (M, h, w) share of
    masked pixels per token (engine.token_labels). known_negatives: (M,) bool, whether a
    defect's unlabelled tokens are good ones (a mask; default all): pseudo-labelled images give
    positives only. ValueError when no defect has a labelled token.
    """
    positive = head_positives(defect_labels).reshape(-1)
    known = torch.ones(len(defect_labels), dtype=torch.bool) if known_negatives is None else known_negatives
    negative = ((defect_labels == 0) & known.view(-1, 1, 1)).reshape(-1)
    d = tokens(defect_residual)
    if not positive.any():
        raise ValueError("no token of the labelled anomalies is marked as a defect (empty masks, or residual maps "
                         "without any error): a defect head needs defect tokens")
    x = torch.cat([tokens(good_residual), d[negative], d[positive]]).double()
    n_pos = int(positive.sum())
    y = torch.cat([torch.zeros(len(x) - n_pos, dtype=x.dtype), torch.ones(n_pos, dtype=x.dtype)])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    # each class weighs half, however few the defect tokens are
    sample_weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    lin = torch.nn.Linear(x.shape[1], 1).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(lin(x)[:, 0], y, reduction="none") * sample_weight).mean()
        loss = loss + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # fold the input standardisation into the weights: w.(r - mean)/std + b = (w/std).r + b'
    w = (lin.weight.detach()[0] / std).float()
    b = float(lin.bias.detach()[0] - (lin.weight.detach()[0] / std * mean).sum())
    return DefectHead(w, b, head_norm(good_residual, good_map, w, b))


def head_positives(defect_labels: torch.Tensor) -> torch.Tensor:
    """(M, h, w) token mask shares -> bool (M, h, w): the head's positive tokens (POSITIVE_SHARE)."""
    cut = POSITIVE_SHARE * defect_labels.flatten(1).amax(1).view(-1, 1, 1)  # per defect image
    return (defect_labels >= cut) & (defect_labels > 0)


def default_gain(n_masked: int, reads_bank: bool = False) -> float:
    """The head's gain when the settings leave it unset (ScoreConfig.head_gain None), for a head
    fitted with n_masked defects with masks: MASK_GAIN, or DEFAULT_GAIN for a head that reads a
    memory bank's residual (ADTR.head_reads_bank); FEW_MASKED_SHARE of that with 1 to
    MIN_MASKED - 1 masked defects; DEFAULT_GAIN with none (pseudo-labels only)."""
    if n_masked <= 0:
        return DEFAULT_GAIN
    full = DEFAULT_GAIN if reads_bank else MASK_GAIN
    return full if n_masked >= MIN_MASKED else FEW_MASKED_SHARE * full


def describe_default_gain() -> str:
    """default_gain's rule in words, for the command line's help."""
    return (f"{MASK_GAIN:g} with at least {MIN_MASKED} masked anomalies, {FEW_MASKED_SHARE * MASK_GAIN:g} with fewer; "
            f"where the map has a memory bank {DEFAULT_GAIN:g} and {FEW_MASKED_SHARE * DEFAULT_GAIN:g}; "
            f"{DEFAULT_GAIN:g} with image labels only")


def head_norm(good_residual: torch.Tensor, good_map: torch.Tensor, weight: torch.Tensor, bias: float) -> torch.Tensor:
    """(4,): mean and std of the residual map (N, h, w) and of the head's logit on the good
    tokens of good_residual (N, C, h, w): the scales on which combine() adds them."""
    logit = tokens(good_residual).double() @ weight.double() + bias
    grid = good_map.double()
    norm = torch.stack([grid.mean(), grid.std(), logit.mean(), logit.std()])
    norm[1::2] = norm[1::2].clamp_min(1e-6)
    return norm.float()


def combine(grid: torch.Tensor, logit: torch.Tensor, norm: torch.Tensor, gain: float) -> torch.Tensor:
    """Residual map (B, h, w) + gain x head logit (B, h, w), each standardised on the good
    training tokens (norm as DefectHead.norm), negative values set to 0: (B, h, w)."""
    return ((grid - norm[0]) / norm[1] + gain * (logit - norm[2]) / norm[3]).clamp_min(0)
