"""Mask statistics (area, COCO RLE runs) against supervision's COCO RLE encoder."""

from __future__ import annotations

import numpy as np
import pytest

from inference_fastpath.examples.benchmarks.mask_statistics import mask_statistics, rle_runs


def _cases():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    first = np.zeros((4, 4), bool)
    first[0, 0] = True
    yield first
    yield rng.random((9, 13)) < 0.5
    blob = np.zeros((30, 40), bool)
    blob[5:20, 8:30] = True
    yield blob


@pytest.mark.parametrize("mask", list(_cases()), ids=["empty", "full", "first-pixel", "noise", "blob"])
def test_rle_runs_count_what_the_coco_encoder_writes(mask):
    from supervision.detection.utils.converters import mask_to_rle

    assert rle_runs(mask) == len(mask_to_rle(mask))


def test_statistics_over_frames():
    blob = np.zeros((10, 10), bool)
    blob[2:7, 3:5] = True  # 10 pixels, one column-major stretch per column: 2 columns -> 5 runs
    stats = mask_statistics([np.stack([blob, blob]), np.zeros((0, 10, 10), bool)])
    assert stats["frames"] == 2 and stats["detections_per_frame"] == 1.0
    assert stats["mask_area_fraction_mean"] == pytest.approx(0.1)
    assert stats["rle_runs_per_mask_median"] == rle_runs(blob) == 5
    assert mask_statistics([])["mask_area_fraction_mean"] is None


def test_polygon_rule_timing_gives_both_verdicts_alike():
    from inference_fastpath.examples.benchmarks.mask_statistics import polygon_rule_ms

    stripes = np.zeros((300, 300), bool)
    stripes[::2, :150] = True  # 150 one-pixel runs a column: straight lines, dropped by the stock rule
    masks = np.stack([stripes, stripes.copy(), stripes[:, ::-1].copy()])
    masks[1, 100:140, 200:260] = True  # a blob after 150 columns of stripes: the shortcut reads on
    masks[2, 100:140, 20:80] = True  # a blob before the stripes: the first runs decide
    assert all(len(np.flatnonzero(np.diff(m.ravel(order="F").astype(np.int8)))) > 2 * 128 for m in masks)
    timings = polygon_rule_ms([masks, np.zeros((0, 300, 300), bool)], repeats=2)
    assert timings["polygon_rule_kept_first_runs"] == timings["polygon_rule_kept_all_runs"] == 2
    assert timings["polygon_rule_ms_first_runs"] > 0 and timings["polygon_rule_ms_all_runs"] > 0


def test_compact_output_timing_runs_both_ways_on_the_same_masks():
    from inference_fastpath.examples.benchmarks.mask_statistics import compact_output_ms

    rng = np.random.default_rng(1)
    frames = [rng.random((3, 20, 30)) < 0.4, np.zeros((0, 20, 30), bool)]
    timings = compact_output_ms(frames, repeats=1)
    assert set(timings) == {"compact_output_ms_eager", "compact_output_ms_lazy"}
    assert all(value >= 0 for value in timings.values())
