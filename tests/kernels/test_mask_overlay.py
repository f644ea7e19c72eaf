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
from inference_fastpath.adapters.postprocess.compact import run_edges
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


def _decoded(runs):
    """The table read back on the host: per mask, (region_h, x1, y1, priority) and its covered positions."""
    n = runs.runs
    cum, starts, owner = runs.table[:n + 1], runs.table[n + 1:2 * n + 1], runs.table[2 * n + 1:3 * n + 1]
    masks = runs.table[3 * n + 1:].reshape(-1, 4)
    covered = [np.zeros(0, np.int64) for _ in masks]
    for run in range(n):
        covered[owner[run]] = np.concatenate([covered[owner[run]], starts[run] + np.arange(cum[run + 1] - cum[run])])
    return masks, covered


def test_runs_table_covers_every_pixel_once():
    """Short runs, a whole-crop run and an empty mask: each mask's pixels listed once, with its crop's corner."""
    rng = np.random.default_rng(3)
    masks = np.concatenate([rng.random((2, 70, 90)) < 0.7, np.ones((1, 70, 90), bool), np.zeros((1, 70, 90), bool)])
    cm = _detections(masks).mask
    runs = MaskRuns.from_edges(*run_edges(cm), np.array([7, 1, 2, 3]))
    info, covered = _decoded(runs)
    assert runs.covered == int(masks.sum()) and info[:, 3].tolist() == [7, 1, 2, 3]
    for index in range(4):
        assert info[index, 0] == cm._crop_shapes[index][0] and tuple(info[index, 1:3]) == tuple(cm._offsets[index])
        crop = cm.crop(index)
        flat = np.zeros(crop.size, np.int64)
        np.add.at(flat, covered[index], 1)
        assert flat.max(initial=0) <= 1 and int(flat.sum()) == int(masks[index].sum())
        assert (flat.reshape(crop.shape[1], crop.shape[0]).T.astype(bool) == crop).all()


@pytest.mark.parametrize("seed", range(4))
def test_label_plane_holds_the_top_priority(seed):
    """The paint kernel alone against a numpy painting of the same runs: many programs, runs of every
    length (whole columns, runs through a column's end into the next), masks off the plane's edges."""
    from inference_fastpath.kernels.mask_overlay import launch_paint_labels

    rng = np.random.default_rng(seed)
    height, width = 90, 130
    masks = rng.random((5, height, width)) < rng.uniform(0.05, 0.95, (5, 1, 1))
    masks[seed % 5, :, 10:50] = True
    edges = [np.flatnonzero(np.diff(np.concatenate([[0], m.ravel(order="F"), [0]]).astype(np.int8))) for m in masks]
    corners = rng.integers(-20, 20, (5, 2))  # the region moved partly off the plane: those pixels are dropped
    priorities = rng.permutation(5)
    runs = MaskRuns.from_edges(edges, [height] * 5, corners, priorities)
    expected = np.full((height, width), -1, np.int64)
    for mask, (dx, dy), priority in zip(masks, corners, priorities):
        ys, xs = np.nonzero(mask)
        ys, xs = ys + dy, xs + dx
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        np.maximum.at(expected, (ys[inside], xs[inside]), priority)
    labels = torch.full((width, height), -1, dtype=torch.int32, device=DEVICE)
    launch_paint_labels(runs, labels)
    assert (labels.cpu().numpy().T == expected).all()


def test_positions_past_int32_take_the_wide_table():
    """A region so tall that a run starts past 2**31: the table widens to int64 and paints the same pixels."""
    from inference_fastpath.kernels.mask_overlay import launch_paint_labels

    region_h = 1 << 16
    start = (1 << 31) + 5  # column 32768 of the region, row 5; the corner moves that column to x = 0
    wide = MaskRuns.from_edges([np.array([start, start + 3])], [region_h], np.array([[-(1 << 15), 0]]), np.array([4]))
    narrow = MaskRuns.from_edges([np.array([5, 8])], [region_h], np.array([[0, 0]]), np.array([4]))
    assert wide.table.dtype == np.int64 and narrow.table.dtype == np.int32
    for runs in (wide, narrow):
        labels = torch.full((10, 12), -1, dtype=torch.int32, device=DEVICE)
        launch_paint_labels(runs, labels)
        assert np.flatnonzero(labels.cpu().numpy().ravel() >= 0).tolist() == [5, 6, 7]


def test_per_frame_integers_stay_out_of_the_specialisation_key():
    """Every frame brings other run counts and another region; Triton compiles a variant per integer
    equal to 1 or divisible by 16 unless told not to, which stalled a GPU run mid-stream for 0.2 s a time."""
    import inspect

    from inference_fastpath.kernels.mask_overlay import _blend_kernel, _paint_labels_kernel

    for kernel in (_paint_labels_kernel, _blend_kernel):
        params = getattr(kernel, "params", None)  # compiled: JITFunction; interpreted: its kwargs
        if params is not None:
            unspecialised = {p.name for p in params if p.do_not_specialize}
        else:
            unspecialised = set(kernel.kwargs["do_not_specialize"] or ())
        integers = {name for name in inspect.signature(kernel.fn).parameters
                    if not name.endswith("_ptr") and not name.isupper() and name != "opacity"}
        assert integers and integers <= unspecialised, sorted(integers - unspecialised)
