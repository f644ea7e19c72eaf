"""Deferred completion: the launch runs now, the finish when the result is first asked for.

With ``downstream_overlap`` a run hands out the *previous* run's results after launching its own frames,
so the previous frames' finish (postprocess, copy to the host, block output) can run right there, on the
step's own thread, while the GPU works on the frames just launched. No worker thread competes with the
steps after ours for the interpreter lock. Same ``submit`` as the other schedulers; its results are
``Future`` objects whose ``result()`` runs the batch's finish on the calling thread, once.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, List, Optional, Sequence


class DeferredScheduler:
    """Example:
        >>> scheduler = DeferredScheduler()
        >>> futures = scheduler.submit(lambda: 2, lambda n: [n, n + 1], count=2)
        >>> futures[0].done(), [f.result() for f in futures]
        (False, [2, 3])
    """

    depth = 1
    deferred = True

    def __init__(self) -> None:
        self._pending: Deque[_DeferredBatch] = deque()
        self._lock = threading.Lock()

    def submit(self, launch: Callable[[], Any], finish: Callable[[Any], Sequence[Any]], count: int) -> List[Future]:
        """Runs ``launch()`` now; each returned future runs ``finish(launched)`` when first resolved."""
        batch = _DeferredBatch(finish, launch(), count)
        with self._lock:
            while self._pending and self._pending[0].finished:
                self._pending.popleft()
            self._pending.append(batch)
        return list(batch.futures)

    def close(self) -> None:
        """Finishes every batch not yet finished (their GPU outputs are released), in submission order."""
        with self._lock:
            pending, self._pending = self._pending, deque()
        for batch in pending:
            batch.run()


class _DeferredFuture(Future):
    def __init__(self, batch: "_DeferredBatch") -> None:
        super().__init__()
        self._batch = batch

    def result(self, timeout: Optional[float] = None) -> Any:
        self._batch.run()
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._batch.run()
        return super().exception(timeout)


class _DeferredBatch:
    """One launched batch and the futures of its frames; ``run`` finishes it once, whoever asks first."""

    def __init__(self, finish: Callable[[Any], Sequence[Any]], launched: Any, count: int) -> None:
        self._finish: Optional[Callable[[Any], Sequence[Any]]] = finish
        self._launched = launched
        self._lock = threading.Lock()
        self.futures = tuple(_DeferredFuture(self) for _ in range(count))

    @property
    def finished(self) -> bool:
        return self._finish is None

    def run(self) -> None:
        with self._lock:
            if self._finish is None:
                return
            finish, launched = self._finish, self._launched
            self._finish = self._launched = None
            try:
                results = list(finish(launched))
                if len(results) != len(self.futures):
                    raise RuntimeError(f"finalisation returned {len(results)} results for {len(self.futures)} frames")
            except BaseException as error:  # delivered to whoever resolves the futures
                for future in self.futures:
                    future.set_exception(error)
            else:
                for future, result in zip(self.futures, results):
                    future.set_result(result)
