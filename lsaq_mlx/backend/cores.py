"""Independent pieces of MLX work (calibration sequences) spread over the CPU's cores.

On MLX's CPU backend elementwise kernels run on one thread: the exponentials of
attention's softmax and the MLP's SiLU leave all but one core idle for about half of
a forward pass. Sequences given to one worker thread per core, each with its own
CPU stream and single-threaded BLAS, keep every core busy (1.4x faster scoring on 2
cores for SmolLM2-135M). On a GPU the work stays on the calling thread.

The workers live as long as the process: MLX keeps per-thread state (streams, the
compile cache of mlx-lm's compiled activations) whose destructor needs the Python
interpreter, so a worker thread that ended during interpreter shutdown would abort it.
"""

import queue
import threading
from typing import Callable, Sequence, TypeVar

import mlx.core as mx

from lsaq_mlx.backend.blas import cores_for_this_process, single_threaded_blas
from lsaq_mlx.backend.compute import backend

Item = TypeVar("Item")
Result = TypeVar("Result")

_workers: list["_Worker"] = []
_workers_lock = threading.Lock()


class _Worker(threading.Thread):
    """A daemon thread with its own CPU stream that runs the jobs put on its queue."""

    def __init__(self):
        super().__init__(daemon=True, name=f"lsaq-mlx-core-{len(_workers)}")
        self.jobs = queue.Queue()
        self.start()

    def run(self):
        with mx.stream(mx.new_stream(mx.cpu)):  # a stream belongs to the thread that made it
            while True:
                self.jobs.get()()


def _pool(size: int) -> list[_Worker]:
    with _workers_lock:
        while len(_workers) < size:
            _workers.append(_Worker())
        return _workers[:size]


def worker_count(items: int) -> int:
    return min(items, cores_for_this_process()) if backend() == "cpu" else 1


def map_on_cores(work: Callable[[Item], Result], items: Sequence[Item],
                 on_done: Callable[[Item], None] | None = None, workers: int | None = None) -> list[Result]:
    """``[work(item) for item in items]``, computed by ``workers`` threads (default: one
    per core on the CPU backend); ``on_done(item)`` runs on the calling thread as each
    item finishes. ``work`` must return no MLX arrays (they belong to its worker's
    stream), must not call ``map_on_cores`` itself, and may only read evaluated arrays."""
    workers = worker_count(len(items)) if workers is None else min(workers, len(items))
    if workers <= 1:
        results = []
        for item in items:
            results.append(work(item))
            if on_done:
                on_done(item)
        return results
    todo, finished, stop = queue.Queue(), queue.Queue(), threading.Event()
    for index in range(len(items)):
        todo.put(index)
    results = [None] * len(items)

    def drain():
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                break
            try:
                results[index] = work(items[index])
                finished.put((index, None))
            except BaseException as error:  # handed to the calling thread
                stop.set()
                finished.put((index, error))
        finished.put((None, None))  # this worker is idle again

    with single_threaded_blas():
        for worker in _pool(workers):
            worker.jobs.put(drain)
        idle = 0
        try:
            for _ in items:
                index, error = finished.get()
                while index is None:
                    idle += 1
                    index, error = finished.get()
                if error is not None:
                    raise error
                if on_done:
                    on_done(items[index])
        finally:
            stop.set()
            while idle < workers:  # BLAS threads are restored only once no worker runs
                index, _ = finished.get()
                idle += index is None
    return results
