"""The future scheduler on its own: order, bounded depth, errors, clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from inference_fastpath.adapters.scheduling.depth2 import WORKER_THREAD_PREFIX, FutureScheduler


def _worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)]


def test_results_come_back_in_order_with_their_own_inputs():
    scheduler = FutureScheduler(depth=2)
    futures = []
    for n in range(20):
        futures += scheduler.submit(lambda n=n: n, lambda launched: [launched * 10, launched * 10 + 1], count=2)
    assert [f.result(timeout=5) for f in futures] == [v for n in range(20) for v in (n * 10, n * 10 + 1)]
    scheduler.close()


def test_no_more_than_depth_batches_are_in_flight():
    scheduler = FutureScheduler(depth=2)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def launch():
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])

    def finish(_):
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return [None]

    futures = [scheduler.submit(launch, finish, count=1)[0] for _ in range(10)]
    for future in futures:
        future.result(timeout=5)
    assert peak[0] == 2
    scheduler.close()


def test_errors_reach_the_futures_and_launch_errors_raise_at_once():
    scheduler = FutureScheduler(depth=2)

    def failing_finish(_):
        raise ValueError("postprocess broke")

    (future,) = scheduler.submit(lambda: None, failing_finish, count=1)
    with pytest.raises(ValueError, match="postprocess broke"):
        future.result(timeout=5)
    with pytest.raises(RuntimeError, match="launch broke"):
        scheduler.submit(lambda: (_ for _ in ()).throw(RuntimeError("launch broke")), lambda _: [None], count=1)
    # the slot taken by the failed launch was given back: two more submits do not block
    for _ in range(2):
        scheduler.submit(lambda: None, lambda _: [None], count=1)[0].result(timeout=5)
    scheduler.close()


def test_close_finishes_pending_work_and_leaves_no_thread():
    scheduler = FutureScheduler(depth=2)
    futures = [scheduler.submit(lambda: None, lambda _: (time.sleep(0.05), [1])[1], count=1)[0] for _ in range(2)]
    scheduler.close()
    assert all(f.done() and f.result() == 1 for f in futures)
    assert not _worker_threads()
    scheduler.close()  # idempotent
    assert scheduler.submit(lambda: 2, lambda x: [x], count=1)[0].result(timeout=5) == 2  # usable again
    scheduler.close()
    assert not _worker_threads()
