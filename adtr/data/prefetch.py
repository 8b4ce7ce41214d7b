"""Decoding ahead of compute: a function mapped over items in threads, chunk by chunk, with the
next chunk already in the threads while the caller works on the current one.

PIL releases the GIL while it decodes and resizes, so the next batch's files are decoded while
the model scores this batch. At most `ahead + 1` chunks of results exist at a time, so memory
stays bounded whatever the number of items.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_ahead(
    fn: Callable[[T], R], items: Sequence[T], chunk_size: int, workers: int = 2, ahead: int = 1
) -> Iterator[tuple[Sequence[T], list[R]]]:
    """Yield (chunk, [fn(x) for x in chunk]) for consecutive chunks of `chunk_size` items, in order.

    While the caller holds chunk k, chunks k+1 .. k+ahead are computed by `workers` threads.
    An exception raised by fn is raised here when its chunk is reached. Stopping early (break,
    an exception in the caller) cancels the chunks not started and waits for the running ones.
    """
    if chunk_size < 1 or ahead < 0:
        raise ValueError(f"chunk_size must be >= 1 and ahead >= 0, got {chunk_size} and {ahead}")
    starts = iter(range(0, len(items), chunk_size))
    pending: deque[tuple[Sequence[T], list[Future[R]]]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            while True:
                while len(pending) <= ahead and (start := next(starts, None)) is not None:
                    chunk = items[start : start + chunk_size]
                    pending.append((chunk, [pool.submit(fn, x) for x in chunk]))
                if not pending:
                    return
                chunk, futures = pending.popleft()
                yield chunk, [f.result() for f in futures]
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
