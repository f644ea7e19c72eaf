"""Compares two sets of detections of the same frame (ours vs the stock block, fast vs reference stage)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import supervision as sv

from inference_fastpath.adapters.masks import largest_external_contour


@dataclass
class ParityReport:
    count_a: int
    count_b: int
    classes_equal: bool
    max_confidence_diff: float
    max_box_diff_px: float
    min_mask_iou: float

    def within(self, confidence: float = 1e-5, box_px: float = 1.0, mask_iou: float = 0.999) -> bool:
        return (
            self.count_a == self.count_b
            and self.classes_equal
            and self.max_confidence_diff <= confidence
            and self.max_box_diff_px <= box_px
            and self.min_mask_iou >= mask_iou
        )

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def as_polygon_mask(mask: np.ndarray) -> np.ndarray:
    """The mask the stock block ends up with: its largest external contour, filled again.

    The stock v3 block sends polygons through the inference response and rasterises them back, so
    extra connected components and holes of a mask are lost there. Comparing our dense masks through
    this same lossy step isolates the model/postprocess numerics from that detour.
    """
    import cv2

    polygon = largest_external_contour(mask)
    filled = np.zeros(mask.shape, dtype=np.uint8)
    if len(polygon) >= 3:
        cv2.fillPoly(filled, [polygon.astype(np.int32)], color=1)
    return filled.astype(bool)


def compare_detections(
    a: sv.Detections, b: sv.Detections, polygonise_a: bool = False
) -> ParityReport:
    """Detections must be in the same order (both paths sort by confidence).

    When the counts differ (e.g. the stock block dropped a detection whose polygon has fewer than
    three points), the two lists are aligned first, so the numbers describe the detections both
    sides have instead of pairs shifted by the missing one; the count mismatch is still reported.
    """
    count_a, count_b = len(a), len(b)
    pairs = _aligned_pairs(a, b)
    ia = np.array([i for i, _ in pairs], dtype=np.int64)
    ib = np.array([j for _, j in pairs], dtype=np.int64)
    classes_equal = count_a == count_b and np.array_equal(a.class_id[ia], b.class_id[ib])
    conf = float(np.max(np.abs(a.confidence[ia] - b.confidence[ib]))) if pairs else 0.0
    box = float(np.max(np.abs(a.xyxy[ia] - b.xyxy[ib]))) if pairs else 0.0
    ious = []
    if a.mask is not None and b.mask is not None:
        for i, j in pairs:
            mask_a = as_polygon_mask(a.mask[i]) if polygonise_a else a.mask[i]
            ious.append(mask_iou(mask_a, b.mask[j]))
    elif "rle_mask" in a.data and "rle_mask" in b.data:
        ious = [_rle_iou(a.data["rle_mask"][i], b.data["rle_mask"][j]) for i, j in pairs]
    return ParityReport(
        count_a=count_a,
        count_b=count_b,
        classes_equal=bool(classes_equal),
        max_confidence_diff=conf,
        max_box_diff_px=box,
        min_mask_iou=min(ious) if ious else 1.0,
    )


def _aligned_pairs(a: sv.Detections, b: sv.Detections, box_px: float = 1.0) -> List[Tuple[int, int]]:
    """Index pairs of the detections both lists share, in order. Equal counts pair by index; else
    an in-order walk pairs same-class detections with boxes within ``box_px`` and skips an
    unpaired one on the longer side."""
    count_a, count_b = len(a), len(b)
    if count_a == count_b:
        return [(i, i) for i in range(count_a)]
    pairs: List[Tuple[int, int]] = []
    i = j = 0
    while i < count_a and j < count_b:
        same = a.class_id[i] == b.class_id[j] and np.max(np.abs(a.xyxy[i] - b.xyxy[j])) <= box_px
        if same:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif count_a - i > count_b - j:
            i += 1
        else:
            j += 1
    return pairs


def detections_distance(a: sv.Detections, b: sv.Detections, cap_px: float = 100.0) -> float:
    """How far apart two frames' detections are, in pixels: the median, over the detections of
    both lists, of each one's distance (largest box-coordinate difference) to the nearest
    same-class detection of the other list, capped at ``cap_px`` (also what a detection with no
    same-class partner counts). 0 for identical lists; small for the same frame run at another
    batch size, even when rounding moves a detection or two across the confidence threshold; large
    for another frame or another camera's frame, where most detections move. So it tells a
    mis-paired result from numeric noise.

    Example:
        >>> import numpy as np, supervision as sv
        >>> one = sv.Detections(xyxy=np.array([[0., 0., 10., 10.]]), class_id=np.array([1]))
        >>> detections_distance(one, one)
        0.0
    """
    if len(a) == 0 and len(b) == 0:
        return 0.0
    if len(a) == 0 or len(b) == 0:
        return cap_px
    gap = np.abs(a.xyxy[:, None, :].astype(np.float64) - b.xyxy[None, :, :].astype(np.float64)).max(-1)
    gap = np.where(a.class_id[:, None] == b.class_id[None, :], np.minimum(gap, cap_px), cap_px)
    return float(np.median(np.concatenate([gap.min(1), gap.min(0)])))


def _rle_iou(a: dict, b: dict) -> float:
    if a == b:
        return 1.0
    from pycocotools import mask as mask_utils

    return mask_iou(mask_utils.decode(a).astype(bool), mask_utils.decode(b).astype(bool))


def mean_detections(batches) -> Optional[float]:
    counts = [len(d) for d in batches if d is not None]
    return float(np.mean(counts)) if counts else None
