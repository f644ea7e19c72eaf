"""Chunked pinned upload of the Triton preprocess stage on a CUDA GPU: same bytes as the single
copy and as a frame already on the device, and no slot overwritten under a pending DMA.

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

from inference_fastpath.adapters.stages.preprocess_triton import TritonPreprocess, stretch_network_input  # noqa: E402


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
