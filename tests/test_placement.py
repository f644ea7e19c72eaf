"""Spreading pipelines over GPUs through the block's device option (workflows/placement.py)."""

import pytest

from inference_fastpath.workflows import FASTPATH, FASTPATH_ANNOTATED, load_workflow
from inference_fastpath.workflows.placement import on_device, round_robin_devices


def test_round_robin_covers_every_gpu_evenly():
    devices = round_robin_devices(8, 4)
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] * 2
    assert round_robin_devices(3, 8) == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(ValueError, match="gpus must be >= 1"):
        round_robin_devices(2, 0)


@pytest.mark.parametrize("name", [FASTPATH, FASTPATH_ANNOTATED])
def test_on_device_sets_only_our_steps_and_leaves_the_input_alone(name):
    workflow = load_workflow(name)
    placed = on_device(workflow, "cuda:3")
    ours = [s for s in placed["steps"] if s["type"].startswith("fastpath/")]
    others = [s for s in placed["steps"] if not s["type"].startswith("fastpath/")]
    assert [s["device"] for s in ours] == ["cuda:3"] * (2 if name == FASTPATH_ANNOTATED else 1)
    assert all("device" not in s for s in others)
    assert all("device" not in s for s in workflow["steps"])  # a copy, not the caller's spec


def test_a_placed_workflow_compiles_with_its_device():
    from inference_fastpath.blocks import mask_visualization_v1, rfdetr_instance_segmentation_v1

    manifests = {rfdetr_instance_segmentation_v1.BLOCK_TYPE: rfdetr_instance_segmentation_v1.BlockManifest,
                 mask_visualization_v1.BLOCK_TYPE: mask_visualization_v1.BlockManifest}
    steps = [s for s in on_device(load_workflow(FASTPATH_ANNOTATED), "cuda:1")["steps"] if s["type"] in manifests]
    assert [manifests[s["type"]](**s).device for s in steps] == ["cuda:1", "cuda:1"]


def test_a_workflow_without_our_step_is_refused():
    with pytest.raises(ValueError, match="no fastpath step"):
        on_device({"steps": [{"type": "roboflow_core/roboflow_instance_segmentation_model@v3", "name": "s"}]}, "cuda:0")
