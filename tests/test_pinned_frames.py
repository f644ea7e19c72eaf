"""Frames decoded into recycled (pinned on CUDA) buffers: the pool never hands out a frame that is
still referenced, the producer decodes exactly what OpenCV decodes, and InferencePipeline runs the
workflow on them with the same detections as from the plain path (CPU; the pinned upload itself is
in ``tests/gpu/test_pinned_upload_gpu.py``)."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

from inference_fastpath.adapters.cuda.pinned_frames import PinnedFramePool, is_pinned_frame
from inference_fastpath.adapters.cuda.pinned_video_source import PinnedVideoFrameProducer, pinned_video_source
from inference_fastpath.workflows.comparison import compare_detections
from inference_fastpath.workflows.running import run_pipeline
from inference_fastpath.workflows import FASTPATH, load_workflow


def _decode_all(path) -> list:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def test_pool_reuses_only_unreferenced_frames():
    pool = PinnedFramePool(budget_bytes=1 << 20, pin=False)
    first = pool.take(4, 5)
    address = first.ctypes.data
    second = pool.take(4, 5)
    assert second.ctypes.data != address  # `first` is still held
    del first
    third = pool.take(4, 5)
    assert third.ctypes.data == address and pool.allocations == 2
    # every kind of reference keeps a frame out of the pool
    holders = [third[::-1], torch.from_numpy(second), third[1:, :, 0]]
    del third, second
    fresh = pool.take(4, 5)
    assert pool.allocations == 3 and fresh.ctypes.data != address
    del holders
    assert pool.take(4, 5).ctypes.data != fresh.ctypes.data
    assert pool.allocations == 3


def test_pool_budget_refuses_with_a_logged_reason(caplog):
    frame_bytes = 4 * 5 * 3
    pool = PinnedFramePool(budget_bytes=2 * frame_bytes, pin=False)
    held = [pool.take(4, 5), pool.take(4, 5)]
    with caplog.at_level(logging.WARNING, logger="inference_fastpath"):
        assert pool.take(4, 5) is None
        assert pool.take(4, 5) is None
    assert pool.refusals == 2 and pool.in_use() == 2
    assert "budget" in pool.fallback_reason
    assert len([r for r in caplog.records if "pinned frames" in r.message]) == 1  # logged once
    held.pop()
    assert pool.take(4, 5) is not None  # a released frame comes back


def test_pool_drops_idle_frames_of_an_old_resolution():
    pool = PinnedFramePool(budget_bytes=2 * 4 * 5 * 3, pin=False)
    held = [pool.take(4, 5), pool.take(4, 5)]
    assert pool.allocated_bytes == 2 * 4 * 5 * 3
    del held  # both idle now
    frame = pool.take(5, 4)  # same bytes, new shape: the old idle frames make room
    assert frame is not None and frame.shape == (5, 4, 3)
    assert pool.allocated_bytes == 4 * 5 * 3


def test_is_pinned_frame_is_false_for_ordinary_arrays():
    frame = np.zeros((4, 5, 3), np.uint8)
    assert not is_pinned_frame(frame[:, ::-1])  # not contiguous: never the direct path
    frame.flags.writeable = False
    assert not is_pinned_frame(frame)
    if not torch.cuda.is_available():
        assert not is_pinned_frame(np.zeros((4, 5, 3), np.uint8))


def test_producer_decodes_what_opencv_decodes_and_keeps_held_frames_intact(clip_path):
    expected = _decode_all(clip_path)
    producer = PinnedVideoFrameProducer(str(clip_path), PinnedFramePool(pin=False))
    kept = {}
    index = 0
    while producer.grab():
        ok, frame = producer.retrieve()
        assert ok and np.array_equal(frame, expected[index]), f"frame {index}"
        if index % 10 == 0:
            kept[index] = frame  # held while later frames are decoded
        index += 1
    producer.release()
    assert index == len(expected)
    for position, frame in kept.items():
        assert np.array_equal(frame, expected[position]), f"kept frame {position} was overwritten"
    assert producer.pooled_frames == len(expected) and producer.other_frames == 0
    assert producer.pool.allocations <= len(kept) + 2  # frames not kept were recycled


def test_producer_without_budget_decodes_into_ordinary_memory(clip_path):
    expected = _decode_all(clip_path)[:5]
    producer = PinnedVideoFrameProducer(str(clip_path), PinnedFramePool(budget_bytes=0, pin=False))
    for index in range(5):
        assert producer.grab()
        ok, frame = producer.retrieve()
        assert ok and np.array_equal(frame, expected[index])
    producer.release()
    assert producer.other_frames == 5 and producer.pooled_frames == 0
    assert "budget" in producer.pool.fallback_reason


@pytest.mark.slow
def test_pipeline_on_pooled_frames_gives_the_same_detections(demo_model_dir, short_clip):
    workflow = load_workflow(FASTPATH, preprocess="reference", postprocess="reference")
    params = {"model_id": demo_model_dir}
    expected_frames = _decode_all(short_clip)
    mismatched = []

    def check_frame(_prediction, frame) -> None:
        if not np.array_equal(frame.image, expected_frames[frame.frame_id - 1]):
            mismatched.append(frame.frame_id)

    plain = run_pipeline(str(short_clip), workflow, params)
    source = pinned_video_source(str(short_clip))
    pooled = run_pipeline(source, workflow, params, on_result=check_frame)
    assert not plain.errors and not pooled.errors
    assert pooled.frame_ids == plain.frame_ids == list(range(1, len(expected_frames) + 1))
    assert not mismatched
    assert source.producer.pooled_frames == len(expected_frames)
    for a, b in zip(plain.results, pooled.results):
        report = compare_detections(a["predictions"], b["predictions"])
        assert report.within(confidence=0.0, box_px=0.0, mask_iou=1.0), report
