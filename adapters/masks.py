"""Host-side mask helpers shared by the stages and the block output."""

from __future__ import annotations

from typing import Any, Optional

import cv2
import numpy as np


def largest_external_contour(mask: np.ndarray) -> np.ndarray:
    """The external contour with the most points (``CHAIN_APPROX_SIMPLE``), as (K, 2) float32.

    This is what the stock inference server sends as a detection's polygon; empty masks give (0, 2).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), dtype=np.float32)
    longest = max(contours, key=len)
    return longest.reshape(-1, 2).astype(np.float32)


def survives_polygon_step(masks: Any, xyxy: np.ndarray) -> np.ndarray:
    """(N,) bool: which masks the stock v3 block keeps (dense ``(N, H, W)`` or a ``CompactMask``).

    Stock turns each mask into its largest external contour and drops detections whose polygon
    has fewer than 3 points (empty masks, single pixels, straight 1-pixel lines). A mask with 3
    pixels of one 2x2 window has a component that is not a straight line, hence such a polygon;
    two rows through the box centre (the crop's middle for compact masks) usually show one, so the
    contour is traced only for the rest.

    Example:
        >>> masks = np.zeros((2, 4, 4), bool); masks[0, 1:3, 1:3] = True; masks[1, 2, :] = True
        >>> survives_polygon_step(masks, np.array([[1, 1, 3, 3], [0, 2, 4, 3]], float)).tolist()
        [True, False]
    """
    keep = np.zeros(len(masks), dtype=bool)
    compact = not isinstance(masks, np.ndarray)
    for index in range(len(masks)):
        if compact:  # two middle columns decoded from the runs; the crop's contour only if needed
            columns = _middle_columns(masks, index)
            keep[index] = (columns is not None and _has_l_shape_near(columns, 0)) or len(
                largest_external_contour(masks.crop(index))) >= 3
        else:
            mask = masks[index]
            row = int((xyxy[index, 1] + xyxy[index, 3]) / 2)
            keep[index] = _has_l_shape_near(mask, row) or len(largest_external_contour(mask)) >= 3
    return keep


def _middle_columns(masks: Any, index: int) -> Optional[np.ndarray]:
    """(2, crop_h) bool: the two middle columns of a compact mask's crop, from its column-major runs."""
    crop_h, crop_w = (int(v) for v in masks._crop_shapes[index])
    if crop_w < 2:
        return None
    low = (crop_w - 1) // 2 * crop_h
    high = low + 2 * crop_h
    counts = np.asarray(masks._rles[index], dtype=np.int64)
    ends = np.cumsum(counts)
    begins = ends - counts
    columns = np.zeros(high - low, dtype=bool)
    for run in range(int(np.searchsorted(ends, low, side="right")), int(np.searchsorted(begins, high))):
        if run % 2:  # odd runs are foreground (the runs start with background)
            columns[max(begins[run], low) - low : min(ends[run], high) - low] = True
    return columns.reshape(2, crop_h)


def _has_l_shape_near(mask: np.ndarray, row: int) -> bool:
    """Whether rows ``row`` and ``row + 1`` hold 3 foreground pixels of one 2x2 window."""
    height = mask.shape[0]
    if height < 2:
        return False
    row = min(max(row, 0), height - 2)
    pair = mask[row : row + 2].view(np.uint8)
    windows = pair[0, :-1] + pair[0, 1:] + pair[1, :-1] + pair[1, 1:]
    return bool(windows.size) and int(windows.max()) >= 3
