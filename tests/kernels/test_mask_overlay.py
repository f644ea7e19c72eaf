"""Mask overlay kernel (through the fast painter) vs supervision's MaskAnnotator, over a grid.

Runs on CUDA when available, else through the Triton interpreter (CPU). The picture must equal the
stock annotator's within one intensity level per channel (the blend's rounding).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import supervision as sv

from inference_fastpath.adapters.visualization.mask_painting import GpuMaskPainter
from inference_fastpath.kernels.mask_overlay import MaskRuns
from support.mask_scenes import MASK_KINDS, compact_detections as _detections, lazy_compact_detections, mask_stack as _masks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _compare(scene, detections, annotator, ours_on=None):
    """``ours_on``: the detections the painter gets when not ``detections`` (the same masks, lazy)."""
    expected = annotator.annotate(scene=scene.copy(), detections=detections)
    painter = GpuMaskPainter(DEVICE)
    ours_on = detections if ours_on is None else ours_on
    assert painter.check(scene, ours_on, annotator).reason is None
    ours = painter(scene.copy(), ours_on, annotator)
    difference = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, f"{int((difference > 1).sum())} channel values differ by more than 1"
    return int((difference > 0).sum())


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (37, 53), (120, 160)])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("opacity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("lazy", [False, True], ids=["crops", "lazy"])
def test_overlay_equals_mask_annotator(hw, kind, opacity, lazy):
    """``lazy``: the block's own masks, painted from their full-frame runs with no crop built; the stock
    annotator paints supervision's encoding of the same masks."""
    rng = np.random.default_rng(hash((hw, kind)) % 2**32)
    scene = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    masks = _masks(kind, *hw, rng)
    ours_on = lazy_compact_detections(masks) if lazy else None
    _compare(scene, _detections(masks), sv.MaskAnnotator(opacity=opacity), ours_on)
    if lazy:
        assert ours_on.mask._built is None


@pytest.mark.parametrize("lookup", [sv.ColorLookup.CLASS, sv.ColorLookup.INDEX])
def test_colour_lookup_and_palette(lookup):
    rng = np.random.default_rng(5)
    scene = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    masks = _masks("overlapping", 64, 80, rng)
    annotator = sv.MaskAnnotator(color=sv.ColorPalette.from_hex(["#ff0000", "#00ff00", "#0000ff"]),
                                 color_lookup=lookup, opacity=0.6)
    _compare(scene, _detections(masks, class_id=[2, 2, 0, 1]), annotator)


def test_8k_frame_with_small_masks():
    rng = np.random.default_rng(8)
    height, width = 4320, 7680
    scene = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((3, height, width), bool)
    masks[0, 10:40, 20:90] = True
    masks[1, height - 5 :, width - 7 :] = True
    masks[2, 2000, 3000] = True
    _compare(scene, _detections(masks), sv.MaskAnnotator(opacity=0.5))


def test_dense_masks_are_left_to_the_reference():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:5, 2:5] = True
    detections = sv.Detections(xyxy=np.array([[2.0, 2, 4, 4]]), class_id=np.array([0]), mask=masks)
    reason = GpuMaskPainter(DEVICE).check(np.zeros((8, 8, 3), np.uint8), detections, sv.MaskAnnotator()).reason
    assert reason and "dense" in reason


def test_runs_split_into_pieces_cover_every_pixel_once():
    """Short runs, and a whole-crop run longer than a piece: every pixel of each mask in exactly one piece."""
    from inference_fastpath.kernels.mask_overlay import PAINT_CHUNK

    rng = np.random.default_rng(3)
    masks = np.concatenate([rng.random((2, 70, 90)) < 0.7, np.ones((1, 70, 90), bool), np.zeros((1, 70, 90), bool)])
    cm = _detections(masks).mask
    runs = MaskRuns.from_crops(cm._rles, cm._crop_shapes, cm._offsets, np.array([0, 1, 2, 3]))
    assert runs.pieces[:, 1].max() == PAINT_CHUNK and runs.pieces[:, 1].min() >= 1
    for priority in range(4):
        rows = runs.pieces[runs.pieces[:, 5] == priority]
        covered = np.zeros(70 * 90, np.int64)
        for start, length, crop_h, x1, y1, _ in rows:
            assert crop_h == cm._crop_shapes[priority][0] and (x1, y1) == tuple(cm._offsets[priority])
            covered[start:start + length] += 1
        crop = cm.crop(priority)
        assert covered.max(initial=0) <= 1 and int(covered.sum()) == int(masks[priority].sum())
        assert (covered[:crop.size].reshape(crop.shape[1], crop.shape[0]).T.astype(bool) == crop).all()
