"""Uploads of the Triton preprocess stage on a CUDA GPU. Chunked pinned staging: same bytes as the
single copy and as a frame already on the device, and no slot overwritten under a pending DMA. Frames
already in pinned memory (one async copy each, no staging fill): same output as the staged path, mixed
batches included, and a pooled frame is never handed out again while its copy may be pending.

Run with ``pytest -m gpu tests/gpu/test_preprocess_upload_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from inference_models.models.common.roboflow.model_packages import (  # noqa: E402
    ImagePreProcessing,
)

from inference_fastpath.adapters.cuda.pinned_frames import PinnedFramePool, is_pinned_frame  # noqa: E402
from inference_fastpath.adapters.preprocess.planning import stretch_network_input  # noqa: E402
from inference_fastpath.adapters.preprocess.triton import TritonPreprocess  # noqa: E402


def _image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _stage(**kwargs) -> TritonPreprocess:
    return TritonPreprocess(stretch_network_input(312, 312), ImagePreProcessing(), torch.device("cuda"), **kwargs)


def _on_device(stage: TritonPreprocess, frames) -> torch.Tensor:
    """The stage's output for the same frames already on the GPU (no staging at all)."""
    batch = stage([torch.from_numpy(np.ascontiguousarray(f)).cuda() for f in frames])
    batch.ready_event.synchronize()
    return batch.tensor.clone()


@pytest.mark.parametrize("chunks, threads", [(1, 0), (None, 0), (4, 2), (8, 0)])
def test_chunked_upload_same_bytes(chunks, threads):
    stage = _stage(upload_chunks=chunks, upload_threads=threads)
    reference = _stage()
    cases = [
        [_image(1080, 1920, seed=0)],
        [_image(1081, 1917, seed=1)[::-1]],  # odd sizes, negative stride
        [_image(1080, 1920, seed=2), _image(1, 5, seed=3), _image(2160, 3840, seed=4)],
    ]
    for frames in cases:
        batch = stage(frames)
        batch.ready_event.synchronize()
        assert torch.equal(batch.tensor, _on_device(reference, frames))
    assert all(h is None or h.is_pinned() for h in stage._staging._host)


@pytest.mark.parametrize("chunks, threads", [(1, 0), (None, 0), (None, 2)])
def test_no_slot_overwritten_under_pending_dma(chunks, threads):
    """The caller's stream is kept busy, so every upload's copies wait behind it while the host
    moves on to the next calls: a slot refilled before its DMA ran would corrupt an output."""
    stage = _stage(upload_chunks=chunks, upload_threads=threads)
    reference = _stage()
    frames = [_image(2160, 3840, seed=10 + i) for i in range(6)]
    outs = [torch.empty(1, 3, 312, 312, device="cuda") for _ in frames]
    events = []
    for frame, out in zip(frames, outs):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time on the caller's stream
        events.append(stage([frame], out=out).ready_event)
    for frame, out, event in zip(frames, outs, events):
        event.synchronize()
        assert torch.equal(out, _on_device(reference, [frame]))


def _pinned_copy(frame: np.ndarray) -> np.ndarray:
    pinned = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True).numpy()
    pinned[...] = frame
    return pinned


def _output(stage: TritonPreprocess, frames) -> torch.Tensor:
    batch = stage(frames)
    batch.ready_event.synchronize()
    return batch.tensor.clone()


def test_pinned_frames_are_detected():
    frame = _image(6, 7, seed=0)
    pinned = _pinned_copy(frame)
    assert is_pinned_frame(pinned) and not is_pinned_frame(frame)
    assert is_pinned_frame(PinnedFramePool().take(6, 7))
    assert not is_pinned_frame(pinned[:, ::-1])  # strided: staged instead


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_pinned_frames_give_the_staged_output(cuda_graphs):
    stage, staged = _stage(cuda_graphs=cuda_graphs), _stage(cuda_graphs=False)
    cases = [
        [_image(1080, 1920, seed=1)],
        [_image(1081, 1917, seed=2), _image(1, 5, seed=3)],
        [_image(576, 768, seed=4)] * 3,
    ]
    for frames in cases:
        pinned = [_pinned_copy(f) for f in frames]
        expected = _output(staged, frames)
        before = stage._staging.direct_frames
        for _ in range(3):  # eager, first sighting, then captured replays
            assert torch.equal(_output(stage, pinned), expected)
        assert stage._staging.direct_frames - before == 3 * len(frames)


def test_mixed_batch_of_pinned_pageable_and_device_frames():
    stage, staged = _stage(), _stage(cuda_graphs=False)
    frames = [_image(720, 1280, seed=5), _image(577, 769, seed=6), _image(1080, 1920, seed=7), _image(30, 40, seed=8)]
    mixed = [
        _pinned_copy(frames[0]),
        frames[1],
        torch.from_numpy(frames[2]).cuda(),
        _pinned_copy(frames[3]),
    ]
    expected = _output(staged, frames)
    for _ in range(3):
        assert torch.equal(_output(stage, mixed), expected)


def test_pooled_frame_not_reused_while_its_copy_is_pending():
    """The caller's stream is kept busy, so the copy of each pinned frame waits behind it: the
    stage must hold the frame (the pool sees it in use) until that copy has run."""
    stage, staged = _stage(), _stage(cuda_graphs=False)
    pool = PinnedFramePool()
    sources = [_image(2160, 3840, seed=20 + i) for i in range(5)]
    outs = [torch.empty(1, 3, 312, 312, device="cuda") for _ in sources]
    events, addresses = [], []
    for source, out in zip(sources, outs):
        frame = pool.take(2160, 3840)
        frame[...] = source
        addresses.append(frame.ctypes.data)
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before this frame's copy can run
        events.append(stage([frame], out=out).ready_event)
        del frame  # only the stage holds it now
    assert len(set(addresses[:2])) == 2  # the frame of the previous call was still in flight
    for source, out, event in zip(sources, outs, events):
        event.synchronize()
        assert torch.equal(out, _output(staged, [source]))
    assert pool.allocations <= 3  # and frames came back once their copies were done
