"""The unit every loader produces: one image file with its label and optional mask file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 anomalous
    defect: str = "good"  # folder name of the defect type
    mask_path: Path | None = None  # None: no mask (good images, or image-level labels only)
