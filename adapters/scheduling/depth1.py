"""Depth 1: each batch is finished before the step returns (the twin of ``depth2.FutureScheduler``)."""

from __future__ import annotations

from typing import Any, Callable, List, Sequence


class SynchronousScheduler:
    """``submit(launch, finish, count)`` as :class:`~.depth2.FutureScheduler` has it, run at once.

    Example:
        >>> SynchronousScheduler().submit(lambda: 2, lambda n: [n, n + 1], count=2)
        [2, 3]
    """

    depth = 1

    def submit(self, launch: Callable[[], Any], finish: Callable[[Any], Sequence[Any]], count: int) -> List[Any]:
        results = list(finish(launch()))
        if len(results) != count:
            raise RuntimeError(f"finalisation returned {len(results)} results for {count} frames")
        return results

    def close(self) -> None:
        """Nothing is ever in flight."""
