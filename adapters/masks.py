"""Host-side mask helpers shared by the stages and the block output."""

from __future__ import annotations

from typing import Any

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
    # lazy compact masks (the fused postprocess's) are read as the full frame's run edges, whose columns
    # are the frame's height: the 2x2 windows are the crop's, and no crop runs are built
    frame_edges = getattr(masks, "frame_edges", None)
    for index in range(len(masks)):
        if compact:  # decided from the runs; the crop is decoded for a contour only if needed
            if frame_edges is not None:
                l_shape = _edges_have_l_shape(frame_edges(index), masks.shape[1])
            else:
                l_shape = _runs_have_l_shape(masks._rles[index], int(masks._crop_shapes[index][0]))
            keep[index] = l_shape or len(largest_external_contour(masks.crop(index))) >= 3
        else:
            mask = masks[index]
            row = int((xyxy[index, 1] + xyxy[index, 3]) / 2)
            keep[index] = _has_l_shape_near(mask, row) or len(largest_external_contour(mask)) >= 3
    return keep


_FIRST_RUNS = 128  # foreground runs tried first: a large mask shows an L-shape in its first columns


def _runs_have_l_shape(counts: np.ndarray, crop_h: int) -> bool:
    """Whether 3 pixels of some 2x2 window are foreground, from column-major run lengths (background
    first): a run of 2+ pixels within one column whose rows meet foreground in a neighbouring column."""
    return _edges_have_l_shape(np.cumsum(np.asarray(counts, dtype=np.int64)), crop_h)


def _edges_have_l_shape(edges: np.ndarray, column_h: int) -> bool:
    """The rule on run edges (cumulative run lengths, background first) in columns ``column_h`` tall.

    The first runs are tried alone before all of them: their pixels are the mask's own, so an L-shape
    among them is one of the mask, and a large mask need not be read to its end."""
    if edges.size > 2 * _FIRST_RUNS and _l_shape_in_edges(edges[: 2 * _FIRST_RUNS], column_h):
        return True
    return _l_shape_in_edges(edges, column_h)


def _l_shape_in_edges(edges: np.ndarray, crop_h: int) -> bool:
    foreground = len(edges) // 2
    starts, ends = edges[0 : 2 * foreground : 2], edges[1 : 2 * foreground : 2] - 1  # first / last pixel
    if crop_h < 2 or starts.size == 0:
        return False
    first_column, last_column = starts // crop_h, ends // crop_h
    if np.any(last_column - first_column >= 2):  # a whole column, and the pixel above it on the left
        return True
    # per-column pieces of 2+ pixels: runs within one column, and both halves of runs over two columns
    split = (last_column > first_column)
    first = np.concatenate([starts, (first_column[split] + 1) * crop_h])
    last = np.concatenate([np.where(split, (first_column + 1) * crop_h - 1, ends), ends[split]])
    tall = last > first
    if not tall.any():
        return False
    first, last = first[tall], last[tall]
    for shift in (crop_h, -crop_h):  # the same rows, one column right / left
        candidate = np.searchsorted(starts, last + shift, side="right") - 1
        if np.any((candidate >= 0) & (ends[np.maximum(candidate, 0)] >= first + shift)):
            return True
    return False


def _has_l_shape_near(mask: np.ndarray, row: int) -> bool:
    """Whether rows ``row`` and ``row + 1`` hold 3 foreground pixels of one 2x2 window."""
    height = mask.shape[0]
    if height < 2:
        return False
    row = min(max(row, 0), height - 2)
    pair = mask[row : row + 2].view(np.uint8)
    windows = pair[0, :-1] + pair[0, 1:] + pair[1, :-1] + pair[1, 1:]
    return bool(windows.size) and int(windows.max()) >= 3
