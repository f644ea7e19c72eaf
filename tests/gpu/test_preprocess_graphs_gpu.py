"""Captured kernel launches of the Triton preprocess stage (CUDA graphs) on a GPU: every replay
gives the same bytes as an eager stage (graphs off) for fresh frame contents, alternating sizes,
numpy and CUDA frames, canvas (letterbox) plans and static crops; past the capture bound the stage
goes eager with a reason.

Run with ``pytest -m gpu tests/gpu/test_preprocess_graphs_gpu.py``.
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
    ColorMode,
    ImagePreProcessing,
    NetworkInputDefinition,
    ResizeMode,
    StaticCrop,
    TrainingInputSize,
)

from inference_fastpath.adapters.preprocess import triton as preprocess_triton  # noqa: E402
from inference_fastpath.adapters.preprocess.planning import stretch_network_input  # noqa: E402
from inference_fastpath.adapters.preprocess.triton import TritonPreprocess  # noqa: E402

DEVICE = torch.device("cuda")


def _frames(sizes, seed, on_device=False):
    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return [torch.from_numpy(f).to(DEVICE) for f in frames] if on_device else frames


def _letterbox() -> NetworkInputDefinition:
    return NetworkInputDefinition(
        training_input_size=TrainingInputSize(height=312, width=312),
        dataset_version_resize_dimensions=TrainingInputSize(height=320, width=320),
        dynamic_spatial_size_supported=False,
        color_mode=ColorMode("rgb"),
        resize_mode=ResizeMode("letterbox"),
        padding_value=114,
        input_channels=3,
        scaling_factor=255,
        normalization=([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    )


def _pair(network_input=None, preprocessing=None):
    kwargs = dict(network_input=network_input or stretch_network_input(312, 312),
                  image_pre_processing=preprocessing or ImagePreProcessing(), device=DEVICE)
    return TritonPreprocess(cuda_graphs=True, **kwargs), TritonPreprocess(cuda_graphs=False, **kwargs)


def _run(stage, frames, out=None):
    batch = stage(frames, out=out)
    batch.ready_event.synchronize()
    return batch.tensor.clone(), batch.metadata


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("layout", ["stretch", "letterbox", "static-crop"])
def test_replays_equal_eager_launches(on_device, layout):
    network_input = _letterbox() if layout == "letterbox" else None
    preprocessing = None
    if layout == "static-crop":
        preprocessing = ImagePreProcessing(
            **{"static-crop": StaticCrop(enabled=True, x_min=10, x_max=85, y_min=15, y_max=90)})
    graphed, eager = _pair(network_input, preprocessing)
    out = torch.empty(1, 3, 312, 312, device=DEVICE)  # a fixed output, like the engine's input buffer
    sizes = [(1080, 1920), (576, 768)] * 4  # each size comes back: captured on its second call
    for index, size in enumerate(sizes):
        frames = _frames([size], seed=index, on_device=on_device)
        got, got_meta = _run(graphed, frames, out=out)
        expected, expected_meta = _run(eager, frames)
        assert torch.equal(got, expected), (layout, size, index)
        assert got_meta == expected_meta
    assert graphed.graph_fallback_reason is None
    assert graphed.captures == 2
    assert eager.captures == 0


def test_batches_of_mixed_sizes_replay():
    graphed, eager = _pair()
    for index in range(4):
        frames = _frames([(480, 640), (480, 640), (720, 1280)], seed=100 + index)
        assert torch.equal(_run(graphed, frames)[0], _run(eager, frames)[0])
    assert graphed.captures >= 2 and graphed.graph_fallback_reason is None


def test_capture_bound_stops_captures_and_keeps_replaying(monkeypatch):
    monkeypatch.setattr(preprocess_triton, "_MAX_LAUNCH_CAPTURES", 1)
    graphed, eager = _pair()
    for index, size in enumerate([(100, 120), (100, 120), (90, 130), (90, 130), (100, 120)]):
        frames = _frames([size], seed=200 + index)
        assert torch.equal(_run(graphed, frames)[0], _run(eager, frames)[0])
    assert graphed.captures == 1 and graphed.graph_fallback_reason is None
    summary = graphed.graph_summary()
    assert "more than 1" in summary["captures_stopped"] and summary["live_keys"] == 1
