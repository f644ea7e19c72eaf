"""Chunked numpy upload of the Triton preprocess stage: the chunk planner, the filler, the staging
slots (CPU; the CUDA side is in ``tests/gpu/test_preprocess_upload_gpu.py``)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are decorated (first import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from inference_models.models.common.roboflow.model_packages import (  # noqa: E402
    ImagePreProcessing,
)
from inference_models.models.rfdetr.pre_processing import pre_process_network_input  # noqa: E402

from inference_fastpath.adapters.preprocess import upload as pt  # noqa: E402
from inference_fastpath.adapters.preprocess.planning import stretch_network_input  # noqa: E402
from inference_fastpath.adapters.preprocess.triton import TritonPreprocess  # noqa: E402
from inference_fastpath.adapters.preprocess.upload import (  # noqa: E402
    Staging as _Staging,
    UploadChunk,
    auto_upload_chunks,
    fill_chunks,
    plan_upload_chunks,
    staging_layout,
)
from inference_fastpath.kernels.preprocess_resize_normalize import interpreter_active  # noqa: E402

CPU = torch.device("cpu")
SENTINEL = 0xA5


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _layout(shapes):
    frames = [np.empty((h, w, 3), np.uint8) for h, w in shapes]
    offsets, total = staging_layout(frames)
    return [h for h, _ in shapes], [3 * w for _, w in shapes], offsets, total


def _check_plan(heights, row_bytes, offsets, chunks, requested):
    """Invariants every plan must satisfy; returns the chunk sizes in bytes."""
    assert 1 <= len(chunks) <= requested
    end = offsets[-1] + heights[-1] * row_bytes[-1]
    assert chunks[0].start == offsets[0] and chunks[-1].end == end
    covered = [np.zeros(h, np.int64) for h in heights]
    previous_end = offsets[0]
    for chunk in chunks:
        assert chunk.start == previous_end and chunk.end > chunk.start  # tile the range, in order
        previous_end = chunk.end
        assert chunk.pieces
        position = chunk.start
        for index, first, last in chunk.pieces:
            assert 0 <= first < last <= heights[index]
            start = offsets[index] + first * row_bytes[index]
            # a piece starts where the previous one ended, or at its frame's (aligned) start
            assert start == position or (first == 0 and position <= start < position + 16)
            position = offsets[index] + last * row_bytes[index]
            covered[index][first:last] += 1
        assert chunk.end - 16 < position <= chunk.end  # only alignment padding after the rows
    for rows in covered:
        assert (rows == 1).all()  # every row of every frame in exactly one piece
    return [c.end - c.start for c in chunks]


# ------------------------------------------------------------------------------ policy


def test_auto_chunk_policy():
    assert auto_upload_chunks(320 * 240 * 3) == 1
    assert auto_upload_chunks(768 * 576 * 3) == 1
    assert auto_upload_chunks(1920 * 1080 * 3) == 1  # one copy measured fastest below 4K
    assert auto_upload_chunks((16 << 20) - 1) == 1
    assert auto_upload_chunks(3840 * 2160 * 3) == 8
    assert auto_upload_chunks(4 * 3840 * 2160 * 3) == 8
    for total in range(16 << 20, 64 << 20, 99_991):
        n = auto_upload_chunks(total)
        assert 2 <= n <= 8 and total / n >= 512 * 1024  # never chunks below 512 KiB


# ----------------------------------------------------------------------------- planner


def test_plan_1080p_is_four_even_row_chunks():
    heights, row_bytes, offsets, total = _layout([(1080, 1920)])
    chunks = plan_upload_chunks(heights, row_bytes, offsets, 4)
    assert [c.pieces for c in chunks] == [
        ((0, 0, 270),), ((0, 270, 540),), ((0, 540, 810),), ((0, 810, 1080),)
    ]
    assert [c.end - c.start for c in chunks] == [270 * 5760] * 4


def test_plan_single_chunk_is_the_old_single_copy():
    shapes = [(37, 53), (1, 7), (60, 17)]
    heights, row_bytes, offsets, total = _layout(shapes)
    (chunk,) = plan_upload_chunks(heights, row_bytes, offsets, 1)
    assert chunk.pieces == ((0, 0, 37), (1, 0, 1), (2, 0, 60))
    assert chunk.start == 0 and chunk.end == offsets[2] + 60 * 51 and total - chunk.end < 16


@pytest.mark.parametrize(
    "shapes, requested",
    [
        ([(1081, 1919)], 4),  # odd height and width
        ([(7, 5)], 8),  # fewer rows than chunks would like: still <= 8, no empty chunk
        ([(3, 4)], 5),  # 3 rows, 5 chunks asked -> at most 3
        ([(1, 400_000)], 4),  # one row: cannot be split
        ([(1, 1), (1, 1), (1, 1)], 3),
        ([(1, 3), (1080, 1920), (2, 2), (1080, 1920), (1, 1)], 8),  # tiny frames in between
        ([(37, 53), (37, 53), (9, 41), (60, 17)], 3),
    ],
)
def test_plan_invariants(shapes, requested):
    heights, row_bytes, offsets, _ = _layout(shapes)
    chunks = plan_upload_chunks(heights, row_bytes, offsets, requested)
    _check_plan(heights, row_bytes, offsets, chunks, requested)
    if shapes == [(3, 4)]:
        assert [c.pieces for c in chunks] == [((0, 0, 1),), ((0, 1, 2),), ((0, 2, 3),)]
    if shapes == [(1, 400_000)]:
        assert len(chunks) == 1


def test_plan_random_layouts_are_even():
    rng = np.random.default_rng(1)
    for _ in range(300):
        count = int(rng.integers(1, 6))
        shapes = [(int(rng.integers(1, 300)), int(rng.integers(1, 200))) for _ in range(count)]
        requested = int(rng.integers(1, 10))
        heights, row_bytes, offsets, _ = _layout(shapes)
        chunks = plan_upload_chunks(heights, row_bytes, offsets, requested)
        sizes = _check_plan(heights, row_bytes, offsets, chunks, requested)
        if len(chunks) == requested:
            # boundaries are the nearest row boundary to the even split: off by < 1 row + padding
            ideal = (chunks[-1].end - chunks[0].start) / requested
            slack = max(row_bytes) + 16
            assert all(abs(size - ideal) <= 2 * slack for size in sizes), (shapes, requested, sizes)
        rows = sum(heights)
        if rows >= requested and len(shapes) == 1:
            assert len(chunks) == requested  # a single frame with enough rows gets every chunk


# ------------------------------------------------------------------------------ filler


def _frames_zoo():
    base = _image(41, 29, seed=3)
    readonly = _image(9, 11, seed=4)
    readonly.flags.writeable = False
    return [
        _image(37, 53, seed=0),  # odd sizes
        _image(1, 7, seed=1),  # one row
        base[::-1],  # negative row stride
        base[:, ::-1, ::-1],  # negative column and channel strides
        np.ascontiguousarray(_image(30, 21, seed=5).transpose(1, 0, 2)).transpose(1, 0, 2),  # W-major
        _image(50, 60, seed=6)[5:36:2, 7:44],  # strided crop, odd height
        readonly,
        _image(1, 1, seed=7),
    ]


def _expected_staging(frames, offsets, total):
    expected = np.full(total, SENTINEL, np.uint8)
    for frame, offset in zip(frames, offsets):
        expected[offset : offset + frame.nbytes] = np.ascontiguousarray(frame).reshape(-1)
    return expected


@pytest.mark.parametrize("requested", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("threads", [0, 2])
def test_fill_chunks_reproduces_frame_bytes(requested, threads):
    frames = _frames_zoo()
    offsets, total = staging_layout(frames)
    heights = [f.shape[0] for f in frames]
    row_bytes = [f.shape[1] * 3 for f in frames]
    chunks = plan_upload_chunks(heights, row_bytes, offsets, requested)
    expected = _expected_staging(frames, offsets, total)
    host = torch.full((total + 32,), SENTINEL, dtype=torch.uint8)
    sent = []

    def send(chunk: UploadChunk) -> None:
        # the chunk is complete when it is sent (what its H2D copy would read) ...
        got = host[chunk.start : chunk.end].numpy()
        want = expected[chunk.start : chunk.end]
        rows = np.zeros(chunk.end - chunk.start, bool)
        for index, first, last in chunk.pieces:
            row = row_bytes[index]
            rows[offsets[index] + first * row - chunk.start : offsets[index] + last * row - chunk.start] = True
        np.testing.assert_array_equal(got[rows], want[rows])
        sent.append(chunk)

    pool = ThreadPoolExecutor(threads) if threads else None
    try:
        fill_chunks(host, frames, offsets, chunks, send, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    assert sent == chunks  # ... every chunk sent once, in order
    # exactly the frame bytes; padding and the slack after the frames untouched
    np.testing.assert_array_equal(host[:total].numpy(), expected)
    assert (host[total:] == SENTINEL).all()


def test_fill_chunks_with_pool_sends_from_calling_thread_and_waits_on_error(monkeypatch):
    frames = [_image(64, 40, seed=8), _image(64, 40, seed=9)]
    offsets, total = staging_layout(frames)
    chunks = plan_upload_chunks([64, 64], [120, 120], offsets, 6)
    host = torch.zeros(total, dtype=torch.uint8)
    caller = threading.get_ident()
    senders, running, lock = [], [0], threading.Lock()
    real_fill = pt.fill_chunk

    def slow_fill(*args, **kwargs):
        with lock:
            running[0] += 1
        try:
            time.sleep(0.05)
            real_fill(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    def send(chunk):
        senders.append(threading.get_ident())
        if len(senders) == 2:
            raise RuntimeError("enqueue failed")

    monkeypatch.setattr(pt, "fill_chunk", slow_fill)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(RuntimeError, match="enqueue failed"):
            fill_chunks(host, frames, offsets, chunks, send, pool)
        assert running[0] == 0  # no worker still writing into the slot when the error surfaces
    assert senders == [caller, caller]  # H2D enqueues only from the calling thread, in order


# ----------------------------------------------------------------------------- staging


def test_staging_upload_views_and_slot_alternation():
    staging = _Staging(CPU, chunks=3, threads=0)
    first = [_image(37, 53, seed=10), _image(1, 5, seed=11)[:, ::-1]]
    second = [_image(20, 9, seed=12)]
    third = [_image(4, 4, seed=13)]
    views1 = staging.upload(first)
    views2 = staging.upload(second)
    for frame, view in zip(first, views1):  # the other slot took the second call
        np.testing.assert_array_equal(view.numpy(), frame)
        assert view.data_ptr() % 16 == 0
    np.testing.assert_array_equal(views2[0].numpy(), second[0])
    assert views1[0].untyped_storage().data_ptr() != views2[0].untyped_storage().data_ptr()
    views3 = staging.upload(third)  # back on the first slot
    assert views3[0].untyped_storage().data_ptr() == views1[0].untyped_storage().data_ptr()
    np.testing.assert_array_equal(views3[0].numpy(), third[0])


@pytest.mark.parametrize("chunks, threads", [(None, None), (1, 0), (4, 0), (7, 2)])
def test_staging_upload_matches_frames(chunks, threads):
    staging = _Staging(CPU, chunks=chunks, threads=threads)
    frames = _frames_zoo() + [_image(600, 700, seed=14)]  # 1.26 MB batch: auto -> one copy
    offsets, total, plan = staging.plan(frames)
    expected_count = {None: 1, 1: 1, 4: 4, 7: 7}[chunks]
    assert len(plan) == expected_count
    for _ in range(3):  # both slots, then a reused one
        views = staging.upload(frames)
        for frame, view in zip(frames, views):
            assert tuple(view.shape) == frame.shape and view.is_contiguous()
            np.testing.assert_array_equal(view.numpy(), frame)


@pytest.mark.parametrize("chunks, threads", [(None, None), (4, 0), (4, 2)])
def test_staging_fill_never_uses_torchs_cpu_copy(monkeypatch, chunks, threads):
    # torch's CPU copy splits over its OpenMP pool, one spinning team per calling thread; inside a
    # pipeline, whose pool threads take turns running the step, that halved the frame rate on a GPU host
    def refuse(self, *args, **kwargs):
        raise AssertionError("the staging fill called torch's CPU copy_")

    monkeypatch.setattr(torch.Tensor, "copy_", refuse)
    staging = _Staging(CPU, chunks=chunks, threads=threads)
    frames = [_image(90, 64, seed=18), _image(90, 64, seed=19)[::-1]]
    for frame, view in zip(frames, staging.upload(frames)):
        np.testing.assert_array_equal(view.numpy(), frame)


def test_staging_plan_cache_is_per_batch_shape():
    staging = _Staging(CPU, chunks=4, threads=0)
    a = [_image(40, 30, seed=15)]
    plan = staging.plan(a)
    assert staging.plan([_image(40, 30, seed=16)[::-1]]) is plan  # same shape, other strides
    assert staging.plan([_image(41, 30, seed=17)]) is not plan
    assert len(staging.plan(a + a)[2]) == 4 and staging.plan(a + a)[1] == 2 * plan[1]
    for frames in (a, [a[0][::-1, ::-1]], [np.zeros((40, 30, 3), np.uint8)]):  # cached plan reused
        (view,) = staging.upload(frames)
        np.testing.assert_array_equal(view.numpy(), frames[0])


def test_staging_arguments():
    with pytest.raises(ValueError):
        _Staging(CPU, chunks=0)
    with pytest.raises(ValueError):
        _Staging(CPU, threads=-1)
    assert _Staging(CPU, threads=3).threads == 3
    assert _Staging(CPU).threads == pt.auto_fill_threads()


# --------------------------------------------------------------------------- the stage


@pytest.mark.skipif(
    not torch.cuda.is_available() and not interpreter_active(),
    reason="kernels were imported before TRITON_INTERPRET=1 was set",
)
def test_stage_chunked_upload_matches_reference():
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    frames = [_image(37, 53, seed=20), _image(37, 53, seed=21), _image(1, 30, seed=22)[:, ::-1], _image(61, 17, seed=23)]
    expected, _ = pre_process_network_input(
        [np.ascontiguousarray(f) for f in frames], ImagePreProcessing(), stretch_network_input(24, 20), CPU, "bgr"
    )
    for chunks, threads in [(1, 0), (5, 0), (5, 2)]:
        stage = TritonPreprocess(
            stretch_network_input(24, 20), ImagePreProcessing(), device, upload_chunks=chunks, upload_threads=threads
        )
        assert stage._staging.chunks == chunks and stage._staging.threads == threads
        assert len(stage._staging.plan(frames)[2]) == chunks
        batch = stage(frames)
        if batch.ready_event is not None:
            batch.ready_event.synchronize()
        torch.testing.assert_close(batch.tensor.cpu(), expected, atol=1e-6, rtol=0)
