"""Gene chunks on threads: the elementwise work of a pass on every core.

A pass over the counts is a loop over gene chunks whose bodies are independent.  About
half of a body is elementwise numpy (``exp``, ``log1p``, products), which runs on one
core, and half is BLAS, which a multi-threaded BLAS spreads over the cores.  Running the
chunks themselves on ``n`` threads, each with a one-thread BLAS, puts the elementwise
work on every core too (numpy releases the GIL inside its loops).

Reproducibility: each chunk is computed by one thread with a one-thread BLAS, and its
results are written or summed by the caller in chunk order, so a pass gives the same
numbers on 1, 2 or 16 chunk threads as long as the BLAS has one thread.
``causarray.batch`` runs every batch that way (:func:`chunk_threads` inside a one-thread
BLAS), which makes a batch's result independent of where it runs.  Outside a batch the
chunks get as many threads as the process's BLAS has; with one, they run in the calling
thread with its BLAS as it is.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


_THREADS: ContextVar[int | None] = ContextVar("causarray_chunk_threads", default=None)
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = [0, None]          # threads inside one_thread_blas(), and its limiter


@contextmanager
def one_thread_blas():
    """Limit the BLAS to one thread until the last thread inside this block leaves it.

    BLAS thread counts are process-wide: with batches running on threads, one batch
    restoring the count on its way out would change it under the others.  The limit is
    therefore set by the first thread in and restored by the last one out.
    """
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS_USERS[0] == 0:
            _BLAS_USERS[1] = threadpool_limits(limits=1, user_api="blas")
        _BLAS_USERS[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS[0] -= 1
            if _BLAS_USERS[0] == 0:
                _BLAS_USERS[1].restore_original_limits()
                _BLAS_USERS[1] = None


def blas_threads() -> int | None:
    """The number of BLAS threads of this process (None when no BLAS is detected)."""
    from threadpoolctl import threadpool_info

    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def gene_chunks(p: int, step: int) -> list[slice]:
    """``[0, step), [step, 2 step), ...`` up to ``p``: the gene chunks of a pass."""
    return [slice(start, min(p, start + step)) for start in range(0, p, step)]


def pass_threads() -> int:
    """Threads for the chunks of a pass: those set by :func:`chunk_threads`, else the BLAS
    thread count of this process (as set by ``OMP_NUM_THREADS``, ``threadpoolctl`` or a
    Dask worker), 1 when no BLAS is detected."""
    set_ = _THREADS.get()
    return max(1, blas_threads() or 1) if set_ is None else set_


@contextmanager
def chunk_threads(threads: int):
    """Run the passes inside the block on ``threads`` chunk threads (this thread only)."""
    token = _THREADS.set(max(1, int(threads)))
    try:
        yield
    finally:
        _THREADS.reset(token)


def map_chunks(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None
               ) -> Iterator[R]:
    """``fn(item)`` for every item, results yielded in order, on ``threads`` threads.

    At most ``2 * threads`` results are held at a time (a chunk's result may be an
    n x k block).  The BLAS is limited to one thread while the chunks run
    (:func:`one_thread_blas`).
    """
    threads = pass_threads() if threads is None else int(threads)
    if threads <= 1:
        yield from map(fn, items)
        return
    with one_thread_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def run_chunks(fn: Callable[[T], None], items: Iterable[T], threads: int | None = None
               ) -> None:
    """:func:`map_chunks` for chunk bodies that write their own part of an output."""
    for _ in map_chunks(fn, items, threads):
        pass
