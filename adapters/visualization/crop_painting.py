"""Compact masks painted on the host, crop by crop: the fast twin for frames the masks cover little of.

supervision's ``MaskAnnotator`` on a ``CompactMask`` blends the whole rectangle that all masks span
together (their union ROI): two objects in opposite corners cost a full-frame copy and blend. This
painter touches only each mask's own crop rectangle. A pixel covered by several masks takes the
colour of the smallest (the mask supervision paints last), so each pixel is blended once, with
the stock arithmetic (``cv2.addWeighted`` of a solid colour and the frame) computed over the crop and kept
where the crop's mask wins.
"""

from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np
import supervision as sv
from supervision.annotators.utils import resolve_color
from supervision.detection.compact_mask import CompactMask

from inference_fastpath.adapters.contracts import Verdict
from inference_fastpath.adapters.visualization.painting_contract import FastPainter


class CropMaskPainter(FastPainter):
    """Paints ``detections``' compact masks into a BGR frame as ``annotator.annotate`` would.

    Example:
        >>> painter = CropMaskPainter()
        >>> frame = np.zeros((4, 4, 3), np.uint8)
        >>> masks = np.zeros((1, 4, 4), bool); masks[0, 1:3, 1:3] = True
        >>> boxes = np.array([[1.0, 1, 2, 2]])
        >>> detections = sv.Detections(xyxy=boxes, class_id=np.array([0]),
        ...                            mask=CompactMask.from_dense(masks, boxes, (4, 4)))
        >>> painter(frame, detections, sv.MaskAnnotator(opacity=1.0))[1, 1].tolist()
        [251, 81, 163]
    """

    name = "crops"

    def check(self, scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator,
              copy: bool = False) -> Verdict:
        verdict = super().check(scene, detections, annotator, copy)
        if verdict.reason is None and not copy and not _pixels_in_row_order(scene):  # a copy is in row order
            return Verdict("the frame is a flipped or strided view, which OpenCV cannot paint into in place")
        return verdict

    def run_checked(self, verdict: Verdict, scene: np.ndarray, detections: sv.Detections,
                    annotator: sv.MaskAnnotator, copy: bool = False) -> np.ndarray:
        if copy:
            scene = scene.copy()
        masks = detections.mask
        if masks is None or len(detections) == 0:
            return scene
        height, width = scene.shape[:2]
        order = np.flip(np.argsort(detections.area))  # supervision's painting order: the last one wins
        rects = [_clipped_rect(masks, int(i), height, width) for i in order]
        crops = [masks.crop(int(i))[rect[4]:rect[5], rect[6]:rect[7]] if rect else None
                 for i, rect in zip(order, rects)]
        # every colour first, as supervision resolves them (a lookup that cannot resolve fails before painting)
        colours = [resolve_color(color=annotator.color, detections=detections, detection_idx=int(i),
                                 color_lookup=annotator.color_lookup).as_bgr() for i in order]
        alpha, beta = float(annotator.opacity), 1.0 - float(annotator.opacity)
        overlapping = _overlaps(rects)
        for rank, (colour, rect, crop) in enumerate(zip(colours, rects, crops)):
            if rect is None:
                continue
            won = np.ascontiguousarray(crop)
            for later in rank + 1 + np.flatnonzero(overlapping[rank, rank + 1:]):  # painted after it, over it
                _clear_overlap(won, rect, rects[later], crops[later])
            if not won.any():
                continue
            x0, y0, x1, y1 = rect[:4]
            region = scene[y0:y1, x0:x1]
            # the stock blend itself (cv2.addWeighted of a solid colour image and the frame), over the crop only;
            # OpenCV's vectorised blend beats a per-channel lookup table, and repeating one row is cheaper than a fill
            solid = cv2.repeat(np.array(colour, np.uint8).reshape(1, 1, 3).repeat(x1 - x0, axis=1), y1 - y0, 1)
            cv2.copyTo(cv2.addWeighted(solid, alpha, region, beta, 0), won.view(np.uint8), region)
        return scene


def covered_fraction(masks: CompactMask, image_hw: Tuple[int, int]) -> float:
    """The summed area of the masks' crop rectangles over the frame's area (can exceed 1).

    Example:
        >>> masks = np.zeros((2, 10, 10), bool); masks[:, :5, :5] = True
        >>> boxes = np.array([[0.0, 0, 4, 4]] * 2)
        >>> covered_fraction(CompactMask.from_dense(masks, boxes, (10, 10)), (10, 10))
        0.5
    """
    shapes = masks._crop_shapes.astype(np.int64)
    return float((shapes[:, 0] * shapes[:, 1]).sum()) / float(max(1, image_hw[0] * image_hw[1]))


def _pixels_in_row_order(scene: np.ndarray) -> bool:
    """Whether each row of ``scene`` is its pixels' BGR bytes in order (a crop of a frame is; a flipped view is not)."""
    return scene.strides[2] == scene.itemsize and scene.strides[1] == 3 * scene.itemsize and scene.strides[0] > 0


def _clipped_rect(masks: CompactMask, index: int, height: int, width: int) -> Tuple[int, ...] | None:
    """(x0, y0, x1, y1) in the frame and (cy0, cy1, cx0, cx1) in the crop, clipped; None when outside."""
    x, y = (int(v) for v in masks._offsets[index])
    crop_h, crop_w = (int(v) for v in masks._crop_shapes[index])
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + crop_w), min(height, y + crop_h)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1, y0 - y, y1 - y, x0 - x, x1 - x


def _overlaps(rects: List[Tuple[int, ...] | None]) -> np.ndarray:
    """(N, N) bool: whether the frame rectangles of two crops intersect (False for a crop outside)."""
    boxes = np.array([rect[:4] if rect else (0, 0, 0, 0) for rect in rects], dtype=np.int64).reshape(-1, 4)
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    return (x0 < x1) & (y0 < y1)


def _clear_overlap(won: np.ndarray, rect: Tuple[int, ...], other: Tuple[int, ...] | None,
                   other_crop: np.ndarray | None) -> None:
    """Drop from ``won`` (a crop at ``rect``) the pixels that ``other_crop`` (at ``other``) covers."""
    if other is None:
        return
    x0, y0 = max(rect[0], other[0]), max(rect[1], other[1])
    x1, y1 = min(rect[2], other[2]), min(rect[3], other[3])
    if x0 >= x1 or y0 >= y1:
        return
    mine = won[y0 - rect[1]:y1 - rect[1], x0 - rect[0]:x1 - rect[0]]
    mine &= ~other_crop[y0 - other[1]:y1 - other[1], x0 - other[0]:x1 - other[0]]


__all__: List[str] = ["CropMaskPainter", "covered_fraction"]
