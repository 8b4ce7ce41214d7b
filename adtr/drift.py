"""Inputs that differ from training: what a run was trained on, and the check of each input.

A model knows only the kind of image it was trained on. An input of another aspect ratio is
stretched to the model's input size, and a colour image scored by a model trained on grey
ones (or the reverse) differs everywhere: such inputs score high and are flagged whatever
their content (issue 14, kind 4). So the fit records an `InputProfile` of its good images
(size range, aspect-ratio range, colour mode), and predict / test / serve / the Python API
check each image against it (`InputProfile.departures`), warn, and put the warnings in their
outputs. Runs saved before the profile existed have none and skip the checks.

Rules (documented in docs/design.md, "Thresholds and decisions"):
- aspect ratio (width / height): a departure when it lies more than ASPECT_TOLERANCE (5%,
  relative) outside the training images' range; e.g. a run on 900x900 parts accepts 0.95 to
  1.05 and warns for 900x600 (1.5). `letterbox=True` (predict, test, serve) then keeps the
  aspect ratio instead of stretching (data.transforms.letterbox_box).
- size: a departure when the image's linear size (the square root of width x height) lies
  more than SIZE_TOLERANCE (20%, relative) outside the training images' range: a crop or
  another zoom shows the part at another scale once resized to the model's input, e.g. a
  600x600 centre crop of a 900x900 part. Images of the training size resized by the user
  (e.g. to 256x256 before upload) are warned about too: the model sees them as the same
  parts, but a warning is cheap and the user can tell.
- colour mode: an image is grey when its mean per-pixel channel spread (max - min of R, G, B,
  on 0..255, measured on the model-size input) is at most GREY_SPREAD; MVTec's colour bottle
  images spread about 9, grey ones 0, JPEG grey saved as RGB below 1. A departure when the
  training images were all grey and the input is colour, or all colour and the input grey
  (a training set of both accepts both).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

ASPECT_TOLERANCE = 0.05  # relative distance outside the training range before a warning
SIZE_TOLERANCE = 0.20  # relative distance of the linear size outside the training range before a warning
GREY_SPREAD = 2.0  # mean channel spread (0..255) at or below which an image counts as grey


class ImageInfo(NamedTuple):
    """What the checks need of one image: its original size and colour mode."""

    height: int
    width: int
    grey: bool

    @property
    def aspect(self) -> float:
        return self.width / self.height


def image_info(model_input: torch.Tensor, original: tuple[int, int]) -> ImageInfo:
    """ImageInfo of an image from its model-size input (3, h, w), values 0..255, and its
    original (height, width). Resizing treats the three channels alike, so a grey image's
    input has equal channels and the spread is measured without the full-size pixels."""
    spread = (model_input.amax(0) - model_input.amin(0)).float().mean().item()
    return ImageInfo(int(original[0]), int(original[1]), spread <= GREY_SPREAD)


@dataclass
class InputProfile:
    """The good training images of a run: counts, size and aspect-ratio ranges, colour mode."""

    n: int
    height: tuple[int, int]  # (min, max) pixels
    width: tuple[int, int]
    aspect: tuple[float, float]  # (min, max) of width / height
    colour: str  # "grey", "colour" or "mixed"

    @classmethod
    def from_infos(cls, infos: Iterable[ImageInfo]) -> InputProfile:
        """The profile of the training images' ImageInfo; ValueError for none."""
        infos = list(infos)
        if not infos:
            raise ValueError("an input profile needs at least one image")
        n_grey = sum(i.grey for i in infos)
        colour = "grey" if n_grey == len(infos) else "colour" if n_grey == 0 else "mixed"
        heights, widths, aspects = [i.height for i in infos], [i.width for i in infos], [i.aspect for i in infos]
        return cls(len(infos), (min(heights), max(heights)), (min(widths), max(widths)),
                   (min(aspects), max(aspects)), colour)  # fmt: skip

    def widened(self, other: InputProfile) -> InputProfile:
        """The profile of this profile's images and other's together (adtr update's new good images)."""
        colour = self.colour if self.colour == other.colour else "mixed"
        return InputProfile(self.n + other.n, _span(self.height, other.height), _span(self.width, other.width),
                            _span(self.aspect, other.aspect), colour)  # fmt: skip

    def departures(self, info: ImageInfo, letterbox: bool = False) -> list[str]:
        """Warnings, one sentence each, for the ways an image departs from the training images; [] if none.

        letterbox: the image is letterboxed, not stretched (the aspect warning says so).
        """
        found = []
        low, high = self.aspect
        if abs(math.log(min(max(info.aspect, low), high) / info.aspect)) > math.log1p(ASPECT_TOLERANCE):
            trained = f"{low:.2f}" if math.isclose(low, high, rel_tol=1e-3) else f"{low:.2f} to {high:.2f}"
            what = (
                "letterboxed: scored at its own aspect ratio, the padding around it not scored"
                if letterbox
                else "the image is stretched to the model's input, which can score as a defect (letterbox keeps "
                "the aspect ratio)"
            )
            found.append(
                f"aspect ratio {info.aspect:.2f} ({info.width}x{info.height}) differs from the training images' "
                f"{trained}: {what}"
            )
        side = math.sqrt(info.width * info.height)
        smallest, largest = math.sqrt(self.width[0] * self.height[0]), math.sqrt(self.width[1] * self.height[1])
        if not smallest / (1 + SIZE_TOLERANCE) <= side <= largest * (1 + SIZE_TOLERANCE):
            low, high = f"{self.width[0]}x{self.height[0]}", f"{self.width[1]}x{self.height[1]}"
            trained = low if low == high else f"{low} to {high}"
            found.append(
                f"size {info.width}x{info.height} is {'smaller' if side < smallest else 'larger'} than the training "
                f"images' {trained}: a crop or another zoom shows parts at another scale, which can score as a defect"
            )
        if self.colour == "grey" and not info.grey:
            found.append("colour image, but the model was trained on grey images only: colour can score as a defect")
        elif self.colour == "colour" and info.grey:
            found.append("grey image, but the model was trained on colour images only: it can score as a defect")
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputProfile:
        return cls(int(data["n"]), tuple(data["height"]), tuple(data["width"]), tuple(data["aspect"]),
                   str(data["colour"]))  # fmt: skip


def _span(a: tuple, b: tuple) -> tuple:
    """The (min, max) range covering ranges a and b."""
    return min(a[0], b[0]), max(a[1], b[1])


def check(profile: InputProfile | None, info: ImageInfo, name: str, letterbox: bool = False) -> list[str]:
    """profile.departures(info, letterbox), each logged as a warning naming the image; [] without a profile."""
    found = profile.departures(info, letterbox) if profile is not None else []
    for warning in found:
        log.warning("%s: %s", name, warning)
    return found


def input_warnings(
    profile: InputProfile | None, names: Sequence[str], infos: Sequence[ImageInfo], letterbox: bool = False
) -> dict[str, list[str]]:
    """{name: warnings} of the images that depart from the training images (check), in order."""
    found = {str(n): check(profile, info, str(n), letterbox) for n, info in zip(names, infos, strict=True)}
    return {n: w for n, w in found.items() if w}
