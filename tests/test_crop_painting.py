"""Host crop painting (and the `painter` option's choice) vs the stock mask visualization's picture.

The reference is supervision's ``MaskAnnotator`` twice: on full-frame dense masks, as the stock block
paints a dense prediction, and on the CompactMask itself, as the stock block paints our output.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import supervision as sv

from inference_fastpath.adapters.visualization import painter_choice
from inference_fastpath.adapters.visualization.crop_painting import CropMaskPainter, covered_fraction
from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter
from inference_fastpath.adapters.visualization.painter_choice import CoverageRoutedPainter, resolve_painter
from support.mask_scenes import MASK_KINDS, compact_detections, mask_stack, stock_picture

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    difference = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"{int((difference > 1).sum())} channel values differ by more than 1"


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (37, 53), (120, 160), (4320, 7680)])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("opacity", [0.0, 0.5, 1.0])
def test_crops_equal_the_stock_picture(hw, kind, opacity):
    if hw == (4320, 7680) and kind in ("full", "overlapping") and opacity != 0.5:
        pytest.skip("8K frame-filling masks: one opacity is enough to show the size, the rest costs minutes")
    rng = np.random.default_rng(hash((hw, kind)) % 2**32)
    scene = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    detections = compact_detections(mask_stack(kind, *hw, rng))
    annotator = sv.MaskAnnotator(opacity=opacity)
    ours = CropMaskPainter()(scene.copy(), detections, annotator)
    _assert_close(ours, stock_picture(scene, detections, annotator))
    _assert_close(ours, annotator.annotate(scene=scene.copy(), detections=detections))


@pytest.mark.parametrize("lookup", [sv.ColorLookup.CLASS, sv.ColorLookup.INDEX])
def test_colour_lookup_palette_and_painting_order(lookup):
    """Nested and crossing masks: every overlapped pixel takes the smallest mask's colour."""
    rng = np.random.default_rng(5)
    scene = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    masks = np.zeros((4, 64, 80), bool)
    masks[0, 5:60, 5:75] = True  # the largest: under everything
    masks[1, 10:30, 10:40] = True  # inside 0
    masks[2, 20:50, 30:70] = True  # crosses 1, inside 0
    masks[3, 25:27, 35:37] = True  # inside 1, 2 and 0: the smallest, painted last
    annotator = sv.MaskAnnotator(color=sv.ColorPalette.from_hex(["#ff0000", "#00ff00", "#0000ff"]),
                                 color_lookup=lookup, opacity=0.6)
    detections = compact_detections(masks, class_id=[2, 2, 0, 1])
    _assert_close(CropMaskPainter()(scene.copy(), detections, annotator), stock_picture(scene, detections, annotator))


@pytest.mark.parametrize("fast", ["crops", "triton"])
def test_a_mask_larger_than_the_frame_is_clipped(fast):
    """Predictions made on a larger image: only the part inside the frame is painted (both fast twins)."""
    rng = np.random.default_rng(9)
    big = np.zeros((2, 60, 80), bool)
    big[0, 20:60, 30:80] = True
    big[1, 0:10, 0:10] = True
    detections = compact_detections(big)
    scene = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    clipped = compact_detections(big[:, :40, :50])
    annotator = sv.MaskAnnotator(opacity=0.5)
    painter = CropMaskPainter() if fast == "crops" else GpuMaskPainter(DEVICE)
    _assert_close(painter(scene.copy(), detections, annotator), stock_picture(scene, clipped, annotator))


def test_a_mask_wholly_outside_the_frame_paints_nothing():
    masks = np.zeros((1, 50, 50), bool)
    masks[0, 40:45, 40:45] = True
    scene = np.full((20, 20, 3), 7, np.uint8)
    assert (CropMaskPainter()(scene.copy(), compact_detections(masks), sv.MaskAnnotator()) == 7).all()


def test_no_detections_and_no_masks_leave_the_frame_alone():
    scene = np.full((6, 6, 3), 9, np.uint8)
    painter = CropMaskPainter()
    assert (painter(scene.copy(), sv.Detections.empty(), sv.MaskAnnotator()) == 9).all()
    boxes = sv.Detections(xyxy=np.array([[0.0, 0, 3, 3]]), class_id=np.array([0]))
    assert (painter(scene.copy(), boxes, sv.MaskAnnotator()) == 9).all()


def test_dense_masks_and_odd_frames_are_left_to_the_reference():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:5, 2:5] = True
    dense = sv.Detections(xyxy=np.array([[2.0, 2, 4, 4]]), class_id=np.array([0]), mask=masks)
    painter = CropMaskPainter()
    assert "dense" in painter.check(np.zeros((8, 8, 3), np.uint8), dense, sv.MaskAnnotator()).reason
    assert "uint8" in painter.check(np.zeros((8, 8, 3), np.float32), dense, sv.MaskAnnotator()).reason
    with pytest.raises(ValueError, match="dense"):
        painter(np.zeros((8, 8, 3), np.uint8), dense, sv.MaskAnnotator())


def test_covered_fraction_sums_the_crop_rectangles():
    masks = np.zeros((3, 10, 20), bool)
    masks[0, :5, :10] = True  # 50 pixels of rectangle
    masks[1, 0, 0] = True  # 1
    masks[2, :, :] = True  # 200
    assert covered_fraction(compact_detections(masks).mask, (10, 20)) == pytest.approx(251 / 200)


class _Spy:
    def __init__(self, inner):
        self.inner, self.calls, self.name = inner, 0, inner.name

    def check(self, *args, **kwargs):
        return self.inner.check(*args, **kwargs)

    def run_checked(self, *args, **kwargs):
        self.calls += 1
        return self.inner.run_checked(*args, **kwargs)


def test_auto_routes_small_masks_to_crops_and_large_ones_to_the_gpu_kernel():
    rng = np.random.default_rng(11)
    scene = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    small = np.zeros((2, 60, 80), bool)
    small[0, 2:6, 3:9] = True
    small[1, 40:44, 50:52] = True
    large = np.ones((1, 60, 80), bool)
    crops, gpu = _Spy(CropMaskPainter()), _Spy(GpuMaskPainter(DEVICE))
    routed = CoverageRoutedPainter(crops, gpu)
    annotator = sv.MaskAnnotator(opacity=0.5)
    for masks, expect_gpu in ((small, 0), (large, 1)):
        detections = compact_detections(masks)
        assert (covered_fraction(detections.mask, (60, 80)) > painter_choice.GPU_FROM_COVERAGE) == bool(expect_gpu)
        _assert_close(routed(scene.copy(), detections, annotator), stock_picture(scene, detections, annotator))
    assert (crops.calls, gpu.calls) == (1, 1)


def test_painter_option_resolution_on_this_machine():
    cpu = torch.device("cpu")
    assert resolve_painter("reference", cpu)[0].name == "reference"
    assert resolve_painter("crops", cpu)[0].name == "crops"
    assert resolve_painter("auto", cpu)[0].name == "crops"  # no CUDA: the host twin, not the stock annotator
    # triton paints on DEVICE: the GPU where there is one, else the CPU under TRITON_INTERPRET=1 (set above)
    triton, reason = resolve_painter("triton", DEVICE)
    assert (triton.name, reason) == ("triton", None)
    if DEVICE.type == "cuda":  # without the interpreter the CPU cannot run the kernel: the stock annotator, and why
        fallback, why = resolve_painter("triton", cpu)
        assert fallback.name == "reference" and "TRITON_INTERPRET" in why
    with pytest.raises(ValueError, match="painter='gpu'"):
        resolve_painter("gpu", cpu)


def test_dense_predictions_through_auto_are_painted_by_the_stock_annotator(caplog):
    masks = np.zeros((1, 12, 12), bool)
    masks[0, 2:9, 3:7] = True
    dense = sv.Detections(xyxy=np.array([[3.0, 2, 6, 8]]), class_id=np.array([0]), mask=masks)
    scene = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    painter, _ = resolve_painter("auto", torch.device("cpu"))
    with caplog.at_level("WARNING", logger="inference_fastpath"):
        ours = painter(scene.copy(), dense, sv.MaskAnnotator())
        painter(scene.copy(), dense, sv.MaskAnnotator())
    assert (ours == sv.MaskAnnotator().annotate(scene.copy(), dense)).all()
    assert sum("dense masks" in record.getMessage() for record in caplog.records) == 1  # logged once


@pytest.mark.parametrize("painter_name", ["auto", "crops", "triton"])
def test_rle_only_predictions_of_the_stock_v4_block_are_painted_by_the_stock_annotator(painter_name, caplog):
    """mask=None with COCO RLE in data["rle_mask"]: the fast twins decline, the stock annotator decodes and paints."""
    from pycocotools import mask as coco

    masks = np.zeros((2, 20, 24), bool)
    masks[0, 5:10, 5:12] = True
    masks[1, 12:18, 2:20] = True
    rles = np.array([coco.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks], dtype=object)
    detections = sv.Detections(xyxy=np.array([[5.0, 5, 11, 9], [2, 12, 19, 17]]), class_id=np.array([0, 1]),
                               data={"rle_mask": rles})
    scene = np.random.default_rng(2).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    painter, _ = resolve_painter(painter_name, DEVICE if painter_name == "triton" else torch.device("cpu"))
    with caplog.at_level("WARNING", logger="inference_fastpath"):
        ours = painter(scene.copy(), detections, sv.MaskAnnotator(opacity=0.5))
    expected = stock_picture(scene, compact_detections(masks), sv.MaskAnnotator(opacity=0.5))
    assert (ours != scene).any()
    _assert_close(ours, expected)
    assert any("RLE-only" in record.getMessage() for record in caplog.records)


def test_a_flipped_frame_view_is_left_to_the_stock_annotator():
    """OpenCV cannot paint into a flipped or strided view in place; the stock annotator can."""
    rng = np.random.default_rng(4)
    frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    masks = mask_stack("overlapping", 30, 40, rng)
    detections = compact_detections(masks)
    annotator = sv.MaskAnnotator(opacity=0.5)
    for view in (frame[:, ::-1], frame[..., ::-1], np.asfortranarray(frame)):
        assert "strided view" in CropMaskPainter().check(view, detections, annotator).reason
        expected = annotator.annotate(np.ascontiguousarray(view).copy(), detections)
        ours = resolve_painter("crops", torch.device("cpu"))[0](view.copy(order="K"), detections, annotator)
        _assert_close(np.ascontiguousarray(ours), expected)
    assert CropMaskPainter().check(frame[2:20, 5:30], detections, annotator).reason is None  # a crop is fine
