"""Process-wide CPU settings: torch threads and glibc's allocator.

glibc hands every freed block above its mmap threshold (at most 32 MiB, adjusted on the fly)
back to the kernel and maps fresh zeroed pages for the next one. A CNN's activations at batch
64 are about that size, so each batch pays hundreds of thousands of page faults: on this
project's 2-core machine the kernel took as much CPU time as the network, and backbone
features came 2.3x (Lite0, 256x256) to 2.7x (Lite2, 128x128) faster without the churn
(`python bench/allocator.py`, results/allocator.md). Raising the
thresholds keeps freed memory in the process for the next batch; resident memory stays up to
about 1 GiB higher. `ADTR_MALLOC=default` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = 1 << 30  # bytes: blocks below this are reused, not unmapped


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them; True if it took effect."""
    if os.environ.get("ADTR_MALLOC", "").lower() == "default":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):  # the user tuned glibc: theirs wins
        return False
    name = ctypes.util.find_library("c")
    if name is None:  # not glibc-like (e.g. Windows): nothing to do
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and macOS have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _KEEP) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
    ok &= mallopt(_M_TOP_PAD, 256 << 20) == 1
    return bool(ok)


def configure_cpu(threads: int | None = None) -> bool:
    """Set torch's thread count (when given) and the allocator; True if the allocator changed."""
    if threads:
        torch.set_num_threads(threads)
    return keep_freed_memory()
