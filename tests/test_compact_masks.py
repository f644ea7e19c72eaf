"""Compact masks on the host: runs from transition positions, the polygon-step rule, window slicing.

Each is checked against an independent reference: supervision's own encoder (``CompactMask.from_dense``),
OpenCV contours of the dense mask (what the stock polygon step computes), and numpy slicing.
"""

from __future__ import annotations

import numpy as np
import pytest

from inference_fastpath.adapters.masks import _runs_have_l_shape, largest_external_contour, survives_polygon_step
from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks, compact_from_dense, compact_from_transitions
from support.mask_scenes import frame_transitions


def _random_masks(rng, count=3):
    height, width = (int(v) for v in rng.integers(1, 12, 2))
    masks = np.zeros((count, height, width), bool)
    for mask in masks:
        kind = rng.integers(0, 6)
        if kind == 0:
            mask[:] = rng.random((height, width)) < 0.2
        elif kind == 1:
            mask[rng.integers(0, height), :] = True
        elif kind == 2:
            mask[rng.integers(0, height), rng.integers(0, width)] = True
        elif kind == 3:
            mask[:, rng.integers(0, width)] = True
        elif kind == 4:
            mask[:, : rng.integers(1, width + 1)] = True
        else:
            mask[:] = rng.random((height, width)) < 0.7
    return masks


def test_runs_from_transitions_equal_supervisions_encoder():
    rng = np.random.default_rng(0)
    for _ in range(1500):
        masks = _random_masks(rng)
        ours = compact_from_transitions([frame_transitions(m) for m in masks], *masks.shape[1:])
        theirs = compact_from_dense(masks)
        np.testing.assert_array_equal(ours.to_dense(), masks)
        assert all(np.array_equal(a, b) for a, b in zip(ours._rles, theirs._rles))
        np.testing.assert_array_equal(ours._offsets, theirs._offsets)
        np.testing.assert_array_equal(ours._crop_shapes, theirs._crop_shapes)


@pytest.mark.parametrize("first_runs", [128, 2, 1])  # 2 and 1: the first-runs shortcut on most masks
def test_polygon_step_rule_on_compact_and_dense_masks_equals_the_contour_rule(monkeypatch, first_runs):
    from inference_fastpath.adapters import masks as mask_rules

    monkeypatch.setattr(mask_rules, "_FIRST_RUNS", first_runs)
    rng = np.random.default_rng(1)
    for _ in range(1500):
        masks = _random_masks(rng)
        truth = [len(largest_external_contour(m)) >= 3 for m in masks]
        boxes = np.array([[0, 0, masks.shape[2] - 1, masks.shape[1] - 1]] * len(masks), float)
        assert survives_polygon_step(masks, boxes).tolist() == truth
        compact = compact_from_dense(masks)
        assert survives_polygon_step(compact, boxes).tolist() == truth
        lazy = LazyCompactMasks([frame_transitions(m) for m in masks], *masks.shape[1:])
        assert survives_polygon_step(lazy, boxes).tolist() == truth
        assert lazy._built is None  # decided on the transitions: no crop runs were built
        for index, crop in enumerate(compact.crop(i) for i in range(len(masks))):
            u = crop.astype(np.uint8)
            windows = u[:-1, :-1] + u[1:, :-1] + u[:-1, 1:] + u[1:, 1:] if min(crop.shape) > 1 else np.zeros(0)
            assert _runs_have_l_shape(compact._rles[index], crop.shape[0]) == bool((windows >= 3).any())


@pytest.mark.parametrize("window", [(slice(None), slice(3, 20), slice(5, 39)), (slice(1, 3), slice(0, 30), slice(10, 12)),
                                    (slice(None), slice(25, 60), slice(-5, None)), (0, slice(2, 9), slice(3, 7))])
def test_window_slices_are_the_dense_slices(window):
    masks = np.random.default_rng(2).random((4, 30, 40)) < 0.3
    compact = compact_from_dense(masks)
    np.testing.assert_array_equal(compact[window], masks[window])
    subset = compact[np.array([True, False, True, True])]
    assert type(subset) is type(compact)
    np.testing.assert_array_equal(subset[:, 2:9, 3:7], masks[[0, 2, 3]][:, 2:9, 3:7])


@pytest.mark.parametrize("count", [0, 1, 3])
def test_lazy_masks_survive_the_engines_deep_copy_and_pickle(count):
    """The Execution Engine deep-copies each output's detections to move them to root coordinates
    (always for a frame without detections): the RLE output's lazy masks must come through whole."""
    import copy
    import pickle

    import supervision as sv
    from roboflow_workflows.core_steps.common.utils import sv_detections_to_root_coordinates

    from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks

    masks = _random_masks(np.random.default_rng(count), count) if count else np.zeros((0, 5, 7), bool)
    lazy = LazyCompactMasks([frame_transitions(m) for m in masks], *masks.shape[1:])
    detections = sv.Detections(xyxy=np.zeros((count, 4)), mask=lazy)
    detections.metadata["root_parent_dimensions"] = list(masks.shape[1:])  # what makes the engine copy
    for copied in (copy.deepcopy(detections), pickle.loads(pickle.dumps(detections)),
                   sv_detections_to_root_coordinates(detections)):
        assert isinstance(copied.mask, LazyCompactMasks)
        np.testing.assert_array_equal(copied.mask.to_dense(), masks)


def _lazy_beside_supervisions(seed: int, cases: int):
    """(masks, our lazy masks from their transitions, supervision's encoding of them) for random cases."""
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        masks = _random_masks(rng, count=4)
        yield masks, LazyCompactMasks([frame_transitions(m) for m in masks], *masks.shape[1:]), compact_from_dense(masks)


def test_lazy_masks_select_and_crop_without_building_all_and_equal_supervisions_encoder():
    for masks, lazy, theirs in _lazy_beside_supervisions(3, 300):
        for index in range(len(masks)):
            np.testing.assert_array_equal(lazy.crop(index), theirs.crop(index))
        for selector in (np.array([True, False, True, True]), [3, 1], slice(1, 3), np.array([], dtype=int)):
            subset = lazy[selector]
            assert isinstance(subset, LazyCompactMasks) and subset._built is None
            np.testing.assert_array_equal(subset.to_dense(), masks[selector])
            assert all(np.array_equal(a, b) for a, b in zip(subset._rles, theirs[selector]._rles))
        for selector in ([True, False], np.array([False, True, True]), [0.0, 3.0], (i for i in (2, 0))):
            theirs_selected = theirs[selector if not hasattr(selector, "__next__") else [2, 0]]
            assert all(np.array_equal(a, b) for a, b in zip(lazy[selector]._rles, theirs_selected._rles))
        assert lazy._built is None
        np.testing.assert_array_equal(lazy[2], masks[2])  # one dense mask: now built, as supervision indexes
        np.testing.assert_array_equal(lazy[[0, 3]].to_dense(), masks[[0, 3]])


def test_lazy_geometry_and_area_equal_supervisions_encoder_without_building_runs():
    for masks, lazy, theirs in _lazy_beside_supervisions(4, 500):
        np.testing.assert_array_equal(lazy.area, masks.reshape(len(masks), -1).sum(axis=1))
        np.testing.assert_array_equal(lazy._offsets, theirs._offsets)
        np.testing.assert_array_equal(lazy._crop_shapes, theirs._crop_shapes)
        assert lazy._built is None
        np.testing.assert_array_equal(lazy.area, theirs.area)


@pytest.mark.parametrize("first_runs", [128, 3])
def test_polygon_step_rule_on_a_frame_of_many_masks_at_once(monkeypatch, first_runs):
    """The rule takes a frame's masks in one pass: masks laid end to end must not see one another, one
    row tall or many, whatever their number of runs."""
    from inference_fastpath.adapters import masks as mask_rules

    monkeypatch.setattr(mask_rules, "_FIRST_RUNS", first_runs)
    rng = np.random.default_rng(7)
    for _ in range(200):
        height, width = int(rng.integers(1, 40)), int(rng.integers(1, 50))
        density = rng.uniform(0.02, 0.9, (12, 1, 1))
        masks = rng.random((12, height, width)) < density
        empty, line, dot = rng.choice(12, 3, replace=False)
        masks[[empty, line, dot]] = False
        masks[line, rng.integers(0, height), :] = True  # a straight line alone: dropped
        masks[dot, rng.integers(0, height), rng.integers(0, width)] = True
        truth = [len(largest_external_contour(m)) >= 3 for m in masks]
        boxes = np.zeros((len(masks), 4))
        assert survives_polygon_step(compact_from_dense(masks), boxes).tolist() == truth
        lazy = LazyCompactMasks([frame_transitions(m) for m in masks], height, width)
        assert survives_polygon_step(lazy, boxes).tolist() == truth
