"""Data loaders: MVTec AD, plain folders, CIFAR-10; image decoding and transforms."""

from adtr.data.images import DataError, read_image, read_mask
from adtr.data.samples import Sample

__all__ = ["DataError", "Sample", "read_image", "read_mask"]
