"""Labelled defects pasted onto good images: more, and more varied, positives for the defect head.

A defect head (defect_head.py) fitted on five masked defects per type sees each defect once, on
its own part. Pasting each defect's masked pixels onto other good parts, at random places,
shows the head the same defect on new backgrounds and positions: the residual it learns from
then varies with the surroundings as it will on the line. The copy-paste augmentation of
detection (Ghiasi et al., "Simple Copy-Paste", CVPR 2021), used here for a per-token
classifier of the reconstruction residual; issue 15 proposed it. Measured (k = 5 per type, 3
draws, 10 copies): MPDD metal_plate's AUPRO 0.9324 -> 0.9379, bsdata's 0.9577 -> 0.9518. So by
default only parts that lie anywhere (metal_plate) paste (paste_copies; docs/design.md,
"Defects pasted onto good images").

The pasted copies only fit the head: they are not stored in the run. replay.py keeps the good
images they are pasted onto and the defects' own pixels, so that `adtr update` pastes the old
defects and its new ones as a fit with all of them does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adtr.data.images import image_size, read_image, read_mask
from adtr.data.samples import Sample
from adtr.data.transforms import resize_image

BACKGROUNDS = 16  # good training images a run keeps to paste defects onto (replay.py)
# At most this many pasted copies in all (each is a backbone pass and a feature map in memory:
# about 0.8 MB at 256x256): 10 copies of up to 25 defects, fewer of each beyond.
MAX_PASTED = 256


AUTO_COPIES = 10  # copies of each masked defect where the parts lie anywhere (paste_copies)


def paste_copies(setting: int | None, map_position_weight: float | None) -> int:
    """Copies of each masked defect to paste (TrainConfig.head_paste): the setting as given, or,
    for None (the default), AUTO_COPIES where the parts lie anywhere and none where they are
    aligned. Aligned or not is what the fit found for the map's per-position statistics: a
    weight below 0.5 (ScoreConfig.map_position_weight, which follows the image scorer's choice
    on held-out good images: 0 on metal_plate, 0.5 on bottle and bsdata). Measured: pasting
    raised metal_plate's AUPRO and lowered bsdata's (docs/design.md, "Defects pasted onto good
    images"): on an aligned part a defect moved elsewhere is a context the line never shows."""
    if setting is not None:
        return setting
    return AUTO_COPIES if map_position_weight is not None and map_position_weight < 0.5 else 0


def copies_for(copies: int, n_defects: int) -> int:
    """Copies of each of n_defects masked defects: `copies`, or fewer so that all of them stay
    within MAX_PASTED (at least 1 each)."""
    return min(copies, max(1, MAX_PASTED // max(1, n_defects)))


def load_backgrounds(samples: Sequence[Sample], size: tuple[int, int], seed: int) -> torch.Tensor:
    """uint8 (B, H, W, 3): a seeded sample of at most BACKGROUNDS of the good images, decoded and
    resized to the model's input size (H, W) as the model sees them. DataError for an unreadable
    file."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:BACKGROUNDS]
    images = [resize_image(read_image(samples[i].path), size) for i in sorted(order.tolist())]
    if not images:
        return torch.zeros((0, *size, 3), dtype=torch.uint8)
    return torch.stack(images).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def defect_pixels(samples: Sequence[Sample], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled defects at the input size (H, W), one row per sample: images uint8
    (K, H, W, 3) and masks uint8 (K, H, W) of 0 / 1: the input pixels the mask covers by at
    least half (area resizing), or, for a defect smaller than that (a pit under one input pixel),
    every pixel it touches. A sample without a mask gets zeros (nothing to paste; its image is not
    read). The layout replay.py keeps them in. DataError for an unreadable file."""
    images = torch.zeros((len(samples), *size, 3), dtype=torch.uint8)
    masks = torch.zeros((len(samples), *size), dtype=torch.uint8)
    for i, s in enumerate(samples):
        if s.mask_path is None:
            continue
        image = resize_image(read_image(s.path), size).round().clamp(0, 255).to(torch.uint8)
        images[i] = image.permute(1, 2, 0)
        mask = torch.from_numpy(read_mask(s.mask_path, image_size(s.path))).float()
        share = F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
        # a hard edge: the partly covered pixels blended in scored lower on metal_plate's draw 0
        # (AUPRO 0.9048 against 0.9084 and 0.9129 for two placements; docs/design.md)
        masks[i] = (share >= 0.5) if bool((share >= 0.5).any()) else (share > 0)
    return images, masks


def paste_defects(
    images: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor, copies: int, seed: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """copies of each defect pasted onto good images: (composites float (K * copies, 3, H, W),
    their masks float (K * copies, H, W)).

    images (K, 3, H, W) and masks (K, H, W) as defect_pixels gives them; backgrounds uint8
    (B, H, W, 3) as load_backgrounds. Each copy takes a background and a place drawn with a
    generator seeded with seed (numpy's SeedSequence: an int or ints): the box around the
    defect's mask moves, whole, to a random position where it fits, and the mask blends it in
    (composite = background x (1 - m) + defect x m).
    ValueError for no backgrounds or shapes that differ.
    """
    if len(images) and not len(backgrounds):
        raise ValueError("no good images to paste the defects onto")
    k, _, h, w = images.shape
    if masks.shape != (k, h, w) or (len(backgrounds) and tuple(backgrounds.shape[1:]) != (h, w, 3)):
        raise ValueError(f"defects {tuple(images.shape)}, masks {tuple(masks.shape)} and backgrounds "
                         f"{tuple(backgrounds.shape)} do not match: (K, 3, H, W), (K, H, W), (B, H, W, 3)")  # fmt: skip
    rng = np.random.default_rng(seed)
    out, out_masks = [], []
    for image, mask in zip(images, masks, strict=True):
        ys, xs = torch.nonzero(mask > 0, as_tuple=True)
        if not len(ys):
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        for _ in range(copies):
            b = backgrounds[int(rng.integers(len(backgrounds)))].permute(2, 0, 1).float()
            dy = int(rng.integers(h - (y1 - y0) + 1)) - y0
            dx = int(rng.integers(w - (x1 - x0) + 1)) - x0
            # the box lands inside the image, so rolling moves it without wrapping the defect
            m, d = mask.roll((dy, dx), (0, 1)), image.roll((dy, dx), (1, 2))
            out.append(b * (1 - m) + d * m)
            out_masks.append(m)
    if not out:
        return torch.zeros((0, 3, h, w)), torch.zeros((0, h, w))
    return torch.stack(out), torch.stack(out_masks)
