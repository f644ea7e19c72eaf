"""Recycled dense-mask buffers: never handed out twice while anything still references them."""

import numpy as np

from inference_fastpath.adapters.postprocess.mask_buffers import MaskBufferPool


def test_buffer_comes_back_only_when_unreferenced():
    pool = MaskBufferPool(buffers_per_size=4)
    first = pool.take(3, 4, 5)
    first[:] = True
    held = first[1, 2:]  # a derived view keeps the buffer busy after `first` is gone
    del first
    second = pool.take(3, 4, 5)
    assert not np.shares_memory(second, held) and held.all()
    assert pool.allocations == 2
    del held
    third = pool.take(2, 4, 5)  # the first buffer again, zeroed
    assert pool.allocations == 2 and third.shape == (2, 4, 5) and not third.any()


def test_sizes_and_growth():
    pool = MaskBufferPool(buffers_per_size=2)
    small = pool.take(2, 6, 7)
    del small
    big = pool.take(20, 6, 7)  # more masks than the idle buffer holds: a larger one
    assert big.shape == (20, 6, 7) and pool.allocations == 2
    other = pool.take(1, 3, 3)  # another frame size has its own buffers
    assert other.shape == (1, 3, 3) and pool.allocations == 3
    del big
    again = pool.take(17, 6, 7)
    assert pool.allocations == 3 and not again.any()


def test_pool_stays_bounded_when_callers_keep_everything():
    pool = MaskBufferPool(buffers_per_size=3)
    kept = [pool.take(2, 8, 8) for _ in range(10)]
    for index, masks in enumerate(kept):
        masks[:] = index % 2 == 0
    assert pool.allocations == 10
    assert len(pool._buffers[(8, 8)]) == 3
    assert all(m.all() == (i % 2 == 0) for i, m in enumerate(kept))  # nothing overwritten
