"""The parity report the benchmark and the tests use: pairing when one side has fewer detections."""

from __future__ import annotations

import numpy as np
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
