"""Host-side mask helpers shared by the stages and the block output."""

from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from inference_fastpath.adapters.postprocess.compact import run_edges


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
    if not isinstance(masks, np.ndarray):  # compact: decided from the runs, a crop decoded only if needed
        # the block's lazy masks are read as the full frame's runs, whose columns are the frame's height:
        # the 2x2 windows are the crop's, and no crop runs are built
        edges, heights, _ = run_edges(masks)
        l_shape = _l_shapes(edges, heights)
        for index in np.flatnonzero(~l_shape):
            keep[index] = len(largest_external_contour(masks.crop(int(index)))) >= 3
        return keep | l_shape
    for index in range(len(masks)):
        mask = masks[index]
        row = int((xyxy[index, 1] + xyxy[index, 3]) / 2)
        keep[index] = _has_l_shape_near(mask, row) or len(largest_external_contour(mask)) >= 3
    return keep


_FIRST_RUNS = 128  # foreground runs tried first: a large mask shows an L-shape in its first columns


def _runs_have_l_shape(counts: np.ndarray, crop_h: int) -> bool:
    """Whether 3 pixels of some 2x2 window are foreground, from column-major run lengths (background
    first): a run of 2+ pixels within one column whose rows meet foreground in a neighbouring column."""
    return bool(_l_shapes([np.cumsum(np.asarray(counts, dtype=np.int64))], [crop_h])[0])


def _l_shapes(edges: Sequence[np.ndarray], column_heights: Sequence[int]) -> np.ndarray:
    """(N,) bool: the rule for N masks at once, each given as run edges (cumulative run lengths,
    background first) in columns ``column_heights[i]`` tall.

    The first runs are tried alone before all of them: their pixels are the mask's own, so an L-shape
    among them is one of the mask, and a large mask need not be read to its end."""
    # widened to int64 only where read (the masks are laid end to end past int32), the first runs first
    edges = [np.asarray(e) for e in edges]
    heights = np.asarray(column_heights, dtype=np.int64).reshape(-1)
    found = _l_shapes_in_edges([e[: 2 * _FIRST_RUNS].astype(np.int64) for e in edges], heights)
    longer = np.array([e.size > 2 * _FIRST_RUNS for e in edges], dtype=bool).reshape(-1)
    rest = np.flatnonzero(~found & longer)
    if rest.size:
        found[rest] = _l_shapes_in_edges([edges[i].astype(np.int64) for i in rest], heights[rest])
    return found


def _l_shapes_in_edges(edges: Sequence[np.ndarray], heights: np.ndarray) -> np.ndarray:
    """The rule on every run of N masks in one pass. The masks' positions are laid end to end with a gap
    wider than a column on either side, so a lookup one column left or right never reaches another mask."""
    count = len(edges)
    found = np.zeros(count, dtype=bool)
    pairs = [e[: 2 * (e.size // 2)] for e in edges]  # a trailing edge closes a background run
    runs_per_mask = np.array([p.size // 2 for p in pairs], dtype=np.int64).reshape(-1)
    if runs_per_mask.sum() == 0:
        return found
    owner = np.repeat(np.arange(count), runs_per_mask)
    flat = np.concatenate(pairs)
    starts, ends = flat[0::2], flat[1::2] - 1  # first / last pixel of each run, per mask
    height = heights[owner]
    first_column, last_column = starts // height, ends // height
    # a whole column, and the pixel above it on the left (only masks at least 2 rows tall)
    found[owner[(last_column - first_column >= 2) & (height >= 2)]] = True
    # per-column pieces of 2+ pixels: runs within one column, and both halves of runs over two columns
    split = last_column > first_column
    first = np.concatenate([starts, (first_column[split] + 1) * height[split]])
    last = np.concatenate([np.where(split, (first_column + 1) * height - 1, ends), ends[split]])
    piece_owner = np.concatenate([owner, owner[split]])
    # masks one row tall have no 2x2 window; runs over 3+ columns decided their masks above
    tall = (last > first) & (heights[piece_owner] >= 2)
    first, last, piece_owner = first[tall], last[tall], piece_owner[tall]
    span = int(flat.max()) + 2 * int(heights.max()) + 2
    base = piece_owner * span
    laid_starts, laid_ends = starts + owner * span, ends + owner * span  # ascending, as each mask's are
    for sign in (1, -1):  # the same rows, one column right / left
        shift = sign * heights[piece_owner] + base
        candidate = np.searchsorted(laid_starts, last + shift, side="right") - 1
        meets = (candidate >= 0) & (laid_ends[np.maximum(candidate, 0)] >= first + shift)
        found[piece_owner[meets]] = True
    return found


def _has_l_shape_near(mask: np.ndarray, row: int) -> bool:
    """Whether rows ``row`` and ``row + 1`` hold 3 foreground pixels of one 2x2 window."""
    height = mask.shape[0]
    if height < 2:
        return False
    row = min(max(row, 0), height - 2)
    pair = mask[row : row + 2].view(np.uint8)
    windows = pair[0, :-1] + pair[0, 1:] + pair[1, :-1] + pair[1, 1:]
    return bool(windows.size) and int(windows.max()) >= 3
