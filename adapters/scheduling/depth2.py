"""Depth-k future-based scheduler: frame N's CPU finalisation overlaps frame N+1's GPU work.

`submit` runs the launch half of a step (preprocess + engine, asynchronous on a GPU) on the caller's
thread and hands the finish half (postprocess, copy to the host, block output) to one worker thread,
returning a ``Future`` per frame at once. At most `depth` batches are in flight: a further submit waits
for the oldest to finish. Finalisation runs in submission order, so results come out in frame order.
Its depth-1 twin is ``depth1.SynchronousScheduler`` (same ``submit``, results instead of futures).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence

LOGGER = logging.getLogger("inference_fastpath")
WORKER_THREAD_PREFIX = "fastpath-finalise"


class FutureScheduler:
    """Example:
        >>> scheduler = FutureScheduler(depth=2)
        >>> [f.result() for f in scheduler.submit(lambda: 2, lambda n: [n, n + 1], count=2)]
        [2, 3]
        >>> scheduler.close()
    """

    def __init__(self, depth: int = 2) -> None:
        if depth < 2:
            raise ValueError(f"FutureScheduler needs depth >= 2, got {depth}")
        self.depth = depth
        self._slots = threading.BoundedSemaphore(depth)
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def _worker(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=WORKER_THREAD_PREFIX)
            return self._executor

    def submit(
        self,
        launch: Callable[[], Any],
        finish: Callable[[Any], Sequence[Any]],
        count: int,
    ) -> List[Future]:
        """Runs `launch()` now, `finish(launched)` on the worker; returns `count` per-item futures."""
        self._slots.acquire()
        try:
            launched = launch()
        except BaseException:
            self._slots.release()
            raise
        futures: List[Future] = [Future() for _ in range(count)]
        self._worker().submit(self._finish, finish, launched, futures)
        return futures

    def _finish(self, finish: Callable[[Any], Sequence[Any]], launched: Any, futures: List[Future]) -> None:
        try:
            results = list(finish(launched))
            if len(results) != len(futures):
                raise RuntimeError(f"finalisation returned {len(results)} results for {len(futures)} frames")
        except BaseException as error:  # delivered to whoever waits on the futures
            for future in futures:
                future.set_exception(error)
        else:
            for future, result in zip(futures, results):
                future.set_result(result)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Finishes everything already submitted, then stops the worker thread. Idempotent."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
