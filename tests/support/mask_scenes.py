"""Compact-mask scenes for the mask painters' tests: the grid of mask kinds the issue names."""

from __future__ import annotations

import numpy as np
import supervision as sv
from supervision.detection.compact_mask import CompactMask

MASK_KINDS = ["empty", "full", "one_pixel", "overlapping", "noise"]


def compact_detections(masks: np.ndarray, class_id=None) -> sv.Detections:
    """Detections whose boxes are the masks' extents and whose ``mask`` is a CompactMask of them."""
    n, height, width = masks.shape
    boxes = np.zeros((n, 4))
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max()) if ys.size else (0, 0, 0, 0)
    class_id = np.arange(n) if class_id is None else np.asarray(class_id)
    return sv.Detections(xyxy=boxes, class_id=class_id, mask=CompactMask.from_dense(masks, boxes, (height, width)))


def frame_transitions(mask: np.ndarray) -> np.ndarray:
    """Column-major positions where a (H, W) mask changes value, the pixel before the first counting as
    background: what the fused postprocess's device program copies back per mask."""
    flat = mask.ravel(order="F").astype(np.int8)
    return np.flatnonzero(flat != np.concatenate([[0], flat[:-1]])).astype(np.int32)  # the device's dtype


def lazy_compact_detections(masks: np.ndarray, class_id=None) -> sv.Detections:
    """:func:`compact_detections` whose ``mask`` is the fused postprocess's lazy compact masks."""
    from inference_fastpath.adapters.postprocess.compact import LazyCompactMasks

    reference = compact_detections(masks, class_id)
    lazy = LazyCompactMasks([frame_transitions(m) for m in masks], *masks.shape[1:])
    return sv.Detections(xyxy=reference.xyxy, class_id=reference.class_id, mask=lazy)


def mask_stack(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) bool masks of one of ``MASK_KINDS``."""
    if kind == "empty":
        return np.zeros((2, height, width), bool)
    if kind == "full":
        return np.ones((1, height, width), bool)
    if kind == "one_pixel":
        masks = np.zeros((3, height, width), bool)
        for m in masks:
            m[rng.integers(0, height), rng.integers(0, width)] = True
        return masks
    if kind == "overlapping":
        masks = np.zeros((4, height, width), bool)
        for m in masks:
            y, x = rng.integers(0, height), rng.integers(0, width)
            m[y : y + rng.integers(1, height + 1), x : x + rng.integers(1, width + 1)] = True
        return masks
    if kind == "noise":  # many short runs: a few hundred kernel programs, even under the interpreter
        masks = np.zeros((3, height, width), bool)
        masks[:, : min(height, 24), : min(width, 24)] = rng.random((3, min(height, 24), min(width, 24))) < 0.3
        return masks
    raise ValueError(kind)


def stock_picture(scene: np.ndarray, detections: sv.Detections, annotator: sv.MaskAnnotator) -> np.ndarray:
    """What the stock block paints: supervision's annotator on full-frame dense masks."""
    dense = sv.Detections(xyxy=detections.xyxy, class_id=detections.class_id,
                          mask=np.asarray(detections.mask.to_dense()) if detections.mask is not None else None)
    return annotator.annotate(scene=scene.copy(), detections=dense)
