"""Work on a sequence computed ahead by a few threads, results in order: for work that
releases the GIL (zstd, hashing, numpy), with at most twice as many items ahead as
threads, so memory stays bounded."""

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def computed_ahead(work: Callable, items: Iterable, workers: int | None = None) -> Iterator:
    """``work(item)`` for each of ``items``, in order (``workers``: at most 4 by default)."""
    items = list(items)
    workers = min(workers or min(4, os.cpu_count() or 1), max(1, len(items)))
    if workers <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
