"""`copy_image` through the painters and the block: in place, or a new frame with the input untouched.

Every painter twin takes ``copy``; the GPU painter hands out copies from a recycled (pinned on CUDA)
pool. References: the stock ``mask_visualization@v1`` block and supervision's ``MaskAnnotator``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import supervision as sv
from inference.core.workflows.core_steps.visualizations.mask.v1 import MaskVisualizationBlockV1
from inference.core.workflows.execution_engine.entities.base import ImageParentMetadata, WorkflowImageData

from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter
from inference_fastpath.adapters.visualization.painter_choice import resolve_painter
from inference_fastpath.blocks.mask_visualization_v1 import FastpathMaskVisualizationBlockV1
from support.mask_scenes import compact_detections, lazy_compact_detections, mask_stack

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAINTERS = ["reference", "crops", "triton", "auto"]


def _painter(name: str):
    painter, reason = resolve_painter(name, DEVICE if name == "triton" else torch.device("cpu"))
    assert reason is None
    return painter


def _assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"{int((difference > 1).sum())} channel values differ by more than 1"


def _band_scene(rng, height=48, width=64):
    """Masks over a band of rows in the middle: the rows above and below must come through unchanged."""
    masks = np.zeros((3, height, width), bool)
    masks[0, 10:30, 5:60] = True
    masks[1, 20:35, 30:40] = True
    masks[2, 33, 2] = True
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8), masks


@pytest.mark.parametrize("name", PAINTERS)
@pytest.mark.parametrize("copy", [True, False])
def test_copy_leaves_the_frame_and_in_place_paints_it(name, copy):
    rng = np.random.default_rng(7)
    scene, masks = _band_scene(rng)
    annotator = sv.MaskAnnotator(opacity=0.6)
    expected = annotator.annotate(scene.copy(), compact_detections(masks))
    original = scene.copy()
    ours = _painter(name)(scene, lazy_compact_detections(masks), annotator, copy=copy)
    _assert_close(ours, expected)
    if copy:
        assert ours is not scene and not np.shares_memory(ours, scene)
        assert (scene == original).all()
    else:
        assert ours is scene


@pytest.mark.parametrize("copy", [True, False])
def test_gpu_painter_on_strided_frames(copy):
    """A flipped or Fortran-ordered frame has no contiguous band of rows: painted through a copy of it."""
    rng = np.random.default_rng(3)
    frame, masks = _band_scene(rng)
    detections, annotator = compact_detections(masks), sv.MaskAnnotator(opacity=0.5)
    for view in (frame[:, ::-1], np.asfortranarray(frame)):
        expected = annotator.annotate(np.ascontiguousarray(view), detections)
        target = view.copy(order="K")
        ours = GpuMaskPainter(DEVICE)(target, detections, annotator, copy=copy)
        _assert_close(np.ascontiguousarray(ours), expected)
        assert (ours is target) != copy


def test_copies_are_recycled_only_once_released():
    rng = np.random.default_rng(5)
    scene, masks = _band_scene(rng)
    detections, annotator = compact_detections(masks), sv.MaskAnnotator(opacity=1.0)
    painter = GpuMaskPainter(DEVICE)
    first = painter(scene, detections, annotator, copy=True)
    kept = first.copy()
    other = scene[::-1].copy()  # another frame: a second picture must not land in the held one
    second = painter(other, detections, annotator, copy=True)
    assert not np.shares_memory(first, second) and (first == kept).all()
    address = second.ctypes.data
    del second
    third = painter(scene, detections, annotator, copy=True)
    assert third.ctypes.data == address  # the released frame came back
    _assert_close(third, annotator.annotate(scene.copy(), detections))


def test_past_the_pool_budget_copies_come_from_ordinary_memory(caplog):
    rng = np.random.default_rng(6)
    scene, masks = _band_scene(rng)
    detections, annotator = compact_detections(masks), sv.MaskAnnotator(opacity=0.5)
    painter = GpuMaskPainter(DEVICE)
    painter._outputs.budget_bytes = 0
    with caplog.at_level("WARNING", logger="inference_fastpath"):
        ours = painter(scene, detections, annotator, copy=True)
    _assert_close(ours, annotator.annotate(scene.copy(), detections))
    assert painter._outputs.refusals == 1
    assert any("painting into ordinary memory" in record.getMessage() for record in caplog.records)


def test_no_masks_with_copy_is_still_a_new_frame():
    scene = np.full((5, 6, 3), 4, np.uint8)
    for name in PAINTERS:
        ours = _painter(name)(scene, sv.Detections.empty(), sv.MaskAnnotator(), copy=True)
        assert ours is not scene and (ours == 4).all()


def _image(frame: np.ndarray) -> WorkflowImageData:
    return WorkflowImageData(parent_metadata=ImageParentMetadata(parent_id="frame"), numpy_image=frame)


@pytest.mark.parametrize("painter", PAINTERS)
@pytest.mark.parametrize("copy_image", [True, False])
def test_block_copy_image_matches_the_stock_block(painter, copy_image):
    rng = np.random.default_rng(11)
    frame, masks = _band_scene(rng)
    args = dict(color_palette="DEFAULT", palette_size=10, custom_colors=[], color_axis="CLASS", opacity=0.5)
    stock_input = frame.copy()
    stock = MaskVisualizationBlockV1().run(_image(stock_input), compact_detections(masks), copy_image, **args)
    ours_input = frame.copy()
    device = "cpu" if painter != "triton" else str(DEVICE)
    ours = FastpathMaskVisualizationBlockV1().run(_image(ours_input), lazy_compact_detections(masks), copy_image,
                                                  painter=painter, device=device, **args)
    _assert_close(ours["image"].numpy_image, stock["image"].numpy_image)
    _assert_close(ours_input, stock_input)  # painted in place exactly when the stock block paints in place
    assert (ours_input == frame).all() == copy_image
