"""The parity report the benchmark and the tests use: pairing when one side has fewer detections."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from inference_fastpath.workflows.comparison import compare_detections


def _detections(boxes, classes, masks=None, confidences=None) -> sv.Detections:
    n = len(boxes)
    return sv.Detections(
        xyxy=np.asarray(boxes, dtype=np.float32).reshape(n, 4),
        class_id=np.asarray(classes, dtype=np.int64),
        confidence=np.asarray(confidences if confidences is not None else np.linspace(0.9, 0.5, n), np.float32),
        mask=None if masks is None else np.asarray(masks, dtype=bool),
    )


def _box_masks(boxes, shape=(20, 20)):
    masks = np.zeros((len(boxes),) + shape, dtype=bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[y1:y2, x1:x2] = True
    return masks


BOXES = [(0, 0, 5, 5), (6, 6, 12, 12), (2, 10, 8, 18)]


def test_a_dropped_detection_is_skipped_not_shifted():
    a = _detections(BOXES, [1, 2, 3], _box_masks(BOXES), confidences=[0.9, 0.8, 0.7])
    kept = [0, 2]
    b = _detections([BOXES[i] for i in kept], [1, 3], _box_masks([BOXES[i] for i in kept]), confidences=[0.9, 0.7])
    report = compare_detections(a, b)
    assert (report.count_a, report.count_b) == (3, 2)
    assert report.min_mask_iou == 1.0 and report.max_box_diff_px == 0.0 and report.max_confidence_diff == 0.0
    assert not report.classes_equal and not report.within()  # the count mismatch still fails parity
    reverse = compare_detections(b, a)
    assert reverse.min_mask_iou == 1.0 and reverse.count_a == 2


def test_equal_counts_pair_by_index_and_report_differences():
    a = _detections(BOXES, [1, 2, 3], _box_masks(BOXES))
    moved = [BOXES[0], (6, 6, 12, 14), BOXES[2]]
    b = _detections(moved, [1, 2, 3], _box_masks(moved))
    report = compare_detections(a, b)
    assert report.classes_equal and report.max_box_diff_px == 2.0
    assert np.isclose(report.min_mask_iou, 36 / 48)
    assert not report.within()
    assert compare_detections(a, a).within()


def _boxes(*rows, classes=None):
    xyxy = np.array(rows, dtype=np.float32).reshape(-1, 4)
    return sv.Detections(xyxy=xyxy, class_id=np.array(classes if classes is not None else [0] * len(xyxy)),
                         confidence=np.full(len(xyxy), 0.9, np.float32))


def test_detections_distance_tells_noise_from_another_frame():
    from inference_fastpath.workflows.comparison import detections_distance

    frame = _boxes([10, 10, 50, 50], [100, 20, 140, 90])
    noisy = _boxes([10.2, 10, 50, 49.9], [100, 20.3, 140, 90])
    moved = _boxes([16, 10, 56, 50], [106, 20, 146, 90])
    assert detections_distance(frame, frame) == 0.0
    assert detections_distance(frame, noisy) == pytest.approx(0.25, abs=1e-4)
    assert detections_distance(frame, moved) == pytest.approx(6.0, abs=1e-4)
    # One detection lost to the threshold (rounding at another batch size) leaves the others'
    # distances, 0 here; when most detections have no partner the distance is large.
    assert detections_distance(frame, _boxes([10, 10, 50, 50])) == 0.0
    three = _boxes([10, 10, 50, 50], [100, 20, 140, 90], [300, 300, 340, 340])
    assert detections_distance(three, _boxes([10, 10, 50, 50], [100, 20, 140, 90])) == 0.0
    assert detections_distance(three, _boxes([10, 10, 50, 50], classes=[4])) == 100.0
    assert detections_distance(_boxes(), _boxes()) == 0.0 and detections_distance(frame, _boxes()) == 100.0


def test_pairing_verdict_flags_a_neighbour_or_another_camera_but_not_batch_noise():
    from inference_fastpath.examples.benchmarks.many_sources import pairing_verdict

    expected = {
        "clip": {0: _boxes([10, 10, 50, 50]), 1: _boxes([14, 10, 54, 50])},
        "mirror": {0: _boxes([590, 10, 630, 50]), 1: _boxes([586, 10, 626, 50])},
    }
    # 2 px off its own frame (beyond the strict parity tolerance), 4 px off the next frame's.
    noise = pairing_verdict(_boxes([12, 10, 50, 50]), "clip", 0, expected)
    assert not noise["mispaired"] and not noise["equal"] and noise["own_distance_px"] == pytest.approx(2.0)
    assert pairing_verdict(_boxes([10, 10, 50, 50]), "clip", 0, expected) == {
        "mispaired": False, "equal": True, "own_distance_px": 0.0}
    assert pairing_verdict(_boxes([14, 10, 54, 50]), "clip", 0, expected)["mispaired"]  # frame 1's result
    assert pairing_verdict(_boxes([590, 10, 630, 50]), "clip", 0, expected)["mispaired"]  # the other camera's
    assert pairing_verdict(_boxes([10, 10, 50, 50]), "clip", 7, expected)["mispaired"]  # no such frame


def test_pairing_verdict_keeps_a_result_whose_detection_crossed_the_threshold():
    """At another batch size rounding can drop a detection; the rest still identify the frame."""
    from inference_fastpath.examples.benchmarks.many_sources import pairing_verdict

    frame0 = [[10, 10, 50, 50], [100, 20, 140, 90], [200, 200, 230, 240]]
    frame1 = [[x0 + 4, y0, x1 + 4, y1] for x0, y0, x1, y1 in frame0]
    expected = {"clip": {0: _boxes(*frame0), 1: _boxes(*frame1)}}
    noisy = _boxes([10.2, 10, 50, 50], [100, 20.1, 140, 90])  # frame 0 without its third detection
    verdict = pairing_verdict(noisy, "clip", 0, expected)
    assert not verdict["mispaired"] and not verdict["equal"]
    assert pairing_verdict(_boxes(*frame1[:2]), "clip", 0, expected)["mispaired"]
