"""Engine stage on the CPU: the torch engine against inference-models' forward.

The RF-DETR forward costs a few seconds on a small CPU, so these checks share one randomly
initialised rfdetr-seg-nano (``seg_model`` in conftest.py) and run exactly two forwards.
"""

from __future__ import annotations

import pytest
import torch

from inference_fastpath.adapters.engine import base
from inference_fastpath.adapters.contracts import PreprocessedBatch


# ----------------------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def torch_engine(seg_model):
    from inference_fastpath.adapters.engine.torch_engine import TorchEngine

    return TorchEngine(seg_model, cuda_graphs=True)  # graphs requested on purpose: must fall back


@pytest.fixture(scope="module")
def parity_outputs(seg_model, torch_engine):
    """The only two RF-DETR forwards of this module: inference-models' and the engine's."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(1, 3, 312, 312, generator=generator)
    reference = seg_model.forward(x.clone())
    raw = torch_engine(PreprocessedBatch(tensor=x, metadata=[]))
    return reference, raw


# ----------------------------------------------------------------------------- torch engine


def test_eager_torch_engine_equals_model_forward(parity_outputs):
    reference, raw = parity_outputs
    assert raw.boxes.shape == (1, 100, 4)
    assert raw.logits.shape == (1, 100, 91)
    assert raw.masks.shape == (1, 100, 78, 78)
    for name, ours in (("pred_boxes", raw.boxes), ("pred_logits", raw.logits), ("pred_masks", raw.masks)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference[name], atol=1e-5, rtol=0, msg=name)
    assert raw.done_event is None
    raw.release(None)
    raw.release(None)  # idempotent


def test_cuda_graphs_on_cpu_fall_back_with_reason(torch_engine, parity_outputs):
    assert torch_engine.cuda_graphs_requested
    assert not torch_engine.cuda_graphs_active
    assert "CUDA" in torch_engine.graph_fallback_reason
    assert torch_engine.stats.eager_runs >= 1 and torch_engine.stats.graph_replays == 0


def test_prepared_module_is_a_private_patched_copy(seg_model, torch_engine, parity_outputs):
    from inference_models.models.rfdetr.ms_deform_attn import MSDeformAttn

    prepared = torch_engine.module
    # instance-level replacements on the copy ...
    assert "forward" in vars(prepared.transformer)
    attns = [m for m in prepared.modules() if isinstance(m, MSDeformAttn)]
    assert attns and all("forward" in vars(m) for m in attns)
    # ... and nothing on the model inference-models owns
    original = seg_model._model
    assert "forward" not in vars(original.transformer)
    assert all("forward" not in vars(m) for m in original.modules() if isinstance(m, MSDeformAttn))
    assert not original._export
    # the proposal geometry was cached by the forward (what makes capture sync-free)
    geometry = getattr(prepared.transformer, "_fastpath_proposal_geometry")
    assert len(geometry) == 1
    (shapes, dtype, _, _), (proposals, invalid) = next(iter(geometry.items()))
    assert shapes == ((26, 26),) and dtype == torch.float32
    assert proposals.shape == (1, 676, 4) and invalid.shape == (1, 676, 1) and invalid.dtype == torch.bool


def test_input_buffer_is_static_per_batch_size(torch_engine):
    first = torch_engine.input_buffer(2)
    again = torch_engine.input_buffer(2)
    assert first.shape == (2, 3, 312, 312) and first.dtype == torch.float32
    assert first.data_ptr() == again.data_ptr()
    assert torch_engine.input_buffer(1).data_ptr() != first.data_ptr()
    assert base.is_same_buffer(again, first)
    assert not base.is_same_buffer(first.clone(), first)


def test_the_block_builds_engines_with_a_graph_for_every_padded_batch_size(seg_model):
    # the block's engines come from build_engine: its cache must hold the padded sizes of 64 sources
    from inference_fastpath.adapters.engine.batch_padding import graph_batch_size
    from inference_fastpath.adapters.selection import build_engine

    engine, _ = build_engine("auto", True, seg_model)
    padded = {graph_batch_size(n, 64) for n in range(1, 65)}
    assert engine.name == "torch" and engine.graph_cache_size >= len(padded) == 7
    assert engine.describe()["graph_cache_size"] == engine.graph_cache_size
