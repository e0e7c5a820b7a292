"""Take decode and mp4 writing off the denoising critical path.

The denoiser's loop dispatches block b+1 while a single background thread turns block b into
frames (VAE decode, colour mapping, ffmpeg). One worker keeps the order and any state the sink
carries (the VAE's causal conv caches, the mp4 container); a bounded queue keeps memory flat
when the sink is slower than the denoiser.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def overlapped(items: Iterable[T], fn: Callable[[T], R], depth: int = 2) -> Iterator[R]:
    """Yield fn(item) for each item, in order, computing them on one background thread while
    `items` moves on. At most `depth` items wait for fn (back-pressure on the producer).

    An exception raised by fn surfaces here, at its item, after every earlier result. Leaving
    early (an exception in `items`, Ctrl-C, closing the generator) drops the items not yet
    started and waits for the one running, so a sink such as an Mp4Writer is never closed mid-frame.
    """
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcjax-sink") as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def drain(results: Iterable) -> int:
    """Run an iterator of side effects (e.g. `overlapped(blocks, writer_sink)`) to its end; the count."""
    return sum(1 for _ in results)
